"""The API's HTTP server, uvicorn, as every way of running the API starts it.

`make run` (bailan.launch) and the container image (`python -m app`) build
uvicorn's command line here, so the limits on connections, headers and
keep-alive (BAILAN_API_*) hold wherever the API runs. uvicorn's own defaults
have none of them: no header cap under httptools, no concurrency limit.
"""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import Field

from bailan.settings import SharedSettings


class ApiServerSettings(SharedSettings):
    """What uvicorn is started with; the application itself reads app.settings.ApiSettings."""

    host: str = Field("127.0.0.1", description="Address the API listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    api_processes: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "API processes behind the one port (uvicorn --workers): the API is Python, so one "
            "process serves requests one core at a time; more take more clients."
        ),
    )
    # Limits of the API's HTTP server (uvicorn), against clients that hold connections
    # open or send endless headers; a reverse proxy in front should set its own too (README).
    api_http: Literal["h11", "httptools"] = Field(
        "h11",
        description=(
            "uvicorn's HTTP parser: h11 enforces BAILAN_API_MAX_HEADER_BYTES; httptools is faster "
            "but accepts headers of any size (leave that limit to a proxy)."
        ),
    )
    api_max_header_bytes: int = Field(
        16384, ge=1024, description="Largest request line plus headers (h11 only); larger get 400."
    )
    api_limit_concurrency: int = Field(
        1000, ge=1, description="Connections or requests in progress per API process beyond which uvicorn answers 503."
    )
    api_timeout_keep_alive_s: int = Field(
        5, ge=1, description="Seconds an idle keep-alive connection stays open."
    )
    api_backlog: int = Field(2048, ge=1, description="Connections waiting to be accepted (the listen backlog).")


def uvicorn_limits(settings: ApiServerSettings) -> list[str]:
    """uvicorn's options for the API's connection, header and keep-alive limits."""
    return [
        "--http", settings.api_http,
        "--h11-max-incomplete-event-size", str(settings.api_max_header_bytes),
        "--limit-concurrency", str(settings.api_limit_concurrency),
        "--timeout-keep-alive", str(settings.api_timeout_keep_alive_s),
        "--backlog", str(settings.api_backlog),
    ]


def uvicorn_argv(settings: ApiServerSettings, python: str = sys.executable) -> list[str]:
    """The whole command that serves the API: address, processes and limits."""
    return [python, "-m", "uvicorn", "app.main:app", "--host", settings.host, "--port", str(settings.port),
            *(["--workers", str(settings.api_processes)] if settings.api_processes > 1 else []),
            *uvicorn_limits(settings)]
