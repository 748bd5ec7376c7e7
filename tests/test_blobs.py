"""The blob store: images and previews out of Redis memory, and gone when they expire.

Unit tests drive DirBlobStore on a temporary directory; expiry is tested by
writing expired timestamps (a blob's mtime is its expiry), never by sleeping.
The last test runs the real API and a real worker and measures what a finished
job costs Redis.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image

from bailan.blobs import DirBlobStore, image_key, preview_key
from bailan.jobs import Keys
from bailan.reaper import Reaper
from tests.test_e2e import Service

JOB = "0123456789abcdef0123456789abcdef"


def expire(store: DirBlobStore, key: str, ago_s: float = 1.0) -> None:
    """Make `key` expired `ago_s` seconds ago, as if its TTL had run out."""
    past = time.time() - ago_s
    os.utime(store._path(key), (past, past))


def test_put_get_replace_delete(tmp_path: Path) -> None:
    """Guards: bytes not coming back as written, a replacement not replacing, delete failing on absent keys."""
    store = DirBlobStore(tmp_path)
    assert store.get(image_key(JOB, 0)) is None
    store.put(image_key(JOB, 0), b"first", 60)
    store.put(preview_key(JOB, 5), b"\xff\xd8", 60)
    assert store.get(image_key(JOB, 0)) == b"first"
    store.put(image_key(JOB, 0), b"second", 60)
    assert store.get(image_key(JOB, 0)) == b"second"
    assert store.get(preview_key(JOB, 5)) == b"\xff\xd8"
    store.delete(image_key(JOB, 0))
    store.delete(image_key(JOB, 0))  # absent: fine
    assert store.get(image_key(JOB, 0)) is None
    # No temporary file is left behind by a write.
    assert sorted(p.name for p in (tmp_path / JOB[:2] / JOB).iterdir()) == ["preview-5"]


@pytest.mark.parametrize("key", ["../etc/passwd", f"{JOB}/../../x", f"{JOB}/a/b", "/abs", f"{JOB}/", "x", ""])
def test_keys_cannot_leave_the_root(tmp_path: Path, key: str) -> None:
    """Guards: a key that maps outside the blob directory (path traversal) being read or written."""
    store = DirBlobStore(tmp_path)
    with pytest.raises(ValueError, match="invalid blob key"):
        store.put(key, b"x", 60)
    with pytest.raises(ValueError, match="invalid blob key"):
        store.get(key)


def test_an_expired_blob_reads_as_absent_before_any_sweep(tmp_path: Path) -> None:
    """Guards: an image served after its TTL because no sweep has run yet."""
    store = DirBlobStore(tmp_path)
    store.put(image_key(JOB, 0), b"png", 60)
    expire(store, image_key(JOB, 0))
    assert store.get(image_key(JOB, 0)) is None


def test_sweep_removes_expired_blobs_and_empty_directories_only(tmp_path: Path) -> None:
    """Guards: expired files staying on disk for ever (the disk fills like Redis did), a sweep
    deleting live blobs, and half-written temporaries of a crashed writer never going."""
    store = DirBlobStore(tmp_path)
    other = "fedcba9876543210fedcba9876543210"
    store.put(image_key(JOB, 0), b"old", 60)
    store.put(preview_key(JOB, 5), b"old", 60)
    store.put(image_key(other, 0), b"live", 60)
    expire(store, image_key(JOB, 0))
    expire(store, preview_key(JOB, 5))
    stale = tmp_path / other[:2] / other / ".tmp-image-1-dead"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / other[:2] / other / ".tmp-image-2-busy"
    fresh.write_bytes(b"being written")

    assert store.sweep() == 3
    assert not (tmp_path / JOB[:2]).exists(), "the expired job's directories must go"
    assert store.get(image_key(other, 0)) == b"live"
    assert not stale.exists() and fresh.exists()
    # The same sweep, later: everything of a day-long TTL has expired.
    assert store.sweep(now=time.time() + 61) == 1
    assert store.get(image_key(other, 0)) is None


def test_a_sweep_of_a_root_given_wrongly_removes_only_blobs(tmp_path: Path) -> None:
    """Guards against a sweep that removed every old file three levels down, whatever it was:
    with the blob directory set to the checkout (an empty BAILAN_BLOB_DIR was the current
    directory) it deleted app/routes/*.py, then stopped at a directory (IsADirectoryError)."""
    store = DirBlobStore(tmp_path)
    old = time.time() - 86400
    others = [tmp_path / "app" / "routes" / "jobs.py", tmp_path / "ab" / "notes" / "todo.txt",
              tmp_path / "ab" / "ab12" / "Upper-Case", tmp_path / "models" / "m" / "config.json"]
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep me")
        os.utime(path, (old, old))
    (tmp_path / "ab" / "ab12" / "__pycache__").mkdir()
    job = "ab12cd34" * 4
    store.put(image_key(job, 0), b"expired", ttl_s=-10)
    assert store.sweep() == 1
    assert all(path.read_text() == "keep me" for path in others)
    assert (tmp_path / "ab" / "ab12" / "__pycache__").is_dir()
    assert not (tmp_path / "ab" / job).exists()


def test_the_reaper_sweeps_blobs_and_survives_a_failing_store(tmp_path: Path, redis_conn: redis.Redis) -> None:
    """Guards: nobody calling the sweep in the service, and a broken disk killing the API's reaper thread."""
    store = DirBlobStore(tmp_path)
    store.put(image_key(JOB, 0), b"old", 60)
    expire(store, image_key(JOB, 0))
    reaper = Reaper(redis_conn, "blobs-test", 3600, blobs=store, blob_sweep_interval_s=3600)
    assert reaper.sweep_blobs() == 1 and store.get(image_key(JOB, 0)) is None

    class Broken(DirBlobStore):
        def sweep(self, now: float | None = None) -> int:
            raise OSError("disk gone")

    assert Reaper(redis_conn, "blobs-broken", 3600, blobs=Broken(tmp_path)).sweep_blobs() == 0


def test_api_processes_share_one_blob_sweep_per_interval(tmp_path: Path, redis_conn: redis.Redis) -> None:
    """Guards: every API process (BAILAN_API_PROCESSES) walking the whole blob store every
    interval, N full scans of a shared volume where one does."""
    store = DirBlobStore(tmp_path)
    first = Reaper(redis_conn, "blobs-shared", 3600, blobs=store, blob_sweep_interval_s=3600)
    second = Reaper(redis_conn, "blobs-shared", 3600, blobs=store, blob_sweep_interval_s=3600)
    store.put(image_key(JOB, 0), b"old", 60)
    expire(store, image_key(JOB, 0))
    assert first.sweep_blobs() == 1
    store.put(image_key(JOB, 1), b"old", 60)
    expire(store, image_key(JOB, 1))
    assert second.sweep_blobs() == 0 and store._path(image_key(JOB, 1)).exists()  # swept this interval
    redis_conn.delete("bailan:blob-sweep-lock:blobs-shared")  # the interval has passed
    assert second.sweep_blobs() == 1 and not store._path(image_key(JOB, 1)).exists()


# ------------------------------------------------------------------ the real service

# A finished job's share of Redis: its record, RQ's job and result, its preview index.
MAX_JOB_REDIS_BYTES = 4096


def job_keys(conn: redis.Redis, job_id: str) -> list[bytes]:
    return list(conn.scan_iter(match=f"*{job_id}*", count=1000))


@pytest.fixture(scope="module")
def blob_service(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Path]]:
    blob_dir = tmp_path_factory.mktemp("blobs")
    svc = Service(redis_url, tiny_model_dir, tmp_path_factory.mktemp("blob-service"), queue="blobs",
                  BAILAN_BLOB_DIR=str(blob_dir))
    svc.add_worker()
    svc.wait_ready()
    yield svc, blob_dir
    svc.close()


def test_a_finished_job_costs_redis_a_few_kb_and_its_images_live_in_files(
    blob_service: tuple[Service, Path], redis_url: str
) -> None:
    """Guards: final images or previews written into Redis again (a 64x64 PNG alone is several KB,
    a 512x512 one hundreds), and a worker and an API that disagree on where the blobs are."""
    service, blob_dir = blob_service
    conn = redis.Redis.from_url(redis_url)
    job = service.submit(width=64, height=64, steps=12, preview_every=3, num_images=2, seed=5)
    view = service.wait_status(job["id"], {"succeeded", "failed"}, timeout=120)
    assert view["status"] == "succeeded", view
    assert [p["step"] for p in view["previews"]] == [3, 6, 9]

    sizes: dict[str, int] = {}
    for key in job_keys(conn, job["id"]):
        sizes[key.decode()] = int(conn.memory_usage(key, samples=0) or 0)
    assert Keys.job(job["id"]) in sizes
    total = sum(sizes.values())
    print(f"\nRedis memory of one finished 2-image job with 3 previews: {total} bytes {sizes}")
    assert total <= MAX_JOB_REDIS_BYTES, sizes

    image = service.http.get(view["images"][1]["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    preview = service.http.get(view["previews"][-1]["url"])
    assert preview.status_code == 200 and preview.content.startswith(b"\xff\xd8")
    job_dir = blob_dir / job["id"][:2] / job["id"]
    assert (job_dir / "image-1").read_bytes() == image.content
    assert (job_dir / "preview-9").read_bytes() == preview.content
    # No value anywhere in the job's keys carries image bytes.
    for key in job_keys(conn, job["id"]):
        if conn.type(key) == b"string":
            assert b"PNG" not in (conn.get(key) or b"") and b"JFIF" not in (conn.get(key) or b"")

    # A day later, records and blobs are both gone: the sweep deletes what expired with them.
    assert DirBlobStore(blob_dir).sweep(now=time.time() + 86400 + 1) >= 5
    assert not job_dir.exists()
    assert service.http.get(view["images"][1]["url"]).status_code == 404


def test_an_image_to_image_job_leaves_no_input_image_in_redis(
    blob_service: tuple[Service, Path], redis_url: str
) -> None:
    """Guards: a client's init_image and mask_image (up to megabytes each) kept in Redis for a day
    after the job that needed them ended."""
    service, _ = blob_service
    conn = redis.Redis.from_url(redis_url)
    picture, mask = io.BytesIO(), io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(picture, format="PNG")
    Image.new("L", (64, 64), 255).save(mask, format="PNG")
    job = service.submit(steps=4, strength=0.5, init_image=base64.b64encode(picture.getvalue()).decode(),
                         mask_image=base64.b64encode(mask.getvalue()).decode())
    view = service.wait_status(job["id"], {"succeeded", "failed"}, timeout=120)
    assert view["status"] == "succeeded", view
    assert not conn.exists(Keys.input_image(job["id"], "init_image"), Keys.input_image(job["id"], "mask_image"))
    total = sum(int(conn.memory_usage(key, samples=0) or 0) for key in job_keys(conn, job["id"]))
    assert total <= MAX_JOB_REDIS_BYTES
