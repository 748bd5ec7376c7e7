"""Input images over HTTP (init_image, mask_image): accepted, described, stored, or refused
with a 422 that names the field. Against a real Redis; no worker code is imported."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import ApiSettings
from bailan.jobs import Keys
from tests.test_api import publish_worker

QUEUE = "bailan-inputs-test"


def encoded(width: int, height: int, fmt: str = "PNG", noise: bool = True) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8) if noise else np.zeros((height, width, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def client(redis_url: str, redis_conn: redis.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(ApiSettings(redis_url=redis_url, queue_name=QUEUE, reap_interval_s=3600))) as c:
        yield c


def submit(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/jobs", json={"prompt": "a red circle", **body})


def field_error(response: Any) -> tuple[int, list[str], str]:
    detail = response.json()["detail"][0]
    return response.status_code, detail["loc"], detail["msg"]


def test_a_512_png_as_base64_is_accepted_with_default_settings(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards against default caps that refuse an ordinary image-to-image request: a
    512x512 PNG (noise, so it hardly compresses) as base64 is taken, its size becomes the
    job's, and its bytes are stored beside the record, not in it."""
    data = encoded(512, 512)
    assert len(data) > 500_000
    r = submit(client, init_image=b64(data), strength=0.5)
    assert r.status_code == 202, r.text
    params = r.json()["params"]
    assert (params["width"], params["height"]) == (512, 512)
    assert params["init_image"] == {"width": 512, "height": 512, "format": "png", "bytes": len(data), "resized": False}
    assert params["strength"] == 0.5
    assert redis_conn.get(Keys.input_image(r.json()["id"], "init_image")) == data
    assert len(redis_conn.hget(Keys.job(r.json()["id"]), "params")) < 2000


