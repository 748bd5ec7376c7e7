"""The web page at `/`: a form, the job's previews as they arrive, its images, and this browser's history.

Static files from app/web (HTML, CSS, plain JavaScript; no build step). The
page talks to the same API as any client: POST /v1/jobs, the job's event
stream read with fetch() (EventSource cannot send the Authorization header an
API key needs), and previews and images fetched with that header into blob: URLs.
Its Content-Security-Policy is stricter than the docs' (app.middleware): no
inline script or style at all, and nothing from any other origin.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from app.deps import RedisDep, SettingsDep
from app.schemas import Detail
from app.store import records
from bailan.jobs import DEFAULT_STEPS, MAX_IMAGES, SchedulerName

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# What the page may load: its own files, the API's JSON, and images it made into blob: URLs.
PAGE_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}

router = APIRouter(tags=["web page"])


class PageConfig(BaseModel):
    """What the page needs to know to build its form."""

    keys_required: bool = Field(description="Whether the API asks for an API key (BAILAN_API_KEYS_FILE is set).")
    max_steps: int
    max_width: int
    max_height: int
    max_images: int
    default_steps: int
    schedulers: list[str]
    models: list[str] = Field(description="Models a job may name (/v1/models' and those whose workers stopped).")
    default_model: str | None = Field(description="The model a job that names none runs on (BAILAN_DEFAULT_MODEL).")


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(
        WEB_DIR / name,
        media_type=media_type,
        # Revalidated on every load (ETag / Last-Modified): a new release is seen at once.
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_POLICY,
                 "X-Content-Type-Options": "nosniff"},
    )


@router.get(
    "/",
    response_class=FileResponse,
    summary="The web page",
    responses={200: {"content": {"text/html": {}}, "description": "The page (no API key needed to load it)."}},
)
def page() -> FileResponse:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/web/config.json", response_model=PageConfig, summary="What the web page's form needs to know")
def page_config(request: Request, settings: SettingsDep, conn: RedisDep) -> PageConfig:
    return PageConfig(
        keys_required=request.app.state.keyring is not None,
        max_steps=settings.max_steps,
        max_width=settings.max_width,
        max_height=settings.max_height,
        max_images=MAX_IMAGES,
        default_steps=min(DEFAULT_STEPS, settings.max_steps),
        schedulers=[s.value for s in SchedulerName],
        models=records.known_models(conn, settings.queue_name),
        default_model=settings.default_model,
    )


@router.get(
    "/web/{name}",
    response_class=FileResponse,
    summary="The web page's script and style sheet",
    responses={
        200: {"content": {"text/javascript": {}, "text/css": {}}, "description": "app.js or style.css."},
        404: {"model": Detail, "description": "No such file."},
    },
)
def asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no web asset {name!r}")
    return _file(name, ASSETS[name])
