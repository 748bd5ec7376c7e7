"""The live workers, as they describe themselves in Redis, and the models they serve."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from app.schemas import ModelOut
from app.store.common import parse_json
from bailan import presence
from bailan.caps import DeviceCaps
from bailan.jobs import MODEL_DEFAULT_FIELDS, ModelDefaults

log = logging.getLogger("bailan.api")


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    model: str
    width: int | None
    height: int | None
    device: str | None
    dtype: str | None
    max_batch: int | None
    hash: str | None = None
    # Device figures the worker reports each tick (CUDA memory in bytes, by kind).
    gauges: dict[str, float] = field(default_factory=dict)
    defaults: ModelDefaults = ModelDefaults()
    samplers: tuple[str, ...] = ()
    # Measured speed and held work, for the wait estimate (bailan.eta); None/0 until measured.
    samples_per_s: float | None = None
    step_s: float | None = None
    backlog: int = 0
    caps: DeviceCaps = DeviceCaps()


def _defaults(value: Any) -> ModelDefaults:
    """A worker's published defaults; a worker of another version may publish what this
    API cannot read, and its jobs then get the service-wide defaults."""
    try:
        return ModelDefaults.model_validate(value) if isinstance(value, dict) else ModelDefaults()
    except ValueError:
        return ModelDefaults()


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _gpu_memory(info: dict[str, Any]) -> dict[str, float]:
    """{allocated|reserved|total: bytes} from a worker key's gpu_memory_<kind>_bytes fields."""
    found = {}
    for key, value in info.items():
        if key.startswith("gpu_memory_") and key.endswith("_bytes") and isinstance(value, (int, float)):
            found[key.removeprefix("gpu_memory_").removesuffix("_bytes")] = float(value)
    return found


def _float_or_none(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return float(value) if ok else None


def parse_worker(key: bytes | str, raw: bytes | str | None) -> WorkerInfo | None:
    if raw is None:  # expired between reading the live set and MGET
        return None
    info = parse_json(raw.decode() if isinstance(raw, bytes) else raw, None)
    if not isinstance(info, dict):
        log.warning("ignoring malformed worker key %r", key)
        return None
    key_name = key.decode() if isinstance(key, bytes) else key
    return WorkerInfo(
        name=str(info.get("worker") or key_name.rsplit(":", 1)[-1]),
        model=str(info.get("model") or "unknown"),
        width=_int_or_none(info.get("width")),
        height=_int_or_none(info.get("height")),
        device=str(info["device"]) if info.get("device") is not None else None,
        dtype=str(info["dtype"]) if info.get("dtype") is not None else None,
        max_batch=_int_or_none(info.get("max_batch")),
        hash=str(info["hash"]) if isinstance(info.get("hash"), str) else None,
        gauges=_gpu_memory(info),
        defaults=_defaults(info.get("defaults")),
        samplers=tuple(str(s) for s in info.get("samplers") or () if isinstance(s, str)),
        samples_per_s=_float_or_none(info.get("samples_per_s")),
        step_s=_float_or_none(info.get("step_s")),
        backlog=_int_or_none(info.get("backlog")) or 0,
        caps=DeviceCaps.from_json(info.get("caps")),
    )


def live_workers(conn: redis.Redis) -> list[WorkerInfo]:
    """Workers whose presence has not expired, as they describe themselves (bailan.presence)."""
    found = (parse_worker(key, raw) for key, raw in presence.live(conn))
    return [w for w in found if w is not None]


class WorkerCache:
    """`live_workers`, read again at most every `max_age_s` seconds (one per API process).

    Every submit needs the live workers (their native size and caps), and each
    read is two round trips (bailan.presence). A worker's presence changes on
    the scale of its heartbeat, so a second-old view is as good.
    """

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._read_at = 0.0
        self._workers: list[WorkerInfo] | None = None

    def get(self, conn: redis.Redis) -> list[WorkerInfo]:
        with self._lock:
            if self._workers is not None and time.monotonic() - self._read_at < self.max_age_s:
                return self._workers
        workers = live_workers(conn)
        with self._lock:
            self._workers, self._read_at = workers, time.monotonic()
        return workers


def models_served(workers: list[WorkerInfo]) -> list[ModelOut]:
    by_model: dict[str, list[WorkerInfo]] = {}
    for w in workers:
        by_model.setdefault(w.model, []).append(w)
    out = []
    for name, group in sorted(by_model.items()):
        sizes = {(w.width, w.height) for w in group if w.width and w.height}
        width, height = sizes.pop() if len(sizes) == 1 else (None, None)
        batches = [w.max_batch for w in group if w.max_batch]
        out.append(
            ModelOut(
                model=name,
                width=width,
                height=height,
                workers=len(group),
                devices=sorted({w.device for w in group if w.device}),
                dtypes=sorted({w.dtype for w in group if w.dtype}),
                max_batch=max(batches) if batches else None,
                hashes=sorted({w.hash for w in group if w.hash}),
                defaults=agreed_defaults(group),
                samplers=sorted(set.intersection(*(set(w.samplers) for w in group))),
            )
        )
    return out


def native_size(workers: list[WorkerInfo]) -> tuple[int | None, int | None]:
    """The default size, when every live worker agrees on one.

    Workers of different models share one queue, so when they disagree the
    API cannot know which will run the job; the worker then resolves it.
    """
    sizes = {(w.width, w.height) for w in workers if w.width and w.height}
    if len(sizes) == 1:
        return sizes.pop()
    return None, None


def serving(workers: list[WorkerInfo], model: str | None) -> list[WorkerInfo]:
    """The workers that may run a job of `model` (None: any worker takes it)."""
    return workers if model is None else [w for w in workers if w.model == model]


def device_refusal(workers: list[WorkerInfo], width: int | None, height: int | None, steps: int,
                   num_images: int = 1) -> tuple[str, str] | None:
    """(field, reason) when live workers exist and none of them takes a job this size, this
    many steps (bailan.caps) and this many images (a job's images run in one batch, so at most
    a worker's max_batch); None when one does, or when none is alive (a job may wait for one)."""
    if not workers:
        return None
    refusals = []
    for worker in workers:
        # A size the request left to the worker is its model's native size.
        w, h = width or worker.width, height or worker.height
        refusal = worker.caps.refusal(w or 0, h or 0, steps)
        if refusal is None and worker.max_batch and num_images > worker.max_batch:
            refusal = "num_images", f"num_images = {num_images} exceeds a batch of {worker.max_batch} images"
        if refusal is None:
            return None
        refusals.append((refusal, worker))
    (field, reason), worker = refusals[0]
    devices = ", ".join(sorted({w.device or "unknown" for _, w in refusals}))
    return field, f"{reason}: more than any live worker takes (devices: {devices})"


def agreed_defaults(workers: list[WorkerInfo]) -> ModelDefaults:
    """Each model default that every live worker publishes alike.

    Like the native size: with workers of different models on one queue the
    API cannot know which runs a job, so a default they disagree on is left to
    the service-wide one.
    """
    agreed: dict[str, Any] = {}
    for name in MODEL_DEFAULT_FIELDS:
        values = {getattr(w.defaults, name) for w in workers}
        if len(values) == 1 and None not in values:
            agreed[name] = values.pop()
    return ModelDefaults(**agreed)
