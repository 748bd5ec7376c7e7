"""The whole service under load, measured as its clients see it: over HTTP.

Each client submits a job (POST /v1/jobs), polls its status (GET /v1/jobs/{id})
until it ends, or follows its event stream (GET /v1/jobs/{id}/events, pushed as
the job changes), or has its submit held until the job ends (`Prefer: wait`),
then fetches its image; latency is submit -> `succeeded` seen, and submit ->
image bytes in hand. By default every mode is measured all three ways
(`--notify`; rows end in `_events` and `_wait` for the last two). Modes, in
one run against one service:

  single     one client alone, one job after another (`--single-reps` of them);
  clients N  N clients at once, one job each (for every N in `--clients`);
  staggered  N clients arriving `--stagger` s apart with mixed step counts.

Images/s is images over the makespan (first submit -> last image fetched).

    python bench/service.py --url http://127.0.0.1:8000              # a running service
    python bench/service.py --start --json out.json                  # start `make run`'s launcher here, measure, stop

Each row also says what the engine did meanwhile (`engine`), from the
workers' figures on GET /metrics before and after the mode: its steps, their
mean rows and seconds (host time of a step; on CUDA it includes waiting for the
device), and `busy_share`, the steps' seconds over the makespan (summed over
workers, so with several it can pass 1). What a row
loses to the engine in-process splits so: a step slower than in-process is
contention inside the step (the worker's other threads, the GIL), a
`busy_share` short of 1 is time the engine stood idle (hand-overs, bookkeeping,
the clients' own turn-around).

With `--trace FILE` each row also gets `trace`, the worker's own timeline
of the mode (worker.trace; `--start` sets BAILAN_TRACE_FILE for its worker,
otherwise start the worker with it): the seconds before its first step,
between its steps with samples in hand (gathering a burst, admitting jobs,
the rest), with none in hand (`idle_s`, waiting for jobs), its decodes, at
how many steps the jobs were admitted, and each job's hand-overs (RQ's start,
the bridge's start, waiting, denoising, storing, RQ's end), p50 and max.

With `--start` it also measures the worker's start: seconds from launching the
service until /readyz answers 200 (model load, compile, CUDA graph capture).
Settings for the started service come from the environment (BAILAN_MODEL, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker import trace  # noqa: E402  (no torch: the trace's reader alone)

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
TERMINAL = {"succeeded", "failed", "canceled"}


def prompt(i: int) -> str:
    fg, bg = COLOURS[i % len(COLOURS)], COLOURS[(i * 3 + 1) % len(COLOURS)]
    return f"a {('small', 'large', 'big', 'tiny')[i % 4]} {fg} {SHAPES[i % len(SHAPES)]} on a {bg} background"


# How a client learns that its job ended (--notify).
NOTIFY_WAYS = ("poll", "events", "wait")
# Rows of clients notified otherwise than by polling carry the way in their name.
SUFFIX = {"poll": "", "events": "_events", "wait": "_wait"}


class Client:
    """One client: its own connection, one job at a time. It learns that its job ended by
    polling every `poll_s` ("poll"), from the job's event stream, which the service pushes
    as the job changes ("events"), or by asking its submit to be held until the end
    (`Prefer: wait`, "wait")."""

    def __init__(self, base: str, poll_s: float, body: dict[str, Any], notify: str = "poll") -> None:
        self.http = httpx.Client(base_url=base, timeout=120)
        self.poll_s = poll_s
        self.body = body
        self.notify = notify

    def generate(self, i: int, steps: int) -> dict[str, Any]:
        wall0, t0 = time.time(), time.perf_counter()
        held = {"Prefer": "wait=60"} if self.notify == "wait" else {}
        r = self.http.post("/v1/jobs", json={**self.body, "prompt": prompt(i), "seed": i, "steps": steps},
                           headers=held)
        r.raise_for_status()
        job = r.json()
        if self.notify == "events" and job["status"] not in TERMINAL:
            job = self.follow_events(job)
        while job["status"] not in TERMINAL:
            if "preference-applied" not in r.headers:  # polling, or a hold the service refused
                time.sleep(self.poll_s)
            r = self.http.get(f"/v1/jobs/{job['id']}", headers=held)
            job = r.json()
        done, wall_done = time.perf_counter(), time.time()
        out: dict[str, Any] = {"submitted": t0, "done": done, "image": done, "status": job["status"],
                               "phases": phases(job, wall0, wall_done),
                               "started_at": stamp(job, "started_at"), "finished_at": stamp(job, "finished_at")}
        if job["status"] != "succeeded":
            return {**out, "error": str(job.get("error"))}
        image = self.http.get(job["images"][0]["url"])
        image.raise_for_status()
        return {**out, "image": time.perf_counter(), "bytes": len(image.content)}

    def follow_events(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job's last view from GET /v1/jobs/{id}/events: its final one, unless the
        stream was refused or ended early (the caller then polls)."""
        event = ""
        with self.http.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            if stream.status_code != 200:
                return job
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: ") and event == "job":
                    job = json.loads(line[len("data: "):])
                    if job["status"] in TERMINAL:
                        return job
                elif line.startswith("data: "):  # gone or error: the poll says what became of it
                    return job
        return job

    def close(self) -> None:
        self.http.close()


