"""End to end: the real API (uvicorn) and real worker processes against a real Redis.

Nothing is faked: jobs go over HTTP into RQ, a `python -m worker` process
samples them with a tiny random-weight Stable Diffusion pipeline, and the test
reads progress, previews and images back over HTTP.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from tests.fixtures.kill_worker import kill_hard

ROOT = Path(__file__).resolve().parent.parent


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


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Service:
    """One API process and the workers behind it, on one queue."""

    def __init__(self, redis_url: str, model: Path, tmp: Path, queue: str, **settings: str) -> None:
        self.env = {
            "BAILAN_REDIS_URL": redis_url,
            "BAILAN_QUEUE_NAME": queue,
            "BAILAN_MODEL": str(model),
            "BAILAN_HEARTBEAT_INTERVAL_S": "0.5",
            "BAILAN_HEARTBEAT_TTL_S": "2",
            "BAILAN_REAP_INTERVAL_S": "0.5",
            "BAILAN_MAX_BATCH": "2",
            "BAILAN_MAX_STEPS": "100000",
            # Jobs long enough to cancel or kill mid-run: no CPU step cap (bailan.caps; tests/test_device_caps.py).
            "BAILAN_MAX_STEPS_CPU": "0",
            **settings,
        }
        self.tmp = tmp
        self.port = free_port()
        self.api = start(
            ["-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port)],
            self.env,
            tmp / f"api-{queue}.log",
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        self.workers: list[subprocess.Popen] = []
        wait_for(self._healthy, 60, "the API to answer /healthz")

    def _healthy(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            if self.api.poll() is not None:
                raise AssertionError("the API exited; see its log in " + str(self.tmp))
            return False

    def add_worker(self, model: Path | None = None) -> subprocess.Popen:
        n = len(self.workers)
        env = {**self.env, "BAILAN_NAME": f"{self.env['BAILAN_QUEUE_NAME']}-w{n}"}
        if model is not None:
            env["BAILAN_MODEL"] = str(model)
        worker = start(["-m", "worker"], env, self.tmp / f"worker-{self.env['BAILAN_QUEUE_NAME']}-{n}.log")
        self.workers.append(worker)
        return worker

    def wait_ready(self) -> None:
        wait_for(lambda: self.http.get("/readyz").status_code == 200, 120, "a live worker (/readyz)", 0.2)

    def submit(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/v1/jobs", json={"prompt": "a red circle", **body})
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
        return response.json()

    def view(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_status(self, job_id: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
        return wait_for(lambda: (v := self.view(job_id))["status"] in statuses and v, timeout,
                        f"job {job_id} to reach {statuses}")

    def close(self) -> None:
        for worker in self.workers:
            stop(worker)
        stop(self.api)
        self.http.close()


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    svc = Service(redis_url, tiny_model_dir, tmp_path_factory.mktemp("e2e"), queue="e2e")
    svc.add_worker()
    svc.wait_ready()
    yield svc
    svc.close()
    conn.flushdb()


def test_job_walks_from_noise_to_picture(service: Service) -> None:
    """Guards the whole client path: queued -> running with rising steps -> previews -> image."""
    job = service.submit(width=64, height=48, steps=150, preview_every=10, seed=3)
    assert job["status"] == "queued" and job["params"]["seed"] == 3
    seen: list[tuple[str, int]] = []

    def finished() -> bool:
        view = service.view(job["id"])
        seen.append((view["status"], view["progress"]["step"]))
        return view["status"] in {"succeeded", "failed", "canceled"}

    wait_for(finished, 120, "the job to finish", interval=0.02)
    view = service.view(job["id"])
    assert view["status"] == "succeeded", view
    running_steps = [step for status, step in seen if status == "running"]
    assert len(set(running_steps)) >= 2 and running_steps == sorted(running_steps), seen
    assert view["progress"] == {"step": 150, "total_steps": 150}
    assert view["started_at"] and view["finished_at"] and view["error"] is None

    steps = [p["step"] for p in view["previews"]]
    assert steps == list(range(10, 150, 10))
    frames = set()
    for preview in view["previews"][:4]:
        response = service.http.get(preview["url"])
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        frames.add(response.content)
        assert Image.open(io.BytesIO(response.content)).format == "JPEG"
    assert len(frames) >= 3, "previews must change as the mist clears"
    latest = service.http.get(f"/v1/jobs/{job['id']}/previews/latest")
    assert latest.status_code == 200 and latest.content == service.http.get(view["previews"][-1]["url"]).content

    assert view["images"] == [{"index": 0, "url": f"/v1/jobs/{job['id']}/images/0", "seed": 3}]
    image = service.http.get(view["images"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(image.content))
    assert picture.format == "PNG" and picture.size == (64, 48)


def test_same_seed_same_image(service: Service) -> None:
    """Guards against nondeterminism: same seed and parameters, same pixels; another seed differs."""
    jobs = [service.submit(seed=seed, steps=8, output_format="png") for seed in (42, 42, 43)]
    images = []
    for job in jobs:
        assert service.wait_status(job["id"], {"succeeded", "failed"})["status"] == "succeeded"
        images.append(Image.open(io.BytesIO(service.http.get(f"/v1/jobs/{job['id']}/images/0").content)).tobytes())
    assert images[0] == images[1]
    assert images[0] != images[2]


def test_server_picks_and_reports_a_seed_and_formats(service: Service) -> None:
    """Guards against unreported random seeds and ignored output formats."""
    job = service.submit(steps=4, num_images=2, output_format="webp")
    view = service.wait_status(job["id"], {"succeeded", "failed"})
    seed = view["params"]["seed"]
    assert isinstance(seed, int)
    assert [img["seed"] for img in view["images"]] == [seed, seed + 1]
    response = service.http.get(view["images"][1]["url"])
    assert response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).format == "WEBP"


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_every_image_carries_its_generation_parameters(service: Service, output_format: str) -> None:
    """Guards against images that cannot be reproduced from the file alone: each image
    carries AUTOMATIC1111's `parameters` text (PNG text chunk, EXIF UserComment in JPEG
    and WebP) with its own seed, the size, sampler, guidance, model and model hash."""
    from worker.imaging import read_parameters
    from worker.loader import model_hash

    job = service.submit(prompt="a red circle", negative_prompt="blue", steps=3, num_images=2, seed=41,
                         guidance_scale=3.5, scheduler="euler_a", output_format=output_format)
    view = service.wait_status(job["id"], {"succeeded", "failed"})
    assert view["status"] == "succeeded", view
    for index, seed in enumerate((41, 42)):
        data = service.http.get(view["images"][index]["url"]).content
        text = read_parameters(data)
        assert text is not None, f"{output_format} image {index} carries no parameters"
        prompt, negative, fields = text.split("\n")
        assert prompt == "a red circle" and negative == "Negative prompt: blue"
        size = f"{view['params']['width']}x{view['params']['height']}"
        assert fields == (f"Steps: 3, Sampler: Euler a, CFG scale: 3.5, Seed: {seed}, Size: {size}, "
                          f"Model hash: {model_hash(Path(service.env['BAILAN_MODEL']))}, Model: tiny-random")


def test_cancel_queued_and_running(service: Service) -> None:
    """Guards against cancel that does not stop work: a queued job never runs, a
    running one stops at its next step; both end canceled; finished jobs say 409."""
    # Long jobs that fill both slots (Euler: its schedule stays well defined at any step count).
    running = [service.submit(steps=3000, scheduler="euler", preview_every=0) for _ in range(2)]
    for job in running:
        wait_for(lambda j=job: service.view(j["id"])["progress"]["step"] > 0, 60, "the job to run")
    queued = service.submit(steps=5)
    assert service.view(queued["id"])["status"] == "queued"
    assert service.view(queued["id"])["queue_position"] == 1

    response = service.http.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    response = service.http.post(f"/v1/jobs/{running[0]['id']}/cancel")
    assert response.status_code == 202
    stopped = service.wait_status(running[0]["id"], {"canceled", "succeeded", "failed"}, timeout=10)
    assert stopped["status"] == "canceled"
    assert 0 < stopped["progress"]["step"] < 3000
    service.http.post(f"/v1/jobs/{running[1]['id']}/cancel")
    assert service.wait_status(running[1]["id"], {"canceled", "succeeded", "failed"}, timeout=10)["status"] == "canceled"

    # The canceled queued job never started, even now that slots are free.
    time.sleep(0.5)
    assert service.view(queued["id"])["started_at"] is None
    assert service.view(queued["id"])["status"] == "canceled"
    again = service.http.post(f"/v1/jobs/{running[0]['id']}/cancel")
    assert again.status_code == 409 and "canceled" in again.text
    # Canceled jobs expire like any other (RQ alone would keep them for ever).
    conn = redis.Redis.from_url(service.env["BAILAN_REDIS_URL"])
    for job in (queued, *running):
        assert conn.ttl(f"rq:job:{job['id']}") > 0


def test_bad_input_unknown_id_and_unknown_words(service: Service) -> None:
    """Guards against 500s on bad input and silent handling of out-of-vocabulary words."""
    response = service.http.post("/v1/jobs", json={"prompt": "x", "width": 63})
    assert response.status_code == 422 and "width" in response.text
    response = service.http.post("/v1/jobs", json={"prompt": "x", "steps": 100001})
    assert response.status_code == 422 and "steps" in response.text
    assert service.http.get("/v1/jobs/does-not-exist").status_code == 404
    job = service.submit(prompt="a red zebra circle", steps=3)
    view = service.wait_status(job["id"], {"succeeded", "failed"})
    assert view["status"] == "succeeded" and view["unknown_words"] == ["zebra"]


def test_models_and_readiness(service: Service) -> None:
    """Guards against /readyz and /v1/models not reflecting the live worker."""
    assert service.http.get("/readyz").status_code == 200
    models = service.http.get("/v1/models").json()
    text = str(models)
    assert "tiny-random" in text and "32" in text


def test_killed_worker_job_is_requeued_once_then_failed(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Guards against jobs stuck `running` forever after kill -9: the lease expires,
    the API's reaper requeues the job once, and fails it when its second worker dies too."""
    svc = Service(redis_url, tiny_model_dir, tmp_path, queue="kill", BAILAN_ABANDONED_RETRIES="1")
    try:
        first = svc.add_worker()
        svc.wait_ready()
        job = svc.submit(steps=100000, scheduler="euler", preview_every=0)
        wait_for(lambda: svc.view(job["id"])["progress"]["step"] > 0, 60, "the job to run")
        kill_hard(first)
        killed_at = time.monotonic()
        # Lease 2 s + reaper every 0.5 s: back in the queue well inside the bound.
        svc.wait_status(job["id"], {"queued"}, timeout=15)
        assert time.monotonic() - killed_at < 15

        second = svc.add_worker()
        wait_for(lambda: svc.view(job["id"])["status"] == "running", 120, "the retry to run")
        kill_hard(second)
        view = svc.wait_status(job["id"], {"failed"}, timeout=15)
        assert view["error"]["code"] == "worker_lost"
        assert view["finished_at"] is not None
    finally:
        svc.close()


