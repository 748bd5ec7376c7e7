"""Per-device caps on size and steps (bailan.caps): a CPU worker never takes what costs minutes a step.

The API tests publish worker presence keys as a worker does (with their caps)
against the conftest's real Redis; the last test runs the real API and a real
CPU worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.main import create_app
from bailan.caps import DeviceCaps
from tests.test_api import announce, make_settings
from tests.test_e2e import Service, wait_for
from tests.test_ops import scrape, total


def publish(conn: redis.Redis, name: str, device: str, caps: Any, width: int = 128, height: int = 128) -> None:
    info = {"model": "tiny", "width": width, "height": height, "worker": name, "device": device,
            "dtype": "float32", "max_batch": 4, "caps": caps}
    announce(conn, name, json.dumps(info))


def test_caps_name_the_field_over_them() -> None:
    """Guards: a cap not applied, or its reason naming the wrong field."""
    caps = DeviceCaps(max_pixels=256 * 256, max_steps=30)
    assert caps.refusal(256, 256, 30) is None
    field, reason = caps.refusal(512, 256, 10) or ("", "")
    assert field == "width" and "131072" in reason and "65536" in reason
    assert (caps.refusal(64, 64, 31) or ("",))[0] == "steps"
    assert DeviceCaps().refusal(4096, 4096, 10_000) is None
    # What an older or broken worker published means no caps, never a crash.
    assert DeviceCaps.from_json(None) == DeviceCaps() == DeviceCaps.from_json({"max_pixels": "x", "max_steps": True})


def test_worker_caps_follow_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: the CPU caps not applied on the CPU by default, or applied to a GPU."""
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    assert settings.device_caps("cpu") == DeviceCaps(max_pixels=512 * 512, max_steps=50)
    assert settings.device_caps("cuda") == DeviceCaps()
    monkeypatch.setenv("BAILAN_MAX_PIXELS_CPU", "0")
    monkeypatch.setenv("BAILAN_MAX_STEPS_CUDA", "80")
    settings = WorkerSettings()
    assert settings.device_caps("cpu") == DeviceCaps(max_pixels=None, max_steps=50)
    assert settings.device_caps("cuda") == DeviceCaps(max_steps=80)


def test_api_refuses_what_no_live_worker_takes_naming_the_field(
    client: TestClient, redis_conn: redis.Redis
) -> None:
    """Guards: a 1024² job accepted when only a CPU worker capped at 512² is alive (it would
    take minutes a step, or fail), its 422 not naming the field, and a job refused although
    one live worker could take it."""
    redis_conn.flushdb()
    # No live worker: the job may wait for one, so it is accepted.
    assert client.post("/v1/jobs", json={"prompt": "x", "width": 1024, "height": 1024}).status_code == 202
    publish(redis_conn, "cpu-1", "cpu", {"max_pixels": 512 * 512, "max_steps": 50}, width=512, height=512)
    r = client.post("/v1/jobs", json={"prompt": "x", "width": 1024, "height": 1024})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "width"] and "262144" in detail["msg"] and "cpu" in detail["msg"]
    r = client.post("/v1/jobs", json={"prompt": "x", "height": 1024})  # width: the model's 512
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "height"]
    r = client.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "steps": 51})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]
    assert client.post("/v1/jobs", json={"prompt": "x", "width": 512, "height": 512, "steps": 50}).status_code == 202
    # A GPU worker without caps joins: it takes the big job.
    publish(redis_conn, "gpu-1", "cuda:0", {"max_pixels": None, "max_steps": None}, width=512, height=512)
    assert client.post("/v1/jobs", json={"prompt": "x", "width": 1024, "height": 1024}).status_code == 202