def stamp(job: dict[str, Any], key: str) -> float | None:
    """One of the job view's timestamps as seconds since the epoch."""
    value = job.get(key)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def phases(job: dict[str, Any], submitted: float, seen: float) -> dict[str, float]:
    """Where a job's time went, from the record's timestamps (same host, same clock):
    submit (client -> record written), queue (-> a worker starts it), run (-> images
    stored), notify (-> the client sees `succeeded`)."""
    created, started, finished = stamp(job, "created_at"), stamp(job, "started_at"), stamp(job, "finished_at")
    if None in (created, started, finished):
        return {}
    return {"submit": created - submitted, "queue": started - created, "run": finished - started,
            "notify": seen - finished}


def run_mode(name: str, base: str, body: dict[str, Any], steps: list[int], poll_s: float,
             interval: float = 0.0, notify: str = "poll") -> dict[str, Any]:
    """len(steps) clients, client i submitting at i * interval (all at once when 0)."""
    clients = [Client(base, poll_s, body, notify) for _ in steps]
    start = time.perf_counter()

    def one(i: int) -> dict[str, Any]:
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return clients[i].generate(i, steps[i])

    with ThreadPoolExecutor(len(steps)) as pool:
        results = list(pool.map(one, range(len(steps))))
    for client in clients:
        client.close()
    return summarise(name, results, poll_s, steps, interval, notify)


def run_single(base: str, body: dict[str, Any], steps: int, reps: int, poll_s: float,
               notify: str = "poll") -> dict[str, Any]:
    client = Client(base, poll_s, body, notify)
    results = [client.generate(i, steps) for i in range(reps)]
    client.close()
    row = summarise("single_client" + SUFFIX[notify], results, poll_s, [steps] * reps, 0.0, notify)
    # One after another: throughput is one over the latency, not images over the makespan.
    row["images_per_s"] = round(1 / row["latency_p50_s"], 3)
    row["latency_sum_s"] = round(sum(r["done"] - r["submitted"] for r in results), 4)
    for key in ("started_spread_s", "finished_spread_s"):
        row.pop(key, None)  # one job at a time: no burst to spread
    return row


# Workers' figures, summed over their labels (workers, models): bailan.metrics' names.
ENGINE_SERIES = ("bailan_images_total", "bailan_steps_total", "bailan_step_seconds_sum", "bailan_step_seconds_count",
                 "bailan_batch_rows_sum", "bailan_batch_rows_count")


PHASES = ("start", "admit", "denoise", "store")  # bailan_job_phase_seconds' phases


