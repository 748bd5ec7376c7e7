"""Every area of the HTTP API, in one router that create_app includes.

A new area (auth, an OpenAI-compatible endpoint, the web page, metrics) is a
new module in app/routes/ with a module-level `router`, plus one line here.
POST /v1/jobs is not here: its body type carries the configured caps, so
create_app adds it from app.routes.jobs.submit_router(settings).
"""

from __future__ import annotations

from fastapi import APIRouter

from app.routes import jobs, metrics, openai, service, web

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(service.router)
api_router.include_router(metrics.router)
api_router.include_router(openai.router)
api_router.include_router(web.router)
