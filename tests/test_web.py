"""The web page at `/`: served with a strict policy, and used in headless Chromium against the
real API and a real worker, with API keys on (so every request carries the key).

The browser test submits a prompt, sees preview frames that differ arrive while the job runs,
the final image with its download link and parameters, the queue position and wait estimate
of a queued job, cancels a queued and a running job (the latter reopened from the history),
and reopens a finished job after a reload without submitting it again.
Set BAILAN_WEB_SCREENSHOT=path to keep the mid-job screenshot (docs/img/web_page.png).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from fastapi.testclient import TestClient

from app.main import create_app
from app.routes.web import PAGE_POLICY
from bailan.keys import hash_key
from tests.browser import OfflineTab, offline_tab
from tests.test_api import make_settings, publish_worker
from tests.test_e2e import Service

if TYPE_CHECKING:
    from playwright.sync_api import Browser

KEY = "bln_" + secrets.token_urlsafe(24)
UI_TIMEOUT_MS = 180_000  # a loaded 2-core machine runs the tiny model slowly


class Tags(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_page_and_its_files_are_served_under_a_strict_policy(client: TestClient) -> None:
    """Guards: the page missing at `/`, a file it names not served, inline script or style (which
    its policy forbids, so the page would be dead), or a policy that lets another origin in."""
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert policy == PAGE_POLICY and "unsafe-inline" not in policy and "script-src 'self'" in policy
    assert not re.search(r"https?:|(?<![:\w])//[\w.-]+\.\w", response.text), "the page names another host"
    tags = Tags()
    tags.feed(response.text)
    for tag, attrs in tags.tags:
        assert "style" not in attrs and not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "script":
            assert attrs.get("src", "").startswith("/web/"), "inline script: the policy would block it"
    assert not re.search(r"<style", response.text)
    named = [a.get("src") or a.get("href") for t, a in tags.tags if t in ("script", "link")]
    assert sorted(named) == ["/web/app.js", "/web/style.css"]
    for url in named:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 500, url
    assert client.get("/web/app.js").headers["content-type"].startswith("text/javascript")


def test_page_config_and_unknown_assets(
    client: TestClient, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Guards: the page asking for a key in open mode (or not asking when keys are on), form limits
    that differ from the server's caps, and a path from the URL reaching the file system."""
    publish_worker(redis_conn, "w1", model="tiny")
    publish_worker(redis_conn, "w2", model="other")
    config = client.get("/web/config.json").json()
    assert config["keys_required"] is False and config["max_steps"] == 150 and config["max_images"] == 4
    assert "euler_a" in config["schedulers"] and config["models"] == ["other", "tiny"]
    for name in ("index.html", "..%2Fweb.py", "nope.js"):
        assert client.get(f"/web/{name}").status_code == 404
    keys = tmp_path / "keys"
    keys.write_text(f"web {hash_key(KEY)}\n")
    with TestClient(create_app(make_settings(redis_url, api_keys_file=keys, max_steps=40))) as keyed:
        config = keyed.get("/web/config.json").json()
        assert config["keys_required"] is True and config["max_steps"] == 40 and config["default_steps"] == 25
        assert keyed.get("/").status_code == 200  # the page itself needs no key


