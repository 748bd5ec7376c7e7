"""Webhooks: a job's news POSTed to the client's URL, signed, queued, and never to an internal address.

A job may name a `webhook_url` and the `webhook_events` it wants (started,
preview, completed). Where a job reaches one of those moments (the worker's
bridge for started, previews and its final states; the API's cancel of a
queued job; the reaper's worker_lost failures) `enqueue` adds an RQ job to the
delivery queue, `<BAILAN_QUEUE_NAME>-webhooks`, in the same Redis transaction
as the state it reports. Deliveries are Redis data, so they outlive a restart
of the API, of the GPU workers and of the delivery process itself.

The delivery process, `python -m bailan.webhooks` (started by `make run` and
in docker-compose; no GPU), is an RQ worker on that queue with RQ's scheduler,
which runs `completed` deliveries again after BAILAN_WEBHOOK_RETRY_INTERVALS_S
while BAILAN_WEBHOOK_RETRIES are left. It runs `app.webhooks.deliver`, named by
string like worker.slots.run_job, because the body is the API's job view.

Each POST is signed per Standard Webhooks (https://www.standardwebhooks.com):
`webhook-id`, `webhook-timestamp` and `webhook-signature` = `v1,` + base64
HMAC-SHA256 of `id.timestamp.body`, keyed by BAILAN_WEBHOOK_SECRET.

Addresses: a URL's host is resolved once, every address it resolves to must
be public (`is_public`) unless the host is in BAILAN_WEBHOOK_ALLOW_HOSTS, and
the connection goes to that checked address (`PinnedTransport`), with the
original name in the Host header and TLS SNI, so a DNS answer that changes
between the check and the connect (rebinding) cannot reach an internal
service. Redirects are never followed. Like the rest of bailan/, no torch.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import redis
from rq import Queue, Retry
from rq.serializers import JSONSerializer
from standardwebhooks import Webhook

# The request's side of webhooks lives in the contract, which the client imports too.
from bailan.jobs import URL_HARD_MAX_CHARS, WebhookEvent, check_url  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from bailan.jobs import JobParams
    from bailan.settings import SharedSettings

log = logging.getLogger("bailan.webhooks")

# The delivery function, named by string: bailan/ never imports app/.
DELIVER_FUNC = "app.webhooks.deliver"
SECRET_PREFIX = "whsec_"
class WebhookRefused(Exception):
    """The URL's address is internal and its host not allow-listed, or it cannot be resolved."""


class DeliveryFailed(Exception):
    """The receiver answered, but not with a 2xx (a redirect counts as a failure)."""


# ---------------------------------------------------------------- addresses


def host_of(url: str) -> str:
    """The URL's host as compared with the allow list: lower case, no brackets, no trailing dot."""
    return (urlsplit(url).hostname or "").rstrip(".").lower()


def is_public(address: str) -> bool:
    """Whether an IP address is a public unicast one: not loopback, private, link-local,
    multicast, reserved, unspecified, shared (CGNAT) or another special-purpose block."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:
        ip = ip.sixtofour  # 2002:c0a8:101:: carries 192.168.1.1 to whoever relays 6to4
    # is_site_local: fec0::/10, deprecated but still routed inside some networks, and "global" to ipaddress.
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local))


# What the C resolver also reads as an IPv4 address: 2130706433, 0x7f.1, 127.1, 017700000001.
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")


def literal_address(host: str) -> str | None:
    """`host` as an IP address when it is one written out, else None: in any form the
    resolver takes for one, so `http://2130706433/` is 127.0.0.1 here as at connect."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host):
        try:
            return str(ipaddress.IPv4Address(socket.inet_aton(host)))
        except OSError:
            return None
    return None


