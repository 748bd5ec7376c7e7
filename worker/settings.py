"""The worker process's settings: one class, BAILAN_ environment variables."""

from __future__ import annotations

import socket
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_MODEL = REPO_ROOT / "models" / "bailan-shapes"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BAILAN_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the queue and job records.")
    queue_name: str = Field("bailan", description="RQ queue this worker serves.")
    model: str | None = Field(
        None,
        description=(
            "Path to a local diffusers Stable Diffusion directory. Default: the built-in model "
            "(models/bailan-shapes), or a tiny random-weight pipeline built locally when that is absent."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present, else CPU.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float16 on CUDA, float32 on CPU."
    )
    max_batch: int = Field(
        0, ge=0, le=256, description="Images denoised together in one UNet call; 0 = pick from the device's memory."
    )
    compile: bool = Field(False, description="torch.compile the UNet (CUDA only; slow start-up, faster steps).")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often a worker proves it is alive.")
    heartbeat_ttl_s: int = Field(
        30, ge=2, description="A running job whose worker is silent this long is failed or requeued by the reaper."
    )
    reap_interval_s: float = Field(10.0, gt=0, description="How often this worker looks for abandoned jobs.")
    preview_ttl_s: int = Field(3600, ge=1, description="How long previews are kept.")
    result_ttl_s: int = Field(86400, ge=1, description="How long final images and job records are kept.")
    preview_max_side: int = Field(256, ge=16, le=1024, description="Longest side of a preview image in pixels.")
    name: str = Field(
        default_factory=lambda: f"{socket.gethostname()}.{os.getpid()}",
        description="Worker name prefix, unique per process.",
    )

    @model_validator(mode="after")
    def _ttls_outlive_heartbeats(self) -> "WorkerSettings":
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("BAILAN_HEARTBEAT_TTL_S must exceed BAILAN_HEARTBEAT_INTERVAL_S")
        if self.model is not None and not Path(self.model).is_dir():
            raise ValueError(f"BAILAN_MODEL={self.model!r} is not a directory")
        return self
