"""A worker process from start to stop: load the model, serve the queue, stop cleanly.

One process owns one model and runs these threads:

* the engine loop (worker.engine.Engine) on the main thread, which owns the
  GPU and steps every admitted job through one UNet call per step;
* `max_batch` slot threads (worker.slots), in-process RQ workers that each
  hand one job at a time to the bridge (worker.bridge) and wait for it;
* the bridge's I/O thread and preview pool;
* the liveness thread (worker.liveness): worker key, leases, reaper;
* a supervisor that ends the engine loop once the slots have stopped.

SIGINT and SIGTERM are handled here alone (`Shutdown`): the first lets running
jobs finish, a second exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import redis
import torch
from rq import Queue
from rq.serializers import JSONSerializer

from bailan.metrics import Tally
from bailan import presence
from bailan.queues import model_base
from bailan.settings import redact_url
from worker.bridge import JobBridge
from worker.engine import Engine, GenerationJob, RunnerOptions
from worker.liveness import Liveness
from worker.loader import load_model, pick_device, pick_dtype
from worker.outage import RedisOutage
from worker.runners.sd import default_max_batch
from worker.settings import WorkerSettings
from worker.slots import SlotWorker
from worker.trace import Trace

log = logging.getLogger("bailan.worker")

# Exit codes of a worker that cannot go on (0 is a requested stop).
EXIT_SLOTS_DIED = 1
EXIT_REDIS_GONE = 3
# After a shutdown request, how long slots may stay in their dequeue with nothing in flight
# before the worker stops without them (seconds).
IDLE_STOP_S = 5.0


class Shutdown:
    """The process's one SIGINT/SIGTERM handler: the first signal sets `requested`
    (slots stop dequeuing, running jobs finish); a second exits at once."""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            # Second signal: leave now; the reaper requeues what was running.
            log.warning("forced shutdown")
            raise SystemExit(1)
        log.info("shutting down: finishing running jobs (signal again to force)")
        self.requested.set()


def process_age_s() -> float | None:
    """Seconds since this process began (Linux; None elsewhere): the interpreter's start and
    the imports before any of the worker's code ran."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        # Field 22 of stat, the start in clock ticks after boot; the split begins at field 3.
        return uptime_s - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def serve(settings: WorkerSettings) -> int:
    """Serve the queue until SIGINT/SIGTERM; 0 after a clean stop, non-zero when it cannot go on."""
    before = process_age_s()
    started = time.perf_counter()
    try:
        # Settings only the device can judge, judged before the model loads (tens of seconds).
        device = pick_device(settings.device)
        dtype = pick_dtype(settings.dtype, device)
        if device.type == "cuda":
            torch.cuda.init()  # the driver's set-up, timed apart from the load it would otherwise join
        max_batch = settings.max_batch or default_max_batch(device)
        options = runner_options(settings, device)
        buckets = batch_buckets(settings, device, max_batch, compiled=options.compile_unet)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    device_s = time.perf_counter() - started
    model = load_model(settings.model, device, dtype)
    load_s = time.perf_counter() - started - device_s
    engine = Engine(model, max_batch, batch_buckets=buckets, options=options)
    warm_up(engine)
    total = time.perf_counter() - started
    log.info("model %s loaded on %s/%s in %.1fs; batch %d", model.name, device, dtype, total, engine.max_batch)
    # Where a start's time goes, for the start-up targets (README, Performance).
    # Two decimals: the built-in model's load and warm-up take hundredths of a second on a CPU.
    log.info("start: process and imports %s, device %.2f s, model load %.2f s, warm-up %.2f s",
             "unknown" if before is None else f"{before:.1f} s", device_s, load_s, total - device_s - load_s)
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
    shutdown = Shutdown()
    # Installed once, before Redis is even reached: a worker waiting for its
    # Redis must stop on SIGTERM, and once the worker key is up (/readyz says
    # 200) a SIGTERM must be a graceful stop.
    shutdown.install()
    if not wait_for_redis(connection, settings.redis_url, shutdown.requested):
        return 0
    outage = RedisOutage(connection, settings.redis_outage_limit_s)
    tally = Tally()
    engine.tally = tally
    trace = Trace(settings.trace_file, settings.name)
    engine.trace = trace
    bridge = JobBridge(settings, model, engine, connection, outage=outage, tally=tally, trace=trace)
    # Jobs for this model, and jobs that name none (bailan.queues).
    queues = [
        Queue(name, connection=connection, serializer=JSONSerializer)
        for name in (settings.queue_name, model_base(settings.queue_name, model.name))
    ]
    slots = [
        SlotWorker(
            queues,
            name=f"{settings.name}.{i}",
            connection=connection,
            serializer=JSONSerializer,
            # The dequeue blocks for worker_ttl - 15 s; keep it short so shutdown is prompt.
            worker_ttl=20,
            lease_s=settings.heartbeat_ttl_s,
            runner=bridge.run,
            stop=shutdown.requested,
            has_room=engine.has_room,
            wait_for_room=engine.wait_for_room,
            expect=engine.expect,
            unexpect=engine.unexpect,
            trace=trace,
        )
        # Exactly one slot per job the engine holds: a spare slot would sit in RQ's
        # blocking dequeue and take a job the engine has no room for yet.
        for i in range(engine.max_batch)
    ]
    info = {**model.info(), "worker": settings.name, "max_batch": engine.max_batch, "slots": len(slots),
            "caps": settings.device_caps(model.device.type).to_json()}
    liveness = Liveness(settings, connection, slots, info, tally=tally, outage=outage,
                        gauges=lambda: device_gauges(device),
                        live_info=lambda: {**engine.meter.snapshot(), "backlog": bridge.backlog()})
    liveness_thread = threading.Thread(target=liveness.loop, name="bailan-liveness", daemon=True)
    threads = [threading.Thread(target=bridge.io_loop, name="bailan-io", daemon=True), liveness_thread]
    slot_threads = [threading.Thread(target=slot.serve, args=(outage,), name=slot.name, daemon=True) for slot in slots]
    for thread in threads:
        thread.start()
    try:
        liveness.heartbeat()
    except redis.RedisError as exc:  # the liveness thread retries
        log.warning("first heartbeat failed: %s", exc)
    for thread in slot_threads:
        thread.start()
    log.info("worker %s ready: model %s on %s, batch %d", settings.name, model.name, device, engine.max_batch)
    finishing = finish_warm_up_in_background(engine, shutdown.requested)

    engine_stop = threading.Event()
    broken = threading.Event()
    threading.Thread(
        target=supervise, args=(slot_threads, shutdown.requested, bridge, engine, engine_stop, broken),
        name="bailan-supervisor", daemon=True,
    ).start()
    # The engine runs on the main thread: PyTorch's CPU kernels measured 2.2x
    # slower when launched from a secondary thread (OpenMP thread teams), and
    # signal handlers still run between two steps.
    engine.run(engine_stop)
    if finishing is not None:
        # A compile cut off by the interpreter's exit can crash it (torch stops its compile
        # workers at exit); a bucket's run ends within seconds once asked.
        finishing.join(timeout=30)
    liveness.stop.set()
    bridge.close()
    # A presence tick still under way would write the worker back after its withdrawal, and
    # /readyz would count a stopped worker for a few seconds more.
    liveness_thread.join(timeout=10)
    try:
        presence.withdraw(connection, settings.name)
    except redis.RedisError:
        pass
    if not broken.is_set():
        return 0
    # Not asked to stop: the slots are gone, so this worker cannot go on. A
    # non-zero exit makes any restart policy (make run, systemd, compose) restart it.
    if outage.gave_up.is_set():
        log.error("exiting: Redis stayed unreachable for more than %.0f s", settings.redis_outage_limit_s)
        return EXIT_REDIS_GONE
    log.error("exiting: the slots stopped on their own (see above)")
    return EXIT_SLOTS_DIED