def check_submitted(url: str, allow_hosts: Iterable[str]) -> None:
    """The submit-time check: an internal address written out in the URL is refused at once.

    Names are not resolved here (the API does not wait for DNS); `resolve` checks
    them when each delivery connects, which is the check that counts.
    """
    host = host_of(url)
    if host in set(allow_hosts):
        return
    address = literal_address(host)
    if address is not None and not is_public(address):
        raise ValueError(
            f"{address} is not a public address (loopback, private, link-local or otherwise internal); "
            "an operator may allow its host with BAILAN_WEBHOOK_ALLOW_HOSTS"
        )


def resolve(host: str, port: int, allow_hosts: Iterable[str]) -> str:
    """The one address to connect to for `host`: every address it resolves to must pass."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WebhookRefused(f"cannot resolve {host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not addresses:
        raise WebhookRefused(f"{host} resolves to no address")
    if host.rstrip(".").lower() not in set(allow_hosts):
        # Every address, not just the first: a name with one public and one
        # internal address must not reach the internal one on a retry.
        internal = [a for a in addresses if not is_public(a)]
        if internal:
            raise WebhookRefused(
                f"{host} resolves to {', '.join(internal)}, not a public address; "
                "allow the host with BAILAN_WEBHOOK_ALLOW_HOSTS if it is meant"
            )
    return addresses[0]


class PinnedTransport(httpx.BaseTransport):
    """httpx's transport, connecting to the address `resolve` vetted and to no other.

    The request's URL gets that IP as its host; the Host header (set by httpx
    from the original URL) and the TLS server name (httpcore's sni_hostname
    extension, also what the certificate is checked against) keep the name.
    """

    def __init__(self, allow_hosts: Iterable[str], inner: httpx.BaseTransport | None = None) -> None:
        self.allow_hosts = frozenset(h.lower() for h in allow_hosts)
        self.inner = inner if inner is not None else httpx.HTTPTransport(retries=0)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        address = resolve(host, port, self.allow_hosts)
        request.url = request.url.copy_with(host=address)
        if request.url.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": host}
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------- signing


def secret_key(secret: str) -> bytes:
    """The HMAC key: a `whsec_` secret is base64 (the standard's form); any other string is its UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be followed by base64") from None
    else:
        key = secret.encode("utf-8")
    if len(key) < 16:
        raise ValueError("must be at least 16 bytes of key (24 base64 characters after whsec_)")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The three Standard Webhooks headers for `body`."""
    when = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": Webhook(key).sign(message_id, when, body),
    }


# ---------------------------------------------------------------- enqueue


def queue_name(base: str) -> str:
    """The delivery queue of the job queue `base`."""
    return f"{base}-webhooks"


@dataclass(frozen=True)
class Policy:
    """How deliveries are queued: where, how often `completed` is retried, how long results stay."""

    queue: str
    retries: int
    intervals: tuple[int, ...]
    timeout_s: float
    keep_s: int

    @classmethod
    def defaults(cls, base: str, keep_s: int) -> Policy:
        """The documented defaults, for callers given no settings (tests, tools)."""
        from bailan.settings import SharedSettings

        return cls.of(SharedSettings.model_construct(queue_name=base, result_ttl_s=keep_s))

    @classmethod
    def of(cls, settings: SharedSettings) -> Policy:
        return cls(
            queue=queue_name(settings.queue_name),
            retries=settings.webhook_retries,
            intervals=tuple(settings.webhook_retry_intervals_s),
            timeout_s=settings.webhook_timeout_s,
            keep_s=settings.result_ttl_s,
        )


def body_key(message_id: str) -> str:
    """String: the body a delivery sent first, sent again by its retries (app.webhooks)."""
    return f"bailan:webhook:{message_id}"


def message_id(job_id: str, event: WebhookEvent, step: int | None = None, attempt: str | None = None) -> str:
    """The delivery's id: RQ's job id and the `webhook-id` header, the same on every retry.
    `attempt` tells a run of the job from another (a job requeued after its worker died
    starts again): its started and preview news are new, not repeats to drop."""
    return (f"msg_{job_id}_{event.value}" + (f"_{step}" if step is not None else "")
            + (f"_a{attempt}" if attempt else ""))


def wanted(params: JobParams | None, event: WebhookEvent) -> bool:
    return params is not None and params.webhook_url is not None and event in params.webhook_events


def transaction(conn: redis.Redis) -> Any:
    """A MULTI/EXEC pipeline, explicitly in MULTI from its first command: RQ's enqueue
    calls multi() on a pipeline that is not, which fails once it holds commands."""
    pipe = conn.pipeline(transaction=True)
    pipe.multi()
    return pipe


def retry_intervals(policy: Policy) -> list[int]:
    """The wait before each retry, one per retry, the last interval repeating: RQ reads its list
    from the end (retry k of n waits intervals[len - (n - k + 1)]), so a list of another length
    than the retries ran off by as many places (3 retries waited 1800, 3600, 7200 s)."""
    given = list(policy.intervals)
    return [given[min(i, len(given) - 1)] for i in range(policy.retries)] if given else []


def enqueue(
    conn: redis.Redis,
    pipe: Any,
    policy: Policy,
    job_id: str,
    event: WebhookEvent,
    params: JobParams | None,
    step: int | None = None,
    attempt: str | None = None,
) -> bool:
    """Queue one delivery on `pipe` (a `transaction`, executed by the caller with the state it
    reports), if `params` asked for it; `attempt` names the run (message_id)."""
    if not wanted(params, event):
        return False
    retry = None
    if event is WebhookEvent.completed and policy.retries > 0:
        retry = Retry(max=policy.retries, interval=retry_intervals(policy) or 0)
    mid = message_id(job_id, event, step, attempt)
    pipe.delete(body_key(mid))  # a job started again is news again, not the old body
    Queue(policy.queue, connection=conn, serializer=JSONSerializer).enqueue_call(
        func=DELIVER_FUNC,
        args=(job_id, event.value, step),
        job_id=mid,
        # The whole delivery, connect to last byte, plus room for the job's own reads.
        timeout=int(policy.timeout_s) * 2 + 10,
        result_ttl=policy.keep_s,
        failure_ttl=policy.keep_s,
        retry=retry,
        pipeline=pipe,
    )
    return True


def enqueue_completed(conn: redis.Redis, pipe: Any, policy: Policy, job_ids: Sequence[str]) -> None:
    """Queue `completed` deliveries for jobs whose params are only in their records (the reaper's case)."""
    from bailan.jobs import JobParams, Keys, RecordField

    raws = conn.pipeline(transaction=False)
    for job_id in job_ids:
        raws.hget(Keys.job(job_id), RecordField.params)
    for job_id, raw in zip(job_ids, raws.execute()):
        if not raw:
            continue
        try:
            params = JobParams.model_validate_json(raw)
        except ValueError:
            continue
        enqueue(conn, pipe, policy, job_id, WebhookEvent.completed, params)


# ---------------------------------------------------------------- the delivery process


def main(argv: Sequence[str] | None = None) -> int:
    """Run the delivery worker: `python -m bailan.webhooks`."""
    import sys

    from pydantic import ValidationError
    from rq import SimpleWorker

    from bailan.logs import configure as configure_logging
    from bailan.settings import SharedSettings

    try:
        settings = SharedSettings()
    except ValidationError as exc:
        print(f"bailan.webhooks: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    # As the API and the workers log: BAILAN_LOG_FORMAT=json gives one JSON object a line.
    configure_logging(settings.log_format)
    if settings.webhook_secret is None:
        log.warning("BAILAN_WEBHOOK_SECRET is unset: the API refuses webhook_url, so nothing will be delivered")
    conn = redis.Redis.from_url(settings.redis_url)
    name = queue_name(settings.queue_name)
    # SimpleWorker: a delivery is a short HTTP call, not worth a fork each. The
    # scheduler moves retries whose interval has passed back onto the queue.
    worker = SimpleWorker([name], connection=conn, serializer=JSONSerializer)
    log.info("delivering webhooks from queue %s", name)
    worker.work(with_scheduler=True, logging_level="WARNING")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
