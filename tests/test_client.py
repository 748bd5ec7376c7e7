"""bailan.client (sync and async) and the `bailan` CLI against the real API (uvicorn), a real
worker and a real Redis, with API keys on."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image

from bailan.client import ApiError, AsyncClient, Client, JobEnded, WaitTimeout
from bailan.jobs import JobState
from bailan.keys import new_key
from tests.test_e2e import ROOT, Service, wait_for

BAILAN = Path(sys.executable).with_name("bailan")


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    secret, line = new_key("client", False)
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text(line + "\n")
    yield path, secret


@pytest.fixture(scope="module")
def service(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, key: tuple[Path, str]
) -> Iterator[Service]:
    redis.Redis.from_url(redis_url).flushdb()
    svc = Service(redis_url, tiny_model_dir, tmp_path_factory.mktemp("client"), queue="client",
                  BAILAN_API_KEYS_FILE=str(key[0]))
    svc.http.headers["Authorization"] = f"Bearer {key[1]}"
    svc.add_worker()
    svc.wait_ready()
    yield svc
    svc.close()


@pytest.fixture
def client(service: Service, key: tuple[Path, str]) -> Iterator[Client]:
    with Client(f"http://127.0.0.1:{service.port}", key[1]) as bailan:
        yield bailan


def picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_sync_client_submits_follows_previews_and_fetches(client: Client) -> None:
    """Guards the sync client's whole path: typed views, previews as they arrive (in step
    order, the picture changing), the final view, and the image bytes."""
    job = client.submit(prompt="a red circle", width=32, height=32, steps=12, preview_every=3, seed=7)
    assert job.status is JobState.queued and job.params is not None and job.params.seed == 7
    previews = list(client.previews(job.id))
    assert [p.step for p in previews] == [3, 6, 9]
    assert len({p.data for p in previews}) == 3 and picture(previews[0].data).format == "JPEG"
    assert client.preview(job.id, 6) == previews[1].data
    final = client.wait(job.id)
    assert final.status is JobState.succeeded and final.progress.step == 12
    image = picture(client.image(job.id, 0))
    assert image.format == "PNG" and image.size == (32, 32)
    assert client.get(job.id) == final
    assert any(m.workers == 1 for m in client.models().models)


def test_sync_generate_several_images(client: Client) -> None:
    """Guards generate(): the final view and one image per num_images, in order of their seeds."""
    job, images = client.generate("a blue square", width=32, height=24, steps=4, num_images=2, seed=11,
                                  output_format="webp")
    assert [ref.seed for ref in job.images] == [11, 12]
    assert [picture(data).size for data in images] == [(32, 24), (32, 24)] and images[0] != images[1]


def test_errors_carry_the_apis_message(client: Client, service: Service) -> None:
    """Guards errors as exceptions: the API's own message (404 detail, 422 field, 409 detail, 401)."""
    with pytest.raises(ApiError) as caught:
        client.get("0" * 32)
    assert caught.value.status_code == 404 and "not found" in caught.value.message
    with pytest.raises(ApiError) as caught:
        client.submit(prompt="x", steps=100001)
    assert caught.value.status_code == 422 and caught.value.message.startswith("steps: ")
    assert "100000" in caught.value.message
    done = client.submit(prompt="x", steps=2)
    client.wait(done.id)
    with pytest.raises(ApiError) as caught:
        client.cancel(done.id)
    assert caught.value.status_code == 409 and "already ended" in caught.value.message
    with Client(f"http://127.0.0.1:{service.port}", "bl_not-a-key") as stranger, pytest.raises(ApiError) as caught:
        stranger.get(done.id)
    assert caught.value.status_code == 401 and caught.value.message == "unknown API key"
    # A field JobRequest refuses fails before any request.
    with pytest.raises(ValueError, match="width"):
        client.submit(prompt="x", width=63)


