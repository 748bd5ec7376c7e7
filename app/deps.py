"""Dependencies of the routes, as Annotated aliases so tests can swap any of
them through app.dependency_overrides[get_settings] (etc.).

They are `async def`: each is a lookup on app.state, and a plain `def` would
cost every request a trip through the thread pool per dependency.
"""

from __future__ import annotations

from typing import Annotated

import redis
import redis.asyncio
from fastapi import Depends, Request

from app.auth import authenticate
from app.settings import ApiSettings
from app.store.workers import WorkerCache
from app.views import PathFor
from bailan.blobs import BlobStore
from bailan.keys import Principal


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
    """How views link to routes: the app's url_path_for (relative paths)."""
    return request.app.url_path_for


PathForDep = Annotated[PathFor, Depends(get_path_for)]
