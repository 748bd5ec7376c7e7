"""Webhooks: signed deliveries to a real local HTTP receiver, queued in real Redis.

The first tests run the API in-process (TestClient) and deliver with an RQ
SimpleWorker in burst mode, the code `python -m bailan.webhooks` runs; the
last ones run the whole service (API, worker and delivery processes) as
tests/test_e2e.py does. The receiver listens on 127.0.0.1, which only
BAILAN_WEBHOOK_ALLOW_HOSTS lets a webhook reach.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from rq import SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer
from standardwebhooks import Webhook

from app import webhooks as delivery
from app.main import create_app
from app.settings import ApiSettings
from bailan import webhooks
from bailan.reaper import Reaper
from bailan.settings import SharedSettings
from bailan.jobs import JobParams
from bailan.webhooks import DeliveryFailed, WebhookEvent, WebhookRefused
from tests.test_api import QUEUE, make_settings, start_job
from tests.test_e2e import Service, start, stop, wait_for

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int
    at: float = 0.0  # time.monotonic() when it arrived


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1: records every request; `plan` says what a path answers."""

    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    plan: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses to answer first, then 200
    delay: dict[str, float] = field(default_factory=dict)  # path -> seconds to wait before answering
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def to(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            rec = holder["r"]
            with rec.lock:
                planned = rec.plan.get(self.path, [])
                status = planned.pop(0) if planned else 200
                rec.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                             body, status, time.monotonic()))
                delay = rec.delay.get(self.path, 0.0)
            time.sleep(delay)
            self.send_response(status)
            if status == 302:
                self.send_header("Location", "/target")
            if self.path == "/big-answer":
                # 64 MB over about 6 s, as a receiver that answers with a flood would.
                chunk = b"x" * 2**20
                self.send_header("Content-Length", str(64 * len(chunk)))
                self.end_headers()
                try:
                    for _ in range(64):
                        self.wfile.write(chunk)
                        time.sleep(0.1)
                except OSError:
                    pass  # the sender hung up: what is guarded
                return
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = rec = Receiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


def verified(received: Received) -> dict[str, Any]:
    """The body, once standardwebhooks accepts its signature (raises if not)."""
    return Webhook(SECRET).verify(received.body, received.headers)


# ---------------------------------------------------------------- pure parts


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
                                     "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "ff02::1", "::",
                                     "2002:c0a8:101::1",  # 6to4 carrying 192.168.1.1: was public
                                     "fec0::1", "fee0::1"])  # IPv6 site-local (deprecated, still internal): was public
