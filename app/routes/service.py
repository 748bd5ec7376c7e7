"""The service itself: the models a request may name, liveness and readiness.

/healthz and /readyz take no API key: probes carry none.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import AuthDep, RedisDep, SettingsDep
from app.schemas import Detail, ModelOut, ModelsOut
from app.store import workers
from bailan.queues import registered_models

router = APIRouter(tags=["service"])


@router.get(
    "/v1/models",
    response_model=ModelsOut,
    summary="Models a request may name: those live workers serve, and those whose workers are all down",
    responses={
        401: {"model": Detail, "description": "Missing or unknown API key (header `WWW-Authenticate: Bearer`)."},
        503: {"model": Detail, "description": "Redis unavailable."},
    },
)
def models(conn: RedisDep, settings: SettingsDep, principal: AuthDep) -> ModelsOut:
    served = workers.models_served(workers.live_workers(conn))
    # A model whose workers are all down still takes jobs (they wait for one): list it, with 0 workers.
    idle = set(registered_models(conn, settings.queue_name)) - {m.model for m in served}
    return ModelsOut(
        models=sorted([*served, *(ModelOut(model=name, workers=0) for name in idle)], key=lambda m: m.model),
        default=settings.default_model,
    )


@router.get("/healthz", summary="Liveness: the API process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: Redis reachable and at least one live worker",
    responses={503: {"model": Detail, "description": "Not ready; detail says why."}},
)
def readyz(conn: RedisDep) -> Any:
    try:
        conn.ping()
        live = workers.live_workers(conn)
    except Exception as exc:  # any Redis failure means not ready, never a 500
        return JSONResponse({"detail": f"Redis unreachable: {exc}"}, status_code=503)
    if not live:
        return JSONResponse({"detail": "no live worker: jobs would wait in the queue"}, status_code=503)
    return {"status": "ready", "workers": len(live)}
