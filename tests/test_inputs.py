"""Inputs JSON can express but not carry back: every one is a 422 naming its field, never a 500.

Against a real Redis (the conftest's private Valkey), through the real app.
"""

from __future__ import annotations


import pytest
import redis
from fastapi.testclient import TestClient

from tests.test_api import QUEUE


@pytest.mark.parametrize("field", ["guidance_scale", "width", "height", "steps", "seed", "num_images", "preview_every"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_are_422_naming_the_field(
    client: TestClient, redis_conn: redis.Redis, field: str, literal: str
) -> None:
    """Guards: NaN, the infinities and 1e400 (read as inf) in a number field answering 500, because
    the 422 that echoed them could not be written as JSON."""
    body = '{"prompt": "x", "%s": %s}' % (field, literal)
    r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert ["body", field] in [e["loc"] for e in errors]
    assert redis_conn.llen(f"rq:queue:{QUEUE}") == 0


def test_guidance_nan_is_refused_as_not_finite(client: TestClient) -> None:
    """Guards: NaN guidance passing its bounds (NaN compares false with both) or refused with a
    misleading 'must be ≤ 50'; the message must say it is not a finite number."""
    r = client.post("/v1/jobs", content='{"prompt": "x", "guidance_scale": NaN}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422
    error = next(e for e in r.json()["detail"] if e["loc"] == ["body", "guidance_scale"])
    assert error["type"] == "finite_number" and error["input"] == "NaN"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text", ["\\ud800", "a \\udfff b", "\\ud83d"])
def test_lone_surrogate_is_422_naming_the_field(client: TestClient, field: str, text: str) -> None:
    """Guards: a prompt holding a lone surrogate (valid JSON escape, not UTF-8) answering 500, because
    the 422 echoing it could not be encoded."""
    body = '{"prompt": "x", "%s": "%s"}' % (field, text) if field != "prompt" else '{"prompt": "%s"}' % text
    r = client.post("/v1/jobs", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert ["body", field] in [e["loc"] for e in r.json()["detail"]]


def test_surrogate_pair_is_a_valid_prompt(client: TestClient) -> None:
    """Guards: the surrogate check refusing a proper pair (an emoji written as two JSON escapes)."""
    r = client.post("/v1/jobs", content='{"prompt": "a \\ud83d\\ude00 face"}'.encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 202, r.text
    assert r.json()["params"]["prompt"] == "a \U0001f600 face"


def test_json_safe_keeps_what_json_carries() -> None:
    """Guards: the 422 sanitiser altering inputs that JSON carries fine (numbers, text, nesting)."""
    from app.errors import json_safe

    assert json_safe({"a": [1, 2.5, "é", None, True]}) == {"a": [1, 2.5, "é", None, True]}
    assert json_safe([float("nan"), float("inf"), -float("inf"), "\ud800"]) == ["NaN", "Infinity", "-Infinity", "\\ud800"]


def test_the_pixel_cap_cannot_exceed_pillows_bomb_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a BAILAN_MAX_IMAGE_PIXELS that Pillow overrules: above its
    decompression-bomb threshold an image within the cap was refused with a message
    naming the cap, so the setting is refused at start-up instead, naming it."""
    from PIL import Image
    from pydantic import ValidationError

    from app.settings import ApiSettings

    monkeypatch.setenv("BAILAN_MAX_IMAGE_PIXELS", str(Image.MAX_IMAGE_PIXELS + 1))
    with pytest.raises(ValidationError, match="max_image_pixels"):
        ApiSettings()
    monkeypatch.setenv("BAILAN_MAX_IMAGE_PIXELS", str(Image.MAX_IMAGE_PIXELS))
    assert ApiSettings().max_image_pixels == Image.MAX_IMAGE_PIXELS