def test_worker_waits_for_redis_and_still_stops_on_sigterm(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Guards against a worker that crashes when it starts before its Redis, or that
    ignores SIGTERM while Redis is unreachable (RQ retries forever)."""
    log = tmp_path / "worker.log"
    worker = start(["-m", "worker"], {"BAILAN_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                                      "BAILAN_MODEL": str(tiny_model_dir)}, log)
    try:
        wait_for(lambda: "waiting for Redis" in log.read_text(), 120, "the worker to wait for Redis", 0.2)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0
    finally:
        if worker.poll() is None:
            worker.kill()


@pytest.mark.parametrize("model", ["missing", "not-a-pipeline", "default", "bad name"])
def test_worker_without_a_model_stops_with_a_message(tmp_path: Path, model: str) -> None:
    """Guards against a worker that starts on a missing or wrong model directory (or one whose
    name requests could not give as `model`),
    or that builds random weights in the built-in model's place when the default
    path is absent (it once did): it must exit at start-up with code 2 and a
    message naming BAILAN_MODEL, and write nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAILAN_")}
    expected = {"missing": "does not exist", "not-a-pipeline": "has no model_index.json",
                "default": "start the worker from the repository root", "bad name": "names the model"}[model]
    if model in ("not-a-pipeline", "bad name"):
        (tmp_path / model).mkdir()
    if model == "bad name":  # a pipeline, but requests could not name it (and its queues would carry it)
        (tmp_path / model / "model_index.json").write_text("{}")
    if model != "default":
        env["BAILAN_MODEL"] = str(tmp_path / model)
    # From an empty directory, so the default path models/bailan-shapes is absent too.
    result = subprocess.run([sys.executable, "-m", "worker"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "BAILAN_MODEL" in result.stderr and expected in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ([model] if model in ("not-a-pipeline", "bad name") else [])


def test_image_to_image_through_the_service(service: Service) -> None:
    """Guards against an input image lost between the API and the worker: a job started
    from a picture (and a mask) runs to the end at the picture's size, and its progress
    counts only the steps it runs."""
    import base64

    picture = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 30, 40)).save(picture, format="PNG")
    mask = io.BytesIO()
    Image.new("L", (40, 24), 255).save(mask, format="PNG")
    job = service.submit(steps=8, strength=0.5, init_image=base64.b64encode(picture.getvalue()).decode(),
                         mask_image=base64.b64encode(mask.getvalue()).decode())
    view = service.wait_status(job["id"], {"succeeded", "failed"})
    assert view["status"] == "succeeded", view
    assert view["progress"] == {"step": 4, "total_steps": 4}
    image = Image.open(io.BytesIO(service.http.get(view["images"][0]["url"]).content))
    assert image.size == (40, 24)


def test_each_model_runs_its_own_jobs(redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Guards: a job for one model run by another model's worker (one shared queue), an
    unknown model accepted, and a job for a model whose workers are all down lost or
    silently stuck: it waits, says so, and runs when a worker of its model comes back."""
    models = {name: Path(shutil.copytree(tiny_model_dir, tmp_path / name)) for name in ("tiny-a", "tiny-b")}
    svc = Service(redis_url, models["tiny-a"], tmp_path, queue="models", BAILAN_DEFAULT_MODEL="tiny-a")
    try:
        svc.add_worker(models["tiny-a"])
        worker_b = svc.add_worker(models["tiny-b"])
        # Other modules' workers may be live too (one Redis): look at these two models only.
        wait_for(lambda: {m["model"]: m["workers"] for m in svc.http.get("/v1/models").json()["models"]
                          if m["model"] in models} == {"tiny-a": 1, "tiny-b": 1}, 120, "a worker of each model")
        jobs = {name: [svc.submit(model=name, steps=2)["id"] for _ in range(3)] for name in models}
        default = svc.submit(steps=2)["id"]
        for name, ids in jobs.items():
            for job_id in ids:
                view = svc.wait_status(job_id, {"succeeded", "failed"})
                assert (view["status"], view["model"]) == ("succeeded", name), view
        assert svc.wait_status(default, {"succeeded"})["model"] == "tiny-a"
        unknown = svc.http.post("/v1/jobs", json={"prompt": "x", "model": "tiny-c"})
        assert unknown.status_code == 422 and "tiny-a, tiny-b" in unknown.text

        stop(worker_b)  # tiny-b's only worker: its jobs wait, and their view says so
        waiting = svc.submit(model="tiny-b", steps=2)["id"]
        # Within the worker key's few seconds (BAILAN_PRESENCE_TTL_S), not the lease's 30 s.
        wait_for(lambda: svc.view(waiting)["waiting_for_worker"], 10, "the view to say no worker serves tiny-b")
        assert svc.view(waiting)["status"] == "queued"
        svc.add_worker(models["tiny-b"])
        view = svc.wait_status(waiting, {"succeeded", "failed"}, timeout=120)
        assert (view["status"], view["model"], view["waiting_for_worker"]) == ("succeeded", "tiny-b", False)
    finally:
        svc.close()
