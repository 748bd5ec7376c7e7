"""HTTP API tests against a real Redis (the conftest's private Valkey).

Worker behaviour is simulated by writing what a worker would write, with the
Keys layout and RQ's own APIs; no worker code is imported.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from unittest import mock
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from fastapi import FastAPI
from fastapi.testclient import TestClient
from rq import Queue
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from app.main import create_app
from app.settings import ApiSettings
from bailan.blobs import DirBlobStore, image_key, preview_key
from bailan import presence
from bailan.jobs import RQ_FUNC, Keys, RecordField, now
from bailan.reaper import Reaper

QUEUE = "bailan-test"
REPO = Path(__file__).resolve().parents[1]


def make_settings(redis_url: str, **overrides: Any) -> ApiSettings:
    # workers_cache_s=0: tests publish a worker and submit at once (the cache: tests/test_device_caps.py).
    values: dict[str, Any] = {"redis_url": redis_url, "queue_name": QUEUE, "reap_interval_s": 3600,
                              "workers_cache_s": 0}
    values.update(overrides)
    return ApiSettings(**values)


def client_for(settings: ApiSettings) -> TestClient:
    return TestClient(create_app(settings))


def queue_of(conn: redis.Redis) -> Queue:
    return Queue(QUEUE, connection=conn, serializer=JSONSerializer)


def submit(client: TestClient, **body: Any) -> dict[str, Any]:
    body.setdefault("prompt", "a lighthouse")
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def publish_worker(conn: redis.Redis, name: str = "w1", width: int = 512, height: int = 512, **extra: Any) -> None:
    info = {"model": "tiny", "width": width, "height": height, "worker": name, "device": "cuda:0",
            "dtype": "float16", "max_batch": 8, **extra}
    announce(conn, name, json.dumps(info))


def announce(conn: redis.Redis, name: str, payload: str | bytes, ttl_s: float = 30) -> None:
    """What a worker's presence tick writes (bailan.presence), with `payload` as its description."""
    pipe = conn.pipeline()
    presence.publish(pipe, name, payload, ttl_s)  # type: ignore[arg-type]
    pipe.execute()


def start_job(conn: redis.Redis, job_id: str, execution_score: float | None = None) -> None:
    """Do what a worker does when it takes a job, with RQ's own APIs."""
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    queue_of(conn).remove(job)
    job.set_status(JobStatus.STARTED)
    conn.hset(Keys.job(job_id), mapping={RecordField.started_at: repr(now()), RecordField.model: "tiny"})
    if execution_score is not None:
        conn.zadd(f"rq:wip:{QUEUE}", {f"{job_id}:exec1": execution_score})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- submit


def test_submit_returns_202_location_record_and_json_rq_job(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: a 202 before both the record and the RQ job exist, or a job pickled / pointing elsewhere."""
    r = client.post("/v1/jobs", json={"prompt": "a lighthouse", "steps": 30, "seed": 7})
    assert r.status_code == 202
    view = r.json()
    job_id = view["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    assert view["status"] == "queued"
    assert view["queue_position"] == 1
    assert view["progress"] == {"step": 0, "total_steps": 30}
    assert view["created_at"].endswith("Z")

    record = {k.decode(): v.decode() for k, v in redis_conn.hgetall(Keys.job(job_id)).items()}
    params = json.loads(record[RecordField.params])
    assert params["seed"] == 7 and params["steps"] == 30 and params["prompt"] == "a lighthouse"
    assert record[RecordField.total_steps] == "30"
    assert float(record[RecordField.created_at]) > 0
    ttl = redis_conn.ttl(Keys.job(job_id))
    assert ttl > 86400

    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [job_id.encode()]
    raw = redis_conn.hget(f"rq:job:{job_id}", "data")
    data = json.loads(raw.decode() if raw[:1] != b"x" else __import__("zlib").decompress(raw))
    assert data[0] == RQ_FUNC and data[2] == [job_id]
    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    assert job.func_name == RQ_FUNC
    assert job.args == [job_id]
    assert job.get_status() == JobStatus.QUEUED
    assert job.retries_left == 1  # abandoned_retries default


def test_seed_picked_and_reported(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: a job without a seed being irreproducible (seed not chosen or not reported)."""
    seeds = {submit(client)["params"]["seed"] for _ in range(3)}
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds)
    assert len(seeds) > 1
    view = submit(client)
    record_params = json.loads(redis_conn.hget(Keys.job(view["id"]), RecordField.params))
    assert record_params["seed"] == view["params"]["seed"]


def test_size_defaults_to_live_worker_native_size(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: omitted width/height not resolved from the live worker's model at submit time."""
    assert submit(client)["params"]["width"] is None  # no worker: left to the worker
    publish_worker(redis_conn, width=768, height=640)
    view = submit(client)
    assert (view["params"]["width"], view["params"]["height"]) == (768, 640)
    record = redis_conn.hgetall(Keys.job(view["id"]))
    assert record[RecordField.width.encode()] == b"768"
    view = submit(client, width=256)
    assert (view["params"]["width"], view["params"]["height"]) == (256, 640)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"prompt": "x", "width": 513}, ["body", "width"]),
        ({"prompt": "x", "width": 2048}, ["body", "width"]),
        ({"prompt": "x", "height": 1032}, ["body", "height"]),
        ({"prompt": "x", "steps": 151}, ["body", "steps"]),
        ({"prompt": "x", "steps": 0}, ["body", "steps"]),
        ({"prompt": "x", "num_images": 5}, ["body", "num_images"]),
        ({"prompt": "x" * 1001}, ["body", "prompt"]),
        ({"prompt": "x", "negative_prompt": "y" * 1001}, ["body", "negative_prompt"]),
        ({"prompt": ""}, ["body", "prompt"]),
        ({}, ["body", "prompt"]),
        ({"prompt": "x", "foo": 1}, ["body", "foo"]),
        ({"prompt": "x", "scheduler": "bogus"}, ["body", "scheduler"]),
        ({"prompt": "x", "output_format": "gif"}, ["body", "output_format"]),
        ({"prompt": "x", "seed": 2**32}, ["body", "seed"]),
        ({"prompt": "x", "preview_every": -1}, ["body", "preview_every"]),
        # Past int64 it failed the worker's whole batch; any value past the steps means no preview.
        ({"prompt": "x", "preview_every": 2**63}, ["body", "preview_every"]),
        ({"prompt": "x", "preview_every": 100_001}, ["body", "preview_every"]),
        # A check across two fields names the later one (it was ["body"], naming none).
        ({"prompt": "x", "seed": 2**32 - 2, "num_images": 4}, ["body", "num_images"]),
    ],
)
def test_invalid_input_is_422_naming_the_field(
    client: TestClient, redis_conn: redis.Redis, body: dict[str, Any], loc: list[str]
) -> None:
    """Guards: a cap violation accepted, answered 500, or reported without the field's name."""
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]]
    assert redis_conn.llen(f"rq:queue:{QUEUE}") == 0


# A valid value for every numeric field of a request, as a client would send it.
NUMBERS: dict[str, int] = {
    "width": 64, "height": 48, "steps": 8, "guidance_scale": 3, "seed": 7, "num_images": 2, "preview_every": 2,
}


@pytest.mark.parametrize("field", sorted(NUMBERS))
@pytest.mark.parametrize("value", [True, False])
def test_boolean_for_a_number_is_422_naming_the_field(
    client: TestClient, redis_conn: redis.Redis, field: str, value: bool
) -> None:
    """Guards: `"steps": true` queued as a 1-step job (pydantic's lax mode reads JSON true as 1 and
    false as 0) instead of a 422 naming the field."""
    r = client.post("/v1/jobs", json={"prompt": "x", field: value})
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["body", field]]
    assert redis_conn.llen(f"rq:queue:{QUEUE}") == 0