def finish_warm_up_in_background(engine: Engine, stop: threading.Event) -> threading.Thread | None:
    """Run what warm_up deferred on a thread of its own while the engine serves (decodes stay
    eager until it is done); None when nothing was deferred. It gives up once `stop` is set."""
    if not engine.runner.vae_deferred:
        return None

    def finish() -> None:
        started = time.perf_counter()
        try:
            timings = engine.finish_warm_up(stop)
        except Exception:  # decodes stay eager: slower, not broken
            if not stop.is_set():
                log.exception("compiling the VAE decoder after the worker became ready failed; decodes stay eager")
            return
        if not timings:
            return  # stopped first
        log.info("the VAE decoder is compiled (%.1f s after ready), decodes use it: %s", time.perf_counter() - started,
                 ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))

    thread = threading.Thread(target=finish, name="bailan-warm-up", daemon=True)
    thread.start()
    return thread


def supervise(
    slot_threads: list[threading.Thread],
    stopping: threading.Event,
    bridge: JobBridge,
    engine: Engine,
    engine_stop: threading.Event,
    broken: threading.Event,
) -> None:
    """Set `engine_stop` once every slot has stopped after a shutdown request, or at
    once when one stops without it (the worker then exits non-zero, see serve)."""
    idle_since: float | None = None
    while any(t.is_alive() for t in slot_threads):
        for thread in slot_threads:
            thread.join(0.2)
        if not stopping.is_set():
            if all(t.is_alive() for t in slot_threads):
                continue
            # A slot gave up (Redis gone past the limit, or a broken loop): stop
            # the rest as on SIGTERM, then exit non-zero (serve) to be restarted.
            log.error("a slot stopped on its own; stopping the worker")
            broken.set()
            stopping.set()
        # Idle slots leave their dequeue within seconds, except while Redis is
        # unreachable (RQ retries forever): with no job in flight there is
        # nothing to finish, so stop waiting for them. A job still storing its
        # images is in flight: cut short, it would be run again by another worker.
        if bridge.running or engine.busy:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > IDLE_STOP_S:
            break
    engine_stop.set()