def test_internal_addresses_are_not_public(address: str) -> None:
    """Guards: an internal, link-local, multicast or reserved block reachable by a webhook."""
    assert not webhooks.is_public(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_public(address: str) -> None:
    """Guards: the guard refusing ordinary internet receivers."""
    assert webhooks.is_public(address)


@pytest.mark.parametrize("secret", [SECRET, "a plain secret of some length"])
def test_signature_verifies_with_standardwebhooks(secret: str) -> None:
    """Guards: a signature receivers' Standard Webhooks libraries reject (wrong key form or signed
    string), verified as the README tells receivers to (a plain-string secret as its bytes: the
    README once showed Webhook(secret) for it, which the library reads as base64 and rejects)."""
    key = webhooks.secret_key(secret)
    body = '{"type":"job.completed"}'
    headers = webhooks.sign(key, "msg_1", int(time.time()), body)
    assert headers["webhook-signature"].startswith("v1,")
    receiver = Webhook(secret) if secret.startswith("whsec_") else Webhook(secret.encode())
    assert receiver.verify(body, headers) == {"type": "job.completed"}
    with pytest.raises(Exception):
        receiver.verify(body.replace("completed", "failed"), headers)


@pytest.mark.parametrize("secret", ["whsec_not*base64", "short"])
def test_unusable_secret_stops_start_up(secret: str) -> None:
    """Guards: a malformed BAILAN_WEBHOOK_SECRET found only at the first delivery."""
    with pytest.raises(ValueError, match="webhook_secret"):
        SharedSettings(webhook_secret=secret)


def test_the_sender_logs_in_the_configured_format(redis_url: str, tmp_path: Path) -> None:
    """Guards: `python -m bailan.webhooks` logging plain text under BAILAN_LOG_FORMAT=json, which
    the API and the workers honour (a log pipeline then cannot parse its lines)."""
    env = {"BAILAN_REDIS_URL": redis_url, "BAILAN_QUEUE_NAME": "logfmt", "BAILAN_LOG_FORMAT": "json"}
    sender = start(["-m", "bailan.webhooks"], env, tmp_path / "sender.log")
    try:
        # Its first line: no secret set, so nothing will be delivered.
        line = wait_for(lambda: (text := (tmp_path / "sender.log").read_text()) and text.splitlines()[0], 30,
                        "the sender's first log line")
        record = json.loads(line)
        assert "BAILAN_WEBHOOK_SECRET is unset" in record["message"] and record["level"] == "WARNING"
    finally:
        stop(sender)


# ---------------------------------------------------------------- submit-time checks


def api_settings(redis_url: str, **overrides: Any) -> ApiSettings:
    return make_settings(redis_url, **{"webhook_secret": SECRET, "webhook_retries": 0, "abandoned_retries": 0,
                                       **overrides})


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"webhook_url": "http://10.0.0.1/hook"}, "webhook_url", "not a public address"),
        ({"webhook_url": "http://127.0.0.1:9/hook"}, "webhook_url", "not a public address"),
        ({"webhook_url": "http://[::1]/hook"}, "webhook_url", "not a public address"),
        # What the resolver also reads as 127.0.0.1 was taken at submit (delivery refused it later).
        ({"webhook_url": "http://2130706433/hook"}, "webhook_url", "127.0.0.1 is not a public address"),
        ({"webhook_url": "http://0x7f.1/hook"}, "webhook_url", "127.0.0.1 is not a public address"),
        ({"webhook_url": "http://127.1/hook"}, "webhook_url", "127.0.0.1 is not a public address"),
        ({"webhook_url": "http://017700000001/hook"}, "webhook_url", "127.0.0.1 is not a public address"),
        ({"webhook_url": "https://user:pw@example.com/hook"}, "webhook_url", "credentials"),
        ({"webhook_url": "ftp://example.com/hook"}, "webhook_url", "http"),
        ({"webhook_url": "https://example.com/" + "a" * 100}, "webhook_url", "at most 64"),
        ({"webhook_url": "https://example.com/", "webhook_events": ["finished"]}, "webhook_events", "started"),
        ({"webhook_url": "https://example.com/", "webhook_events": ["preview", "preview"]},
         "webhook_events", "at most once"),
    ],
)
def test_bad_webhook_fields_get_422_naming_the_field(
    redis_url: str, redis_conn: redis.Redis, body: dict[str, Any], field: str, says: str
) -> None:
    """Guards: an internal address, credentials or a bad event accepted (or a 500) at submit."""
    with TestClient(create_app(api_settings(redis_url, webhook_url_max_chars=64))) as client:
        response = client.post("/v1/jobs", json={"prompt": "a lighthouse", **body})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(field in e["loc"] and says in e["msg"] for e in errors), errors


