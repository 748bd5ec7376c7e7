"""Dependencies of the routes, as Annotated aliases so tests can swap any of
them through app.dependency_overrides[get_settings] (etc.)."""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Request
from rq import Queue

from app.settings import ApiSettings
from app.store.records import make_queue
from app.views import PathFor


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]


def get_queue(settings: SettingsDep, conn: RedisDep) -> Queue:
    return make_queue(settings, conn)


QueueDep = Annotated[Queue, Depends(get_queue)]


def get_path_for(request: Request) -> PathFor:
    """How views link to routes: the app's url_path_for (relative paths)."""
    return request.app.url_path_for


PathForDep = Annotated[PathFor, Depends(get_path_for)]
