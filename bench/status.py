"""Polling throughput of GET /v1/jobs/{id} against a bare FastAPI endpoint, in one run.

Both servers run as `make run` starts the API (uvicorn with the launcher's
limits: bailan.launch.uvicorn_limits, one process each), on one private
valkey; a load generator with C keep-alive connections (raw HTTP/1.1 over
asyncio, so the client costs little) polls each. The bare app answers the
same path with a constant JSON body of similar size. Two jobs are polled: a
running one with two previews, and a queued one second in line with a live
worker's rates published, so that its view carries queue_position and eta_s.
Each is polled on an API process that keeps rendered views (the default: a
poll that finds the job unchanged is served the bytes rendered before,
"unchanged") and on one started with BAILAN_VIEW_CACHE_JOBS=0, which renders
every poll as if the job had changed since the last ("rendered").

The targets take turns for R rounds of D seconds each (bare, running,
queued, bare, ...), so a machine whose speed drifts during the run (a shared
host) drifts for all of them alike; each figure is the total over its rounds.

    .venv/bin/python bench/status.py [--connections 16] [--seconds 2] [--rounds 5] [--http h11|httptools]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rq import Queue  # noqa: E402
from rq.job import Job, JobStatus  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from bailan import presence  # noqa: E402
from bailan.jobs import Keys, RecordField  # noqa: E402
from bailan.launch import LaunchSettings, uvicorn_limits  # noqa: E402
from bench.common import answers_ok, free_port, private_valkey, wait_for  # noqa: E402

BARE_APP = '''
from fastapi import FastAPI
app = FastAPI()
BODY = {"id": "0" * 32, "status": "queued", "progress": {"step": 0, "total_steps": 25}, "queue_position": 1}

@app.get("/v1/jobs/{job_id}")
async def job(job_id: str) -> dict:
    return BODY
'''


def serve(app: str, port: int, env: dict[str, str], http: str, cwd: Path) -> subprocess.Popen[bytes]:
    limits = uvicorn_limits(LaunchSettings(_env_file=None, api_http=http))
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log", *limits]
    process = subprocess.Popen(argv, cwd=cwd, env=env)
    wait_for(lambda: answers_ok(f"http://127.0.0.1:{port}/docs"), 60, app, [process], every_s=0.1)
    return process


async def poll(port: int, path: str, connections: int, seconds: float) -> tuple[int, int]:
    """(2xx answers, others) from `connections` keep-alive connections polling for `seconds`."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    ok = bad = 0
    end = time.monotonic() + seconds

    async def one() -> None:
        nonlocal ok, bad
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < end:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 2"):
                ok += 1
            else:
                bad += 1
        writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return ok, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per target per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--http", choices=["h11", "httptools"], default="h11")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    server = private_valkey()
    url = f"redis://127.0.0.1:{server.port}/0"
    env = {**os.environ, "BAILAN_REDIS_URL": url, "BAILAN_RATE_LIMIT": "none"}
    env.pop("BAILAN_API_KEYS_FILE", None)
    bare_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bailan-bench-bare-{os.getpid()}"
    bare_dir.mkdir(exist_ok=True)
    (bare_dir / "bare_app.py").write_text(BARE_APP)
    api_port, bare_port, fresh_port = free_port(), free_port(), free_port()
    # A second API process renders every view afresh (BAILAN_VIEW_CACHE_JOBS=0): what a poll of a
    # job that changed since the last one costs (a running job on a GPU, a step every few
    # tens of milliseconds).
    processes = [serve("app.main:app", api_port, env, args.http, ROOT),
                 serve("bare_app:app", bare_port, env, args.http, bare_dir),
                 serve("app.main:app", fresh_port, {**env, "BAILAN_VIEW_CACHE_JOBS": "0"}, args.http, ROOT)]
    try:
        conn = redis.Redis.from_url(url)
        # A worker's presence with measured rates (what its heartbeat writes), so a queued job's
        # view carries its wait estimate; no worker runs, so the jobs stay as they are set up.
        pipe = conn.pipeline()
        presence.publish(pipe, "bench", json.dumps({"model": "bailan-shapes", "worker": "bench", "width": 64,
                                                    "height": 64, "samples_per_s": 20.0, "step_s": 0.1,
                                                    "backlog": 10}), 3600)
        pipe.execute()
        submit = lambda: httpx.post(f"http://127.0.0.1:{api_port}/v1/jobs",  # noqa: E731
                                    json={"prompt": "a red circle"}).json()["id"]
        running, _, queued = submit(), submit(), submit()
        # The running job: started as a worker starts it (RQ's own calls), previews listed as the
        # worker lists them (scored by when their blobs expire); the view reads no blob bytes.
        rq_job = Job.fetch(running, connection=conn, serializer=JSONSerializer)
        Queue(rq_job.origin, connection=conn, serializer=JSONSerializer).remove(rq_job)
        rq_job.set_status(JobStatus.STARTED)
        conn.hset(Keys.job(running), mapping={RecordField.started_at: repr(time.time()), RecordField.step: "10"})
        for step in (5, 10):
            conn.zadd(Keys.previews(running), {str(step): time.time() + 600})
        view = httpx.get(f"http://127.0.0.1:{api_port}/v1/jobs/{running}").json()
        assert view["status"] == "running" and len(view["previews"]) == 2, view
        view = httpx.get(f"http://127.0.0.1:{api_port}/v1/jobs/{queued}").json()
        assert view["status"] == "queued" and view["queue_position"] == 2 and view["eta_s"], view

        targets = [("bare FastAPI", bare_port, f"/v1/jobs/{running}"),
                   ("running, unchanged", api_port, f"/v1/jobs/{running}"),
                   ("queued, unchanged", api_port, f"/v1/jobs/{queued}"),
                   ("running, rendered", fresh_port, f"/v1/jobs/{running}"),
                   ("queued, rendered", fresh_port, f"/v1/jobs/{queued}")]
        for _, port, path in targets:
            asyncio.run(poll(port, path, args.connections, 1.0))  # warm-up
        counts: dict[str, list[int]] = {name: [] for name, _, _ in targets}
        for round_ in range(args.rounds):
            line = []
            for name, port, path in targets:
                ok, bad = asyncio.run(poll(port, path, args.connections, args.seconds))
                if bad:
                    raise SystemExit(f"{name}: {bad} answers were not 2xx")
                counts[name].append(ok)
                line.append(f"{name} {ok / args.seconds:.0f}/s")
            print(f"round {round_ + 1}: " + ", ".join(line), flush=True)
        total_s = args.rounds * args.seconds
        rates = {name: sum(n) / total_s for name, n in counts.items()}
        bare = rates["bare FastAPI"]
        for name, rate in rates.items():
            print(f"{name:20s} {rate:8.0f} requests/s   ratio {rate / bare:.2f}", flush=True)
        print("target: ratio >= 0.5")
        if args.json:
            args.json.write_text(json.dumps({
                "http": args.http, "connections": args.connections, "seconds_per_round": args.seconds,
                "rounds": args.rounds,
                "results": {name: {"requests_per_s": rates[name], "ratio": rates[name] / bare,
                                   "per_round_requests_per_s": [n / args.seconds for n in counts[name]]}
                            for name in rates},
            }, indent=2))
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=20)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