def device_gauges(device: torch.device) -> dict[str, Any]:
    """What the worker key reports of the device each tick: CUDA memory in bytes."""
    if device.type != "cuda":
        return {}
    return {
        "gpu_memory_allocated_bytes": torch.cuda.memory_allocated(device),
        "gpu_memory_reserved_bytes": torch.cuda.memory_reserved(device),
        "gpu_memory_total_bytes": torch.cuda.get_device_properties(device).total_memory,
    }


def wait_for_redis(connection: redis.Redis, url: str, stopping: threading.Event) -> bool:
    """Block until Redis answers (a worker may start before its Redis); False if told to stop."""
    delay = 0.5
    while not stopping.is_set():
        try:
            connection.ping()
            return True
        except redis.RedisError as exc:
            log.warning("waiting for Redis at %s: %s", redact_url(url), exc)
            stopping.wait(delay)
            delay = min(delay * 2, 10.0)
    return False


def batch_buckets(settings: WorkerSettings, device: torch.device, max_batch: int,
                  compiled: bool = False) -> tuple[int, ...] | None:
    """BAILAN_BATCH_BUCKETS for this device and batch; None: the engine's own choice. Raises
    ValueError for buckets the worker would not capture: the largest must be a full batch
    (steps padded beyond what warm-up captures would run uncaptured), and with a compiled
    UNet none may be 1 (its first call would be of one row: compiled again for every other,
    and never saved for the next start) or odd."""
    given = settings.batch_buckets
    if not given:
        return None
    if device.type != "cuda":
        log.warning("BAILAN_BATCH_BUCKETS pads batches for CUDA graphs: ignored on the %s", device.type)
        return None
    named = f"BAILAN_BATCH_BUCKETS={','.join(map(str, given))}"
    if given[-1] != 2 * max_batch:
        raise ValueError(f"{named}: the largest bucket must be a full batch, 2 x {max_batch} images = "
                         f"{2 * max_batch} rows (BAILAN_MAX_BATCH)")
    if compiled and given[0] == 1:
        raise ValueError(f"{named}: a bucket of 1 row has a compiled UNet compile twice and its code never "
                         "saved; leave 1 out, or set BAILAN_COMPILE=false")
    if compiled and any(rows % 2 for rows in given):
        # Its saved code is checked at twice its first batch (worker.precompile): an odd bucket
        # may fail the guards it keeps, and the code would be dropped and compiled at every start.
        raise ValueError(f"{named}: with a compiled UNet every bucket must be even; or set BAILAN_COMPILE=false")
    return tuple(given)