@pytest.fixture(scope="module")
def keyed_service(redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("web")
    keys = tmp / "keys"
    keys.write_text(f"web {hash_key(KEY)}\n")
    # One job at a time, so a second job waits in the queue.
    svc = Service(redis_url, tiny_model_dir, tmp, queue="web", BAILAN_API_KEYS_FILE=str(keys), BAILAN_MAX_BATCH="1")
    svc.add_worker()
    svc.wait_ready()
    yield svc
    svc.close()


def submit_in_page(tab: OfflineTab, steps: int, preview_every: int, prompt: str) -> str:
    """Fill the form and press Generate; returns the id of the job the page now shows."""
    page = tab.page
    before = page.text_content("#job-id") or ""
    page.fill("#prompt", prompt)
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", str(steps))
    page.fill("#preview_every", str(preview_every))
    page.select_option("#scheduler", "euler")
    page.fill("#seed", "7")
    page.click("#submit")
    page.wait_for_function(f"() => document.getElementById('job-id').textContent !== {before!r}",
                           timeout=UI_TIMEOUT_MS)
    return page.text_content("#job-id") or ""


def wait_status(tab: OfflineTab, status: str) -> None:
    tab.page.wait_for_selector(f"#job-status[data-status='{status}']", timeout=UI_TIMEOUT_MS)


def test_page_runs_a_job_live_and_cancels(browser: Browser, keyed_service: Service) -> None:
    """Guards the page end to end: a job's previews not shown as they arrive (or all the same frame),
    no final image or download link, no queue position or wait estimate while queued, a cancel
    button that cancels neither a queued nor a running job, a history that cannot reopen a job
    without submitting it again, and any request to another origin or blocked by the page's policy."""
    with offline_tab(browser, keyed_service.port) as tab:
        page = tab.page
        tab.goto("/")
        page.wait_for_selector("#key-box:not([hidden])", timeout=UI_TIMEOUT_MS)
        # Refusals are shown, not swallowed: no key, then a field beyond the server's cap.
        page.click("#submit")
        page.wait_for_selector("#form-error:not([hidden])", timeout=UI_TIMEOUT_MS)
        assert "API key is required" in (page.text_content("#form-error") or "")
        page.fill("#api-key", KEY)
        page.fill("#steps", "100001")
        page.click("#submit")
        page.wait_for_function("() => document.getElementById('form-error').textContent.startsWith('steps:')",
                               timeout=UI_TIMEOUT_MS)
        assert page.is_hidden("#job")
        assert page.is_hidden("#model-box")  # one model: nothing to choose

        # 1. A job whose previews the page shows one by one, then its image.
        first = submit_in_page(tab, steps=40, preview_every=5, prompt="a red circle on a blue background")
        page.wait_for_function("() => document.querySelectorAll('#frames img').length >= 2", timeout=UI_TIMEOUT_MS)
        shot = keyed_service.tmp / "web_page.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("BAILAN_WEB_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["BAILAN_WEB_SCREENSHOT"])
        wait_status(tab, "succeeded")
        page.wait_for_function(
            "() => { const i = document.querySelector('#images img'); return i && i.complete && i.naturalWidth; }",
            timeout=UI_TIMEOUT_MS)
        assert page.eval_on_selector("#images img", "i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
        assert page.get_attribute("#images a", "download") == f"bailan-{first}-0.png"
        assert page.text_content("#params dd[data-param='seed']") == "7"
        assert page.text_content("#params dd[data-param='steps']") == "40"
        # The frames are the previews, in step order, and the picture changed between them.
        frames = page.evaluate(
            """() => [...document.querySelectorAll('#frames img')].map(img => {
                const canvas = document.createElement('canvas');
                canvas.width = img.naturalWidth;
                canvas.height = img.naturalHeight;
                const context = canvas.getContext('2d');
                context.drawImage(img, 0, 0);
                const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
                return [Number(img.dataset.step), img.naturalWidth, Array.from(pixels).join(',')];
            })""")
        steps = [step for step, _, _ in frames]
        assert steps == list(range(5, 40, 5)), steps
        assert all(width > 0 for _, width, _ in frames), "a frame that never loaded"
        assert len({pixels for _, _, pixels in frames}) >= 2, "every preview frame was the same picture"
        assert page.eval_on_selector("#job-progress", "p => [p.value, p.max]") == [40, 40]

        # 2. A long job runs; a third waits behind it with its place and an estimate; cancel it.
        running = submit_in_page(tab, steps=5000, preview_every=0, prompt="a long one")
        wait_status(tab, "running")
        queued = submit_in_page(tab, steps=20, preview_every=5, prompt="a waiting one")
        wait_status(tab, "queued")
        page.wait_for_function("() => document.getElementById('job-queue').dataset.eta", timeout=UI_TIMEOUT_MS)
        assert "position 1 in the queue" in (page.text_content("#job-queue") or "")
        assert float(page.get_attribute("#job-queue", "data-eta") or 0) > 0
        page.click("#cancel")
        wait_status(tab, "canceled")
        assert page.is_hidden("#cancel")

        # 3. The running one, reopened from the history, canceled at its next step.
        assert page.eval_on_selector_all("#history li", "lis => lis.map(li => li.dataset.id)") == [
            queued, running, first]
        page.click(f"#history li[data-id='{running}'] button")
        page.wait_for_function(f"() => document.getElementById('job-id').textContent === {running!r}")
        wait_status(tab, "running")
        page.click("#cancel")
        wait_status(tab, "canceled")

        # 4. After a reload, the history reopens the finished job: its image, no new submission.
        page.reload()
        page.click(f"#history li[data-id='{first}'] button")
        wait_status(tab, "succeeded")
        page.wait_for_selector("#images img", timeout=UI_TIMEOUT_MS)
        assert page.get_attribute("#images a", "download") == f"bailan-{first}-0.png"
        submits = [url for url in tab.requested if url == tab.origin + "/v1/jobs"]
        assert len(submits) == 5, submits  # the two refused above, and the three jobs

        # A job the service no longer knows is marked expired in the history.
        gone = "0" * 32
        page.evaluate(f"""() => localStorage.setItem('bailan.history', JSON.stringify(
            [{{id: '{gone}', prompt: 'old', at: null, status: 'succeeded'}},
             ...JSON.parse(localStorage.getItem('bailan.history'))]))""")
        page.reload()
        page.click(f"#history li[data-id='{gone}'] button")
        page.wait_for_function(
            f"() => document.querySelector(\"#history li[data-id='{gone}']\").textContent.includes('expired')",
            timeout=UI_TIMEOUT_MS)

        assert tab.foreign() == [] and tab.blocked_by_policy == [], (tab.foreign(), tab.blocked_by_policy)
        assert tab.errors == [], tab.errors
        # The page closes a job's event stream when the job ends or it shows another one.
        closed = [f for f in tab.failed if f.startswith("net::ERR_ABORTED ") and f.endswith("/events")]
        refused = [f"401 {tab.origin}/v1/jobs", f"422 {tab.origin}/v1/jobs", f"404 {tab.origin}/v1/jobs/{gone}"]
        assert [f for f in tab.failed if f not in closed] == refused, tab.failed


def test_page_rides_out_failures_it_can(browser: Browser, keyed_service: Service) -> None:
    """Guards against a page that a passing failure breaks for good: its settings answering
    503 once hid the key field and left the sampler list empty until a reload; a key with a
    character no header can carry (the placeholder's "…") made every request throw, and was
    kept; one preview whose fetch failed stopped every later frame and the final image
    (an unhandled rejection in the chain); a stream's Redis error stayed on screen after
    the job had recovered and succeeded."""
    from playwright.sync_api import Route

    once: set[str] = set()

    def fail_once(what: str, answer: dict[str, object] | None = None) -> object:
        def handler(route: Route) -> None:
            if what in once:
                route.continue_()
            elif answer is None:
                once.add(what)
                route.abort("connectionreset")
            else:
                once.add(what)
                route.fulfill(**answer)
        return handler

    with offline_tab(browser, keyed_service.port) as tab:
        page = tab.page
        page.route("**/web/config.json", fail_once("config", {"status": 503, "body": "{}",
                                                              "content_type": "application/json"}))
        page.route(re.compile(r".*/previews/5$"), fail_once("preview"))
        page.route(re.compile(r".*/events$"), fail_once("events", {
            "status": 200, "content_type": "text/event-stream",
            "body": "event: error\ndata: the job store (Redis) is unavailable: injected\n\n"}))
        tab.goto("/")
        page.wait_for_selector("#key-box:not([hidden])", timeout=UI_TIMEOUT_MS)  # settings unread: still shown
        page.fill("#api-key", "bln_abc…")
        assert page.evaluate("() => localStorage.getItem('bailan.apiKey')") is None
        assert not page.eval_on_selector("#api-key", "input => input.validity.valid")
        page.fill("#api-key", KEY)
        # The settings, read again a few seconds later: the samplers are listed.
        page.wait_for_function("() => document.querySelectorAll('#scheduler option').length > 1",
                               timeout=UI_TIMEOUT_MS)
        submit_in_page(tab, steps=20, preview_every=5, prompt="a red circle on a blue background")
        wait_status(tab, "succeeded")
        page.wait_for_function(
            "() => { const i = document.querySelector('#images img'); return i && i.complete && i.naturalWidth; }",
            timeout=UI_TIMEOUT_MS)
        assert once == {"config", "preview", "events"}
        steps = page.eval_on_selector_all("#frames img", "imgs => imgs.map(i => Number(i.dataset.step))")
        assert steps == [10, 15], steps  # the one lost, the ones after it shown
        assert page.is_hidden("#job-error"), page.text_content("#job-error")
        assert tab.errors == [], tab.errors


def test_page_says_an_image_expired_instead_of_offering_a_retry(browser: Browser, keyed_service: Service) -> None:
    """Guards against a finished job whose image had expired (the blob store keeps images for
    BAILAN_RESULT_TTL_S) shown as "could not be loaded; open the job again to retry": the API's
    404 said it expired, and no retry could bring it back. The page shows the API's reason."""
    from bailan.blobs import DirBlobStore, image_key

    with offline_tab(browser, keyed_service.port) as tab:
        page = tab.page
        tab.goto("/")
        page.fill("#api-key", KEY)
        job = submit_in_page(tab, steps=2, preview_every=0, prompt="a short one")
        wait_status(tab, "succeeded")
        page.wait_for_selector("#images img", timeout=UI_TIMEOUT_MS)
        blobs = DirBlobStore(os.environ["BAILAN_BLOB_DIR"])  # the service's: the tests' own (conftest)
        assert blobs.get(image_key(job, 0)) is not None
        blobs.delete(image_key(job, 0))  # expired
        page.reload()
        page.click(f"#history li[data-id='{job}'] button")
        page.wait_for_selector("#job-error:not([hidden])", timeout=UI_TIMEOUT_MS)
        shown = page.text_content("#job-error") or ""
        assert shown.startswith("image 0: ") and "expired" in shown and "retry" not in shown, shown
