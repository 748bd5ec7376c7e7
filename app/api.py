"""Every area of the HTTP API: the routers that create_app includes, in order.

A new area (auth, an OpenAI-compatible endpoint, the web page, metrics) is a
new module in app/routes/ with a module-level `router`, plus one line here.
They are included into the app one by one, not through one router that holds
them: each level of inclusion is one more router that FastAPI walks to match
every request, the polled status path included.
POST /v1/jobs is not here: its body type carries the configured caps, so
create_app adds it from app.routes.jobs.submit_router(settings).
"""

from __future__ import annotations

from fastapi import APIRouter

from app.routes import jobs, metrics, openai, service, web

AREAS: tuple[APIRouter, ...] = (
    jobs.router,
    service.router,
    metrics.router,
    openai.router,
    web.router,
)