@pytest.mark.parametrize("field", sorted(NUMBERS))
def test_number_in_a_string_is_422_naming_the_field(client: TestClient, redis_conn: redis.Redis, field: str) -> None:
    """Guards: `"steps": "8"` silently read as 8 (lax mode's string-to-number coercion), so a client's
    type mistake passes here and breaks on a stricter server or in its own code later."""
    r = client.post("/v1/jobs", json={"prompt": "x", field: str(NUMBERS[field])})
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["body", field]]
    assert redis_conn.llen(f"rq:queue:{QUEUE}") == 0


@pytest.mark.parametrize("value", ["yes", "true", "off", 1, 0])
def test_a_non_boolean_for_a_boolean_is_422_naming_the_field(client: TestClient, redis_conn: redis.Redis,
                                                             value: object) -> None:
    """Guards: `"preview_full_decode": "yes"` (or 1) queued as true: the numbers were strict,
    the boolean still took lax mode's readings of strings and numbers."""
    r = client.post("/v1/jobs", json={"prompt": "x", "preview_full_decode": value})
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "preview_full_decode"]]
    assert redis_conn.llen(f"rq:queue:{QUEUE}") == 0
    assert submit(client, preview_full_decode=True)["params"]["preview_full_decode"] is True


def test_strict_numbers_still_take_json_integers(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: strict types refusing ordinary requests: JSON integers for every numeric field, an
    integer guidance scale (7 must become 7.0), a fractional one, and the values stored for the worker."""
    view = submit(client, **NUMBERS)
    assert {name: view["params"][name] for name in NUMBERS} == NUMBERS
    stored = json.loads(redis_conn.hget(Keys.job(view["id"]), RecordField.params))
    assert {name: stored[name] for name in NUMBERS} == NUMBERS
    assert isinstance(stored["guidance_scale"], float) and isinstance(stored["steps"], int)
    assert submit(client, guidance_scale=7)["params"]["guidance_scale"] == 7.0
    assert submit(client, guidance_scale=1.25)["params"]["guidance_scale"] == 1.25
    assert submit(client, seed=0, preview_every=0)["params"]["seed"] == 0


def test_pixel_cap_is_422_naming_the_field(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: width × height over max_pixels accepted, or its 422 not naming a field (cross-field cap)."""
    with client_for(make_settings(redis_url, max_pixels=512 * 512)) as c:
        r = c.post("/v1/jobs", json={"prompt": "x", "width": 1024, "height": 512})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "width"]
        assert "262144" in r.json()["detail"][0]["msg"]
        publish_worker(redis_conn, width=512, height=512)
        r = c.post("/v1/jobs", json={"prompt": "x", "height": 1024})  # width from the model
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "height"]
        assert c.post("/v1/jobs", json={"prompt": "x", "width": 512, "height": 512}).status_code == 202


