"""A fair share on the CPU: one API key floods the queue, another submits one job.

Starts a private valkey, the API (with a keys file of two keys) and one worker
on the built-in model, then measures the lone job of key `light`:

  1. alone: submit to succeeded, with nothing else queued;
  2. under a flood: key `heavy` first queues FLOOD jobs, and once the worker
     is busy with them, `light` submits its one job.

Workers take turns between the keys' queues (bailan.queues), so the lone job
waits for one freed slot, not for the 200 jobs ahead of it. The flood is
canceled once the lone job is done (the bench does not wait for it).

    .venv/bin/python bench/fairness.py [--flood 200] [--steps 25] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bailan.keys import hash_key  # noqa: E402
from bench.common import answers_ok, free_port, private_valkey, wait_for  # noqa: E402

KEYS = {"heavy": "bl_bench-heavy", "light": "bl_bench-light"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bailan-fairness-"))
    keys_file = tmp / "keys"
    keys_file.write_text("".join(f"{name} {hash_key(key)}\n" for name, key in KEYS.items()))
    server = private_valkey()
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BAILAN_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
           "BAILAN_API_KEYS_FILE": str(keys_file), "BAILAN_RATE_LIMIT": "none",
           "BAILAN_MAX_QUEUED_PER_KEY": str(args.flood + 10), "BAILAN_MAX_BATCH": str(args.batch),
           "BAILAN_DEVICE": "cpu"}
    logs = [(tmp / "api.log").open("wb"), (tmp / "worker.log").open("wb")]
    processes = [
        subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level",
                          "warning"], cwd=ROOT, env=env, stdout=logs[0], stderr=subprocess.STDOUT),
        subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=logs[1], stderr=subprocess.STDOUT),
    ]
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def as_key(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[name]}"}

    def submit(name: str) -> str:
        r = http.post("/v1/jobs", json={"prompt": "a red circle on a blue background", "steps": args.steps,
                                        "preview_every": 0}, headers=as_key(name))
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def view(name: str, job: str) -> dict[str, Any]:
        return http.get(f"/v1/jobs/{job}", headers=as_key(name)).json()

    def stamp(value: str) -> float:
        from datetime import datetime

        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()

    waits: list[float] = []

    def latency(name: str) -> float:
        t0 = time.perf_counter()
        job = submit(name)
        done = wait_for(lambda: (v := view(name, job))["status"] in ("succeeded", "failed", "canceled") and v,
                        1200, "the lone job")
        assert done["status"] == "succeeded", done
        waits.append(stamp(done["started_at"]) - stamp(done["created_at"]))
        return time.perf_counter() - t0

    try:
        wait_for(lambda: answers_ok(f"http://127.0.0.1:{port}/readyz"), 300,
                 "the worker (see its log in " + str(tmp) + ")", processes, every_s=0.2)
        latency("light")  # warm-up: first-job costs stay out of the figures
        alone = latency("light")
        print(f"lone job alone:        {alone:6.2f} s", flush=True)
        flood = [submit("heavy") for _ in range(args.flood)]
        wait_for(lambda: view("heavy", flood[args.batch - 1])["status"] != "queued", 600, "the flood to start")
        under = latency("light")
        ahead = sum(1 for job in flood if view("heavy", job)["status"] == "queued")
        first = [view("heavy", job) for job in flood[: args.batch]]
        batch_s = max(stamp(v["finished_at"]) for v in first if v["finished_at"]) - min(
            stamp(v["started_at"]) for v in first)
        print(f"lone job under flood:  {under:6.2f} s  ({args.flood} jobs of another key queued first; "
              f"{ahead} still queued when it finished)")
        print(f"ratio:                 {under / alone:6.2f}x")
        print(f"its wait in the queue: {waits[-1]:6.2f} s under the flood ({waits[-2]:.2f} s alone); "
              f"one batch of {args.batch} flood jobs ran {batch_s:.2f} s")
        for job in flood:
            http.post(f"/v1/jobs/{job}/cancel", headers=as_key("heavy"))
        if args.json:
            args.json.write_text(json.dumps({"flood": args.flood, "steps": args.steps, "batch": args.batch,
                                             "alone_s": alone, "under_flood_s": under, "ratio": under / alone,
                                             "queue_wait_alone_s": waits[-2], "queue_wait_under_flood_s": waits[-1],
                                             "first_batch_s": batch_s,
                                             "flood_still_queued": ahead}, indent=2))
    finally:
        http.close()
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
