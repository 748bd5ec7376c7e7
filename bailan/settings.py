"""Settings every Bailan process reads the same way, declared once.

The API (app.settings.ApiSettings), the worker (worker.settings.WorkerSettings)
and the launcher (bailan.launch.LaunchSettings) inherit `SharedSettings`, so a
value one process accepts is accepted by all of them, and one they refuse
stops each of them at start-up. Like the rest of bailan/, no torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bailan.jobs import STEPS_HARD_MAX, URL_HARD_MAX_CHARS

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redact_url(url: str) -> str:
    """`url` with its password replaced by ***, for logs and banners (BAILAN_REDIS_URL carries one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def non_empty_path(cls: type, value: Any) -> Any:
    """A directory setting's value, refused when empty: `Path("")` is the current directory,
    where a blob sweep or a cache would act on whatever is there (the checkout). A field
    validator (mode="before"), as comma_separated."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty; give a directory, or leave the variable unset for the default")
    return value


def comma_separated(cls: type, value: Any) -> Any:
    """A list setting's env value, comma-separated: what operators write in an env file (JSON
    lists, the pydantic-settings default, are easy to get wrong). A field validator (mode="before")
    for a field annotated with NoDecode."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class SharedSettings(BaseSettings):
    """Where jobs travel and how long they are kept (environment variables prefixed BAILAN_)."""

    # extra="ignore": every process sees the whole BAILAN_ environment,
    # including the variables that only the others read.
    # allow_inf_nan=False: "inf" seconds passes gt=0, then breaks a thread's wait at run time.
    # hide_input_in_errors: a refused BAILAN_REDIS_URL or secret is not printed back (a password).
    model_config = SettingsConfigDict(env_prefix="BAILAN_", extra="ignore", allow_inf_nan=False,
                                      hide_input_in_errors=True)

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
    max_steps: int = Field(150, ge=1, le=STEPS_HARD_MAX, description="Most denoising steps a request may ask for.")
    blob_dir: Path = Field(
        Path(".run/blobs"),
        description=(
            "Directory holding final images and previews (bailan.blobs); every API and worker "
            "process must see the same one (a shared volume across hosts)."
        ),
    )
    blob_sweep_interval_s: float = Field(
        300.0, gt=0, description="Seconds between the API's sweeps that delete expired images and previews."
    )
    reap_interval_s: float = Field(
        10.0, gt=0, description="Seconds between sweeps for jobs whose worker died (the API's and each worker's)."
    )
    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        # Checked here, not at the first connection: a worker would find out after loading its model.
        value = value.strip()
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{redact_url(value)!r} is not a Redis URL: write redis://[:password@]host:port/db "
                             "(rediss:// for TLS, unix:///path.sock)")
        return value

    _blob_dir_given = field_validator("blob_dir", mode="before")(non_empty_path)

    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines: text, or json (one JSON object per line; job lines carry job_id).",
    )

    # Webhooks (bailan.webhooks): the API checks URLs against them, the worker,
    # the API and the reaper queue deliveries with them, `python -m bailan.webhooks` sends.
    webhook_secret: SecretStr | None = Field(
        None,
        description=(
            "Key signing webhook deliveries (Standard Webhooks): whsec_ + base64 as the standard writes it, "
            "or any other string (its UTF-8 bytes), 16 bytes at least. Unset: requests with webhook_url get 422."
        ),
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
        description=(
            "The API's address as clients reach it (https://bailan.example.com, or with a path prefix); "
            "webhook deliveries' links (images, previews) start with it. Unset: they are paths, as in "
            "API answers, to be resolved against the API's address."
        ),
    )
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated hosts (names or IPs, as written in the URL) a webhook may reach even though "
            "they are internal (loopback, private, link-local...); every other host must resolve to public addresses."
        ),
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="Seconds a webhook POST may wait to connect, and for each read of the answer (at most 2 x this + 10 s in all).")
    webhook_retries: int = Field(
        8, ge=0, le=50, description="Times a failed `completed` delivery is tried again (started and preview: never)."
    )
    webhook_retry_intervals_s: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [10, 30, 60, 300, 900, 1800, 3600, 7200],
        description="Comma-separated seconds before each retry; the last repeats when retries outnumber them.",
    )
    webhook_url_max_chars: int = Field(
        2048, ge=16, le=URL_HARD_MAX_CHARS, description="Longest webhook_url a request may give."
    )

    _split_hosts = field_validator("webhook_allow_hosts", mode="before")(comma_separated)

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _normal_hosts(cls, value: list[str]) -> list[str]:
        # As a URL's host compares (bailan.webhooks): no IPv6 brackets, no root dot, lower case.
        hosts = (host.strip().strip("[]").rstrip(".").lower() for host in value)
        return [host for host in hosts if host]

    _split_intervals = field_validator("webhook_retry_intervals_s", mode="before")(comma_separated)

    @field_validator("webhook_retry_intervals_s")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if any(v < 0 for v in value):
            raise ValueError("intervals must be 0 or more seconds")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _usable_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            # Imported here: bailan.webhooks brings RQ and httpx, which a client of the contract need not load.
            from bailan.webhooks import secret_key

            secret_key(value.get_secret_value())  # fail at start-up, not at the first delivery
        return value
