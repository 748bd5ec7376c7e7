"""Dependencies of the routes, as Annotated aliases so tests can swap any of
them through app.dependency_overrides[get_settings] (etc.). The job routes
read through one of them, JobAccess (swap get_job_access for those).

They are `async def`: each is a lookup on app.state, and a plain `def` would
cost every request a trip through the thread pool per dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis
import redis.asyncio
from fastapi import Depends, Request

from app.auth import authenticate
from app.settings import ApiSettings
from app.store.common import looks_like_job_id
from app.store.workers import WorkerCache
from app.views import PathFor, RenderedViews
from bailan.blobs import BlobStore
from bailan.keys import Principal
from bailan.logs import job_id_var


async def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


async def get_async_redis(request: Request) -> redis.asyncio.Redis:
    """The event loop's client: the status path and event streams, which must not wait for a thread."""
    return request.app.state.aredis


async def get_blobs(request: Request) -> BlobStore:
    """Where the workers put images and previews (bailan.blobs)."""
    return request.app.state.blobs


async def get_worker_cache(request: Request) -> WorkerCache:
    """The live workers as this API process last read them (app.store.workers.WorkerCache)."""
    return request.app.state.worker_cache


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
AsyncRedisDep = Annotated[redis.asyncio.Redis, Depends(get_async_redis)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
WorkerCacheDep = Annotated[WorkerCache, Depends(get_worker_cache)]
# Who is asking (app.auth): a key from the keys file, or the anonymous key of open mode.
AuthDep = Annotated[Principal, Depends(authenticate)]


async def get_path_for(request: Request) -> PathFor:
    """How views link to routes: the app's url_path_for (relative paths), each route's path resolved once (views.Links)."""
    return request.app.state.links


PathForDep = Annotated[PathFor, Depends(get_path_for)]


@dataclass(frozen=True)
class JobAccess:
    """What the job routes read and link through, as one dependency.

    FastAPI solves each dependency on every request, at a cost comparable to
    the route's own work on the status path that clients poll: GET
    /v1/jobs/{id} took eight solves where it now takes three. Tests swap the
    whole bundle through app.dependency_overrides[get_job_access].
    """

    settings: ApiSettings
    redis: redis.Redis
    # The event loop's client: the status path and event streams, which must not wait for a thread.
    aredis: redis.asyncio.Redis
    links: PathFor
    blobs: BlobStore
    # Views kept with the snapshot answers they were rendered from (GET /v1/jobs/{id}).
    views: RenderedViews


async def get_job_access(request: Request) -> JobAccess:
    """The app's JobAccess; and every line logged while the request runs names its job (bailan.logs).

    Async, so it runs in the request's own task and context, which the route
    (even a plain def, run in the thread pool with a copy) then shares.
    """
    job_id = request.path_params.get("job_id")
    if isinstance(job_id, str) and looks_like_job_id(job_id):
        job_id_var.set(job_id)
    return request.app.state.job_access


JobAccessDep = Annotated[JobAccess, Depends(get_job_access)]
