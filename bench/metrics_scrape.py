"""What a Prometheus scrape of GET /metrics costs, beside GET /healthz, in one run.

The real API (uvicorn, one process) on a private valkey seeded as a busy
deployment looks: W live worker keys (one with GPU figures), K API-key
queues with a few jobs each, and the worker figures' hash filled by a Tally
of many jobs. Then S sequential scrapes of each path; prints the median and
95th percentile latency and the exposition's size.

    .venv/bin/python bench/metrics_scrape.py [--workers 16] [--keys 200] [--scrapes 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bailan import presence  # noqa: E402
from bailan.jobs import Keys  # noqa: E402
from bailan.metrics import ADD_BATCH, Tally, add_batch  # noqa: E402
from bailan.queues import key_queue_name  # noqa: E402
from bench.common import answers_ok, free_port, private_valkey, wait_for  # noqa: E402


def seed(conn: redis.Redis, queue: str, workers: int, keys: int) -> None:
    pipe = conn.pipeline()
    for i in range(workers):
        info = {"worker": f"w{i}", "model": f"model-{i % 3}", "max_batch": 8}
        if i == 0:
            info.update(gpu_memory_allocated_bytes=1 << 33, gpu_memory_reserved_bytes=1 << 34,
                        gpu_memory_total_bytes=80 << 30)
        presence.publish(pipe, f"w{i}", json.dumps(info), 3600)
    for k in range(keys):
        name = key_queue_name(queue, f"client-{k}")
        pipe.sadd(Keys.key_queues(queue), name)
        pipe.rpush(f"rq:queue:{name}", *(f"{k:016x}{j:016x}" for j in range(3)))
    tally = Tally()
    for j in range(5000):
        model = f"model-{j % 3}"
        tally.observe("bailan_job_wait_seconds", (j % 97) / 10, {"model": model})
        tally.observe("bailan_step_seconds", (j % 13) / 100)
        tally.observe("bailan_batch_rows", 1 + j % 16)
        tally.inc("bailan_jobs_finished_total", {"model": model, "status": "succeeded"})
        tally.inc("bailan_images_total", {"model": model})
    add_batch(conn.register_script(ADD_BATCH), pipe, queue, "seed", 1, tally.take())
    pipe.execute()


def timed(client: httpx.Client, path: str, n: int) -> tuple[list[float], int]:
    seconds, size = [], 0
    for _ in range(n):
        started = time.perf_counter()
        response = client.get(path)
        seconds.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        size = len(response.content)
    return seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()

    server = private_valkey(Path(tempfile.mkdtemp(prefix="bailan-bench-")))
    url = f"redis://127.0.0.1:{server.port}/0"
    conn = redis.Redis.from_url(url)
    seed(conn, "bench", args.workers, args.keys)
    port = free_port()
    env = {**os.environ, "BAILAN_REDIS_URL": url, "BAILAN_QUEUE_NAME": "bench"}
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level", "warning"],
                           cwd=ROOT, env=env)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        wait_for(lambda: answers_ok(f"http://127.0.0.1:{port}/healthz"), 60, "the API", [api], every_s=0.2)
        timed(client, "/metrics", 10)  # warm up
        results = {path: timed(client, path, args.scrapes) for path in ("/healthz", "/metrics")}
        print(f"{args.workers} workers, {args.keys} key queues, {args.scrapes} sequential requests each")
        for path, (seconds, size) in results.items():
            ordered = sorted(seconds)
            print(f"  GET {path:9s} median {statistics.median(ordered) * 1000:6.2f} ms, "
                  f"p95 {ordered[int(len(ordered) * 0.95)] * 1000:6.2f} ms, body {size} bytes")
    finally:
        api.terminate()
        api.wait()
        server.stop()


if __name__ == "__main__":
    main()
