"""Worker figures on their way to the API's /metrics, through Redis.

Workers run on other hosts and in other processes than the API, and come and
go; Prometheus scrapes the API. So a worker counts in memory (`Tally`) and its
liveness thread adds the counts to one Redis hash per queue (`Keys.metrics`)
every tick, with HINCRBYFLOAT: totals stay monotonic across worker restarts
and deaths (they live in Redis, in its AOF), a Redis outage only delays them
(unsent counts are kept and sent later), and the API's collector reads the
whole hash in one HGETALL at scrape time. No worker needs an open port. Each
tick's counts are a batch with its sender's next number, added at most once
(`add_batch`): a batch whose answer was lost, sent again, adds nothing the
second time.

Fields are `<name>` plus labels: `<name>{<k>=<v>,...}`; histogram buckets are
stored per bucket (not cumulative) as `<name>_bucket{...,le=<bound>}`, with
`<name>_sum{...}` and `<name>_count{...}`. Like the rest of bailan/, no torch.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from bailan.jobs import KEY_PREFIX

# Histograms the workers feed, and their bucket upper bounds.
BUCKETS: dict[str, tuple[float, ...]] = {
    # Seconds from submit to the worker starting the job.
    "bailan_job_wait_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    # Seconds of one engine step (one UNet call for one batch group, all its splits).
    "bailan_step_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    # A succeeded job's time on its worker, by phase: start (its slot took it: record read, marked
    # started), admit (handed to the engine until given a slot), denoise (prompt encoded, steps,
    # decode), store (its images encoded and stored, record written).
    "bailan_job_phase_seconds": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    # UNet rows (images, twice for guided ones) run in one step.
    "bailan_batch_rows": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
}

# Counters the workers (and the reapers) feed, with their help text.
COUNTERS: dict[str, str] = {
    "bailan_jobs_finished_total": "Jobs that reached a final state, by status (and error code for failures).",
    "bailan_images_total": "Images generated; rate() of it is images/s.",
    "bailan_steps_total": "Engine steps run.",
    "bailan_oom_splits_total": "Steps split in half after the device ran out of memory.",
    "bailan_jobs_requeued_total": "Jobs requeued by the reaper because their worker died.",
    "bailan_jobs_recovered_total": (
        "Jobs put back in their queue by the reaper: a worker took them off it but never started them "
        "(it died, or its connection broke, in between)."
    ),
}

HELP: dict[str, str] = {
    **COUNTERS,
    "bailan_job_wait_seconds": "Seconds from submit to start (queue wait).",
    "bailan_step_seconds": "Seconds per engine step.",
    "bailan_job_phase_seconds": (
        "A succeeded job's seconds on its worker, by phase: start (record read, marked started), admit "
        "(waiting in the engine for a slot), denoise (prompt encoded, steps, decode), store (images encoded "
        "and stored)."
    ),
    "bailan_batch_rows": "UNet rows run per engine step (batch fill).",
}


# A sender's batches of counts, numbered 1, 2, ... and sent in order, each added once: the
# sender's key holds the last number added, and a batch sent again (its answer was lost, so
# the sender could not tell whether it ran) finds its number there and adds nothing.
ADD_BATCH = """
local seq = tonumber(ARGV[2])
if seq > tonumber(redis.call('GET', KEYS[2]) or '0') then
  for i = 3, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[1])
end
return 0
"""
# How long a sender's last number is remembered after its last batch, at least: the worker
# makes it longer still where it waits out longer outages (BAILAN_REDIS_OUTAGE_LIMIT_S) with a
# batch unsent.
BATCH_ID_TTL_S = 3600


def metrics_key(queue_name: str) -> str:
    """Hash: every worker figure of one base queue's deployment, summed over workers."""
    return f"{KEY_PREFIX}:metrics:{queue_name}"


def field(name: str, labels: Mapping[str, str] | None = None) -> str:
    """The hash field of one series."""
    if not labels:
        return name
    inner = ",".join(f"{k}={_clean(v)}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _clean(value: str) -> str:
    # Label values come from model names and error codes; keep the field parseable.
    return str(value).replace(",", "_").replace("=", "_").replace("{", "_").replace("}", "_")


def parse_field(raw: str) -> tuple[str, dict[str, str]]:
    """`field`'s inverse: (name, labels)."""
    if not raw.endswith("}") or "{" not in raw:
        return raw, {}
    name, inner = raw[:-1].split("{", 1)
    labels = dict(part.split("=", 1) for part in inner.split(",") if "=" in part)
    return name, labels


def bucket_bound(name: str, value: float) -> str:
    """The `le` label of the bucket `value` falls in ("+Inf" past the last bound)."""
    for bound in BUCKETS[name]:
        if value <= bound:
            return _bound_text(bound)
    return "+Inf"


def _bound_text(bound: float) -> str:
    return repr(float(bound))


class Tally:
    """Counts not yet sent to Redis; any thread may add, the liveness thread sends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, float] = defaultdict(float)

    def inc(self, name: str, labels: Mapping[str, str] | None = None, amount: float = 1.0) -> None:
        with self._lock:
            self._pending[field(name, labels)] += amount

    def observe(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        if not math.isfinite(value):
            return
        labels = dict(labels or {})
        with self._lock:
            self._pending[field(f"{name}_bucket", {**labels, "le": bucket_bound(name, value)})] += 1
            self._pending[field(f"{name}_sum", labels)] += value
            self._pending[field(f"{name}_count", labels)] += 1

    def take(self) -> dict[str, float]:
        """Everything counted since the last take: one batch for `add_batch`, which the sender
        sends again under its number while its sending fails."""
        with self._lock:
            taken = dict(self._pending)
            self._pending.clear()
        return taken


def add_batch(script: Any, pipe: Any, queue_name: str, sender: str, number: int,
              counts: Mapping[str, float], ttl_s: int = BATCH_ID_TTL_S) -> None:
    """Queue on `pipe` the adding of `counts` to the queue's figures, once: `sender` names
    one process's run, whose batches are numbered from 1 and sent in order; its last number
    is remembered `ttl_s` after its last batch. `script`: ADD_BATCH registered on the
    pipeline's client (register_script)."""
    args: list[Any] = [ttl_s, number]
    for name, amount in counts.items():
        if amount:
            args += [name, amount]
    if len(args) > 2:
        script(keys=[metrics_key(queue_name), f"{KEY_PREFIX}:metrics-sent:{sender}"], args=args, client=pipe)
