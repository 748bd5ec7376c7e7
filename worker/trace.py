"""A worker's timeline, as JSON lines: each engine step, and each job's hand-overs.

`bailan_job_phase_seconds` and the step metrics give means, which say how much
a burst lost but not where: an engine idle while slots hand jobs over, a burst
split over two admissions, stores serialised behind one another, a step slowed
in the middle. With `BAILAN_TRACE_FILE` set, the worker appends a line per
engine step, and two per succeeded job (the bridge's and its slot's), in
wall-clock seconds (`time.time()`), each naming the worker, so
`bench/service.py --trace` lays them beside its clients' own stamps, and
workers sharing one file stay apart:

    {"event": "step", "worker": "<name>", "t0": ..., "t1": ..., "gather_s": ..., "admit_s": ...,
     "admitted": 16, "rows": 32, "bucket": 32, "samples": 16, "finished": 0, "decode_s": 0.0,
     "active_after": 16}
    {"event": "job", "worker": "<name>", "job": "<id>", "taken": ..., "submitted": ...,
     "admitted": ..., "done": ..., "stored": ...}
    {"event": "slot", "worker": "<name>", "job": "<id>", "dequeued": ..., "rq_ended": ...}

Times are the host's: on CUDA a step's end includes waiting for the device once
steps queue up (two at most run ahead), and a decode's time includes the steps
still queued before it, since the decode waits for them.

Off by default: tracing writes a line per step and per job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# perf_counter to wall-clock: the stamps are taken with perf_counter (GenerationJob's, the
# engine's), which is monotonic but has no epoch; the offset is fixed at this module's import.
_WALL_OFFSET = time.time() - time.perf_counter()


def wall(perf: float) -> float:
    """A time.perf_counter() stamp of this process as wall-clock seconds."""
    return round(perf + _WALL_OFFSET, 6)


class Trace:
    """Lines held in memory and appended to `path` by `flush` (off the engine's thread)."""

    def __init__(self, path: Path | None, worker: str = "") -> None:
        self.path = path
        self.worker = worker  # on every line: several workers may append to one file
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._broken = False

    @property
    def on(self) -> bool:
        return self.path is not None and not self._broken

    def add(self, event: str, **fields: Any) -> None:
        """One line; perf_counter stamps go in as `wall(...)`. Nothing when tracing is off."""
        if not self.on:
            return
        line = json.dumps({"event": event, "worker": self.worker, **fields}, separators=(",", ":"))
        with self._lock:
            self._lines.append(line)

    def flush(self) -> None:
        """Append the lines held so far to the file. A trace that cannot be written stops
        (logged once) rather than failing the thread that flushes it."""
        if not self.on:
            return
        with self._lock:
            lines, self._lines = self._lines, []
        if not lines:
            return
        assert self.path is not None
        try:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write("\n".join(lines) + "\n")
        except OSError as exc:
            self._broken = True
            log.error("trace file %s cannot be written (%s); tracing stops", self.path, exc)


# The stamp that places each kind of line in time.
_AT = {"step": "t0", "job": "taken", "slot": "dequeued"}
# A job's hand-overs in order: the slot's (RQ) stamps around the bridge's.
_JOB_STAMPS = ("dequeued", "taken", "submitted", "admitted", "done", "stored", "rq_ended")


def read(path: Path, since: float = float("-inf"), until: float = float("inf")) -> list[dict[str, Any]]:
    """The lines of a trace file placed in [since, until] (a step by its start, a job by
    its hand-over to the bridge, a slot's by its dequeue); a line cut short by a write
    under way is skipped."""
    found = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            at = item.get(_AT.get(item.get("event"), ""))
            if isinstance(at, (int, float)) and since <= at <= until:
                found.append(item)
    return found


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(ordered[len(ordered) // 2], 4), "max": round(ordered[-1], 4)}


def summarise(items: list[dict[str, Any]]) -> dict[str, Any]:
    """What a stretch of trace says of the engine and of the jobs in it.

    engine: its steps (host seconds each: on CUDA they include waiting for the device once
    steps queue up), the seconds from the first job's hand-over to the first step, the
    engine's seconds between steps, split into gathering a burst, admitting jobs (prompts
    encoded) and the rest, the seconds it stood with no samples at all (`idle_s`: waiting
    for jobs), the decodes, and at how many steps jobs were admitted (a burst admitted over
    several steps finishes over several decodes). Workers sharing the file are summed.
    jobs: each hand-over's seconds, p50 and max over the jobs (RQ's start in the slot, the
    bridge's start, waiting for the engine, denoising, encoding and storing, RQ's end),
    and over how long the jobs were handed over and stored."""
    steps = sorted((i for i in items if i.get("event") == "step"), key=lambda i: i["t0"])
    jobs: dict[str, dict[str, float]] = {}
    for item in items:
        if item.get("event") in ("job", "slot"):
            jobs.setdefault(item["job"], {}).update({k: v for k, v in item.items() if k in _JOB_STAMPS})
    summary: dict[str, Any] = {}
    if steps:
        # Each worker's steps follow one another; several workers' interleave.
        by_worker: dict[str, list[dict[str, Any]]] = {}
        for step in steps:
            by_worker.setdefault(str(step.get("worker", "")), []).append(step)
        pairs = [pair for own in by_worker.values() for pair in zip(own, own[1:])]
        # A gap after a step that left samples in hand is the engine's own; one after a step
        # that left none is waiting for work (a lone client's next job), reported apart, but
        # for the next step's gathering and admitting, which are the engine's work either way.
        held = [b["t0"] - a["t1"] for a, b in pairs if a.get("active_after", 1)]
        work = sum(b["gather_s"] + b["admit_s"] for a, b in pairs if not a.get("active_after", 1))
        waited = sum(b["t0"] - a["t1"] for a, b in pairs if not a.get("active_after", 1)) - work
        gather = sum(b["gather_s"] for _, b in pairs)
        admit = sum(b["admit_s"] for _, b in pairs)
        between = sum(held) + work
        summary["engine"] = {
            "workers": len(by_worker),
            "steps": len(steps),
            "rows_mean": round(sum(s["rows"] for s in steps) / len(steps), 2),
            "step_s_mean": round(sum(s["t1"] - s["t0"] for s in steps) / len(steps), 5),
            "steps_s": round(sum(s["t1"] - s["t0"] for s in steps), 4),
            "decode_s": round(sum(s["decode_s"] for s in steps), 4),
            "decodes": sum(1 for s in steps if s["finished"]),
            "between_steps_s": round(between, 4),
            "between_gather_s": round(gather, 4),
            "between_admit_s": round(admit, 4),
            "between_other_s": round(between - gather - admit, 4),
            "largest_gap_s": round(max(held, default=0.0), 4),
            "idle_s": round(waited, 4),
            "admitting_steps": sum(1 for s in steps if s["admitted"]),
        }
        taken = [j["taken"] for j in jobs.values() if "taken" in j]
        if taken:
            summary["engine"]["first_step_after_s"] = round(steps[0]["t0"] - min(taken), 4)
    whole = [j for j in jobs.values() if all(k in j for k in _JOB_STAMPS)]
    if whole:
        summary["jobs"] = {
            "count": len(whole),
            **{f"{a}_to_{b}_s": _spread([j[b] - j[a] for j in whole]) for a, b in zip(_JOB_STAMPS, _JOB_STAMPS[1:])},
            "taken_over_s": round(max(j["taken"] for j in whole) - min(j["taken"] for j in whole), 4),
            "stored_over_s": round(max(j["stored"] for j in whole) - min(j["stored"] for j in whole), 4),
        }
    return summary