def test_api_refuses_more_images_than_any_live_workers_batch(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards against a job of 3 or 4 images (the API's own range) accepted when every live
    worker batches at most 2 (a GPU under 14 GiB, or BAILAN_MAX_BATCH=2): it waited its turn,
    then its worker failed it as invalid_for_model."""
    redis_conn.flushdb()
    info = {"model": "tiny", "width": 128, "height": 128, "worker": "small-gpu", "device": "cuda:0",
            "dtype": "float16", "max_batch": 2, "caps": {"max_pixels": None, "max_steps": None}}
    announce(redis_conn, "small-gpu", json.dumps(info))
    assert client.post("/v1/jobs", json={"prompt": "x", "num_images": 2}).status_code == 202
    r = client.post("/v1/jobs", json={"prompt": "x", "num_images": 3})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "num_images"] and "batch of 2" in detail["msg"]
    announce(redis_conn, "big-gpu", json.dumps({**info, "worker": "big-gpu", "max_batch": 8}))
    assert client.post("/v1/jobs", json={"prompt": "x", "num_images": 3}).status_code == 202


def test_a_cpu_worker_fails_a_job_over_its_caps_with_a_clear_code(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Guards: a CPU worker running a job over its caps (minutes a step) instead of failing it with
    exceeds_device_limits (counted so in /metrics, not as internal), and a worker that does not
    publish its caps (the API could not refuse)."""
    redis.Redis.from_url(redis_url).flushdb()
    service = Service(redis_url, tiny_model_dir, tmp_path, queue="caps", BAILAN_DEVICE="cpu",
                      BAILAN_MAX_PIXELS_CPU=str(32 * 32), BAILAN_MAX_STEPS_CPU="4")
    try:
        # Submitted while no worker is alive: accepted, and left to the worker.
        big = service.submit(width=64, height=64, steps=2)
        service.add_worker()
        failed = service.wait_status(big["id"], {"succeeded", "failed"}, timeout=120)
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "exceeds_device_limits"
        assert "4096 pixels exceeds 1024" in failed["error"]["message"]
        # Counted under its own code, not as an internal error (the worker sends counts every tick).
        wait_for(lambda: total(scrape(service), "bailan_jobs_finished_total", error="exceeds_device_limits") == 1,
                 10, "the refusal in /metrics")
        assert total(scrape(service), "bailan_jobs_finished_total", error="internal") == 0
        # Its caps are published: now the API refuses the same job up front.
        r = service.http.post("/v1/jobs", json={"prompt": "x", "width": 32, "height": 32, "steps": 5})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"], r.text
        small = service.submit(width=32, height=32, steps=4)
        assert service.wait_status(small["id"], {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
    finally:
        service.close()


def worker_reads(conn: redis.Redis) -> int:
    """Reads of the live workers so far: each is one ZRANGEBYSCORE of the live set (bailan.presence)."""
    return int(conn.info("commandstats").get("cmdstat_zrangebyscore", {}).get("calls", 0))


def test_submits_share_one_read_of_the_live_workers(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: a read of the live workers on every submit (to find their sizes and caps), where
    one read per BAILAN_WORKERS_CACHE_S is enough.
    (The job view a submit answers with may read the workers itself, for eta_s: counted alike
    on both sides, so the difference is the submit path's own reads.)"""
    redis_conn.flushdb()
    publish(redis_conn, "cpu-1", "cpu", {"max_pixels": 512 * 512, "max_steps": 50}, width=512, height=512)

    def scans_for_five_submits(cache_s: float) -> int:
        with TestClient(create_app(make_settings(redis_url, workers_cache_s=cache_s))) as c:
            before = worker_reads(redis_conn)
            for _ in range(5):
                assert c.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64}).status_code == 202
            return worker_reads(redis_conn) - before

    assert scans_for_five_submits(0) - scans_for_five_submits(60) == 4
    with TestClient(create_app(make_settings(redis_url, workers_cache_s=60))) as c:
        assert c.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64}).status_code == 202
        # The cached view still holds the caps: over them is refused.
        r = c.post("/v1/jobs", json={"prompt": "x", "width": 1024, "height": 1024})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "width"]
