"""The API's HTTP server limits as `make run` and `python -m app` (the container's command)
start it, and the banner's word on API keys."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.server import uvicorn_limits
from bailan.launch import LaunchSettings, auth_line, banner
from tests.test_e2e import free_port

REPO = Path(__file__).resolve().parents[1]


def test_uvicorn_limits_follow_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: the API started with uvicorn's unbounded defaults (no header cap under httptools,
    unlimited concurrency), or settings that are documented but never passed on."""
    defaults = uvicorn_limits(LaunchSettings())
    assert defaults == ["--http", "h11", "--h11-max-incomplete-event-size", "16384", "--limit-concurrency", "1000",
                        "--timeout-keep-alive", "5", "--backlog", "2048"]
    for name, value in [("API_HTTP", "httptools"), ("API_MAX_HEADER_BYTES", "4096"), ("API_LIMIT_CONCURRENCY", "7"),
                        ("API_TIMEOUT_KEEP_ALIVE_S", "2"), ("API_BACKLOG", "64")]:
        monkeypatch.setenv(f"BAILAN_{name}", value)
    assert uvicorn_limits(LaunchSettings()) == ["--http", "httptools", "--h11-max-incomplete-event-size", "4096",
                                               "--limit-concurrency", "7", "--timeout-keep-alive", "2",
                                               "--backlog", "64"]
    monkeypatch.setenv("BAILAN_API_HTTP", "zttp")
    with pytest.raises(ValueError):
        LaunchSettings()


def test_banner_announces_open_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: `make run` serving with no API keys without saying so."""
    monkeypatch.delenv("BAILAN_API_KEYS_FILE", raising=False)
    assert "OPEN MODE" in banner("http://x", "redis://y", None, 1)
    monkeypatch.setenv("BAILAN_API_KEYS_FILE", "/etc/bailan/keys")
    assert "/etc/bailan/keys" in auth_line() and "OPEN" not in auth_line()


def test_api_under_the_launchers_limits_refuses_huge_headers(redis_url: str, tmp_path: Path) -> None:
    """Guards: a client sending megabytes of headers (or dripping them) being buffered without bound;
    with the launcher's options the API answers 400 past BAILAN_API_MAX_HEADER_BYTES. Started as
    the container image starts it, `python -m app`, which once ran uvicorn with none of them."""
    port = free_port()
    env = {**os.environ, "BAILAN_REDIS_URL": redis_url, "BAILAN_API_MAX_HEADER_BYTES": "8192",
           "BAILAN_PORT": str(port), "BAILAN_HOST": "127.0.0.1"}
    argv = [sys.executable, "-m", "app"]
    with (tmp_path / "api.log").open("wb") as log:
        api = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and api.poll() is None, "the API did not start"
                time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            try:
                for i in range(20):
                    sock.sendall(b"X-Junk-%d: " % i + b"a" * 1000 + b"\r\n")
            except OSError:
                pass  # closed on us mid-send: refused too
            answer = sock.recv(100)
        assert answer.startswith(b"HTTP/1.1 400") or answer == b"", answer
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"X-Small": "a" * 1000}).status_code == 200
    finally:
        api.terminate()
        api.wait(timeout=20)
