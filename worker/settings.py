"""The worker process's settings: one class, BAILAN_ environment variables.

Redis, the queue, the TTLs and the reap interval are bailan.settings.SharedSettings,
declared once for the API and the worker.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from bailan.caps import DeviceCaps
from bailan.jobs import model_dir_problem
from bailan.settings import SharedSettings, comma_separated, non_empty_path


class WorkerSettings(SharedSettings):
    """Settings of one worker process (environment variables prefixed BAILAN_)."""

    model: Path = Field(
        Path("models/bailan-shapes"),
        description=(
            "Path to a local diffusers Stable Diffusion directory. Default: the built-in model, "
            "models/bailan-shapes, relative to the working directory (the repository root under "
            "`make run`, /app in the image)."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present, else CPU.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float16 on CUDA, float32 on CPU."
    )
    max_batch: int = Field(
        0, ge=0, le=256, description="Images denoised together in one UNet call; 0 = pick from the device's memory."
    )
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often a worker proves it is alive.")
    heartbeat_ttl_s: int = Field(
        30, ge=2, description="A running job whose worker is silent this long is failed or requeued by the reaper."
    )
    presence_interval_s: float = Field(
        1.0, gt=0, description="How often a worker renews its presence key, which /readyz and /v1/models count."
    )
    presence_ttl_s: float = Field(
        4.0, gt=0, description="Seconds a worker's presence key outlives its last renewal: how soon /readyz stops counting a dead worker."
    )
    redis_outage_limit_s: float = Field(
        300.0,
        gt=0,
        description=(
            "How long a worker waits for an unreachable Redis (slots and running jobs wait and reconnect) "
            "before it gives up and exits with code 3, for a supervisor to restart it."
        ),
    )
    preview_max_side: int = Field(256, ge=16, le=1024, description="Longest side of a preview image in pixels.")
    name: str = Field(
        default_factory=lambda: f"{socket.gethostname()}.{os.getpid()}",
        description="Worker name prefix, unique per process.",
    )
    # CUDA-only machinery is switched on by the device: "auto" means on with CUDA, off on the CPU.
    cuda_graphs: bool | Literal["auto"] = Field(
        "auto", description="Capture each padded batch shape's denoising step as a CUDA graph (CUDA only)."
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "torch.compile the UNet and the VAE decoder (CUDA only): faster steps, a slower first start "
            "(later starts reuse BAILAN_COMPILE_CACHE_DIR)."
        ),
    )
    cudnn_benchmark: bool = Field(
        False,
        description=(
            "Let cuDNN time its convolution algorithms and keep the fastest, once per shape (CUDA only): "
            "at warm-up, for each bucket, at every start. false: cuDNN's heuristics pick; no H100 figure "
            "showed the timing making a step faster."
        ),
    )
    batch_buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description=(
            "UNet row counts (two for each guided image) that a step's batch is padded up to, comma-separated, "
            "each captured as a CUDA graph before the worker is ready (CUDA only). Empty: 2 and 4 (1 too when "
            "not compiling), then every 4 up to 32 and every 8 above, up to twice the batch. Finer buckets waste "
            "less of a step on padding when jobs come and go, and each adds a capture to the start."
        ),
    )
    _split_buckets = field_validator("batch_buckets", mode="before")(comma_separated)
    compile_cache_dir: Path = Field(
        Path(".run/compile-cache"),
        description=(
            "Where torch.compile keeps its compiled kernels (TORCHINDUCTOR_CACHE_DIR) and the worker its "
            "whole compiled UNet and VAE decoder (precompiled/) across restarts."
        ),
    )
    _cache_dir_given = field_validator("compile_cache_dir", mode="before")(non_empty_path)

    # Per-device caps (bailan.caps): a CPU worker must not take what costs minutes a step.
    max_pixels_cpu: int = Field(
        512 * 512,
        ge=0,
        description=(
            "Largest width × height a worker on the CPU takes (0 = no cap beyond the API's); "
            "a 1024² step of the built-in model takes 7–16 s on a 2-core CPU."
        ),
    )
    max_steps_cpu: int = Field(50, ge=0, description="Most steps a worker on the CPU takes (0 = no cap beyond the API's).")
    max_pixels_cuda: int = Field(
        0, ge=0, description="Largest width × height a worker on a GPU takes (0 = no cap beyond the API's)."
    )
    max_steps_cuda: int = Field(0, ge=0, description="Most steps a worker on a GPU takes (0 = no cap beyond the API's).")
    trace_file: Path | None = Field(
        None,
        description="Append a JSON line per engine step, and two per succeeded job, to this file (worker.trace), "
        "for bench/service.py --trace. Unset: no trace.",
    )

    def device_caps(self, device_type: str) -> DeviceCaps:
        """This worker's caps on a device of type `device_type` ("cpu" or "cuda")."""
        pixels, steps = (
            (self.max_pixels_cuda, self.max_steps_cuda) if device_type == "cuda" else (self.max_pixels_cpu, self.max_steps_cpu)
        )
        return DeviceCaps(max_pixels=pixels or None, max_steps=steps or None)

    @field_validator("model")
    @classmethod
    def _model_is_a_pipeline_directory(cls, path: Path) -> Path:
        # Checked with the settings, before torch loads, so a wrong path stops the
        # worker at once with what to do; the worker never serves a stand-in.
        problem = model_dir_problem(path)
        if problem is None:
            return path
        if (path / "model_index.json").is_file():  # its name
            raise ValueError(f"BAILAN_MODEL={str(path)!r}: {problem}")
        fix = "set BAILAN_MODEL to a local diffusers Stable Diffusion directory"
        if path == cls.model_fields["model"].default:
            fix += " or start the worker from the repository root, where the built-in model lives"
        raise ValueError(f"BAILAN_MODEL={str(path)!r} ({path.resolve()}): {problem}; {fix}")

    @field_validator("batch_buckets")
    @classmethod
    def _buckets_are_row_counts(cls, value: list[int]) -> list[int]:
        if any(rows < 1 for rows in value):
            raise ValueError(f"BAILAN_BATCH_BUCKETS={value}: a bucket is a number of UNet rows, at least 1")
        return sorted(set(value))

    @model_validator(mode="after")
    def _ttls_outlive_heartbeats(self) -> "WorkerSettings":
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("BAILAN_HEARTBEAT_TTL_S must exceed BAILAN_HEARTBEAT_INTERVAL_S")
        if self.presence_ttl_s <= self.presence_interval_s:
            raise ValueError("BAILAN_PRESENCE_TTL_S must exceed BAILAN_PRESENCE_INTERVAL_S")
        return self