def test_data_urls_masks_and_resizing(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards against data: URLs being refused, masks being lost, and a resize the job does
    not report: asked-for sizes resize the picture, odd sizes round down to a multiple of 8."""
    picture = encoded(100, 60, "JPEG")
    mask = encoded(100, 60, "WEBP", noise=False)
    r = submit(client, init_image="data:image/jpeg;base64," + b64(picture), mask_image=b64(mask))
    assert r.status_code == 202, r.text
    params = r.json()["params"]
    assert (params["width"], params["height"]) == (96, 56)
    assert params["init_image"]["resized"] and params["init_image"]["format"] == "jpeg"
    assert params["mask_image"]["format"] == "webp"
    assert redis_conn.get(Keys.input_image(r.json()["id"], "mask_image")) == mask
    r = submit(client, init_image=b64(encoded(64, 64)), width=128, height=96)
    assert r.status_code == 202
    assert (r.json()["params"]["width"], r.json()["params"]["height"]) == (128, 96)
    assert r.json()["params"]["init_image"]["resized"] is True


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("init_image", "not base64!!", "base64"),
        ("init_image", b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "not a readable image"),
        ("init_image", b64(encoded(16, 16, "GIF")), "format GIF"),
        ("init_image", "data:text/plain;base64," + b64(b"hello"), "data: URL"),
        ("mask_image", "not base64!!", "base64"),
    ],
)
def test_bad_images_are_422_naming_the_field(client: TestClient, field: str, value: str, message: str) -> None:
    """Guards against a corrupt, foreign or undecodable image reaching the worker (or a 500)."""
    body: dict[str, Any] = {field: value}
    if field == "mask_image":
        body["init_image"] = b64(encoded(16, 16))
    status, loc, msg = field_error(submit(client, **body))
    assert status == 422 and loc == ["body", field] and message in msg, msg


def test_image_caps_are_configurable_and_enforced(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards against input images without bounds: bytes and decoded pixels each have a cap."""
    settings = ApiSettings(redis_url=redis_url, queue_name=QUEUE, max_image_bytes=20_000, max_image_pixels=64 * 64)
    with TestClient(create_app(settings)) as c:
        status, loc, msg = field_error(submit(c, init_image=b64(encoded(128, 128))))
        assert status == 422 and loc == ["body", "init_image"] and "20000" in msg
        small_but_wide = encoded(200, 100, noise=False)
        assert len(small_but_wide) < 20_000
        status, loc, msg = field_error(submit(c, init_image=b64(small_but_wide)))
        assert status == 422 and loc == ["body", "init_image"] and "pixels" in msg
        assert submit(c, init_image=b64(encoded(48, 48, noise=False))).status_code == 202


def test_a_pictures_size_keeps_the_size_caps(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards against an init_image that carried its job past BAILAN_MAX_WIDTH/HEIGHT and
    BAILAN_MAX_PIXELS: its size became the job's unchecked (2048 x 16 was queued with a
    512 wide cap), and a GPU worker has no size cap of its own by default."""
    settings = ApiSettings(redis_url=redis_url, queue_name=QUEUE, max_width=512, max_height=512,
                           max_pixels=256 * 256)
    with TestClient(create_app(settings)) as c:
        for size, side in (((2048, 16), "width"), ((16, 1024), "height")):
            status, loc, msg = field_error(submit(c, init_image=b64(encoded(*size, noise=False))))
            assert (status, loc) == (422, ["body", "init_image"]), msg
            assert f"the picture's {side}" in msg and "512" in msg and "send width and height" in msg
        status, loc, msg = field_error(submit(c, init_image=b64(encoded(512, 512, noise=False))))
        assert (status, loc) == (422, ["body", "init_image"]) and "65536" in msg  # 512 x 512 > max_pixels
        # Sent sizes are the client's to change: the error names them; a resize to them is fine.
        status, loc, _ = field_error(submit(c, init_image=b64(encoded(2048, 16, noise=False)), width=1024))
        assert (status, loc) == (422, ["body", "width"])
        r = submit(c, init_image=b64(encoded(2048, 16, noise=False)), width=256, height=256)
        assert r.status_code == 202 and r.json()["params"]["init_image"]["resized"] is True
        assert redis_conn.llen(f"rq:queue:{QUEUE}") == 1
    # A size left to the workers stays theirs, as before: their native size may pass a side's cap
    # (a review caught the check above refusing it, blaming a width nobody sent).
    publish_worker(redis_conn, "wide", width=1152, height=896)
    with TestClient(create_app(ApiSettings(redis_url=redis_url, queue_name=QUEUE, workers_cache_s=0))) as c:
        r = submit(c)
        assert r.status_code == 202, r.text
        assert (r.json()["params"]["width"], r.json()["params"]["height"]) == (1152, 896)


def test_a_mask_needs_a_picture_and_strength_is_bounded(client: TestClient) -> None:
    """Guards against a mask with nothing to repaint, and strengths outside (0, 1]."""
    r = submit(client, mask_image=b64(encoded(16, 16)))
    status, loc, msg = field_error(r)
    assert (status, loc) == (422, ["body", "mask_image"]) and "needs init_image" in msg
    for strength in (0, 1.5, True):
        r = submit(client, init_image=b64(encoded(16, 16)), strength=strength)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "strength"]


def test_a_strength_that_runs_no_step_is_refused(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards against an image-to-image job that runs no step (int(strength x steps) = 0)
    being queued: its worker failed it after it had waited its turn, as an internal error."""
    r = submit(client, init_image=b64(encoded(16, 16)), strength=0.1, steps=3)
    status, loc, msg = field_error(r)
    assert (status, loc) == (422, ["body", "strength"]) and "runs no step" in msg and "3 steps" in msg
    assert redis_conn.llen(f"rq:queue:{QUEUE}") == 0
    # The last int(strength x steps) steps run: one step is enough.
    assert submit(client, init_image=b64(encoded(16, 16)), strength=0.34, steps=3).status_code == 202
