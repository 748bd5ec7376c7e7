"""One webhook delivery: the RQ job that `python -m bailan.webhooks` runs (see bailan.webhooks).

The body is built when the delivery runs, from the job's stored state, so a
`completed` delivery carries the same job view as GET /v1/jobs/{id}. It is
kept after the first attempt, so every retry sends the very bytes, under the
same webhook-id, that the first one did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import datetime, timezone
from functools import cache
from typing import Any

import httpx
import redis
from rq import get_current_job

from app import views
from app.routes.jobs import router
from app.store import records
from bailan import webhooks
from bailan.jobs import TERMINAL_STATES, RecordField
from bailan.settings import SharedSettings
from bailan.webhooks import DeliveryFailed, WebhookEvent, WebhookRefused, body_key

log = logging.getLogger("bailan.webhooks")


@cache
def settings() -> SharedSettings:
    """The delivery process's settings, read once (the process checked them at start-up)."""
    return SharedSettings()


@cache
def links(public_url: str | None) -> views.PathFor:
    """How a delivery links to routes: paths, or absolute URLs under BAILAN_PUBLIC_URL (a
    receiver has no request to resolve a path against)."""
    if not public_url:
        return views.Links(router.url_path_for)
    root = public_url.rstrip("/")
    return views.Links(lambda name, **params: root + str(router.url_path_for(name, **params)))


def payload(conn: redis.Redis, job_id: str, event: WebhookEvent, step: int | None) -> tuple[str, str] | None:
    """(URL, JSON body) of a delivery, or None when the job's record is gone."""
    path_for = links(settings().public_url)
    snap = records.snapshot(conn, job_id)
    params = snap.params if snap is not None else None
    if snap is None or params is None or params.webhook_url is None:
        return None
    if event is WebhookEvent.preview:
        data: dict[str, Any] = {
            "id": job_id,
            "status": snap.state.value,
            "step": step,
            "url": str(path_for(views.PREVIEW_ROUTE, job_id=job_id, step=step)),
        }
    else:
        if event is WebhookEvent.completed and snap.state not in TERMINAL_STATES:
            if not snap.record.get(RecordField.finished_at):
                raise DeliveryFailed(f"job {job_id} is {snap.state.value}, not ended yet")
            # The worker queues this with the record's end, a moment before RQ
            # marks its own job done: the record alone says how it ended.
            snap = dataclasses.replace(snap, rq_status=None)
        data = views.job_view(conn, snap, path_for).model_dump(mode="json")
    body = {
        "type": f"job.{event.value}",
        "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "data": data,
    }
    return params.webhook_url, json.dumps(body, separators=(",", ":"))


def send(url: str, message_id: str, body: str, config: SharedSettings) -> int:
    """POST one signed body; the receiver's status. Raises WebhookRefused, DeliveryFailed or httpx's errors."""
    assert config.webhook_secret is not None
    key = webhooks.secret_key(config.webhook_secret.get_secret_value())
    # identity: a receiver's answer is never unpacked (1 MB of gzip can be a GB of zeros).
    headers = {"content-type": "application/json", "user-agent": "Bailan-Webhooks/1", "accept-encoding": "identity",
               **webhooks.sign(key, message_id, int(time.time()), body)}
    transport = webhooks.PinnedTransport(config.webhook_allow_hosts)
    # trust_env=False: an HTTP(S)_PROXY from the environment would connect instead of the pinned transport.
    with httpx.Client(transport=transport, timeout=config.webhook_timeout_s, follow_redirects=False,
                      trust_env=False) as client:
        # Streamed, and closed unread: only the status matters, and a receiver (any address a
        # client names) could answer with gigabytes, in the memory of the process that
        # delivers everyone's webhooks.
        with client.stream("POST", url, content=body.encode(), headers=headers) as response:
            status = response.status_code
    if not 200 <= status < 300:
        # A 3xx too: following it would let a public receiver send us anywhere.
        raise DeliveryFailed(f"{url} answered {status}")
    return status


def deliver(job_id: str, event: str, step: int | None = None) -> dict[str, Any]:
    """The RQ job: build (or reload) the body, sign it and POST it. Raising makes RQ retry it."""
    job = get_current_job()
    assert job is not None, "deliver runs as an RQ job"
    conn = job.connection
    config = settings()
    if config.webhook_secret is None:
        raise WebhookRefused("BAILAN_WEBHOOK_SECRET is unset in the delivery process")
    kind = WebhookEvent(event)
    stored = conn.get(body_key(job.id))
    if stored is not None:
        url, body = json.loads(stored)
    else:
        built = payload(conn, job_id, kind, step)
        if built is None:
            log.info("webhook %s: job %s is gone; nothing to deliver", job.id, job_id)
            return {"skipped": "the job's record expired"}
        url, body = built
        conn.set(body_key(job.id), json.dumps([url, body]), ex=config.result_ttl_s)
    try:
        status = send(url, job.id, body, config)
    except (WebhookRefused, DeliveryFailed, httpx.HTTPError) as exc:
        log.warning("webhook %s to %s failed (%s retries left): %s", job.id, url, job.retries_left or 0, exc)
        raise
    log.info("webhook %s delivered to %s (%d)", job.id, url, status)
    return {"status": status}