def scrape_engine(base: str) -> dict[str, float] | None:
    """ENGINE_SERIES from GET /metrics, and each job phase's sum and count (`phase_<name>_sum`,
    `phase_<name>_count`), or None where it is not served."""
    try:
        response = httpx.get(f"{base}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    totals = dict.fromkeys(ENGINE_SERIES, 0.0)
    totals.update({f"phase_{phase}_{part}": 0.0 for phase in PHASES for part in ("sum", "count")})
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
            elif sample.name in ("bailan_job_phase_seconds_sum", "bailan_job_phase_seconds_count"):
                key = f"phase_{sample.labels.get('phase')}_{sample.name.rsplit('_', 1)[1]}"
                if key in totals:
                    totals[key] += sample.value
    return totals


class EngineMeter:
    """The engine's steps during a mode, from the workers' figures on /metrics. A worker
    publishes them once a presence tick (about a second), so a mode's figures are read
    once the images it made have been counted."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.mark = scrape_engine(base)

    def since(self, images: int, timeout_s: float = 5.0) -> dict[str, float] | None:
        """The steps since the last mark, once `images` more images are counted; marks anew.
        None where /metrics did not answer (the mark stays) or the images were not all counted
        in time (the figures would mix this mode's steps with the next one's)."""
        if self.mark is None:
            self.mark = scrape_engine(self.base)
            return None
        deadline = time.monotonic() + timeout_s
        now = scrape_engine(self.base)
        while now is not None and now["bailan_images_total"] - self.mark["bailan_images_total"] < images \
                and time.monotonic() < deadline:
            time.sleep(0.1)
            now = scrape_engine(self.base)
        if now is None:
            return None
        before, self.mark = self.mark, now
        if now["bailan_images_total"] - before["bailan_images_total"] < images:
            return None
        delta = {k: now[k] - before.get(k, 0.0) for k in now}
        if delta["bailan_step_seconds_count"] <= 0:
            return None
        figures: dict[str, Any] = {
            "steps": int(delta["bailan_steps_total"]),
            "step_s_mean": round(delta["bailan_step_seconds_sum"] / delta["bailan_step_seconds_count"], 5),
            "rows_mean": round(delta["bailan_batch_rows_sum"] / max(delta["bailan_batch_rows_count"], 1), 2),
            "busy_s": round(delta["bailan_step_seconds_sum"], 4),
        }
        # A job's mean seconds on its worker per phase: starting, waiting in the engine, denoising, storing.
        phases = {phase: round(delta[f"phase_{phase}_sum"] / delta[f"phase_{phase}_count"], 4)
                  for phase in PHASES if delta[f"phase_{phase}_count"] > 0}
        if phases:
            figures["job_phases_mean_s"] = phases
        return figures

    def add_to(self, row: dict[str, Any], makespan_s: float | None = None) -> dict[str, Any]:
        """`row` with its `engine` figures (and `busy_share` of the makespan)."""
        figures = self.since(row["images"])
        if figures is not None:
            span = makespan_s if makespan_s is not None else row["makespan_s"]
            figures["busy_share"] = round(figures["busy_s"] / span, 3) if span > 0 else None
            row["engine"] = figures
        return row


def summarise(name: str, results: list[dict[str, Any]], poll_s: float, steps: list[int],
              interval: float, notify: str = "poll") -> dict[str, Any]:
    failed = [r for r in results if r["status"] != "succeeded"]
    lat = sorted(r["done"] - r["submitted"] for r in results)
    img = sorted(r["image"] - r["submitted"] for r in results)
    makespan = max(r["image"] for r in results) - min(r["submitted"] for r in results)
    return {
        "mode": name,
        "clients": len(results),
        "images": len(results) - len(failed),
        "failed": len(failed),
        "errors": sorted({str(r.get("error") or r["status"]) for r in failed})[:3],
        "makespan_s": round(makespan, 4),
        "images_per_s": round((len(results) - len(failed)) / makespan, 3),
        "latency_p50_s": round(float(np.percentile(lat, 50)), 4),
        "latency_p95_s": round(float(np.percentile(lat, 95)), 4),
        "image_latency_p50_s": round(float(np.percentile(img, 50)), 4),
        "phases_p50_s": {k: round(float(np.median([r["phases"][k] for r in results if r["phases"]])), 4)
                         for k in ("submit", "queue", "run", "notify") if any(r["phases"] for r in results)},
        # First to last job started, and ended: a burst the worker starts over several steps
        # also ends over several (one decode and completion each), which all-at-once rows show.
        **{f"{key.removesuffix('_at')}_spread_s": round(max(found) - min(found), 4)
           for key in ("started_at", "finished_at")
           if len(found := [r[key] for r in results if r.get(key) is not None]) > 1},
        "notified_by": {"poll": f"polling every {poll_s} s", "events": "event stream",
                        "wait": "Prefer: wait (held submit)"}[notify],
        "poll_s": poll_s,
        "steps": sorted(set(steps)),
        **({"arrival_interval_s": interval} if interval else {}),
    }


# ---- starting and stopping the service ----------------------------------------------------


def start_service(port: int, log_path: Path | None, trace_path: Path | None = None) -> tuple[subprocess.Popen[bytes], Any]:
    env = dict(os.environ, BAILAN_PORT=str(port), PYTHONUNBUFFERED="1")
    if trace_path is not None:
        env["BAILAN_TRACE_FILE"] = str(trace_path.resolve())
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "bailan.launch"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    return process, log


def wait_ready(base: str, process: subprocess.Popen[bytes], timeout_s: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the service was not ready after {timeout_s:.0f} s")


# What the worker logs (worker.process) when its VAE decoder's first compile is left for after
# it is ready, and when that compile has ended (or failed: decodes stay eager).
DEFERRED = "the VAE decoder's first compile is left for after the worker is ready"
DEFERRED_ENDED = ("the VAE decoder is compiled", "decodes stay eager")


def wait_for_deferred_compile(log_path: Path, process: subprocess.Popen[bytes], timeout_s: float) -> float | None:
    """Seconds waited for a first start's deferred VAE compile to end; None if nothing was
    deferred. Measured meanwhile, the service would decode eagerly and share its interpreter
    with the compile, and its first rows would not be its steady state."""
    if DEFERRED not in log_path.read_text(errors="replace"):
        return None
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if any(end in log_path.read_text(errors="replace") for end in DEFERRED_ENDED):
            return time.perf_counter() - started
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with code {process.returncode} while its VAE compiled")
        time.sleep(0.5)
    raise TimeoutError(f"the worker's deferred VAE compile had not ended {timeout_s:.0f} s after ready")


def stop_service(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- the run ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--start", action="store_true", help="start the service (python -m bailan.launch) here first")
    p.add_argument("--port", type=int, default=8000, help="with --start: the API's port")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--service-log", type=Path, help="with --start: where the service's output goes")
    p.add_argument("--clients", default="16,32", help="concurrent client counts")
    p.add_argument("--stagger-clients", type=int, default=16)
    p.add_argument("--stagger", type=float, help="arrival interval, s (default: clients_N's makespan / 2N)")
    p.add_argument("--mixed-steps", default="15,25,40")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, help="width = height (default: the model's native size)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--single-reps", type=int, default=5)
    p.add_argument("--poll", type=float, help="seconds between a client's polls (default 10 ms, clients/1600 above 16)")
    p.add_argument("--notify", default=",".join(NOTIFY_WAYS),
                   help="how clients learn that their job ended, each measured in turn: poll, events (following "
                        "the job's event stream; rows named *_events), wait (a submit held by Prefer: wait; *_wait)")
    p.add_argument("--trace", type=Path, help="the worker's trace file (BAILAN_TRACE_FILE): each row gets `trace`")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    ways = [way.strip() for way in args.notify.split(",") if way.strip()]
    if not ways or set(ways) - set(NOTIFY_WAYS):
        p.error(f"--notify takes a comma-separated list of {', '.join(NOTIFY_WAYS)}")
    base = f"http://127.0.0.1:{args.port}" if args.start else args.url.rstrip("/")
    body: dict[str, Any] = {"guidance_scale": args.guidance, "scheduler": "dpmpp_2m"}
    if args.size:
        body["width"] = body["height"] = args.size
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(["bench/service.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"steps": args.steps, "guidance": args.guidance, "size": args.size or "native",
                     "preview_every": "service default (5)"},
        "environment": {k: v for k, v in os.environ.items() if k.startswith("BAILAN_")},
        "modes": {},
    }

    def poll_for(clients: int) -> float:
        # ~1,600 polls/s at most: what one API process per 4 cores can answer unhurried.
        return args.poll if args.poll is not None else max(0.01, clients / 1600)

    def traced(row: dict[str, Any], since: float) -> dict[str, Any]:
        """`row` with `trace`: what the worker's trace says of the mode begun at `since`."""
        if args.trace is None or not args.trace.exists():
            return row
        time.sleep(0.2)  # the worker appends its lines every 50 ms, the slots' after RQ's end
        found = trace.summarise(trace.read(args.trace, since, time.time()))
        if found:
            row["trace"] = found
        return row

    def record(row: dict[str, Any]) -> None:
        results["modes"][row["mode"]] = row
        spread = (f"  started over {row['started_spread_s']:.3f} s, ended over {row['finished_spread_s']:.3f} s"
                  if {"started_spread_s", "finished_spread_s"} <= row.keys() else "")
        engine = row.get("engine")
        stepped = (f"  engine: {engine['steps']} steps of {engine['rows_mean']} rows, {1000 * engine['step_s_mean']:.1f} ms "
                   f"each, busy {engine['busy_share']}, a job's phases (s) {engine.get('job_phases_mean_s')}"
                   if engine else "")
        print(f"  {row['mode']:<24} {row['images_per_s']:8.3f} img/s  p50 {row['latency_p50_s']:.3f} s  "
              f"p95 {row['latency_p95_s']:.3f} s  failed {row['failed']}  phases p50 {row.get('phases_p50_s')}"
              f"{spread}{stepped}", flush=True)
        if "trace" in row:
            print(f"    trace: {json.dumps(row['trace'], separators=(',', ':'))}", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    process = log = None
    try:
        if args.start:
            process, log = start_service(args.port, args.service_log, args.trace)
            results["time_to_ready_s"] = round(wait_ready(base, process, args.ready_timeout), 2)
            print(f"service ready in {results['time_to_ready_s']} s", flush=True)
            if args.service_log is not None:
                waited = wait_for_deferred_compile(args.service_log, process, args.ready_timeout)
                if waited is not None:
                    results["deferred_vae_compile_s"] = round(waited, 2)
                    print(f"the worker's deferred VAE compile ended {waited:.1f} s after ready", flush=True)
        results["models"] = httpx.get(f"{base}/v1/models", timeout=10).json()
        engine = EngineMeter(base)
        # Warm-up: the first requests through every process path.
        engine.since(run_mode("warm-up", base, body, [2] * 4, 0.01)["images"])
        for notify in ways:
            engine.since(run_mode("warm-up", base, body, [2] * 4, 0.01, notify=notify)["images"])
            suffix = SUFFIX[notify]
            since = time.time()
            single = run_single(base, body, args.steps, args.single_reps, poll_for(1), notify)
            # One after another: the engine's share of the jobs' own time, not of the gaps between them.
            record(traced(engine.add_to(single, makespan_s=single["latency_sum_s"]), since))
            for n in [int(c) for c in args.clients.split(",") if c]:
                since = time.time()
                record(traced(engine.add_to(run_mode(f"clients_{n}{suffix}", base, body, [args.steps] * n,
                                                     poll_for(n), notify=notify)), since))
            mixed = [int(s) for s in args.mixed_steps.split(",")]
            n = args.stagger_clients
            if n < 1:
                continue  # --stagger-clients 0: no staggered mode
            # Arrivals twice as fast as N clients at once were served, so the arrival process
            # never starves the worker: the comparison is of batching mixed work, not of idling.
            burst = results["modes"].get(f"clients_{n}{suffix}")
            interval = args.stagger if args.stagger is not None else (burst["makespan_s"] / (2 * n) if burst else 0.05)
            since = time.time()
            record(traced(engine.add_to(run_mode(f"staggered_{n}_mixed_steps{suffix}", base, body,
                                                 [mixed[i % len(mixed)] for i in range(n)], poll_for(n),
                                                 interval=interval, notify=notify)), since))
    finally:
        if process is not None:
            stop_service(process)
        if log not in (None, subprocess.DEVNULL):
            log.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
