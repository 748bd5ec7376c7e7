"""The Bailan HTTP API application.

Run with `uvicorn app.main:app` or `uvicorn --factory app.main:create_app`.
Importing this module reads no settings and touches no network: `app` is
built on first access, so tests and tools can import create_app freely.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio
import redis.client
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api import AREAS
from app.deps import JobAccess
from app.errors import http_error, validation_error
from app.metrics import HttpMetrics, RedisCollector
from app.middleware import BodySizeLimit, SelfOnlyPages
from app.routes.jobs import submit_router
from app.settings import ApiSettings
from app.store.events import JobEvents
from app.store.workers import WorkerCache
from app.views import Links, RenderedViews
from bailan import webhooks
from bailan.blobs import open_store
from bailan.keys import KeyRing
from bailan.logs import configure as configure_logging
from bailan.reaper import Reaper

log = logging.getLogger("bailan.api")

# Where /docs and /redoc load Swagger UI's and ReDoc's files from: this process.
DOCS_ASSETS_URL = "/docs-assets"


# Retried once: a connection that broke (a pooled one from before a Redis restart). Not a
# timeout: the commands may still run once Redis catches up, and a transaction sent again
# would then run twice (a job queued twice, a webhook sent twice). A connection can break after
# its command ran too: writes that must not run twice watch their keys (a submit, a cancel's
# end), which redis-py never sends again, or use a client that never retries (the reaper).
RETRIED = (redis.ConnectionError,)


class _Pipeline(redis.client.Pipeline):
    def reset(self) -> None:
        # Closed, not sent UNWATCH: a connection's WATCHes end with it, and reset() runs where a
        # command just failed. redis-py sent UNWATCH there, on a new connection where the old one
        # broke: to a Redis that stopped answering, each waited the timeout again (once in
        # execute(), once in the caller's reset()), so a submit's 503 came after three
        # timeouts, not one. Only an early return or an error leaves a pipeline watching.
        if self.watching and self.connection is not None:
            self.connection.disconnect()
            self.watching = False
        super().reset()


class ApiRedis(redis.Redis):
    """The API's Redis client: redis-py's, with _Pipeline's reset."""

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> redis.client.Pipeline:
        return _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def make_redis(settings: ApiSettings, retries: int = 1) -> redis.Redis:
    # Short timeouts and a single quick retry: a dead Redis must become a
    # prompt 503, not a request that hangs for redis-py's default backoff.
    return ApiRedis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries, supported_errors=RETRIED),
        health_check_interval=30,
    )


def make_async_redis(settings: ApiSettings) -> redis.asyncio.Redis:
    """The event loop's client (status path, event streams), with make_redis' timeouts."""
    return redis.asyncio.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        retry=AsyncRetry(ExponentialBackoff(cap=0.1, base=0.01), 1, supported_errors=RETRIED),
        health_check_interval=30,
    )


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings if settings is not None else ApiSettings()
    configure_logging(settings.log_format)
    conn = make_redis(settings)
    aconn = make_async_redis(settings)
    keyring = KeyRing(settings.api_keys_file) if settings.api_keys_file is not None else None
    blobs = open_store(settings.blob_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if keyring is None:
            log.warning("open mode: BAILAN_API_KEYS_FILE is unset, so no API key is asked and every client "
                        "is 'anonymous' and sees every job; set it before exposing the API beyond this machine")
        else:
            log.info("API keys from %s: %d keys", settings.api_keys_file, len(keyring))
        # Never retried: a connection can break after a command ran, and RQ's cleanup transaction
        # (the requeue of a dead worker's job) sent again pushed the job onto its queue twice, to
        # run twice. A cleanup whose answer was lost is read back (bailan.reaper._reap_queue).
        reaper_conn = make_redis(settings, retries=0)
        reaper = Reaper(reaper_conn, settings.queue_name, settings.reap_interval_s, settings.result_ttl_s,
                        webhooks.Policy.of(settings), blobs=blobs,
                        blob_sweep_interval_s=settings.blob_sweep_interval_s)
        reaper.start()
        app.state.reaper = reaper
        job_events = JobEvents(aconn)
        job_events.start()
        app.state.job_events = job_events
        try:
            yield
        finally:
            await job_events.stop()
            reaper.stop()
            reaper_conn.close()
            conn.close()
            await aconn.aclose()

    # FastAPI's own /docs and /redoc load their JavaScript, CSS and favicon
    # from public CDNs, so without internet they are blank pages. FastAPIOffline
    # is FastAPI with the same pages fed from the files fastapi-offline ships
    # (served under DOCS_ASSETS_URL), ReDoc without Google Fonts included;
    # SelfOnlyPages (below) keeps their pages from reaching any other host.
    app = FastAPIOffline(
        title="Bailan",
        summary="Queued image generation over HTTP: submit, poll, preview, fetch, cancel.",
        version="1.0.0",
        lifespan=lifespan,
        static_url=DOCS_ASSETS_URL,
        # Swagger UI's default validator badge is an image from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.redis = conn
    app.state.aredis = aconn
    app.state.keyring = keyring
    app.state.blobs = blobs
    app.state.worker_cache = WorkerCache(settings.workers_cache_s)
    # One registry per app (tests build many apps in one process): this process's
    # HTTP figures, and the service's, read from Redis at scrape time (app.metrics).
    registry = CollectorRegistry()
    registry.register(RedisCollector(conn, settings.queue_name))
    app.state.metrics_registry = registry
    # The one route built per app: its body type carries this server's caps.
    app.include_router(submit_router(settings))
    for area in AREAS:
        app.include_router(area)
    app.state.links = Links(app.url_path_for)
    app.state.job_access = JobAccess(settings, conn, aconn, app.state.links, blobs, RenderedViews(settings.view_cache_jobs))

    async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable during %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": f"the job store (Redis) is unavailable: {exc}; retry later"},
            status_code=503,
            headers={"Retry-After": str(settings.retry_after_s)},
        )

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Still a 500, but JSON like every other error, and logged with its traceback.
        log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error; it has been logged"}, status_code=500)

    # Connection and timeout errors are the common case; any other Redis error
    # (out of memory under noeviction, a read-only replica) also means the
    # store cannot serve right now, which is a 503, not a bug in the request.
    app.add_exception_handler(redis.RedisError, redis_unavailable)
    # The default 422 handler fails (500) on inputs JSON cannot carry: NaN, 1e400, lone surrogates.
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)

    app.add_middleware(SelfOnlyPages)
    # Added last = outermost, so 413 answers also carry CORS headers.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            # A browser's preflight names every non-simple header the request will carry.
            allow_headers=["Content-Type", "Authorization", "Idempotency-Key", "Prefer"],
            # Every header of ours a client reads; the rest browsers hide from a page's code.
            expose_headers=["Location", "Retry-After", "X-Bailan-Step", "Idempotent-Replayed", "WWW-Authenticate",
                            "Preference-Applied", "X-Bailan-Job-Id", "x-should-retry", "Content-Disposition"],
        )
    # Outermost: every answer counts, the 413s and CORS preflights included.
    app.add_middleware(HttpMetrics, registry=registry)
    return app


def __getattr__(name: str) -> Any:
    # PEP 562: `app` is created on first use (uvicorn's getattr), not at import.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
