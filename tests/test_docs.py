"""The interactive docs (/docs, /redoc) work without internet.

The HTML and the files it names are checked over HTTP first; then the real API
serves both pages to headless Chromium with every other host blocked, and the
operations must render.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient

from app.main import DOCS_ASSETS_URL, create_app
from app.settings import ApiSettings
from tests.browser import SITE, ApiProcess, offline_tab

if TYPE_CHECKING:
    from playwright.sync_api import Browser

DOC_PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")
# Hosts that serve fonts and front-end code: what a bundled UI would fetch at
# run time. (The bundles mention many other URLs in text and code, such as
# specifications and licences, that no browser fetches.)
ASSET_HOSTS = ("cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com", "fonts.googleapis.com",
               "fonts.gstatic.com", "cdn.redoc.ly", "fastapi.tiangolo.com")
# ReDoc 2.5's sidebar draws Redocly's logo from Redocly's CDN, whatever its
# options; the pages' Content-Security-Policy stops it in the browser (the
# logo hides itself when it fails to load). Nothing else may be attempted.
REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
SUBMIT_BLOCK = "#operations-jobs-submit_job_v1_jobs_post"
RENDER_TIMEOUT_MS = 60_000  # generous: a loaded 2-core CI machine parses ReDoc slowly


class ResourceLinks(HTMLParser):
    """Every URL an HTML page's markup names for the browser (src, href, ReDoc's spec-url, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "spec-url", "srcset", "poster", "data") and value:
                self.urls.append(value)


def css_urls(css: str) -> list[str]:
    """The targets of url(...) and @import in a style sheet."""
    found = [m.strip("'\" ") for m in re.findall(r"url\(\s*([^)]*?)\s*\)", css)]
    return found + re.findall(r"@import\s+[\"']([^\"']+)", css)


@pytest.fixture(scope="module")
def docs_client() -> TestClient:
    # Serving the docs needs no Redis: the client never enters the lifespan.
    return TestClient(create_app(ApiSettings(redis_url="redis://127.0.0.1:1/1")))


def test_docs_pages_load_only_this_servers_files(docs_client: TestClient) -> None:
    """Guards: /docs or /redoc naming a CDN again (FastAPI's defaults: swagger-ui-bundle.js,
    swagger-ui.css and redoc.standalone.js from jsdelivr, the favicon from FastAPI's site, ReDoc's
    Google Fonts), which leaves a blank page on a machine without internet; or a named file not served."""
    assets: set[str] = set()
    for page in DOC_PAGES:
        response = docs_client.get(page)
        assert response.status_code == 200, page
        assert response.headers["content-type"].startswith("text/html")
        assert not re.search(r"https?:|(?<![:\w])//[\w.-]+\.\w", response.text), f"{page} names another host"
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "img-src 'self' data: blob:;" in policy, page
        links = ResourceLinks()
        links.feed(response.text)
        for url in links.urls:
            assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url}"
        assets.update(url for url in links.urls if url.startswith(DOCS_ASSETS_URL + "/"))
    # Swagger UI's spec and its JS, its CSS, ReDoc's JS and the favicon.
    assert {a.rsplit("/", 1)[1] for a in assets} >= {
        "swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"}
    assert "url: '/openapi.json'" in docs_client.get("/docs").text
    assert '"validatorUrl": null' in docs_client.get("/docs").text  # its badge is an image from swagger.io
    for asset in sorted(assets):
        response = docs_client.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset
        if asset.endswith(".css"):
            for url in css_urls(response.text):
                assert url.startswith("data:") or not re.match(r"(\w+:)?//", url), f"{asset} loads {url}"


