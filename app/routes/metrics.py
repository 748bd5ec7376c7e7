"""GET /metrics: the service's figures in Prometheus' text format (app.metrics).

Open like /healthz: a scraper carries no API key, and the figures name no
client's jobs (queues appear by key digest, never by key name). Keep the port
off the internet, or let the reverse proxy restrict /metrics.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["service"])


@router.get(
    "/metrics",
    summary="Prometheus metrics: queues, jobs, workers, steps, HTTP",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition format."}},
)
def metrics(request: Request) -> Response:
    # A plain def: the Redis collector blocks, so it runs in the thread pool.
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