def runner_options(settings: WorkerSettings, device: torch.device) -> RunnerOptions:
    """The engine's use of the device: CUDA graphs and torch.compile on CUDA unless turned off."""
    cuda = device.type == "cuda"
    compile_ = cuda if settings.compile == "auto" else bool(settings.compile) and cuda
    graphs = cuda if settings.cuda_graphs == "auto" else bool(settings.cuda_graphs) and cuda
    if compile_:
        # Compiled kernels outlive the process here, so a restart skips most of the compile.
        cache = settings.compile_cache_dir.resolve()
        try:
            cache.mkdir(parents=True, exist_ok=True)
            empty = not any(cache.iterdir())
        except OSError as exc:
            raise ValueError(f"BAILAN_COMPILE_CACHE_DIR={str(settings.compile_cache_dir)!r}: {exc}") from exc
        # Set, not defaulted: importing diffusers already set TORCHINDUCTOR_CACHE_DIR to a /tmp
        # directory (torch._dynamo computes its cache dir at import), and kept it there.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
        # Nothing else says why a first start keeps /readyz at 503 for minutes.
        if not empty:
            log.info("torch.compile: may reuse the compiled kernels in %s (another model's, or another torch "
                     "version's, still compile for minutes)", cache)
        else:
            log.info("torch.compile: the compile cache %s is empty, so this start compiles the UNet and the VAE "
                     "decoder before the worker is ready: minutes (an H100: about 2 for SD 1.5, over 4 for SDXL); "
                     "later starts reuse it. BAILAN_COMPILE=false skips compiling.", cache)
    # NHWC and fused attention projections pay only under compile (eager NHWC GroupNorms convert back).
    return RunnerOptions(cuda_graphs=graphs, compile_unet=compile_, compile_vae=compile_,
                         compile_cache=settings.compile_cache_dir.resolve() if compile_ else None,
                         channels_last=compile_, fuse_qkv=compile_, cudnn_benchmark=settings.cudnn_benchmark,
                         max_steps=settings.max_steps)


def warm_up(engine: Engine) -> None:
    """Before taking work: every batch shape's kernels, compiled code and CUDA graphs
    (Engine.warm_up), then one short job through every path. A first compile of the VAE
    decoder is left for after the worker is ready (finish_warm_up_in_background): on an
    H100 it was 28.9 s of a 138 s first start, for about 0.15 s per 16-image decode."""
    timings = engine.warm_up(defer_vae_compile=True)
    log.info("warm-up: %s", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if engine.runner.vae_deferred:
        # Before ready, so that whoever reads the log (bench/service.py) knows to wait for its end.
        log.info("the VAE decoder's first compile is left for after the worker is ready; decodes are eager until "
                 "it is done")
    model = engine.model
    job = GenerationJob(id="warm-up", prompt="warm up", width=model.native_width, height=model.native_height,
                        steps=2, guidance_scale=2.0, seed=0, preview_every=1)
    engine.submit(job)
    engine.run_until_idle()
    job.future.result()
