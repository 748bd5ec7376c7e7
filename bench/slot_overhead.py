"""What RQ costs a slot per job, in one run: Bailan's slot against RQ's own success path.

A slot's runner here returns at once, so the time per job is all RQ: the
dequeue, its start bookkeeping and the job's end. Two slots take turns on
R rounds of N jobs each, on one private valkey: Bailan's `SlotWorker` (its
end in one transaction), and the same slot with RQ's stock
`handle_job_success` (WATCH on the job's dependents, their read, a result
stream, then the slot's delete of that stream and its event-stream notice).
Each figure is the total over its rounds, so a host whose speed drifts
drifts for both.

After a batch of jobs ends at one step, each slot does this bookkeeping before
it can take its next job for the engine, so the engine idles meanwhile.

    .venv/bin/python bench/slot_overhead.py [--jobs 300] [--rounds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402
from rq import Queue, SimpleWorker  # noqa: E402
from rq.job import Job  # noqa: E402
from rq.queue import Queue as RQQueue  # noqa: E402
from rq.registry import StartedJobRegistry  # noqa: E402
from rq.results import Result  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from bailan import events  # noqa: E402
from bailan.jobs import RQ_FUNC  # noqa: E402
from bench.common import private_valkey  # noqa: E402
from worker.slots import SlotWorker  # noqa: E402


class StockEndSlot(SlotWorker):
    """The slot as it was: RQ's own success path, then the result stream's delete and the notice."""

    def handle_job_success(self, job: Job, queue: RQQueue, started_job_registry: StartedJobRegistry) -> None:
        SimpleWorker.handle_job_success(self, job, queue, started_job_registry)
        self.connection.delete(Result.get_key(job.id))
        events.notify(self.connection, job.id)


def one_round(conn: redis.Redis, kind: type[SlotWorker], tag: str, jobs: int) -> float:
    """Seconds for one slot of `kind` to take and end `jobs` jobs."""
    queue = Queue(f"overhead-{tag}", connection=conn, serializer=JSONSerializer)
    for i in range(jobs):
        queue.enqueue_call(func=RQ_FUNC, args=(f"{tag}-{i}",), job_id=f"{tag}-{i}", result_ttl=600,
                           failure_ttl=600, timeout=-1)
    stop, done = threading.Event(), threading.Event()
    ended = [0]

    def runner(job_id: str) -> dict[str, Any]:
        return {"images": 1}

    slot = kind([queue], name=f"overhead-{tag}.0", connection=conn, serializer=JSONSerializer, worker_ttl=20,
                runner=runner, stop=stop)
    end = slot.handle_job_success

    def counted(*args: Any, **kwargs: Any) -> None:
        end(*args, **kwargs)
        ended[0] += 1
        if ended[0] == jobs:
            done.set()

    slot.handle_job_success = counted  # type: ignore[method-assign]
    started = time.perf_counter()
    thread = threading.Thread(target=slot.work, kwargs={"logging_level": "WARNING"}, daemon=True)
    thread.start()
    if not done.wait(600):
        raise SystemExit(f"{kind.__name__}: only {ended[0]} of {jobs} jobs ended")
    took = time.perf_counter() - started
    stop.set()
    thread.join(timeout=30)
    status = Job.fetch(f"{tag}-0", connection=conn, serializer=JSONSerializer).get_status()
    if status != "finished":
        raise SystemExit(f"{kind.__name__}: a job ended {status}")
    conn.flushdb()
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=300, help="jobs per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    server = private_valkey()
    conn = redis.Redis(port=server.port)
    totals = {"stock": 0.0, "bailan": 0.0}
    try:
        for r in range(args.rounds):
            for name, kind in (("stock", StockEndSlot), ("bailan", SlotWorker)):
                totals[name] += one_round(conn, kind, f"{name}{r}", args.jobs)
    finally:
        server.stop()
    count = args.jobs * args.rounds
    per_job = {name: round(total / count * 1000, 3) for name, total in totals.items()}
    result = {
        "machine": f"{platform.machine()}, {platform.processor() or '?'}",
        "jobs": count,
        "ms_per_job": per_job,
        "bailan_over_stock": round(per_job["bailan"] / per_job["stock"], 3),
    }
    print(f"{count} jobs each, one slot, runner returns at once (private valkey)")
    for name, value in per_job.items():
        print(f"  {name:7s} {value:6.2f} ms a job  ({1000 / value:.0f} jobs/s)")
    print(f"  bailan / stock: {result['bailan_over_stock']:.2f}x the time")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
