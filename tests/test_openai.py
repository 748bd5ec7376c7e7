"""The OpenAI-compatible endpoint, driven by the official `openai` package against the real
API (uvicorn), a real worker and a real Redis, with API keys on."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
from PIL import Image

from app.routes.openai import _preview_every
from bailan.keys import new_key
from tests.test_e2e import Service


def previews_taken(steps: int, every: int) -> int:
    """How many previews the worker takes: after each multiple of `every` below `steps`."""
    return 0 if every == 0 else len(range(every, steps, every))


def test_preview_interval_fits_partial_images() -> None:
    """Guards partial_images: never more previews than asked, and no shorter interval would also fit
    (so a short job still gets what it can); 0 asks for none."""
    for steps in range(1, 160):
        assert _preview_every(steps, 0) == 0
        for partial in (1, 2, 3):
            every = _preview_every(steps, partial)
            assert previews_taken(steps, every) <= partial
            assert every == 1 or previews_taken(steps, every - 1) > partial
    assert previews_taken(25, _preview_every(25, 3)) == 3


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    key, line = new_key("oa", False)
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text(line + "\n")
    return path, key


@pytest.fixture(scope="module")
def service(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, str]
) -> Iterator[Service]:
    redis.Redis.from_url(redis_url).flushdb()
    # A model whose own default steps differ from the service's: the endpoint must use them
    # (a request through it sets no steps) and space a stream's previews over them.
    model = tmp_path_factory.mktemp("model") / "tiny-nine-steps"
    shutil.copytree(tiny_model_dir, model)
    (model / "bailan_defaults.json").write_text('{"steps": 9}')
    svc = Service(redis_url, model, tmp_path_factory.mktemp("openai"), queue="openai",
                  BAILAN_API_KEYS_FILE=str(keys[0]))
    svc.http.headers["Authorization"] = f"Bearer {keys[1]}"
    svc.add_worker()
    svc.wait_ready()
    yield svc
    svc.close()


@pytest.fixture
def client(service: Service, keys: tuple[Path, str]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"http://127.0.0.1:{service.port}/v1", api_key=keys[1], max_retries=0,
                       timeout=120) as oa:
        yield oa


def png(b64: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    picture.load()
    return picture


def test_b64_json_runs_as_an_ordinary_job(client: openai.OpenAI, service: Service) -> None:
    """Guards the basic call: the openai client gets a PNG of the asked size, made by a job
    that went through the ordinary queue (visible under /v1/jobs, owned by the same key)."""
    raw = client.images.with_raw_response.generate(
        prompt="a red circle", size="32x24", response_format="b64_json", model="dall-e-3", quality="hd",
        style="vivid", user="someone",
    )
    result = raw.parse()
    assert len(result.data) == 1 and result.data[0].url is None
    picture = png(result.data[0].b64_json)
    assert picture.format == "PNG" and picture.size == (32, 24)
    assert result.size == "32x24" and result.created > 0
    job = service.view(raw.headers["x-bailan-job-id"])
    assert job["status"] == "succeeded" and job["params"]["width"] == 32 and job["params"]["prompt"] == "a red circle"
    assert job["params"]["steps"] == 9 and job["params"]["preview_every"] == 0
    image = service.http.get(job["images"][0]["url"])
    assert base64.b64decode(result.data[0].b64_json) == image.content


def test_model_picks_one_of_ours(client: openai.OpenAI, service: Service) -> None:
    """Guards `model` ignored: a model /v1/models lists runs the job (OpenAI's own names,
    like dall-e-3 above, mean the default; an unknown one is an error naming `model`)."""
    raw = client.images.with_raw_response.generate(prompt="a red circle", size="32x32", model="tiny-nine-steps")
    assert service.view(raw.headers["x-bailan-job-id"])["model"] == "tiny-nine-steps"


def test_url_form_with_two_images(client: openai.OpenAI, service: Service) -> None:
    """Guards n and response_format=url: two absolute URLs on this server, each a different
    image, fetchable with the same key (and not without it)."""
    result = client.images.generate(prompt="a blue square", n=2, response_format="url", output_format="webp")
    assert len(result.data) == 2 and all(d.b64_json is None for d in result.data)
    images = []
    for item in result.data:
        assert item.url is not None and item.url.startswith(f"http://127.0.0.1:{service.port}/v1/jobs/")
        response = service.http.get(item.url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
        images.append(response.content)
        assert httpx.get(item.url).status_code == 401
    assert images[0] != images[1]


def test_stream_sends_partial_images_then_completed(client: openai.OpenAI) -> None:
    """Guards streaming: partial_images=2 gives two partial_image events (our previews, in order,
    different frames) and then a completed event carrying the final PNG, with OpenAI's fields.
    The model's 9 default steps give previews at steps 3 and 6 (spaced over 25, the service
    default, there would be none)."""
    stream = client.images.generate(prompt="a red circle", size="32x32", stream=True, partial_images=2)
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    partial = events[:2]
    assert [e.partial_image_index for e in partial] == [0, 1]
    frames = [base64.b64decode(e.b64_json) for e in partial]
    assert frames[0] != frames[1] and all(Image.open(io.BytesIO(f)).format == "JPEG" for f in frames)
    done = events[2]
    assert done.size == "32x32" and done.output_format == "png" and done.usage.total_tokens == 0
    assert png(done.b64_json).size == (32, 32)


def test_stream_without_partial_images_sends_only_the_image(client: openai.OpenAI) -> None:
    """Guards partial_images=0 (and its default): one completed event per image, no partials."""
    events = list(client.images.generate(prompt="a red circle", size="32x32", n=2, stream=True))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert events[0].b64_json != events[1].b64_json


@pytest.mark.parametrize(
    ("kwargs", "param", "code", "words"),
    [
        ({"n": 5}, "n", "invalid_value", "less than or equal to 4"),
        ({"size": "33x33"}, "size", "invalid_value", "multiple of 8"),
        ({"size": "big"}, "size", "invalid_value", "WxH"),
        ({"size": "2048x2048"}, "size", "invalid_value", "1024"),
        ({"background": "transparent"}, "background", "invalid_value", "opaque"),
        ({"output_format": "svg"}, "output_format", "invalid_value", "png"),
        ({"extra_body": {"steps": 3}}, "steps", "unknown_parameter", "Unknown parameter: 'steps'"),
        ({"model": "sd-turbo"}, "model", "invalid_value", "the models here: tiny-nine-steps"),
    ],
)
def test_bad_requests_answer_in_openais_error_shape(
    client: openai.OpenAI, kwargs: dict, param: str, code: str, words: str
) -> None:
    """Guards OpenAI's error shape: a 400 the openai client raises as BadRequestError, naming
    the parameter by OpenAI's name (size, not width; n, not num_images)."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red circle", **kwargs)
    error = caught.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert words in error["message"], error