def test_webhook_url_refused_while_no_secret_is_set(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: jobs accepted with a webhook the server cannot sign (and so never sends)."""
    with TestClient(create_app(api_settings(redis_url, webhook_secret=None))) as client:
        response = client.post("/v1/jobs", json={"prompt": "x", "webhook_url": "https://example.com/"})
    assert response.status_code == 422
    assert "BAILAN_WEBHOOK_SECRET" in response.text


# ---------------------------------------------------------------- delivery, in-process


@pytest.fixture
def delivery_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The delivery side's settings (read from the environment, as the process reads them)."""
    monkeypatch.setenv("BAILAN_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("BAILAN_WEBHOOK_ALLOW_HOSTS", "127.0.0.1")
    monkeypatch.setenv("BAILAN_WEBHOOK_TIMEOUT_S", "5")
    delivery.settings.cache_clear()
    yield
    delivery.settings.cache_clear()


def deliver_queued(conn: redis.Redis) -> None:
    """What `python -m bailan.webhooks` does, until its queue is empty."""
    SimpleWorker([webhooks.queue_name(QUEUE)], connection=conn, serializer=JSONSerializer).work(burst=True)


def test_cancel_of_queued_job_delivers_canceled_view(
    redis_url: str, redis_conn: redis.Redis, receiver: Receiver, delivery_env: None
) -> None:
    """Guards: a job canceled while queued (the API ends it, no worker ever sees it) never reported,
    and a delivery queued while no delivery process runs being lost."""
    settings = api_settings(redis_url, webhook_allow_hosts="127.0.0.1")
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/jobs", json={"prompt": "x", "webhook_url": receiver.url("/canceled")}).json()
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        view = client.get(f"/v1/jobs/{job['id']}").json()
    assert view["status"] == "canceled"
    assert receiver.to("/canceled") == []  # queued in Redis, not sent by the API
    deliver_queued(redis_conn)
    [received] = receiver.to("/canceled")
    payload = verified(received)
    assert received.headers["webhook-id"] == f"msg_{job['id']}_completed"
    assert payload["type"] == "job.completed"
    assert payload["data"]["status"] == "canceled" and payload["data"]["id"] == job["id"]
    assert payload["data"]["finished_at"] == view["finished_at"]


@pytest.mark.parametrize(("retries", "waits"), [(3, [10, 30, 60]), (10, [10, 30, 60, 300, 900, 1800, 3600, 7200,
                                                                         7200, 7200])])
def test_retries_wait_the_documented_intervals(
    redis_url: str, redis_conn: redis.Redis, receiver: Receiver, retries: int, waits: list[int]
) -> None:
    """Guards against retries that waited other intervals than BAILAN_WEBHOOK_RETRY_INTERVALS_S
    says: RQ reads its interval list from the end, so with 3 retries the waits were 1800,
    3600 and 7200 s, and with 10 the first interval repeated instead of the last. Read as
    RQ reads them, from the queued delivery."""
    settings = api_settings(redis_url, webhook_allow_hosts="127.0.0.1", webhook_retries=retries)
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/jobs", json={"prompt": "x", "webhook_url": receiver.url("/waits")}).json()
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    delivery = Job.fetch(f"msg_{job['id']}_completed", connection=redis_conn, serializer=JSONSerializer)
    seen = []
    for left in range(retries, 0, -1):  # retry 1 happens with all of them left
        delivery.retries_left = left
        seen.append(delivery.get_retry_interval())
    assert seen == waits


def test_worker_lost_failure_is_delivered(
    redis_url: str, redis_conn: redis.Redis, receiver: Receiver, delivery_env: None
) -> None:
    """Guards: a job the reaper fails (its worker died, so no worker reports it) never reported."""
    settings = api_settings(redis_url, webhook_allow_hosts="127.0.0.1")
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/jobs", json={"prompt": "x", "webhook_url": receiver.url("/lost")}).json()
    start_job(redis_conn, job["id"], execution_score=time.time() - 100)
    assert Reaper(redis_conn, QUEUE, 1, hooks=webhooks.Policy.of(settings)).sweep() == [job["id"]]
    deliver_queued(redis_conn)
    [received] = receiver.to("/lost")
    data = verified(received)["data"]
    assert data["status"] == "failed" and data["error"]["code"] == "worker_lost"


def test_name_resolving_to_loopback_is_refused_at_connect(receiver: Receiver, delivery_env: None) -> None:
    """Guards: the address check done on the URL's text only, so a name that resolves to an
    internal address (or is rebound to one after submit) reaches it."""
    config = delivery.settings()
    url = receiver.url("/sneaky", host="localhost")
    webhooks.check_submitted(url, config.webhook_allow_hosts)  # a name passes at submit...
    with pytest.raises(WebhookRefused, match="not a public address"):
        delivery.send(url, "msg_x", "{}", config)  # ...and is refused where it connects
    assert receiver.to("/sneaky") == []
    # Allow-listed by name, the same URL goes through, to the vetted address, under its own name.
    allowed = config.model_copy(update={"webhook_allow_hosts": ["localhost"]})
    assert delivery.send(url, "msg_x", "{}", allowed) == 200
    [received] = receiver.to("/sneaky")
    assert received.headers["host"] == f"localhost:{receiver.port}"


def test_pinned_transport_connects_to_the_address_it_checked(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: DNS rebinding: the transport resolving the name again when it connects, after the
    check, so a second answer (an internal address) is the one it reaches."""
    import socket

    answers = iter(["127.0.0.1", "10.255.255.1"])  # checked answer, then a rebound one
    real = socket.getaddrinfo

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            return real(next(answers), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    config = SharedSettings(webhook_secret=SECRET, webhook_allow_hosts="rebind.test", webhook_timeout_s=2)
    # Had the connection resolved the name itself, it would get 10.255.255.1 and time out.
    assert delivery.send(f"http://rebind.test:{receiver.port}/rebind", "msg_r", "{}", config) == 200
    assert receiver.to("/rebind")[0].headers["host"] == f"rebind.test:{receiver.port}"


def test_redirect_is_not_followed(receiver: Receiver, delivery_env: None) -> None:
    """Guards: a receiver's 3xx followed, which would let a public host send us to an internal one."""
    receiver.plan["/redirect"] = [302]
    with pytest.raises(DeliveryFailed, match="302"):
        delivery.send(receiver.url("/redirect"), "msg_y", "{}", delivery.settings())
    assert len(receiver.to("/redirect")) == 1
    assert receiver.to("/target") == []


def test_a_receivers_answer_is_not_read(receiver: Receiver, delivery_env: None) -> None:
    """Guards against a receiver flooding the sender: its answer's body was read whole (and
    gzip unpacked), so any address a client names could fill the memory of the process that
    delivers everyone's webhooks. Only the status is read, and nothing is asked compressed."""
    started = time.monotonic()
    assert delivery.send(receiver.url("/big-answer"), "msg_big", "{}", delivery.settings()) == 200
    assert time.monotonic() - started < 3  # not the 6 s the whole answer takes
    assert receiver.to("/big-answer")[0].headers["accept-encoding"] == "identity"


# ---------------------------------------------------------------- the whole service


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with redis.Redis.from_url(redis_url) as conn:
        conn.flushdb()
    tmp = tmp_path_factory.mktemp("hooks")
    svc = Service(redis_url, tiny_model_dir, tmp, queue="hooks",
                  BAILAN_WEBHOOK_SECRET=SECRET, BAILAN_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
                  BAILAN_WEBHOOK_RETRIES="3", BAILAN_WEBHOOK_RETRY_INTERVALS_S="1",
                  BAILAN_WEBHOOK_TIMEOUT_S="5")
    svc.add_worker()
    # Two senders, as `make run` starts them (BAILAN_WEBHOOK_SENDERS).
    senders = [start(["-m", "bailan.webhooks"], svc.env, tmp / f"webhooks-{i}.log") for i in range(2)]
    svc.wait_ready()
    yield svc
    for sender in senders:
        stop(sender)
    svc.close()
    with redis.Redis.from_url(redis_url) as conn:
        conn.flushdb()


def test_signed_started_preview_and_completed_deliveries(service: Service, receiver: Receiver) -> None:
    """Guards: the whole path: worker -> delivery queue -> delivery process -> signed POST, with the
    completed delivery carrying the same final view as GET /v1/jobs/{id}."""
    job = service.submit(width=32, height=32, steps=6, preview_every=3, seed=1, webhook_url=receiver.url("/ok"),
                         webhook_events=["started", "preview", "completed"])
    assert job["params"]["webhook_url"] == receiver.url("/ok")
    final = service.wait_status(job["id"], {"succeeded", "failed", "canceled"})
    assert final["status"] == "succeeded"

    def types() -> list[str]:
        return [verified(r)["type"] for r in receiver.to("/ok")]

    # Two senders deliver concurrently: the started delivery may land after the completed one.
    wait_for(lambda: {"job.started", "job.completed"} <= set(types()), 30, "the started and completed deliveries")
    payloads = {verified(r)["type"] + str(verified(r)["data"].get("step", "")): verified(r)
                for r in receiver.to("/ok")}
    completed = payloads["job.completed"]["data"]
    assert completed["status"] == "succeeded"
    assert completed["images"] == final["images"] and completed["finished_at"] == final["finished_at"]
    assert payloads["job.started"]["data"]["id"] == job["id"]
    wait_for(lambda: {"job.preview3"} <= {verified(r)["type"] + str(verified(r)["data"].get("step", ""))
                                          for r in receiver.to("/ok")}, 10, "the preview delivery")
    preview = next(verified(r)["data"] for r in receiver.to("/ok") if verified(r)["type"] == "job.preview")
    assert preview["url"] == f"/v1/jobs/{job['id']}/previews/3"
    assert service.http.get(preview["url"]).status_code == 200


def test_a_slow_receiver_does_not_hold_up_another_clients_webhook(service: Service, receiver: Receiver) -> None:
    """Guards: one sender for everyone, where a receiver slow to answer (up to the timeout) held
    up every other client's deliveries behind it."""
    receiver.delay["/slow"] = 4.5  # under the fixture's 5 s timeout: it answers, late
    service.submit(width=32, height=32, steps=2, webhook_url=receiver.url("/slow"))
    wait_for(lambda: receiver.to("/slow"), 60, "the slow delivery to start")
    slow_answers_at = receiver.to("/slow")[0].at + receiver.delay["/slow"]
    service.submit(width=32, height=32, steps=2, webhook_url=receiver.url("/fast"))
    wait_for(lambda: receiver.to("/fast"), 60, "the other delivery")
    assert receiver.to("/fast")[0].at < slow_answers_at


def test_cancel_of_running_job_delivers_canceled_view(service: Service, receiver: Receiver) -> None:
    """Guards: a job canceled while it runs (the worker ends it) reported as succeeded or running,
    since RQ marks its own job done only after the record (and the delivery) are written."""
    job = service.submit(width=32, height=32, steps=3000, scheduler="euler", preview_every=0,
                         webhook_url=receiver.url("/stop"))
    service.wait_status(job["id"], {"running"})
    assert service.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    final = service.wait_status(job["id"], {"succeeded", "failed", "canceled"})
    assert final["status"] == "canceled"
    wait_for(lambda: receiver.to("/stop"), 30, "the completed delivery")
    data = verified(receiver.to("/stop")[0])["data"]
    assert data["status"] == "canceled" and data["progress"] == final["progress"]


def test_failing_receiver_gets_retries_until_it_answers(service: Service, receiver: Receiver) -> None:
    """Guards: a completed delivery lost when the receiver fails, or retried under a new id or body
    (so receivers could not deduplicate it)."""
    receiver.plan["/flaky"] = [500, 503]
    job = service.submit(width=32, height=32, steps=2, webhook_url=receiver.url("/flaky"))
    wait_for(lambda: len(receiver.to("/flaky")) >= 3, 60, "two failed tries and a third")
    tries = receiver.to("/flaky")
    assert [t.answered for t in tries] == [500, 503, 200]
    assert {t.headers["webhook-id"] for t in tries} == {f"msg_{job['id']}_completed"}
    assert len({t.body for t in tries}) == 1
    assert all(verified(t)["data"]["status"] == "succeeded" for t in tries)
    with redis.Redis.from_url(service.env["BAILAN_REDIS_URL"]) as conn:
        rq_job = Job.fetch(f"msg_{job['id']}_completed", connection=conn, serializer=JSONSerializer)
        wait_for(lambda: rq_job.get_status(refresh=True) == "finished", 10, "the delivery job to finish")


def test_internal_address_refused_end_to_end(service: Service, receiver: Receiver) -> None:
    """Guards: a private address reaching the receiver from the running service: refused at submit
    when written out, and at connect time when a name resolves to it."""
    refused = service.http.post("/v1/jobs", json={"prompt": "x", "webhook_url": "http://10.0.0.1/hook"})
    assert refused.status_code == 422 and "webhook_url" in refused.text
    job = service.submit(width=32, height=32, steps=2, webhook_url=receiver.url("/named", host="localhost"))
    assert service.wait_status(job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    with redis.Redis.from_url(service.env["BAILAN_REDIS_URL"]) as conn:
        rq_job = Job.fetch(f"msg_{job['id']}_completed", connection=conn, serializer=JSONSerializer)
        # 3 retries, 1 s apart: then RQ gives up and keeps the failure.
        wait_for(lambda: rq_job.get_status(refresh=True) == "failed", 30, "the delivery to fail for good")
        assert "not a public address" in (rq_job.latest_result().exc_string or "")
    assert receiver.to("/named") == []


def test_links_are_absolute_under_the_public_url(
    redis_url: str, redis_conn: redis.Redis, receiver: Receiver, delivery_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: a receiver handed bare paths (/v1/jobs/...), which it cannot resolve, when the
    operator said where the API is (BAILAN_PUBLIC_URL)."""
    monkeypatch.setenv("BAILAN_PUBLIC_URL", "https://bailan.example.com/api/")
    delivery.settings.cache_clear()
    settings = api_settings(redis_url, webhook_allow_hosts="127.0.0.1")
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/jobs", json={"prompt": "x", "webhook_url": receiver.url("/links"),
                                            "webhook_events": ["preview"]}).json()
    params = JobParams.model_validate(job["params"])
    pipe = webhooks.transaction(redis_conn)
    assert webhooks.enqueue(redis_conn, pipe, webhooks.Policy.of(settings), job["id"], WebhookEvent.preview, params, 3)
    pipe.execute()
    deliver_queued(redis_conn)
    [received] = receiver.to("/links")
    assert verified(received)["data"]["url"] == f"https://bailan.example.com/api/v1/jobs/{job['id']}/previews/3"


def test_a_public_url_must_be_an_http_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: a malformed BAILAN_PUBLIC_URL found only in receivers' broken links."""
    monkeypatch.setenv("BAILAN_PUBLIC_URL", "bailan.example.com")
    with pytest.raises(ValueError, match="public_url"):
        SharedSettings()


def test_allowed_hosts_compare_as_url_hosts_however_given() -> None:
    """Guards against an allow-list entry that never matches: hosts written with IPv6
    brackets, a root dot or capitals were normalised only from the environment's comma
    list, not when given as a list (init arguments), so they passed as typed."""
    from bailan.settings import SharedSettings

    want = ["::1", "example.com"]
    assert SharedSettings(webhook_allow_hosts="[::1], Example.COM., ., []").webhook_allow_hosts == want
    assert SharedSettings(webhook_allow_hosts=["[::1]", " Example.COM."]).webhook_allow_hosts == want
