"""Configuration of the HTTP front end: one class, read from BAILAN_* variables.

Invalid values stop the process at start-up rather than surfacing later as odd
request failures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from PIL import Image
from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from app.limits import Rate, parse_rate
from bailan.jobs import MODEL_NAME_MAX, MODEL_NAME_PATTERN, SIZE_MULTIPLE
from bailan.keys import read_keys
from bailan.settings import SharedSettings, comma_separated

MIN_PIXELS = 64 * 64


class ApiSettings(SharedSettings):
    """Settings of the Bailan API process (environment variables prefixed BAILAN_).

    Redis, the queue, the TTLs and the reap interval come from SharedSettings.
    The address and port are not here: uvicorn takes --host/--port, and under
    `make run` the launcher reads BAILAN_HOST/BAILAN_PORT (bailan.launch).
    """

    model_config = SettingsConfigDict(frozen=True)

    redis_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Connect and read timeout for Redis; requests fail with 503 after it."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed by CORS, comma-separated; empty (the default) disables CORS.",
    )
    max_width: int = Field(1024, ge=SIZE_MULTIPLE, description="Largest image width a request may ask for.")
    max_height: int = Field(1024, ge=SIZE_MULTIPLE, description="Largest image height a request may ask for.")
    max_pixels: int = Field(
        1024 * 1024, ge=MIN_PIXELS, description="Largest width × height a request may ask for."
    )
    max_prompt_chars: int = Field(
        1000, ge=1, description="Longest prompt (and negative prompt), in characters."
    )
    max_queue_depth: int = Field(
        1000, ge=1, description="Queued jobs beyond which submissions get 429 instead of waiting forever."
    )
    max_body_bytes: int = Field(
        12 * 2**20,
        ge=1024,
        description="Largest request body accepted; larger ones get 413 (room for two base64 input images).",
    )
    max_image_bytes: int = Field(
        4 * 2**20, ge=1024, description="Largest input image (init_image, mask_image), in bytes as decoded from base64."
    )
    max_image_pixels: int = Field(
        2048 * 2048,
        ge=64 * 64,
        # Above Pillow's decompression-bomb threshold, Pillow itself would refuse what the cap allows.
        le=Image.MAX_IMAGE_PIXELS,
        description="Most pixels an input image may have (checked before it is decoded); "
        f"at most {Image.MAX_IMAGE_PIXELS} (Pillow's decompression-bomb threshold).",
    )
    abandoned_retries: int = Field(
        1, ge=0, description="Times a job whose worker died is requeued before it fails with worker_lost."
    )
    events_poll_interval_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description=(
            "How often an event stream (GET /v1/jobs/{id}/events) re-reads its job when no change was "
            "pushed: a safety net, since workers publish every change."
        ),
    )
    api_keys_file: Path | None = Field(
        None,
        description=(
            "File of API keys, one '<name> <sha256 hex> [admin]' a line (python -m bailan.keys new NAME); "
            "re-read when it changes. Unset: open mode, no keys asked (local use only)."
        ),
    )
    rate_limit: str = Field(
        "600/minute",
        description="Submits per API key: COUNT/PERIOD (120/minute, 10/second, 5/10minutes) or 'none'.",
    )
    max_queued_per_key: int = Field(
        500, ge=1, description="Queued jobs one API key may have; more get 429 (in open mode: everyone's)."
    )
    max_streams_per_key: int = Field(
        32,
        ge=1,
        description="Open event streams one API key may have; more get 429. Requests held by `Prefer: wait` count too.",
    )
    max_wait_s: int = Field(
        60,
        ge=0,
        le=600,
        description="Longest a request is held by `Prefer: wait=N` until its job ends (POST /v1/jobs, GET /v1/jobs/{id}); 0: never held.",
    )
    view_cache_jobs: int = Field(
        4096,
        ge=0,
        description=(
            "Jobs whose rendered view each API process keeps with the snapshot it was rendered from, "
            "so a poll that finds the job unchanged is served the same bytes (the snapshot is still "
            "read every time). Each entry holds the view and that snapshot: a few KB, more for a queued "
            "job while many workers are live (its snapshot carries their descriptions). 0 renders every poll."
        ),
    )
    workers_cache_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description=(
            "How old the live workers a submit is checked against (their native size and caps) may be; "
            "each re-read is two Redis round trips. 0 re-reads on every submit."
        ),
    )
    openai_timeout_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description=(
            "How long POST /v1/images/generations waits for its job; past it the call answers an error "
            "naming the job id, and the job goes on (follow it under /v1/jobs/{id})."
        ),
    )
    retry_after_s: int = Field(
        10, ge=1, description="Retry-After sent with 429 (queue full) and 503 (Redis down)."
    )
    default_model: str | None = Field(
        None,
        min_length=1,
        max_length=MODEL_NAME_MAX,
        pattern=MODEL_NAME_PATTERN,
        description=(
            "Model a request that names none runs on (a name /v1/models lists). Unset: such a job goes "
            "to whichever worker takes it first, which is the one model when a deployment serves one."
        ),
    )

    _split_origins = field_validator("cors_origins", mode="before")(comma_separated)

    @field_validator("rate_limit")
    @classmethod
    def _valid_rate(cls, value: str) -> str:
        parse_rate(value)  # fail at start-up, naming the setting, not at the first submit
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _valid_keys_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_keys(value)  # KeysFileError is a ValueError: it names the file and the line
        return value

    @property
    def rate(self) -> Rate | None:
        return parse_rate(self.rate_limit)

    @field_validator("max_width", "max_height")
    @classmethod
    def _size_multiple(cls, value: int) -> int:
        if value % SIZE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIZE_MULTIPLE}")
        return value