def test_missing_prompt_bad_json_and_wrong_types(service: Service) -> None:
    """Guards the error shape where FastAPI would answer its own 422 list: a missing field,
    a body that is not JSON, and a boolean where a number belongs (lax parsing would read 1)."""
    cases = [({"json": {}}, "prompt", "missing_required_parameter"),
             ({"content": b"not json", "headers": {"content-type": "application/json"}}, None, "invalid_json"),
             # Refused by Python's own int limit: it was our bare 400, code null.
             ({"content": b'{"prompt": "x", "n": ' + b"1" * 5000 + b"}", "headers": {"content-type": "application/json"}},
              None, "invalid_json"),
             ({"json": {"prompt": "x", "n": True}}, "n", "invalid_value"),
             # No body at all once named the parameter 'None'.
             ({"content": b"", "headers": {"content-type": "application/json"}}, "prompt",
              "missing_required_parameter")]
    for kwargs, param, code in cases:
        response = service.http.post("/v1/images/generations", **kwargs)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["code"] == code and error["type"] == "invalid_request_error"
        assert "None" not in error["message"]
        assert response.headers["x-should-retry"] == "false"


def test_a_wrong_key_is_refused_in_openais_shape(service: Service) -> None:
    """Guards keys on this route: an unknown key is a 401 that the client raises as AuthenticationError."""
    with openai.OpenAI(base_url=f"http://127.0.0.1:{service.port}/v1", api_key="bl_wrong", max_retries=0) as oa:
        with pytest.raises(openai.AuthenticationError) as caught:
            oa.images.generate(prompt="a red circle")
    assert caught.value.response.json()["error"] == {
        "message": "unknown API key", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


def test_timeout_names_the_job_which_goes_on_and_limits_apply(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Guards the wait's bound and the shared limits: with no worker, the call gives up after
    BAILAN_OPENAI_TIMEOUT_S with an error naming the job, which stays queued (not canceled);
    it counts against the key's queued-job cap like any job, so the next call gets 429. A
    stream ends with the same error as an event; a job canceled meanwhile ends the call."""
    svc = Service(redis_url, tiny_model_dir, tmp_path, queue="openai-idle", BAILAN_OPENAI_TIMEOUT_S="3",
                  BAILAN_MAX_QUEUED_PER_KEY="1")
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{svc.port}/v1", api_key="unused", max_retries=0) as oa:
            with pytest.raises(openai.APIStatusError) as caught:
                oa.images.generate(prompt="a red circle", size="32x32")
            assert caught.value.status_code == 504
            error = caught.value.response.json()["error"]
            job_id = caught.value.response.headers["x-bailan-job-id"]
            assert job_id in error["message"] and error["code"] == "timeout" and error["type"] == "server_error"
            assert caught.value.response.headers["x-should-retry"] == "false"
            assert svc.view(job_id)["status"] == "queued"

            with pytest.raises(openai.RateLimitError) as limited:
                oa.images.generate(prompt="a red circle", size="32x32")
            assert limited.value.response.json()["error"]["code"] == "rate_limit_exceeded"
            assert "limit 1" in limited.value.response.json()["error"]["message"]

            assert svc.http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
            with pytest.raises(openai.APIError) as streamed:
                list(oa.images.generate(prompt="a red circle", size="32x32", stream=True, partial_images=1))
            assert "did not finish within 3 s" in str(streamed.value)
            assert streamed.value.body["code"] == "timeout"
            second = re.search(r"job (\S+) did not finish", str(streamed.value))
            assert second is not None and svc.view(second.group(1))["status"] == "queued"
            assert svc.http.post(f"/v1/jobs/{second.group(1)}/cancel").status_code == 200

        # The stream names its job in a header at once, so it can be canceled while the call waits.
        with svc.http.stream("POST", "/v1/images/generations", json={"prompt": "x", "stream": True}) as answer:
            assert answer.status_code == 200
            assert svc.http.post(f"/v1/jobs/{answer.headers['x-bailan-job-id']}/cancel").status_code == 200
            lines = [line for line in answer.iter_lines() if line]
        assert lines[0] == "event: error"
        assert json.loads(lines[1].removeprefix("data: "))["error"]["code"] == "job_canceled"
    finally:
        svc.close()