@pytest.mark.parametrize("payload", [b"{not json", b'{"prompt": "x",}', b"", b"[1,2]", b'"text"'])
def test_malformed_json_is_422(client: TestClient, payload: bytes) -> None:
    """Guards: a malformed or non-object body answered 500 instead of 422."""
    r = client.post("/v1/jobs", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "4300 digits"),
     (b'{"prompt": "x\xff"}', "utf-8")],
)
def test_a_body_pythons_json_refuses_is_422_saying_why(client: TestClient, payload: bytes, reason: str) -> None:
    """Guards against a body json.loads refused with a ValueError of its own (an integer longer
    than Python's 4300-digit limit, bytes that are not UTF-8) getting FastAPI's bare 400
    "There was an error parsing the body", where every other malformed body gets a 422 that
    says what is wrong."""
    r = client.post("/v1/jobs", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["type"] == "json_invalid" and reason in error["msg"] and "sys." not in error["msg"]


def test_oversized_body_is_413(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: a huge body read into memory and parsed (declared size or chunked stream)."""
    cap = 65536
    client = client_for(make_settings(redis_url, max_body_bytes=cap))
    big = json.dumps({"prompt": "x" * (cap + 4464)}).encode()
    r = client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert str(cap) in r.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert redis_conn.llen(f"rq:queue:{QUEUE}") == 0


def test_queue_full_is_429_with_retry_after(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: an unbounded queue (ComfyUI #2401) — submissions past max_queue_depth must be refused."""
    with client_for(make_settings(redis_url, max_queue_depth=2)) as c:
        submit(c)
        submit(c)
        r = c.post("/v1/jobs", json={"prompt": "x"})
        assert r.status_code == 429
        assert "queue is full" in r.json()["detail"]
        assert int(r.headers["retry-after"]) > 0
        assert redis_conn.llen(f"rq:queue:{QUEUE}") == 2


# ---------------------------------------------------------------- read


def test_view_fields_and_queue_position(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: queue_position missing/0-based, or view fields missing for a queued then running job."""
    ids = [submit(client)["id"] for _ in range(3)]
    assert [client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids] == [1, 2, 3]
    start_job(redis_conn, ids[0])
    redis_conn.hset(Keys.job(ids[0]), mapping={RecordField.step: "4", RecordField.unknown_words: '["zorp"]'})
    view = client.get(f"/v1/jobs/{ids[0]}").json()
    assert set(view) >= {"id", "status", "progress", "queue_position", "previews", "images", "error", "params",
                         "unknown_words", "model", "created_at", "started_at", "finished_at"}
    assert view["status"] == "running"
    assert view["queue_position"] is None
    assert view["progress"] == {"step": 4, "total_steps": 25}
    assert view["unknown_words"] == ["zorp"]
    assert view["model"] == "tiny"
    assert view["started_at"].endswith("Z") and view["finished_at"] is None
    assert view["error"] is None
    assert client.get(f"/v1/jobs/{ids[1]}").json()["queue_position"] == 1


def test_previews_and_images_served_with_content_types(
    client: TestClient, redis_conn: redis.Redis, settings: ApiSettings
) -> None:
    """Guards: previews/images unreachable, served with the wrong content type, or 500 when absent;
    and a preview listed after its blob expired."""
    blobs = DirBlobStore(settings.blob_dir)
    job_id = submit(client, output_format="webp", num_images=2, seed=10)["id"]
    assert client.get(f"/v1/jobs/{job_id}/previews/latest").status_code == 404
    r = client.get(f"/v1/jobs/{job_id}/images/0")
    assert r.status_code == 409 and "not ready" in r.json()["detail"]

    start_job(redis_conn, job_id)
    for step in (5, 10):
        blobs.put(preview_key(job_id, step), b"\xff\xd8jpeg%d" % step, 60)
        redis_conn.zadd(Keys.previews(job_id), {str(step): now() + 60})
    redis_conn.zadd(Keys.previews(job_id), {"15": now() - 1})  # stored once, expired since
    view = client.get(f"/v1/jobs/{job_id}").json()
    assert view["previews"] == [{"step": 5, "url": f"/v1/jobs/{job_id}/previews/5"},
                                {"step": 10, "url": f"/v1/jobs/{job_id}/previews/10"}]
    r = client.get(f"/v1/jobs/{job_id}/previews/5")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content == b"\xff\xd8jpeg5"
    r = client.get(f"/v1/jobs/{job_id}/previews/latest")
    assert r.status_code == 200 and r.content == b"\xff\xd8jpeg10" and r.headers["x-bailan-step"] == "10"
    assert client.get(f"/v1/jobs/{job_id}/previews/7").status_code == 404

    blobs.put(image_key(job_id, 0), b"RIFFwebp0", 60)
    blobs.put(image_key(job_id, 1), b"RIFFwebp1", 60)
    redis_conn.hset(Keys.job(job_id), mapping={
        RecordField.images: json.dumps([{"index": 0, "seed": 10}, {"index": 1, "seed": 11}]),
        RecordField.finished_at: repr(now()), RecordField.step: "25",
    })
    Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).set_status(JobStatus.FINISHED)
    view = client.get(f"/v1/jobs/{job_id}").json()
    assert view["status"] == "succeeded"
    assert view["images"] == [{"index": 0, "url": f"/v1/jobs/{job_id}/images/0", "seed": 10},
                              {"index": 1, "url": f"/v1/jobs/{job_id}/images/1", "seed": 11}]
    r = client.get(view["images"][1]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp" and r.content == b"RIFFwebp1"
    assert client.get(f"/v1/jobs/{job_id}/images/2").status_code == 404


def test_every_link_in_a_view_is_served(client: TestClient, redis_conn: redis.Redis, settings: ApiSettings) -> None:
    """Guards: a view or a Location header linking to a path no route serves (a path written
    in a view and in a route, then changed in one of them)."""
    r = client.post("/v1/jobs", json={"prompt": "a lighthouse", "num_images": 2})
    job_id = r.json()["id"]
    start_job(redis_conn, job_id)
    blobs = DirBlobStore(settings.blob_dir)
    blobs.put(preview_key(job_id, 5), b"\xff\xd8jpeg", 60)
    redis_conn.zadd(Keys.previews(job_id), {"5": now() + 60})
    for index in (0, 1):
        blobs.put(image_key(job_id, index), b"png%d" % index, 60)
    redis_conn.hset(Keys.job(job_id), mapping={
        RecordField.images: json.dumps([{"index": 0, "seed": 1}, {"index": 1, "seed": 2}]),
        RecordField.finished_at: repr(now()),
    })
    Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).set_status(JobStatus.FINISHED)
    view = client.get(r.headers["location"]).json()
    links = [p["url"] for p in view["previews"]] + [i["url"] for i in view["images"]]
    assert len(links) == 3
    for link in links:
        assert link.startswith(f"/v1/jobs/{job_id}/")
        assert client.get(link).status_code == 200, link


def test_previews_disabled_says_so(client: TestClient) -> None:
    """Guards: a client polling forever for previews of a job submitted with preview_every=0."""
    job_id = submit(client, preview_every=0)["id"]
    r = client.get(f"/v1/jobs/{job_id}/previews/latest")
    assert r.status_code == 404 and "preview_every=0" in r.json()["detail"]


def test_failed_job_error_from_rq_exception(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: a job that died with an exception (no error code in the record) showing error: null or a 500."""
    job_id = submit(client)["id"]
    start_job(redis_conn, job_id)
    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    Result.create_failure(job, 60, "Traceback (most recent call last):\n  ...\nValueError: bad latent\n")
    job.set_status(JobStatus.FAILED)
    view = client.get(f"/v1/jobs/{job_id}").json()
    assert view["status"] == "failed"
    assert view["error"] == {"code": "internal", "message": "ValueError: bad latent"}


def test_failed_job_error_from_record(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: the worker's own error code being replaced by a generic one."""
    job_id = submit(client)["id"]
    start_job(redis_conn, job_id)
    redis_conn.hset(Keys.job(job_id), mapping={RecordField.error_code: "out_of_memory",
                                              RecordField.error_message: "CUDA OOM at 1024x1024",
                                              RecordField.finished_at: repr(now())})
    Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).set_status(JobStatus.FAILED)
    view = client.get(f"/v1/jobs/{job_id}").json()
    assert view["error"] == {"code": "out_of_memory", "message": "CUDA OOM at 1024x1024"}
    r = client.get(f"/v1/jobs/{job_id}/images/0")
    assert r.status_code == 404 and "failed" in r.json()["detail"]


@pytest.mark.parametrize("job_id", ["0" * 32, "nope", "../../etc"])
def test_unknown_job_is_404(client: TestClient, job_id: str) -> None:
    """Guards: unknown or malformed ids answered 500/422 instead of 404 with a reason."""
    for path in ("", "/previews/latest", "/previews/3", "/images/0"):
        r = client.get(f"/v1/jobs/{job_id}{path}")
        assert r.status_code == 404, (path, r.text)
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 404


def test_expired_job_404_mentions_retention(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: an expired job answered as if it never existed, without saying how long results are kept."""
    job_id = submit(client)["id"]
    redis_conn.delete(Keys.job(job_id))
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 404
    assert "86400" in r.json()["detail"]


# ---------------------------------------------------------------- cancel


def test_cancel_queued_job(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: a canceled queued job still being run by a worker, or still shown queued."""
    job_id = submit(client)["id"]
    other = submit(client)["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200
    view = r.json()
    assert view["status"] == "canceled" and view["cancel_requested"] is True
    assert view["finished_at"] is not None and view["queue_position"] is None
    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [other.encode()]
    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.CANCELED
    assert job_id in queue_of(redis_conn).canceled_job_registry.get_job_ids()
    assert client.get(f"/v1/jobs/{other}").json()["queue_position"] == 1
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    # RQ keeps canceled jobs for ever unless told; with noeviction that is a leak.
    assert 0 < redis_conn.ttl(f"rq:job:{job_id}") <= 86400


def test_a_submit_whose_view_cannot_be_read_back_still_answers_202(
    client: TestClient, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a submit that queued its job and then answered 503 (no Location) because
    Redis failed on reading the view back: a client without an Idempotency-Key submitted it
    again. It answers 202 with the job as it was written."""
    from app.store import records

    def blip(*args: Any, **kwargs: Any) -> None:
        raise redis.ConnectionError("injected: Redis went away after the submit")

    monkeypatch.setattr(records, "snapshot", blip)
    r = client.post("/v1/jobs", json={"prompt": "a lighthouse", "seed": 3})
    assert r.status_code == 202, r.text
    view = r.json()
    assert view["status"] == "queued" and view["params"]["seed"] == 3 and view["params"]["prompt"] == "a lighthouse"
    assert r.headers["location"] == f"/v1/jobs/{view['id']}"
    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [view["id"].encode()]
    monkeypatch.undo()
    assert client.get(f"/v1/jobs/{view['id']}").json()["params"] == view["params"]


def test_a_canceled_queued_job_is_kept_like_any_ended_one(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards against a job canceled after hours in its queue keeping its submit's record TTL
    (result_ttl + 1 h from its submit): its record expired long before RQ's copy did
    (result_ttl from the cancel) and GET answered 404; and against its input images staying
    stored (megabytes) for a job that never runs."""
    import base64
    import io

    from PIL import Image

    picture = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(picture, "PNG")
    job_id = submit(client, init_image=base64.b64encode(picture.getvalue()).decode())["id"]
    assert redis_conn.exists(*Keys.input_images(job_id)) == 1
    redis_conn.expire(Keys.job(job_id), 120)  # what is left of its TTL after hours queued
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert redis_conn.ttl(Keys.job(job_id)) > 86400 - 60  # the default result_ttl, from now
    assert redis_conn.exists(*Keys.input_images(job_id)) == 0


def test_a_cancel_cut_short_by_redis_leaves_no_stranded_job(
    client: TestClient, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a cancel whose Redis failed after it took the job off its queue: the
    job was then in no queue, yet queued to RQ and to its view, and nothing would ever run
    or end it (a second cancel answered 202 "asked to stop"). It goes back to the head of
    its queue, asked to cancel, so a worker ends it at once, or a second cancel does."""
    from app.store import records

    job_id = submit(client)["id"]
    other = submit(client)["id"]

    def blip(*args: Any, **kwargs: Any) -> Job:
        raise redis.ConnectionError("injected: Redis went away mid-cancel")

    monkeypatch.setattr(records.Job, "fetch", blip)
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 503
    monkeypatch.undo()
    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [job_id.encode(), other.encode()]
    assert redis_conn.hget(Keys.job(job_id), RecordField.cancel_requested)  # a worker taking it cancels it
    assert client.get(f"/v1/jobs/{job_id}").json()["queue_position"] == 1
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [other.encode()]


def test_the_loser_of_two_racing_cancels_answers_canceled(
    client: TestClient, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the second of two concurrent cancels of a queued job answering 202 "asked
    to stop": it read the job queued, found it already off its queue (the first cancel took
    it) and took the running branch, though the job was canceled and nothing would stop."""
    from app.store import records

    job_id = submit(client)["id"]
    original = records.cancel

    def racing(conn: redis.Redis, base: str, snap: records.JobSnapshot, *args: Any) -> str:
        original(conn, base, snap, *args)  # the winner, from the same snapshot the loser read
        return original(conn, base, snap, *args)

    monkeypatch.setattr(records, "cancel", racing)
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "canceled"


def test_the_loser_of_two_cancels_racing_mid_way_answers_canceled(
    client: TestClient, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the second of two concurrent cancels of a queued job answering 202 with
    status queued: the first had taken the job off its queue and was still ending it, so the
    second found it in no queue, not yet ended, and took the running branch."""
    from app.store import records

    job_id = submit(client)["id"]
    original = records.cancel

    winner = redis.Redis.from_url(client.app.state.settings.redis_url)
    threads: list[threading.Thread] = []
    original_end = records._end_canceled

    def slow_end(*end_args: Any) -> None:
        time.sleep(0.2)  # the loser looks meanwhile
        original_end(*end_args)

    def racing(conn: redis.Redis, base: str, snap: records.JobSnapshot, *args: Any) -> str:
        # The winner takes the job off its queue, and ends it a moment after the loser looks.
        monkeypatch.setattr(records, "_end_canceled", slow_end)
        threads.append(threading.Thread(target=original, args=(winner, base, snap, *args)))
        threads[0].start()
        deadline = time.monotonic() + 5
        while redis_conn.lpos(f"rq:queue:{QUEUE}", job_id) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        return original(conn, base, snap, *args)

    monkeypatch.setattr(records, "cancel", racing)
    try:
        r = client.post(f"/v1/jobs/{job_id}/cancel")
    finally:
        for thread in threads:
            thread.join()
        winner.close()
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "canceled"


def test_a_cancel_racing_a_jobs_own_end_answers_409(
    client: TestClient, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a cancel answering 202 "asked to stop" for a job that succeeded between
    the request's read and its write: nothing was left to stop."""
    from app.store import records

    job_id = submit(client)["id"]
    start_job(redis_conn, job_id)
    original = records.cancel

    def ending(conn: redis.Redis, base: str, snap: records.JobSnapshot, *args: Any) -> str:
        redis_conn.hset(Keys.job(job_id), mapping={RecordField.finished_at: repr(now()), RecordField.images: "[]"})
        return original(conn, base, snap, *args)

    monkeypatch.setattr(records, "cancel", ending)
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 409, r.text
    assert "already ended (succeeded)" in r.json()["detail"]


def test_cancel_running_job_sets_flag(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: cancel of a running job doing nothing, or yanking RQ state under a live worker.

    Only the request side is checked here; the worker stopping at its next
    step belongs to the end-to-end tests.
    """
    job_id = submit(client)["id"]
    start_job(redis_conn, job_id)
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    first = redis_conn.hget(Keys.job(job_id), RecordField.cancel_requested)
    assert first
    assert Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).get_status() == JobStatus.STARTED
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202  # idempotent
    assert redis_conn.hget(Keys.job(job_id), RecordField.cancel_requested) == first


@pytest.mark.parametrize("rq_status", [JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED])
def test_cancel_ended_job_is_409(client: TestClient, redis_conn: redis.Redis, rq_status: JobStatus) -> None:
    """Guards: cancel of an ended job rewriting its outcome."""
    job_id = submit(client)["id"]
    start_job(redis_conn, job_id)
    redis_conn.hset(Keys.job(job_id), RecordField.finished_at, repr(now()))
    Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).set_status(rq_status)
    before = redis_conn.hgetall(Keys.job(job_id))
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 409
    assert "already ended" in r.json()["detail"]
    assert redis_conn.hgetall(Keys.job(job_id)) == before


# ---------------------------------------------------------------- service


def test_redis_down_is_503_fast() -> None:
    """Guards: a dead Redis hanging requests or answering 500."""
    settings = ApiSettings(redis_url=f"redis://127.0.0.1:{closed_port()}/0", queue_name=QUEUE, reap_interval_s=3600)
    with client_for(settings) as c:
        for method, path, body in [
            ("POST", "/v1/jobs", {"prompt": "x"}),
            ("GET", "/v1/jobs/" + "a" * 32, None),
            ("POST", "/v1/jobs/" + "a" * 32 + "/cancel", None),
            ("GET", "/v1/models", None),
            ("GET", "/readyz", None),
        ]:
            t0 = time.monotonic()
            r = c.request(method, path, json=body)
            assert r.status_code == 503, (path, r.text)
            assert time.monotonic() - t0 < 3
            assert "Redis" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200


def test_readyz_needs_a_live_worker(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: reporting ready while no worker would ever run a job."""
    r = client.get("/readyz")
    assert r.status_code == 503 and "worker" in r.json()["detail"]
    publish_worker(redis_conn)
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["workers"] == 1


def test_models_lists_live_workers(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: /v1/models not reflecting what the live workers serve, or 500 on a malformed worker key."""
    assert client.get("/v1/models").json() == {"models": [], "default": None}
    publish_worker(redis_conn, "w1")
    publish_worker(redis_conn, "w2", max_batch=16, device="cuda:1", hash="0123456789")
    announce(redis_conn, "junk", b"not json")
    models = client.get("/v1/models").json()["models"]
    assert models == [{"model": "tiny", "width": 512, "height": 512, "workers": 2,
                       "devices": ["cuda:0", "cuda:1"], "dtypes": ["float16"], "max_batch": 16,
                       "hashes": ["0123456789"],
                       "defaults": {"steps": None, "guidance_scale": None, "scheduler": None}, "samplers": []}]


def test_a_models_defaults_fill_what_a_request_omits(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: a model's own defaults (its bailan_defaults.json, published by its workers)
    ignored, overriding what the client asked for, or applied when workers disagree."""
    samplers = ["ddim", "dpmpp_2m", "euler"]
    publish_worker(redis_conn, "w1", defaults={"guidance_scale": 1.0, "steps": 12}, samplers=samplers)
    publish_worker(redis_conn, "w2", defaults={"guidance_scale": 1.0, "steps": 12}, samplers=samplers[:2])
    [model] = client.get("/v1/models").json()["models"]
    assert model["defaults"] == {"steps": 12, "guidance_scale": 1.0, "scheduler": None}
    assert model["samplers"] == ["ddim", "dpmpp_2m"]  # what every worker of the model runs

    omitted = submit(client)["params"]
    assert (omitted["guidance_scale"], omitted["steps"], omitted["scheduler"]) == (1.0, 12, "dpmpp_2m")
    given = submit(client, guidance_scale=7.5, steps=30)["params"]
    assert (given["guidance_scale"], given["steps"]) == (7.5, 30)

    # A worker that publishes other defaults: the API cannot know which runs the job.
    publish_worker(redis_conn, "w3", defaults={"guidance_scale": 3.0, "steps": 12})
    mixed = submit(client)["params"]
    assert (mixed["guidance_scale"], mixed["steps"]) == (7.5, 12)


def test_healthz(client: TestClient) -> None:
    """Guards: the liveness probe depending on anything but the process."""
    assert client.get("/healthz").json() == {"status": "ok"}


def test_cors_only_when_configured(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: CORS open by default, or configured origins not honoured."""
    with client_for(make_settings(redis_url)) as c:
        r = c.get("/healthz", headers={"Origin": "https://ui.example"})
        assert "access-control-allow-origin" not in r.headers
    with client_for(make_settings(redis_url, cors_origins=["https://ui.example"])) as c:
        r = c.get("/healthz", headers={"Origin": "https://ui.example"})
        assert r.headers["access-control-allow-origin"] == "https://ui.example"
        r = c.post("/v1/jobs", json={"prompt": "x"}, headers={"Origin": "https://ui.example"})
        assert "location" in r.headers["access-control-expose-headers"].lower()


def test_settings_from_env_and_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: comma-separated CORS origins misparsed, or nonsensical caps accepted at start-up."""
    monkeypatch.setenv("BAILAN_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("BAILAN_MAX_STEPS", "50")
    s = ApiSettings()
    assert s.cors_origins == ["https://a.example", "https://b.example"] and s.max_steps == 50
    monkeypatch.delenv("BAILAN_CORS_ORIGINS")
    assert ApiSettings().cors_origins == []
    for bad in ({"max_pixels": 1000}, {"max_width": 1001}, {"max_steps": 0}, {"max_queue_depth": -1},
                {"reap_interval_s": 0}, {"abandoned_retries": -1}):
        with pytest.raises(ValueError):
            ApiSettings(**bad)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("BAILAN_BLOB_DIR", "", "is empty"),  # Path("") is the checkout, which the blob sweep walks
        ("BAILAN_REDIS_URL", "", "is not a Redis URL"),
        ("BAILAN_REDIS_URL", "localhost:6379", "is not a Redis URL"),
        ("BAILAN_REDIS_URL", "http://:s3cret@db:6379/0", "'http://:***@db:6379/0' is not a Redis URL"),
        ("BAILAN_REAP_INTERVAL_S", "inf", "finite"),  # passed gt=0, then ended the reaper's thread
        ("BAILAN_BLOB_SWEEP_INTERVAL_S", "nan", "finite"),
    ],
)
def test_settings_that_would_fail_later_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    """Guards against settings accepted at start-up that fail later, or do harm: an empty
    BAILAN_BLOB_DIR (the current directory) let the blob sweep delete the checkout's files;
    a Redis URL without its scheme stopped the API with a bare ValueError and a worker only
    after it had loaded its model; "inf" seconds killed the reaper's thread. A refused URL is
    not printed back with its password."""
    from pydantic import ValidationError

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        ApiSettings()
    assert variable.removeprefix("BAILAN_").lower() in str(refused.value)
    assert says in str(refused.value) and "s3cret" not in str(refused.value)


def test_openapi_documents_configured_caps(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: /docs advertising limits other than the ones this server enforces."""
    with client_for(make_settings(redis_url, max_width=768, max_steps=60, max_prompt_chars=300)) as c:
        assert c.get("/docs").status_code == 200
        schema = c.get("/openapi.json").json()["components"]["schemas"]["JobRequest"]["properties"]
        assert schema["width"]["anyOf"][0]["maximum"] == 768
        assert "768" in schema["width"]["description"]
        assert schema["steps"]["maximum"] == 60
        assert schema["prompt"]["maxLength"] == 300
        assert c.post("/v1/jobs", json={"prompt": "x", "steps": 61}).status_code == 422


@pytest.mark.parametrize(
    ("setting", "cap", "field", "value", "schema_key"),
    [
        ("max_width", 512, "width", 1024, "maximum"),
        ("max_height", 256, "height", 512, "maximum"),
        ("max_steps", 20, "steps", 150, "maximum"),
        ("max_prompt_chars", 10, "prompt", "x" * 1000, "maxLength"),
        ("max_prompt_chars", 10, "negative_prompt", "y" * 1000, "maxLength"),
    ],
)
def test_caps_follow_the_settings_of_each_app(
    redis_url: str, redis_conn: redis.Redis, setting: str, cap: int, field: str, value: Any, schema_key: str
) -> None:
    """Guards: the request model's caps fixed at import, or copied from the defaults, so an app built
    with smaller caps still accepts (and documents) what only the default app should accept."""
    body = {"prompt": "x", field: value}
    with client_for(make_settings(redis_url)) as c:
        assert c.post("/v1/jobs", json=body).status_code == 202
    with client_for(make_settings(redis_url, **{setting: cap})) as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        assert ["body", field] in [e["loc"] for e in r.json()["detail"]]
        prop = c.get("/openapi.json").json()["components"]["schemas"]["JobRequest"]["properties"][field]
        constraints = prop["anyOf"][0] if "anyOf" in prop else prop
        assert constraints[schema_key] == cap
        assert str(cap) in prop["description"]


def test_request_model_is_job_request_narrowed_only_by_the_caps() -> None:
    """Guards: the API's request model re-declaring JobRequest's fields and drifting from the shared
    contract (a default, a hard bound or the size multiple written twice and changed once)."""
    from app.schemas import make_request_model
    from bailan.jobs import DEFAULT_STEPS, JobRequest

    model = make_request_model(ApiSettings(max_steps=10, max_width=512))
    assert issubclass(model, JobRequest)
    assert list(model.model_fields) == list(JobRequest.model_fields)
    for name, base in JobRequest.model_fields.items():
        field = model.model_fields[name]
        assert field.annotation == base.annotation, name
        assert all(m in field.metadata for m in base.metadata), name
        assert field.examples == base.examples, name
        if name != "steps":
            assert field.default == base.default, name
    # The default follows a cap below it, so an empty request stays valid.
    assert model(prompt="x").steps == 10
    assert make_request_model(ApiSettings())(prompt="x").steps == DEFAULT_STEPS
    assert model(prompt="x", width=512).width == 512


# ---------------------------------------------------------------- reaper


def test_reaper_fails_job_of_dead_worker(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: a kill -9'ed worker's job staying 'running' forever when no other worker is alive."""
    settings = make_settings(redis_url, reap_interval_s=0.05, abandoned_retries=0)
    with client_for(settings) as c:
        job_id = submit(c)["id"]
        start_job(redis_conn, job_id, execution_score=time.time() - 100)
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] in ("running", "failed")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            view = c.get(f"/v1/jobs/{job_id}").json()
            if view["status"] == "failed":
                break
            time.sleep(0.05)
        assert view["status"] == "failed"
        assert view["error"]["code"] == "worker_lost"
        assert view["finished_at"] is not None


def test_reaped_job_is_never_failed_without_its_reason(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: a poll between RQ failing an abandoned job and the reaper writing worker_lost into
    its record, which showed the job failed with an `internal` error (and later worker_lost)."""
    from rq.registry import StartedJobRegistry

    from bailan.reaper import reap_abandoned

    settings = make_settings(redis_url, abandoned_retries=0)
    with client_for(settings) as c:
        job_id = submit(c)["id"]
        start_job(redis_conn, job_id, execution_score=time.time() - 100)
        seen: list[Any] = []
        real_cleanup = StartedJobRegistry.cleanup

        def cleanup(registry: StartedJobRegistry, *args: Any, **kwargs: Any) -> Any:
            # What a poll would read the instant RQ marks the job failed.
            result = real_cleanup(registry, *args, **kwargs)
            seen.append(c.get(f"/v1/jobs/{job_id}").json())
            return result

        with mock.patch.object(StartedJobRegistry, "cleanup", cleanup):
            deadline = time.monotonic() + 5
            while not reap_abandoned(redis_conn, QUEUE) and time.monotonic() < deadline:
                time.sleep(0.02)  # the app's own reaper may hold the sweep lock
        assert seen and seen[0]["status"] == "failed"
        assert seen[0]["error"]["code"] == "worker_lost"


def test_reaper_requeues_while_retries_left(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: a job lost to a dying worker failing at once although abandoned_retries allows a
    rerun, or requeued still marked with that worker's model."""
    job_id = submit(client)["id"]
    start_job(redis_conn, job_id, execution_score=time.time() - 100)
    # The app's own reaper sweeps once at start-up on its thread; while it holds the
    # sweep lock a second sweep finds nothing to do, so ask until this one runs.
    deadline = time.monotonic() + 5
    while not (reaped := Reaper(redis_conn, QUEUE, 1).sweep()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reaped == [job_id]
    view = client.get(f"/v1/jobs/{job_id}").json()
    assert view["status"] == "queued" and view["queue_position"] == 1
    # The dead worker's model goes too, the job naming none: its view and wait estimate looked
    # for that model's workers (waiting_for_worker, no eta_s) where any worker would take it.
    assert redis_conn.hget(Keys.job(job_id), RecordField.model) is None
    assert view["model"] is None and view["waiting_for_worker"] is False


def test_reaper_survives_redis_down() -> None:
    """Guards: the reaper thread dying (and never reaping again) after one Redis outage."""
    conn = redis.Redis(port=closed_port(), socket_connect_timeout=0.5)
    assert Reaper(conn, QUEUE, 1).sweep() == []


def test_every_area_router_is_served(settings: ApiSettings) -> None:
    """Guards: a new area module in app/routes/ whose module-level router was never included in
    app.api, so its routes answer 404 and are missing from /openapi.json."""
    import importlib
    import pkgutil

    import app.routes

    paths = create_app(settings).openapi()["paths"]
    served = {(path, method.upper()) for path, operations in paths.items() for method in operations}
    areas = [importlib.import_module(f"app.routes.{m.name}") for m in pkgutil.iter_modules(app.routes.__path__)]
    assert {area.__name__ for area in areas} >= {"app.routes.jobs", "app.routes.service"}
    for area in areas:
        routes = {(route.path, method) for route in area.router.routes for method in route.methods}
        assert routes and routes <= served, area.__name__
    assert ("/v1/jobs", "POST") in served  # the one route create_app adds itself


def test_app_never_imports_torch() -> None:
    """Guards: the API process pulling in torch/diffusers (seconds of start-up, GPU libraries on the front end)."""
    code = "import app.main, sys; app.main.create_app(); assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_non_json_content_type_is_422(client: TestClient) -> None:
    """Guards: a form or plain-text body answered 500 instead of 422."""
    r = client.post("/v1/jobs", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 422, r.text
    r = client.post("/v1/jobs", data={"prompt": "x"})
    assert r.status_code == 422, r.text


def test_redis_out_of_memory_is_503(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: a Redis refusing writes (OOM under noeviction) surfacing as a 500."""
    try:
        original = redis_conn.config_get("maxmemory")["maxmemory"]
        redis_conn.config_set("maxmemory", "1")
    except redis.ResponseError:
        pytest.skip("this Redis does not allow CONFIG SET")
    try:
        r = client.post("/v1/jobs", json={"prompt": "x"})
    finally:
        redis_conn.config_set("maxmemory", original)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"]


def override_job_access(app: FastAPI, connect: Callable[[], redis.asyncio.Redis], **fields: Any) -> None:
    """The job routes read through one bundle (app.deps.JobAccess): swap its event-loop client
    for one `connect()` makes per request (closed after it), and any other `fields`."""
    import dataclasses

    from app.deps import JobAccess, get_job_access

    async def access() -> AsyncIterator[JobAccess]:
        conn = connect()
        try:
            yield dataclasses.replace(app.state.job_access, aredis=conn, **fields)
        finally:
            await conn.aclose()

    app.dependency_overrides[get_job_access] = access


def test_dependencies_can_be_overridden(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: routes reaching Redis around the injected dependency (tests and tools could not swap it)."""
    import redis.asyncio

    from app.deps import get_redis

    app = create_app(ApiSettings(redis_url=f"redis://127.0.0.1:{closed_port()}/0", queue_name=QUEUE))
    app.dependency_overrides[get_redis] = lambda: redis_conn
    override_job_access(app, lambda: redis.asyncio.Redis.from_url(redis_url), redis=redis_conn)
    with TestClient(app) as c:
        job_id = submit(c)["id"]
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert c.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
    assert redis_conn.exists(Keys.job(job_id))


def test_idempotency_key_replays_instead_of_queuing_twice(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: a client retrying a timed-out submit getting (and paying for) a second job."""
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json={"prompt": "x"}, headers=headers)
    assert first.status_code == 202
    again = client.post("/v1/jobs", json={"prompt": "x"}, headers=headers)
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["params"]["seed"] == first.json()["params"]["seed"]
    assert again.headers["location"] == first.headers["location"]
    assert redis_conn.llen(f"rq:queue:{QUEUE}") == 1
    r = client.post("/v1/jobs", json={"prompt": "y"}, headers=headers)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert client.post("/v1/jobs", json={"prompt": "x"}).json()["id"] != first.json()["id"]


def test_idempotency_key_with_a_default_spelled_out_is_another_body(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards against a replay of a different job: the fingerprint filled in the service's
    defaults, so a body leaving `steps` to the model (whose default is 12) matched one asking
    for the service's 25, and the second was answered with the first's 12-step job."""
    publish_worker(redis_conn, "w1", defaults={"guidance_scale": 1.0, "steps": 12})
    headers = {"Idempotency-Key": "order-43"}
    first = client.post("/v1/jobs", json={"prompt": "x"}, headers=headers)
    assert first.status_code == 202 and first.json()["params"]["steps"] == 12
    spelled = client.post("/v1/jobs", json={"prompt": "x", "steps": 25, "guidance_scale": 7.5}, headers=headers)
    assert spelled.status_code == 422 and spelled.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert client.post("/v1/jobs", json={"prompt": "x"}, headers=headers).status_code == 200  # the same body replays


def test_idempotency_key_released_when_submit_fails(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: a key burnt by a 429, so the client's retry with it can never succeed."""
    with client_for(make_settings(redis_url, max_queue_depth=1)) as c:
        blocker = submit(c)["id"]
        headers = {"Idempotency-Key": "k1"}
        assert c.post("/v1/jobs", json={"prompt": "x"}, headers=headers).status_code == 429
        assert c.post(f"/v1/jobs/{blocker}/cancel").status_code == 200
        r = c.post("/v1/jobs", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 202


def test_a_submit_whose_reply_timed_out_is_replayed_not_queued_again(
    client: TestClient, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the case Idempotency-Key exists for: Redis ran the submit's transaction
    and its reply timed out (a stall past BAILAN_REDIS_TIMEOUT_S). The API answered 503 and
    deleted the key's claim, so the client's retry with the key queued a second job."""
    from app.store import records

    real_submit = records.submit

    def timed_out(*args: Any, **kwargs: Any) -> str:
        real_submit(*args, **kwargs)
        raise redis.TimeoutError("injected: the reply to an applied EXEC timed out")

    monkeypatch.setattr(records, "submit", timed_out)
    headers = {"Idempotency-Key": "stalled"}
    assert client.post("/v1/jobs", json={"prompt": "x"}, headers=headers).status_code == 503
    monkeypatch.undo()
    retry = client.post("/v1/jobs", json={"prompt": "x"}, headers=headers)
    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true", retry.text
    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [retry.json()["id"].encode()]


def test_a_retry_is_replayed_whatever_changed_since_its_first_submit(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    """Guards against a retry refused although its job was made: the key was looked up only
    after the checks that read what may change between two tries (the live workers' caps; the
    server's default model, which also entered the fingerprint), so a retry after the only
    GPU worker died got a 422 on its width, and one after BAILAN_DEFAULT_MODEL changed (or
    through another API replica) a 422 'key reused with another body'."""
    headers = {"Idempotency-Key": "retry-later"}
    body = {"prompt": "x", "width": 1024, "height": 1024}
    publish_worker(redis_conn, "gpu", width=512, height=512)
    with client_for(make_settings(redis_url)) as c:
        first = c.post("/v1/jobs", json=body, headers=headers)
        assert first.status_code == 202, first.text
        presence.withdraw(redis_conn, "gpu")
        publish_worker(redis_conn, "cpu", width=512, height=512, device="cpu",
                       caps={"max_pixels": 512 * 512, "max_steps": 50})
        assert c.post("/v1/jobs", json={**body, "prompt": "y"}).status_code == 422  # as a new job: refused
        again = c.post("/v1/jobs", json=body, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"], again.text

    other = {"Idempotency-Key": "another-default"}
    with client_for(make_settings(redis_url, default_model="alpha")) as c:
        first = c.post("/v1/jobs", json={"prompt": "z"}, headers=other)
        assert first.status_code == 202, first.text
    with client_for(make_settings(redis_url, default_model="beta")) as c:
        again = c.post("/v1/jobs", json={"prompt": "z"}, headers=other)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"], again.text


def test_idempotency_key_of_expired_job_starts_a_new_one(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: a key whose job expired answering 409 'in progress' forever."""
    headers = {"Idempotency-Key": "k2"}
    first = client.post("/v1/jobs", json={"prompt": "x"}, headers=headers).json()["id"]
    redis_conn.delete(Keys.job(first))
    key = next(iter(redis_conn.scan_iter("bailan:idempotency:*")))
    value = json.loads(redis_conn.get(key))
    value["claimed_at"] = now() - 3600
    redis_conn.set(key, json.dumps(value))
    r = client.post("/v1/jobs", json={"prompt": "x"}, headers=headers)
    assert r.status_code == 202 and r.json()["id"] != first


def test_a_submit_slower_than_the_keys_window_queues_nothing_twice(
    client: TestClient, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against two jobs for one Idempotency-Key: a submit still in flight after the
    claim's 10 s window (a slow Redis) had its claim taken over by the client's retry, which
    queued a job, and then queued its own as well. Its transaction now runs only while the
    claim still names its job; otherwise it answers with the retry's job (a replay)."""
    from app.store import records

    real_submit = records.submit
    retried: list[str] = []

    def slow_submit(*args: Any, **kwargs: Any) -> str:
        # While this submit is in flight, past the window, the client's retry takes the key over.
        key = next(iter(redis_conn.scan_iter("bailan:idempotency:*")))
        value = json.loads(redis_conn.get(key))
        value["claimed_at"] = now() - 60
        redis_conn.set(key, json.dumps(value))
        monkeypatch.setattr(records, "submit", real_submit)
        retry = client.post("/v1/jobs", json={"prompt": "x"}, headers={"Idempotency-Key": "slow"})
        assert retry.status_code == 202
        retried.append(retry.json()["id"])
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(records, "submit", slow_submit)
    first = client.post("/v1/jobs", json={"prompt": "x"}, headers={"Idempotency-Key": "slow"})
    assert first.status_code == 200 and first.headers["idempotent-replayed"] == "true", first.text
    assert first.json()["id"] == retried[0]
    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [retried[0].encode()]  # one job, the retry's
    assert not redis_conn.zcard(Keys.reservations(QUEUE))  # the slow one's place was given back


def test_a_stale_claim_taken_over_meanwhile_is_not_deleted(
    settings: ApiSettings, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against two jobs for one key: a request read a stale claim (its job expired) and
    deleted it, but another retry had meanwhile replaced it with its own, live claim; the DEL
    removed that one, and this request claimed the key and queued a second job."""
    from app.store.idempotency import IdempotencyInFlight, claim_idempotency, idempotency_digest

    key = Keys.idempotency(idempotency_digest("anonymous", "race"))
    redis_conn.set(key, json.dumps({"job_id": "a" * 32, "fingerprint": "f", "claimed_at": now() - 3600}))
    taken = json.dumps({"job_id": "b" * 32, "fingerprint": "f", "claimed_at": now()})
    real_get = redis_conn.get
    done: list[bool] = []

    def read_then_taken_over(name: str) -> Any:
        raw = real_get(name)
        if name == key and not done:
            done.append(True)
            redis_conn.set(key, taken)  # the other retry, between this read and the delete
        return raw

    monkeypatch.setattr(redis_conn, "get", read_then_taken_over)
    with pytest.raises(IdempotencyInFlight):  # the other's claim, still in flight
        claim_idempotency(settings, redis_conn, "race", "f", "anonymous")
    assert real_get(key) == taken.encode()


def test_idempotency_key_in_flight_is_409(client: TestClient, settings: ApiSettings, redis_conn: redis.Redis) -> None:
    """Guards: two concurrent requests with one key both queuing a job, or the second seeing a 404."""
    from app.schemas import make_request_model
    from app.store.idempotency import idempotency_digest, request_fingerprint

    fingerprint = request_fingerprint(make_request_model(settings)(prompt="x"))
    value = {"job_id": "f" * 32, "fingerprint": fingerprint, "claimed_at": now()}
    # Keys are scoped per API key; open mode's is "anonymous".
    redis_conn.set(Keys.idempotency(idempotency_digest("anonymous", "k3")), json.dumps(value))
    r = client.post("/v1/jobs", json={"prompt": "x"}, headers={"Idempotency-Key": "k3"})
    assert r.status_code == 409 and r.headers["retry-after"] == "1"
    assert redis_conn.llen(f"rq:queue:{QUEUE}") == 0


def read_events(client: TestClient, path: str, timeout_s: float = 5) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    name = ""
    deadline = time.monotonic() + timeout_s
    with client.stream("GET", path) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, line[len("data: "):]))
            assert time.monotonic() < deadline, events
    return events


def test_event_stream_follows_job_to_the_end(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: the push stream missing progress, never ending after a final status, or 500 on unknown ids."""
    import threading

    with client_for(make_settings(redis_url, events_poll_interval_s=0.02)) as c:
        job_id = submit(c)["id"]

        def worker() -> None:
            # Once the stream follows the job (its subscription is up), and a moment more for its
            # first view: a slow start (a loaded CI host) saw the job running already.
            deadline = time.monotonic() + 30
            while redis_conn.pubsub_numsub(Keys.job_events(job_id))[0][1] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            start_job(redis_conn, job_id)
            redis_conn.hset(Keys.job(job_id), RecordField.step, "7")
            time.sleep(0.2)
            redis_conn.hset(Keys.job(job_id), mapping={RecordField.step: "25", RecordField.finished_at: repr(now())})
            Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).set_status(JobStatus.FINISHED)

        thread = threading.Thread(target=worker)
        thread.start()
        events = read_events(c, f"/v1/jobs/{job_id}/events")
        thread.join()
        views = [json.loads(data) for name, data in events if name == "job"]
        assert views[0]["status"] == "queued"
        assert any(v["status"] == "running" and v["progress"]["step"] == 7 for v in views)
        assert views[-1]["status"] == "succeeded"
        assert c.get(f"/v1/jobs/{'0' * 32}/events").status_code == 404


def test_event_stream_reports_expiry(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: a stream spinning forever on a job whose record expired under it."""
    import threading

    with client_for(make_settings(redis_url, events_poll_interval_s=0.02)) as c:
        job_id = submit(c)["id"]

        def expire() -> None:
            # Once the stream follows the job, and its first view is out (as above).
            deadline = time.monotonic() + 30
            while redis_conn.pubsub_numsub(Keys.job_events(job_id))[0][1] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            redis_conn.delete(Keys.job(job_id))

        timer = threading.Thread(target=expire)
        timer.start()
        events = read_events(c, f"/v1/jobs/{job_id}/events")
        timer.join()
        assert events[0][0] == "job" and events[-1][0] == "gone"


# ---------------------------------------------------------------- a model per request


def test_a_job_names_its_model_and_waits_in_that_models_queue(
    client: TestClient, redis_conn: redis.Redis
) -> None:
    """Guards: a job for one model landing on a queue another model's workers take, an
    unknown model accepted (or refused with no list of names), and a job for a model with
    no live worker queued silently."""
    r = client.post("/v1/jobs", json={"prompt": "x", "model": "sd15"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "model"]
    assert "none yet" in r.json()["detail"][0]["msg"]

    publish_worker(redis_conn, "w1")  # serves "tiny"
    redis_conn.sadd(Keys.models(QUEUE), "sd15")  # a model whose workers are all down
    r = client.post("/v1/jobs", json={"prompt": "x", "model": "sdxl"})
    assert r.status_code == 422 and "the models here: sd15, tiny" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/jobs", json={"prompt": "x", "model": "../etc"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model"]

    view = submit(client, model="sd15")
    assert Queue(f"{QUEUE}:m:sd15", connection=redis_conn).job_ids == [view["id"]]
    assert queue_of(redis_conn).job_ids == []
    assert (view["model"], view["params"]["model"], view["waiting_for_worker"]) == ("sd15", "sd15", True)
    redis_conn.set(Keys.model_live("sd15"), "w9", ex=30)  # what a worker of it writes with its heartbeat
    assert client.get(f"/v1/jobs/{view['id']}").json()["waiting_for_worker"] is False

    # A job that names no model, with no default: the plain queue, which every worker takes.
    plain = submit(client)
    assert queue_of(redis_conn).job_ids == [plain["id"]]
    assert (plain["model"], plain["waiting_for_worker"]) == (None, False)

    models = {m["model"]: m["workers"] for m in client.get("/v1/models").json()["models"]}
    assert models == {"sd15": 0, "tiny": 1}


def test_the_default_model_takes_jobs_that_name_none(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: BAILAN_DEFAULT_MODEL ignored, so a job that names no model runs on whichever
    model's worker is free first; and sizes or defaults taken from another model's workers."""
    with client_for(make_settings(redis_url, default_model="small")) as c:
        publish_worker(redis_conn, "w1", width=64, height=64, model="small", defaults={"guidance_scale": 1.0})
        publish_worker(redis_conn, "w2", width=512, height=512, model="big", defaults={"guidance_scale": 7.0})
        view = submit(c)
        assert Queue(f"{QUEUE}:m:small", connection=redis_conn).job_ids == [view["id"]]
        params = view["params"]
        assert (params["model"], params["width"], params["guidance_scale"]) == ("small", 64, 1.0)
        big = submit(c, model="big")["params"]
        assert (big["width"], big["guidance_scale"]) == (512, 7.0)
        assert c.get("/v1/models").json()["default"] == "small"


def test_a_models_default_steps_count_against_the_cap(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: a model whose bailan_defaults.json asks for more steps than BAILAN_MAX_STEPS getting
    jobs queued over the cap whenever a client left steps out."""
    publish_worker(redis_conn, "w1", defaults={"steps": 80})
    with client_for(make_settings(redis_url, max_steps=50)) as c:
        r = c.post("/v1/jobs", json={"prompt": "x"})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", "steps"] and "default of 80 steps exceeds the limit of 50" in detail["msg"]
        assert submit(c, steps=40)["params"]["steps"] == 40


def test_waiting_notice_is_back_within_the_worker_keys_life(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: a model's live key renewed with the 30 s job lease, so for up to 30 s after the
    model's last worker died, its queued jobs' views did not say waiting_for_worker."""
    from worker.liveness import Liveness
    from worker.settings import WorkerSettings

    settings = WorkerSettings(redis_url=redis_url, queue_name=QUEUE, presence_ttl_s=4, heartbeat_ttl_s=30)
    Liveness(settings, redis_conn, slots=[], info={"model": "sd15"}).heartbeat()
    assert redis_conn.exists(Keys.worker(settings.name))
    assert 0 < redis_conn.pttl(Keys.model_live("sd15")) <= 4000


def test_live_workers_are_found_without_scanning_the_keyspace(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: /readyz, /v1/models and every submit walking the whole keyspace (every job record)
    with SCAN to find worker keys; and a dead worker's name lingering in the live set."""
    publish_worker(redis_conn, "w1")
    for i in range(50):
        redis_conn.set(f"bailan:job:filler{i}", "x", ex=60)  # keys a SCAN would have to walk
    before = redis_conn.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    assert client.get("/readyz").json()["workers"] == 1
    assert [m["workers"] for m in client.get("/v1/models").json()["models"]] == [1]
    submit(client)
    assert redis_conn.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) == before
    # A worker whose presence lapsed a minute ago: not live, and the next reader drops its name.
    redis_conn.zadd(Keys.workers(), {"gone": time.time() - presence.STALE_S - 1})
    assert client.get("/readyz").json()["workers"] == 1
    assert redis_conn.zscore(Keys.workers(), "gone") is None
    presence.withdraw(redis_conn, "w1")
    assert client.get("/readyz").status_code == 503


def test_a_worker_whose_clock_lags_is_still_live(
    client: TestClient, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against presence scored or read on a host's clock. Scored on the worker's and
    read on the API's, a worker more than its presence TTL (4 s) behind was never live
    (/readyz 503, no workers in /v1/models, no eta_s) while its key was alive in Redis;
    later, read within a minute of the score, one more than a minute behind still was not.
    Both sides now read Redis' TIME; the key's TTL, on Redis' clock too, decides."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # the worker's clock, an hour behind
    publish_worker(redis_conn, "lagging", samples_per_s=5.0, step_s=0.25, backlog=0)
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # the API's, an hour ahead
    assert client.get("/readyz").json()["workers"] == 1
    assert [m["workers"] for m in client.get("/v1/models").json()["models"]] == [1]
    job = submit(client)
    assert client.get(f"/v1/jobs/{job['id']}").json()["eta_s"] is not None  # the snapshot script's read too
    assert presence.any_live(redis_conn)  # the launcher's
    redis_conn.delete(Keys.worker("lagging"))  # its key expired: dead, though scored ahead
    assert client.get("/readyz").status_code == 503


def test_a_transaction_that_timed_out_is_not_sent_again(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards against the API's Redis client retrying a transaction after a read timeout: Redis
    had the first one already and ran it once it caught up, so it ran twice (a job queued
    twice, a completed webhook queued twice, a counter counted twice). The stall is real:
    a slow Lua script on another connection."""
    import threading

    from app.main import make_redis

    slow = "local x = 0 for i = 1, tonumber(ARGV[1]) do x = x + i end return 1"
    loops = 1
    while True:  # a script that keeps Redis busy for about 1.5 s on this machine
        started = time.perf_counter()
        redis_conn.eval(slow, 0, loops)
        took = time.perf_counter() - started
        if took > 0.05:
            break
        loops *= 4
    # Three times the timeout: measured under load, the stall once came out short of it and the
    # transaction got its answer. Any retry is sent within the stall and would still run twice.
    loops = int(loops * 1.5 / took)
    api = make_redis(make_settings(redis_url, redis_timeout_s=0.45))
    api.ping()
    stall = threading.Thread(target=lambda: redis.Redis.from_url(redis_url).eval(slow, 0, loops))
    stall.start()
    time.sleep(0.05)
    pipe = api.pipeline(transaction=True)
    pipe.rpush("bailan:test:sent-once", "job")
    with pytest.raises(redis.TimeoutError):
        pipe.execute()
    stall.join()
    wait_for_value = time.monotonic() + 5
    while not redis_conn.exists("bailan:test:sent-once") and time.monotonic() < wait_for_value:
        time.sleep(0.02)
    assert redis_conn.lrange("bailan:test:sent-once", 0, -1) in ([], [b"job"])  # at most once
    redis_conn.delete("bailan:test:sent-once")
    api.close()
