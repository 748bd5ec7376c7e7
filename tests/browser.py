"""A headless browser cut off from every host but the service, and the service it visits.

Tests of the pages Bailan serves (the interactive docs; the web page) load
them in Debian's Chromium, driven by Playwright, which here never downloads a
browser of its own. Set BAILAN_TEST_CHROMIUM to use another Chromium binary.

The browser reaches the service under a made-up name, SITE, as a user would
reach a deployment, not under 127.0.0.1: some front-end code (Swagger UI's
validator badge, for one) fetches from the internet only when the page's host
is not a loopback name. Every other host name resolves nowhere, and every
request to another origin is aborted and recorded, so a test can assert that
nothing was even attempted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Request, Response, Route

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("BAILAN_TEST_CHROMIUM", "/usr/bin/chromium")
SITE = "bailan.test"
# Schemes a page uses without any network: inline images, generated objects.
LOCAL_SCHEMES = frozenset({"data", "blob", "about", "chrome-error"})
MISSING_BROWSER = (
    "the page tests need Chromium at {path}. Install Debian's package (as root: "
    "apt-get install chromium; .ci/run does it on CI), or set BAILAN_TEST_CHROMIUM to a Chromium binary."
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium whose resolver knows SITE (loopback) and no other host.

    Raises FileNotFoundError when the binary is missing: a page test must fail
    then, not skip, or CI would pass without ever rendering a page.
    """
    if not os.access(CHROMIUM, os.X_OK):
        raise FileNotFoundError(MISSING_BROWSER.format(path=CHROMIUM))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            # The first matching rule wins: SITE is this machine, every other
            # name fails to resolve, even if a page's request slipped past the
            # router of OfflineTab (say, one made by the browser itself).
            args=[f"--host-resolver-rules=MAP {SITE} 127.0.0.1, MAP * ~NOTFOUND"],
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class OfflineTab:
    """A page that may load from `origin` only; every other request is aborted and kept."""

    page: Page
    origin: str
    requested: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # URLs the page's Content-Security-Policy stopped in the browser, each
    # with the directive that stopped it, e.g. "https://x/logo.svg img-src".
    blocked_by_policy: list[str] = field(default_factory=list)

    def foreign(self) -> list[str]:
        """URLs of other hosts the page asked for (each was aborted, but it should never ask)."""
        return [url for url in self.requested if urlsplit(url).scheme not in LOCAL_SCHEMES
                and origin_of(url) != self.origin]

    def goto(self, path: str) -> None:
        response = self.page.goto(self.origin + path, wait_until="load")
        assert response is not None and response.ok, f"GET {path}: {response and response.status}"


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@contextmanager
def offline_tab(browser: Browser, port: int) -> Iterator[OfflineTab]:
    """A fresh browser context (no cache, no cookies) on http://SITE:port, with the rest of the web blocked."""
    context: BrowserContext = browser.new_context()
    tab = OfflineTab(page=context.new_page(), origin=f"http://{SITE}:{port}")

    def route(route: Route) -> None:
        if origin_of(route.request.url) == tab.origin:
            route.continue_()
        else:
            route.abort("blockedbyclient")

    def answered(response: Response) -> None:
        if response.status >= 400:
            tab.failed.append(f"{response.status} {response.url}")

    def lost(request: Request) -> None:
        if origin_of(request.url) == tab.origin:
            tab.failed.append(f"{request.failure} {request.url}")

    def policy_violation(source: Any, blocked: str, directive: str) -> None:
        tab.blocked_by_policy.append(f"{blocked} {directive}")

    # Blocked by a policy, a request still shows up below; this tells who stopped it.
    context.expose_binding("bailanPolicyViolation", policy_violation)
    context.add_init_script(
        "document.addEventListener('securitypolicyviolation',"
        " e => window.bailanPolicyViolation(e.blockedURI, e.effectiveDirective));"
    )
    # On the context, so requests of workers and pop-ups are seen and routed too.
    context.on("request", lambda request: tab.requested.append(request.url))
    context.on("response", answered)
    context.on("requestfailed", lost)
    context.route("**/*", route)
    tab.page.on("pageerror", lambda error: tab.errors.append(str(error)))
    try:
        yield tab
    finally:
        context.close()


class ApiProcess:
    """The real API, `uvicorn app.main:app` in its own process, as `make run` starts it."""

    def __init__(self, redis_url: str, log: Path, **settings: str) -> None:
        self.port = free_port()
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "BAILAN_REDIS_URL": redis_url, **settings}
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        try:
            wait_for(self._healthy, 60, "the API to answer /healthz")
        except BaseException:
            self.close()  # no orphaned server when it never became healthy
            raise

    def _healthy(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            if self.process.poll() is not None:
                raise AssertionError(f"the API exited; see {self.log}")
            return False

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
