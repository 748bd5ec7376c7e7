"""A bounded schemathesis run against the live API's own /openapi.json: no input gets a 5xx,
and every answer matches the schema (status codes, content types, bodies).

The API runs under uvicorn on loopback, on the conftest's private Valkey, with
a keys file; every case carries the valid key, so requests reach validation. Examples are
bounded and derandomized: the same cases every run, well under a minute.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation.modes import GenerationMode

from app.main import create_app
from app.routes.openai import PATH as OPENAI_PATH
from app.routes.openai import ImageGenerationRequest
from bailan.jobs import Keys
from bailan.keys import hash_key
from tests.test_api import announce, make_settings, publish_worker

# Cases per mode across every operation (about 10 operations).
MAX_EXAMPLES = 250
KEY = "bl_fuzz-key"
# A 16x16 PNG as base64: what a positive case sends as init_image or mask_image.
TINY_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGUlEQVR4nGOssDnBQApgIkn1qIZRDUNKAwC8xAGcxUyBsAAAAABJRU5ErkJggg=="
)
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def live_api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real app under uvicorn, in a thread, on a free loopback port, asking for API keys."""
    redis.Redis.from_url(redis_url).flushdb()
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"fuzz {hash_key(KEY)}\n")
    # No worker runs here: a valid OpenAI-style call would wait for its job; 1 s bounds a case
    # that slips through (and its 504 fails the run, so none may). Likewise a generated
    # `Prefer: wait=N` holds a request at most 1 s.
    app = create_app(make_settings(redis_url, rate_limit="none", api_keys_file=keys, openai_timeout_s=1,
                                   max_wait_s=1))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    # A live worker, as a worker would describe itself: /readyz answers 200 and
    # defaults resolve (its 503 without one is the designed answer, not a fault).
    conn = redis.Redis.from_url(redis_url)
    publish_worker(conn, "fuzz-worker", width=64, height=64)
    # For the whole run, however long: an expiry a day ahead.
    announce(conn, "fuzz-worker", conn.get(Keys.worker("fuzz-worker")), ttl_s=86400)
    yield base
    server.should_exit = True
    thread.join(timeout=10)
    redis.Redis.from_url(redis_url).flushdb()


@pytest.fixture(scope="module")
def api_schema(live_api: str) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{live_api}/openapi.json")
    assert httpx.get(f"{live_api}/healthz").status_code == 200
    return schema


def _valid_generation(body: object) -> bool:
    try:
        ImageGenerationRequest.model_validate(body)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_5xx_and_answers_match_the_schema(api_schema: schemathesis.BaseSchema,
                                                           mode: GenerationMode) -> None:
    """Guards: any input (NaN, 1e400, lone surrogates, odd ids, wrong types, missing fields) answered
    500, and answers that stray from the documented schema (an undocumented status, a body of
    another shape, another content type)."""

    schema = api_schema
    if mode is GenerationMode.POSITIVE:
        # A valid image generation waits for a worker, which this run does not have (it would
        # answer 504); its valid calls run against a real worker in test_openai.
        schema = api_schema.exclude(path=OPENAI_PATH)

    @given(case=schema.as_strategy(mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # a fixed seed: every run sends the same cases
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        if mode is GenerationMode.POSITIVE and case.headers and "Idempotency-Key" in case.headers:
            # A key reused with another body is a 422 by design (tested in test_api); generated
            # keys repeat ("0"), so each case gets its own, still schema-valid.
            case.headers["Idempotency-Key"] = uuid.uuid4().hex
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            # The schema says "a string"; only a decodable image is valid (tested in
            # test_image_inputs), so a positive case's input images are real, tiny ones.
            for name in ("init_image", "mask_image"):
                if case.body.get(name) is not None:
                    case.body["init_image"] = case.body[name] = TINY_PNG
            # Only a strength that runs a step, int(strength x steps) >= 1, is valid (tested in
            # test_image_inputs); 1 runs every step.
            if case.body.get("init_image") is not None and "strength" in case.body:
                case.body["strength"] = 1.0
            # Likewise only a model some worker serves is a valid `model` (tested in test_api).
            if case.body.get("model") is not None:
                case.body["model"] = "tiny"
        if (mode is GenerationMode.NEGATIVE and case.path == OPENAI_PATH and case.method.upper() == "POST"
                and _valid_generation(case.body)):
            # Negated elsewhere (an odd extra header, say) but with a valid body, the call is a
            # real generation, waiting for the worker this run lacks (504, as for positive cases).
            return
        # A valid key, so cases reach validation; schemathesis' own auth check still
        # sends bad keys and expects the 401.
        case.call_and_validate(headers=AUTH)

    check()
