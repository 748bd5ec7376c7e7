"""Soak: many small jobs through the real service; does anything grow per job?

Starts a private valkey, the API (uvicorn, a keys file of --keys API keys) and
one worker on the built-in model on the CPU, with the blob store in a
temporary directory. Client threads (--clients per key) each submit a small
job, poll it to its end and fetch its image, until --jobs have finished. Every
--sample-every jobs it samples the API's and the worker's RSS (/proc) and
Redis's used_memory (INFO memory), then prints:

- each series' least-squares slope per 1000 jobs, over the samples after the
  first --warmup jobs (start-up, model load and first batches stay out);
- the totals: start, end, and the blob directory's files and bytes.

    .venv/bin/python bench/soak.py [--jobs 2000] [--keys 4] [--clients 4] [--max-seconds 600] \
        [--json bench/results/soak_cpu.json]

With --max-seconds the clients stop taking new jobs after that long, and the
figures cover the jobs that finished (the report says how many).

Redis keeps finished records for BAILAN_RESULT_TTL_S (a day), so its slope is
the per-job cost of a finished job's record (bailan.blobs keeps images out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bailan.keys import hash_key  # noqa: E402
from bench.common import answers_ok, free_port, private_valkey, wait_for  # noqa: E402

FINAL = {"succeeded", "failed", "canceled"}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope_per_1000(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs, times 1000 (per 1000 jobs)."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def dir_usage(path: Path) -> tuple[int, int]:
    files = size = 0
    for entry in path.rglob("*"):
        if entry.is_file():
            files += 1
            size += entry.stat().st_size
    return files, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=4, help="API keys submitting")
    parser.add_argument("--clients", type=int, default=4, help="client threads per key")
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="BAILAN_MAX_BATCH of the worker")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between a client's status polls")
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200, help="jobs left out of the slopes")
    parser.add_argument("--max-seconds", type=float, default=0,
                        help="stop submitting after this long and report the jobs done (0: run all --jobs)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bailan-soak-"))
    keys = {f"soak{i}": f"bl_soak-key-{i}" for i in range(args.keys)}
    keys_file = tmp / "keys"
    keys_file.write_text("".join(f"{name} {hash_key(key)}\n" for name, key in keys.items()))
    blob_dir = tmp / "blobs"
    server = private_valkey()
    redis_url = f"redis://127.0.0.1:{server.port}/0"
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BAILAN_REDIS_URL": redis_url,
           "BAILAN_API_KEYS_FILE": str(keys_file), "BAILAN_RATE_LIMIT": "none",
           "BAILAN_MAX_BATCH": str(args.batch), "BAILAN_DEVICE": "cpu", "BAILAN_BLOB_DIR": str(blob_dir)}
    logs = [(tmp / "api.log").open("wb"), (tmp / "worker.log").open("wb")]
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level",
                            "warning"], cwd=ROOT, env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    worker = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=logs[1],
                              stderr=subprocess.STDOUT)
    conn = redis.Redis.from_url(redis_url)
    base = f"http://127.0.0.1:{port}"
    body = {"prompt": "a red circle on a blue background", "width": args.size, "height": args.size,
            "steps": args.steps, "preview_every": 1}

    lock = threading.Lock()
    done = {"n": 0, "failed": 0, "claimed": 0}
    samples: list[dict[str, float]] = []
    errors: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        samples.append({"jobs": done["n"], "t_s": time.monotonic() - t0, "api_rss": rss_bytes(api.pid),
                        "worker_rss": rss_bytes(worker.pid),
                        "redis_used": int(conn.info("memory")["used_memory"])})

    def client(key: str) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, timeout=60, headers=headers) as http:
            while not stop.is_set():
                with lock:
                    if done["claimed"] >= args.jobs or (args.max_seconds and time.monotonic() - t0 > args.max_seconds):
                        return
                    done["claimed"] += 1
                try:
                    r = http.post("/v1/jobs", json=body)
                    if r.status_code != 202:
                        raise RuntimeError(f"submit: {r.status_code} {r.text[:200]}")
                    job = r.json()["id"]
                    while (view := http.get(f"/v1/jobs/{job}").json())["status"] not in FINAL:
                        time.sleep(args.poll)
                    ok = view["status"] == "succeeded"
                    if ok:
                        image = http.get(view["images"][0]["url"])
                        ok = image.status_code == 200 and image.content.startswith(b"\x89PNG")
                except Exception as exc:  # noqa: BLE001 - recorded, and the soak stops
                    errors.append(f"{type(exc).__name__}: {exc}")
                    stop.set()
                    return
                with lock:
                    done["n"] += 1
                    done["failed"] += 0 if ok else 1
                    if done["n"] % args.sample_every == 0:
                        sample()

    try:
        wait_for(lambda: answers_ok(f"{base}/readyz"), 300, f"the service (logs in {tmp})", [api, worker],
                 every_s=0.2)
        t0 = time.monotonic()
        sample()
        threads = [threading.Thread(target=client, args=(key,), daemon=True)
                   for key in keys.values() for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - t0
        if done["n"] % args.sample_every:
            sample()
        if errors:
            print("errors:", *errors[:5], sep="\n  ", file=sys.stderr)
        files, blob_bytes = dir_usage(blob_dir)
        late = [s for s in samples if s["jobs"] >= args.warmup]
        slopes = {name: slope_per_1000([s["jobs"] for s in late], [s[name] for s in late])
                  for name in ("api_rss", "worker_rss", "redis_used")}
        first, last = samples[0], samples[-1]
        result: dict[str, Any] = {
            "jobs": done["n"], "failed": done["failed"], "errors": errors[:5], "keys": args.keys,
            "clients_per_key": args.clients, "size": args.size, "steps": args.steps, "batch": args.batch, "poll_s": args.poll,
            "requested_jobs": args.jobs, "max_seconds": args.max_seconds, "elapsed_s": round(elapsed, 1), "jobs_per_s": round(done["n"] / elapsed, 2),
            "slopes_per_1000_jobs_bytes": {k: round(v) if v is not None else None for k, v in slopes.items()},
            "start": {k: first[k] for k in ("api_rss", "worker_rss", "redis_used")},
            "end": {k: last[k] for k in ("api_rss", "worker_rss", "redis_used")},
            "redis_bytes_per_job": round((last["redis_used"] - first["redis_used"]) / max(done["n"], 1)),
            "blob_files": files, "blob_bytes": blob_bytes,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "note": args.note, "samples": samples,
        }
        mib = 2**20
        print(f"{done['n']} jobs ({done['failed']} not succeeded) from {args.keys} keys x {args.clients} clients, "
              f"{args.size}x{args.size}, {args.steps} steps, in {elapsed:.0f} s ({result['jobs_per_s']} jobs/s)")
        for name, label in (("api_rss", "API RSS"), ("worker_rss", "worker RSS"), ("redis_used", "Redis used_memory")):
            slope = slopes[name]
            slope_text = f"{slope / 1024:+9.1f} KiB per 1000 jobs" if slope is not None else "n/a"
            print(f"{label:18} {first[name] / mib:8.1f} MiB -> {last[name] / mib:8.1f} MiB   slope {slope_text}")
        print(f"Redis per finished job: {result['redis_bytes_per_job']} bytes; "
              f"blob store: {files} files, {blob_bytes / mib:.1f} MiB (what Redis no longer holds)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 1 if errors or done["failed"] else 0
    finally:
        stop.set()
        for process in (worker, api):
            process.terminate()
        for process in (worker, api):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        server.stop()
        for log in logs:
            log.close()
        if not errors:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