def test_wait_timeout_then_cancel(client: Client) -> None:
    """Guards wait()'s bound (the job goes on) and cancel of a running job, which ends canceled;
    generate() on a canceled job raises JobEnded with its view."""
    job = client.submit(prompt="a long one", width=32, height=32, steps=100000, scheduler="euler", preview_every=0)
    with pytest.raises(WaitTimeout) as caught:
        client.wait(job.id, timeout=1.0)
    assert caught.value.job.id == job.id and caught.value.job.status in (JobState.queued, JobState.running)
    wait_for(lambda: client.get(job.id).progress.step > 0, 60, "the job to run")
    assert client.cancel(job.id).cancel_requested
    final = client.wait(job.id, timeout=30)
    assert final.status is JobState.canceled
    assert str(JobEnded(final)).endswith(f"job {job.id} canceled: canceled")


def test_async_client(service: Service, key: tuple[Path, str]) -> None:
    """Guards the async client: the same submit, previews as they arrive, wait, images, cancel, errors."""

    async def scenario() -> None:
        async with AsyncClient(f"http://127.0.0.1:{service.port}", key[1]) as bailan:
            job = await bailan.submit({"prompt": "a red circle", "width": 32, "height": 32}, steps=9,
                                      preview_every=4, seed=3)
            steps = [p.step async for p in bailan.previews(job.id)]
            assert steps == [4, 8]
            final = await bailan.wait(job.id)
            assert final.status is JobState.succeeded
            assert picture(await bailan.image(job.id)).size == (32, 32)
            assert (await bailan.images(final))[0] == await bailan.image(job.id, 0)

            long = await bailan.submit(prompt="long", width=32, height=32, steps=100000, scheduler="euler",
                                       preview_every=0)
            with pytest.raises(WaitTimeout):
                await bailan.wait(long.id, timeout=0.5)
            await bailan.cancel(long.id)
            assert (await bailan.wait(long.id, timeout=30)).status is JobState.canceled
            with pytest.raises(ApiError, match="not found"):
                await bailan.cancel("0" * 32)

    asyncio.run(scenario())


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BAILAN), *args], env={**os.environ, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_generate_status_cancel(service: Service, key: tuple[Path, str], tmp_path: Path) -> None:
    """Guards the installed `bailan` command: generate saves the image and the previews, shows a
    progress bar up to the last step; status and cancel print the view; errors are the API's message
    with a non-zero exit; the URL and key come from flags or BAILAN_URL/BAILAN_API_KEY."""
    url = f"http://127.0.0.1:{service.port}"
    env = {"BAILAN_URL": url, "BAILAN_API_KEY": key[1]}
    done = run_cli("generate", "a red circle on a blue background", "-o", "out.png", "--previews", "frames",
                   "--width", "32", "--height", "24", "--steps", "10", "--preview-every", "3", "--seed", "5",
                   "--scheduler", "euler", "--no-preview-full-decode", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "out.png"
    assert picture((tmp_path / "out.png").read_bytes()).size == (32, 24)
    frames = sorted(p.name for p in (tmp_path / "frames").iterdir())
    job_id = done.stderr.split("job ", 1)[1].split()[0]
    assert frames == [f"{job_id}-step{s:04d}.jpg" for s in (3, 6, 9)]
    assert "] 10/10 steps succeeded" in done.stderr

    status = run_cli("status", job_id, "--url", url, "--key", key[1], env={}, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["status"] == "succeeded" and view["params"]["seed"] == 5 and view["params"]["scheduler"] == "euler"

    again = run_cli("cancel", job_id, env=env, cwd=tmp_path)
    assert again.returncode == 1 and "already ended" in again.stderr

    with Client(url, key[1]) as client:
        long = client.submit(prompt="long", width=32, height=32, steps=100000, scheduler="euler", preview_every=0)
        canceled = run_cli("cancel", long.id, env=env, cwd=tmp_path)
        assert canceled.returncode == 0, canceled.stderr
        assert json.loads(canceled.stdout)["id"] == long.id
        assert client.wait(long.id, timeout=30).status is JobState.canceled

    several = run_cli("generate", "two", "-o", "pics/two.webp", "--num-images", "2", "--steps", "2",
                      "--output-format", "webp", env=env, cwd=tmp_path)
    assert several.returncode == 0, several.stderr
    assert several.stdout.split() == ["pics/two-0.webp", "pics/two-1.webp"]
    assert picture((tmp_path / "pics/two-1.webp").read_bytes()).format == "WEBP"

    # A previews directory that cannot be made fails before any job is queued (one ran on, unwatched).
    (tmp_path / "a-file").write_text("")
    conn = redis.Redis.from_url(service.env["BAILAN_REDIS_URL"])
    jobs_before = sum(1 for _ in conn.scan_iter("bailan:job:*"))
    unwritable = run_cli("generate", "x", "--previews", "a-file/frames", env=env, cwd=tmp_path)
    assert unwritable.returncode == 1 and "a-file" in unwritable.stderr
    assert sum(1 for _ in conn.scan_iter("bailan:job:*")) == jobs_before

    refused = run_cli("generate", "x", "--steps", "100001", env=env, cwd=tmp_path)
    assert refused.returncode == 1 and "steps: " in refused.stderr and "100000" in refused.stderr
    stranger = run_cli("status", job_id, "--key", "bl_wrong", env=env, cwd=tmp_path)
    assert stranger.returncode == 1 and "unknown API key" in stranger.stderr


def test_cli_output_extension_picks_the_format(service: Service, key: tuple[Path, str], tmp_path: Path) -> None:
    """Guards against `-o photo.jpg` saving PNG bytes under a .jpg name: the extension asks for its
    format when --output-format is not given; a contradicting --output-format, or an extension
    Bailan writes no files of (PNG bytes as x.gif), queues nothing."""
    env = {"BAILAN_URL": f"http://127.0.0.1:{service.port}", "BAILAN_API_KEY": key[1]}
    done = run_cli("generate", "a red circle", "-o", "photo.JPG", "--steps", "2", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert picture((tmp_path / "photo.JPG").read_bytes()).format == "JPEG"

    conn = redis.Redis.from_url(service.env["BAILAN_REDIS_URL"])
    jobs_before = sum(1 for _ in conn.scan_iter("bailan:job:*"))
    clash = run_cli("generate", "x", "-o", "x.png", "--output-format", "webp", env=env, cwd=tmp_path)
    assert clash.returncode == 2 and "--output-format webp" in clash.stderr and "x.png" in clash.stderr
    unknown = run_cli("generate", "x", "-o", "x.gif", env=env, cwd=tmp_path)
    assert unknown.returncode == 2 and ".gif" in unknown.stderr
    assert sum(1 for _ in conn.scan_iter("bailan:job:*")) == jobs_before


def test_client_and_cli_load_no_server_or_model_code() -> None:
    """Guards the client's weight: importing bailan.client and bailan.cli must not load torch,
    diffusers, the worker, FastAPI or RQ (a client machine need not run them)."""
    code = ("import sys, bailan.client, bailan.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'diffusers', 'transformers', 'worker', 'fastapi', 'starlette', 'rq'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_cli_ctrl_c_cancels_its_job(service: Service, key: tuple[Path, str], tmp_path: Path) -> None:
    """Guards against a job left running for nobody: Ctrl-C during `bailan generate` cancels it
    and exits 130."""
    with subprocess.Popen(
        [str(BAILAN), "generate", "long", "--steps", "100000", "--scheduler", "euler", "--preview-every", "0",
         "--width", "32", "--height", "32"],
        env={**os.environ, "BAILAN_URL": f"http://127.0.0.1:{service.port}", "BAILAN_API_KEY": key[1]},
        cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    ) as process:
        try:
            assert process.stderr is not None
            job_id = process.stderr.readline().split()[1]
            while "steps" not in process.stderr.readline():  # the bar has started: the job runs
                assert process.poll() is None
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 130
            assert f"canceled job {job_id}" in process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
    with Client(f"http://127.0.0.1:{service.port}", key[1]) as client:
        assert client.wait(job_id, timeout=30).status is JobState.canceled


def test_cli_ctrl_c_while_the_server_is_silent_exits_cleanly(tmp_path: Path) -> None:
    """Guards against Ctrl-C outside a job's wait (a submit to a server that never answers)
    ending `bailan generate` with a Python traceback instead of exit 130."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    try:
        with subprocess.Popen(
            [str(BAILAN), "generate", "x", "--url", f"http://127.0.0.1:{silent.getsockname()[1]}"],
            cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        ) as process:
            silent.settimeout(60)
            connection, _ = silent.accept()  # the submit is under way
            assert process.poll() is None
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 130
            assert process.stderr is not None
            err = process.stderr.read()
            assert "interrupted" in err and "Traceback" not in err, err
            connection.close()
    finally:
        silent.close()


class CuttableProxy:
    """A TCP proxy to the API whose connections a test can cut, as an API restart or a
    proxy's idle timeout cuts an event stream."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target))
            self.accepted += 1
            self.open += [inbound, outbound]
            for source, sink in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        for end in self.open:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        self.open.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_wait_rides_out_a_cut_stream(service: Service, key: tuple[Path, str]) -> None:
    """Guards against wait() (and so generate(), previews() and the CLI) failing on a stream
    cut mid-job (an API restart, a proxy's idle timeout): it raised JobGone(502) "ended
    before the job did", or the transport's error, for a job that went on. It follows again."""
    proxy = CuttableProxy(service.port)
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", key[1]) as via_proxy:
            job = via_proxy.submit(prompt="a red circle", width=32, height=32, steps=400, scheduler="euler",
                                   preview_every=0)
            seen: list[JobState] = []
            for view in via_proxy.watch(job.id, timeout=120):
                seen.append(view.status)
                if view.status is JobState.running and seen.count(JobState.running) == 1:
                    proxy.cut()  # mid-job, the stream's connection goes
            assert seen[-1] is JobState.succeeded and proxy.accepted >= 2
            assert via_proxy.wait(job.id, timeout=30).status is JobState.succeeded
    finally:
        proxy.close()


def test_a_key_without_a_free_stream_place_still_waits(client: Client, service: Service) -> None:
    """Guards against wait() and generate() raising the event stream's 429 when the key's
    stream places were all taken (BAILAN_MAX_STREAMS_PER_KEY, 32 by default): the job was
    already queued, so a caller retrying generate() queued it again. They hold polls instead."""
    from bailan.jobs import Keys
    from bailan.queues import key_digest

    places = Keys.streams(key_digest("client"))
    conn = redis.Redis.from_url(service.env["BAILAN_REDIS_URL"])
    conn.zadd(places, {f"someone-{i}": time.time() + 600 for i in range(32)})
    try:
        job, images = client.generate("a blue square", width=32, height=32, steps=6, preview_every=2, timeout=60)
        assert job.status is JobState.succeeded and len(images) == 1
        held = client.submit(prompt="a red circle", width=32, height=32, steps=9, preview_every=3)
        assert [p.step for p in client.previews(held.id)] == [3, 6]
    finally:
        conn.zrem(places, *(f"someone-{i}" for i in range(32)))


def test_watch_decides_each_break_as_documented() -> None:
    """Guards the watch's decisions (pure logic): a 429 turns it to held polls, and a 429 to a
    held poll (a proxy's limit) waits as told instead of spinning; a cut stream is followed
    again with a growing backoff, at most RECONNECTS times in a row; a gone job and other
    refusals are raised at once."""
    import httpx

    from bailan.client import RECONNECTS, ApiError, JobGone, _Watch

    state = _Watch(None)
    assert state.broke(ApiError(429, "streams full")) == 0.0 and state.held
    assert state.broke(ApiError(429, "slow down", retry_after=3.0)) == 3.0
    assert state.broke(ApiError(429, "slow down")) == 1.0
    state = _Watch(None)
    waits = [state.broke(httpx.RemoteProtocolError("cut")) for _ in range(RECONNECTS)]
    assert waits == sorted(waits) and waits[0] > 0
    with pytest.raises(httpx.RemoteProtocolError):
        state.broke(httpx.RemoteProtocolError("cut once more"))
    state.saw()
    assert state.broke(JobGone(503, "the job store is unavailable")) > 0  # an event: error, followed again
    with pytest.raises(JobGone):
        _Watch(None).broke(JobGone(404, "expired"))
    with pytest.raises(ApiError):
        _Watch(None).broke(ApiError(401, "unknown API key"))
    # The API (or a proxy) that cannot serve now: its store away (503, Retry-After), a restart
    # behind a proxy (502, 504). The store's 503 had the CLI give up, and cancel the job.
    assert _Watch(None).broke(ApiError(503, "the job store (Redis) is unavailable", retry_after=2.0)) == 2.0
    assert _Watch(None).broke(ApiError(502, "bad gateway")) > 0 and _Watch(None).broke(ApiError(504, "gw")) > 0
    with pytest.raises(ApiError):
        _Watch(None).broke(ApiError(500, "internal error"))  # a bug, not a break that passes


def test_a_preview_that_fails_to_load_does_not_end_the_watch(service: Service, key: tuple[Path, str],
                                                              tmp_path: Path) -> None:
    """Guards against one preview download failing (the store away a moment, the frame expired)
    ending a job's watch: previews() raised, and the CLI gave up on the job and canceled it.
    The frame is skipped, as the page skips it; the job and its image come through."""
    import httpx

    from bailan import cli

    real = httpx.HTTPTransport()
    failed: list[str] = []

    class FirstPreviewFails(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if "/previews/" in request.url.path and not failed:
                failed.append(request.url.path)
                return httpx.Response(503, json={"detail": "the job store (Redis) is unavailable: injected"},
                                      headers={"Retry-After": "1"})
            return real.handle_request(request)

    url = f"http://127.0.0.1:{service.port}"
    with real, Client(url, key[1], transport=FirstPreviewFails()) as flaky:
        job = flaky.submit(prompt="a red circle", width=32, height=32, steps=9, scheduler="euler", preview_every=3)
        assert [p.step for p in flaky.previews(job.id)] == [6]  # 3 failed to load, and was skipped
        assert flaky.wait(job.id, timeout=60).status is JobState.succeeded

    failed.clear()
    (tmp_path / "frames").mkdir()
    args = cli.parser().parse_args(["generate", "a blue square", "-o", str(tmp_path / "out.png"), "--previews",
                                    str(tmp_path / "frames"), "--width", "32", "--height", "32", "--steps", "9",
                                    "--preview-every", "3", "--scheduler", "euler"])
    real = httpx.HTTPTransport()
    with real, Client(url, key[1], transport=FirstPreviewFails()) as flaky:
        assert cli.generate(flaky, args) == 0
    assert failed and (tmp_path / "out.png").is_file()
    assert len(list((tmp_path / "frames").iterdir())) == 1  # the frames that loaded (step 6)


def test_wait_on_a_job_that_ended_returns_it_whatever_the_timeout(client: Client) -> None:
    """Guards against wait(id, timeout=0) on a job that had already ended raising WaitTimeout
    ("still succeeded after 0 s"): with no time to watch, it returned nothing it fetched."""
    job, _ = client.generate("a red circle", width=32, height=32, steps=2, timeout=60)
    assert client.wait(job.id, timeout=0).status is JobState.succeeded

    async def waited() -> JobState:
        async with AsyncClient(client.url, client.http.headers["Authorization"].removeprefix("Bearer ")) as aio:
            return (await aio.wait(job.id, timeout=0)).status

    assert asyncio.run(waited()) is JobState.succeeded


def test_an_api_key_no_header_carries_is_named(service: Service, tmp_path: Path) -> None:
    """Guards against a key copied with a stray character ("bl_abc…") failing deep in httpx
    with "'ascii' codec can't encode character": the client names the key, and the CLI says so
    (exit 2, as for any flag value refused)."""
    from bailan.client import BadKey

    with pytest.raises(BadKey, match=r"the API key \(--key or BAILAN_API_KEY\) holds a character"):
        Client(f"http://127.0.0.1:{service.port}", "bl_abc\u2026")
    refused = run_cli("status", "some-job", "--url", f"http://127.0.0.1:{service.port}", "--key", "bl_abc\u2026",
                      env={}, cwd=tmp_path)
    assert refused.returncode == 2 and "the API key (--key or BAILAN_API_KEY)" in refused.stderr
