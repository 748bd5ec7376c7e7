"""The interactive docs (/docs, /redoc) work without internet: the HTML and the files it names."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from app.main import DOCS_ASSETS_URL, create_app
from app.settings import ApiSettings

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
    CDN at run time."""
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
