"""Settings every Bailan process reads the same way, declared once.

The API (app.settings.ApiSettings), the worker (worker.settings.WorkerSettings)
and the launcher (bailan.launch.LaunchSettings) inherit `SharedSettings`, so a
value one process accepts is accepted by all of them, and one they refuse
stops each of them at start-up. Like the rest of bailan/, no torch here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class SharedSettings(BaseSettings):
    """Where jobs travel and how long they are kept (environment variables prefixed BAILAN_)."""

    # extra="ignore": every process sees the whole BAILAN_ environment,
    # including the variables that only the others read.
    model_config = SettingsConfigDict(env_prefix="BAILAN_", extra="ignore")

    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        description="Redis holding the RQ queue and job records; the launcher sets it.",
    )
    queue_name: str = Field("bailan", min_length=1, description="RQ queue the workers listen on.")
    # A minute at least: a client that polls must find its finished job.
    result_ttl_s: int = Field(
        86400, ge=60, description="Seconds finished jobs, their records and images are kept."
    )
    preview_ttl_s: int = Field(3600, ge=1, description="Seconds intermediate previews are kept.")
    # The API refuses more; the worker sizes each slot's schedule table by it.
    max_steps: int = Field(150, ge=1, le=100_000, description="Most denoising steps a request may ask for.")
    reap_interval_s: float = Field(
        10.0, gt=0, description="Seconds between sweeps for jobs whose worker died (the API's and each worker's)."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines: text, or json (one JSON object per line; job lines carry job_id).",
    )