def test_docs_assets_fetch_from_no_asset_host(docs_client: TestClient) -> None:
    """Guards: an update of the bundled Swagger UI or ReDoc whose code pulls fonts or scripts from a
    CDN at run time (the browser tests below would see it too, but this names the file)."""
    page_assets = {"/docs": ("swagger-ui-bundle.js", "swagger-ui.css"), "/redoc": ("redoc.standalone.js",)}
    for page, names in page_assets.items():
        for name in names:
            response = docs_client.get(f"{DOCS_ASSETS_URL}/{name}")
            assert response.status_code == 200, name
            body = response.text
            assert f"{DOCS_ASSETS_URL}/{name}" in docs_client.get(page).text
            for host in ASSET_HOSTS:
                # The one known exception, stopped by the pages' policy (see REDOCLY_LOGO).
                assert host not in body.replace(REDOCLY_LOGO, ""), f"{name} names {host}"


def test_offline_tab_blocks_and_records_other_hosts(browser: Browser, live_api: ApiProcess) -> None:
    """Guards: a browser harness that neither sees nor stops requests to other hosts, so that the
    offline checks below would pass however many CDNs a page used."""
    with offline_tab(browser, live_api.port) as tab:
        tab.goto("/healthz")
        loaded = tab.page.evaluate(
            """() => new Promise(done => {
                const img = new Image();
                img.onload = () => done(true);
                img.onerror = () => done(false);
                img.src = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/favicon-32x32.png";
            })"""
        )
        assert loaded is False
        assert tab.foreign() == ["https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/favicon-32x32.png"]
        assert tab.origin == f"http://{SITE}:{live_api.port}"


def test_swagger_ui_lists_every_operation_offline(browser: Browser, live_api: ApiProcess) -> None:
    """Guards: /docs a blank white page without internet (issue 13): Swagger UI's files fetched from a
    CDN, or any other request to another host, or an operation of the API missing from the page."""
    operations = {(method.upper(), path) for path, item in live_api.http.get("/openapi.json").json()["paths"].items()
                  for method in item}
    with offline_tab(browser, live_api.port) as tab:
        tab.goto("/docs")
        block = tab.page.wait_for_selector(SUBMIT_BLOCK, timeout=RENDER_TIMEOUT_MS)
        assert block is not None
        summary = block.inner_text()
        assert "POST" in summary and "/v1/jobs" in summary and "Submit a generation job" in summary
        rendered = tab.page.eval_on_selector_all(
            ".opblock",
            """blocks => blocks.map(b => [b.querySelector('.opblock-summary-method').textContent,
                                          b.querySelector('.opblock-summary-path').getAttribute('data-path')])""",
        )
        assert {tuple(op) for op in rendered} == operations
        tab.page.wait_for_load_state("networkidle")
        assert tab.foreign() == [] and tab.blocked_by_policy == [], (tab.foreign(), tab.blocked_by_policy)
        assert tab.failed == [] and tab.errors == [], (tab.failed, tab.errors)
        assert any(url.endswith(f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js") for url in tab.requested)


def test_redoc_renders_every_operation_offline(browser: Browser, live_api: ApiProcess) -> None:
    """Guards: /redoc blank without internet: ReDoc's script from a CDN, Google Fonts, or any other
    request to another host; or the API's operations not rendered."""
    summaries = [op["summary"] for item in live_api.http.get("/openapi.json").json()["paths"].values()
                 for op in item.values()]
    with offline_tab(browser, live_api.port) as tab:
        tab.goto("/redoc")
        heading = tab.page.get_by_role("heading", name="Submit a generation job")
        heading.wait_for(timeout=RENDER_TIMEOUT_MS)
        headings = tab.page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent.trim())")
        assert set(summaries) <= set(headings), (summaries, headings)
        assert "/v1/jobs" in tab.page.inner_text("body")
        tab.page.wait_for_load_state("networkidle")
        # The service's own policy, not only this test's blocking, stopped every attempt at another host.
        assert set(tab.foreign()) <= {REDOCLY_LOGO}, tab.foreign()
        assert sorted(tab.blocked_by_policy) == sorted(f"{url} img-src" for url in tab.foreign())
        assert tab.failed == [] and tab.errors == [], (tab.failed, tab.errors)
        assert any(url.endswith(f"{DOCS_ASSETS_URL}/redoc.standalone.js") for url in tab.requested)
