"""The estimated wait (`eta_s`): the pure estimate, the worker's meter, the API's view of it
against a real Redis, and a real worker whose measured rate gives a queued job an estimate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from bailan.eta import WorkerRate, estimate_eta, jobs_ahead
from bailan.jobs import Keys
from tests.test_api import QUEUE, announce, publish_worker, start_job, submit
from tests.test_e2e import Service, wait_for
from worker.rates import StepMeter


# ---------------------------------------------------------------- the pure estimate


def test_jobs_ahead_counts_own_queue_and_one_turn_per_round_of_the_others() -> None:
    """Guards against an estimate that ignores the other keys' queues served round robin,
    or counts more of them than the rounds before this job can serve."""
    assert jobs_ahead(1, []) == 0
    assert jobs_ahead(3, []) == 2
    assert jobs_ahead(3, [10, 1, 0]) == 2 + 3 + 1


def test_estimate_drains_backlog_and_jobs_ahead_then_runs_own_steps() -> None:
    """Guards the formula: (backlog + ahead x steps x images) / total throughput + steps x mean step time."""
    workers = [WorkerRate(samples_per_s=10.0, step_s=0.2, backlog=40), WorkerRate(10.0, 0.4, 20)]
    # (60 + 2 * 20 * 2) / 20 = 7 s waiting, then 20 steps * 0.3 s = 6 s running.
    assert estimate_eta(ahead=2, steps=20, num_images=2, workers=workers) == pytest.approx(13.0)
    # More jobs ahead: a longer wait.
    assert estimate_eta(ahead=5, steps=20, num_images=2, workers=workers) > 13.0


def test_estimate_is_unknown_without_a_measured_worker() -> None:
    """Guards against a made-up number (or a division by zero) when no live worker measured its speed."""
    assert estimate_eta(0, 20, 1, []) is None
    assert estimate_eta(0, 20, 1, [WorkerRate(None, None, 0)]) is None
    assert estimate_eta(0, 20, 1, [WorkerRate(0.0, 0.1, 0)]) is None
    # An unmeasured worker adds its backlog but no throughput.
    one = estimate_eta(1, 10, 1, [WorkerRate(5.0, 0.2, 0)])
    assert estimate_eta(1, 10, 1, [WorkerRate(5.0, 0.2, 0), WorkerRate(None, None, 50)]) == one + 10.0


def test_step_meter_averages_and_ignores_empty_iterations() -> None:
    """Guards the worker's figures: first measurement taken as is, later ones moved toward by alpha,
    an iteration that ran nothing leaves them alone."""
    meter = StepMeter(alpha=0.5)
    assert meter.snapshot() == {"step_s": None, "samples_per_s": None}
    meter.record(0.1, 2)
    assert meter.snapshot() == {"step_s": 0.1, "samples_per_s": 20.0}
    meter.record(0.3, 3)
    meter.record(0.0, 5)
    meter.record(0.2, 0)
    assert meter.snapshot() == {"step_s": pytest.approx(0.2), "samples_per_s": pytest.approx(15.0)}


def test_cli_progress_shows_the_estimate() -> None:
    """Guards against the CLI's progress line dropping the wait estimate of a queued job."""
    import io

    from app.schemas import JobOut, Progress
    from bailan.cli import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(out)
    view = JobOut(id="x", status="queued", progress=Progress(step=0, total_steps=10), queue_position=2, eta_s=12.4)
    bar.show(view)
    bar.show(view.model_copy(update={"eta_s": None}))
    assert out.getvalue().splitlines() == ["queued (position 2), done in about 12 s", "queued (position 2)"]


# ---------------------------------------------------------------- the API, real Redis


def test_queued_view_carries_eta_from_published_rates(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards the API side: the view of a queued job carries the estimate from what the live workers
    published; null with no measured worker, and null again once the job runs."""
    publish_worker(redis_conn)  # alive but not measured yet
    first = submit(client, steps=10, num_images=1)
    second = submit(client, steps=10, num_images=1)
    assert first["eta_s"] is None and client.get(f"/v1/jobs/{second['id']}").json()["eta_s"] is None

    publish_worker(redis_conn, samples_per_s=5.0, step_s=0.25, backlog=15)
    # Second in line: (15 backlog + 1 job ahead x 10) / 5 = 5 s, then 10 x 0.25 s.
    view = client.get(f"/v1/jobs/{second['id']}").json()
    assert view["queue_position"] == 2 and view["eta_s"] == pytest.approx(7.5)
    assert client.get(f"/v1/jobs/{first['id']}").json()["eta_s"] == pytest.approx(5.5)
    third = submit(client, steps=10)
    assert third["eta_s"] == pytest.approx(9.5)  # the submit answer carries it too

    start_job(redis_conn, first["id"])
    view = client.get(f"/v1/jobs/{first['id']}").json()
    assert view["status"] == "running" and view["eta_s"] is None


def test_eta_counts_only_the_workers_of_the_jobs_model(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards against a job for one model estimated from another model's workers, which never take it."""
    publish_worker(redis_conn, "w1", model="tiny")  # alive, not measured
    publish_worker(redis_conn, "w2", model="other", samples_per_s=5.0, step_s=0.25, backlog=0)
    assert submit(client, steps=10, model="tiny")["eta_s"] is None
    # Its own model's worker: (0 backlog + 0 ahead) / 5, then 10 x 0.25 s.
    assert submit(client, steps=10, model="other")["eta_s"] == pytest.approx(2.5)


def test_a_job_naming_no_model_counts_every_models_queue_ahead(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards against a job that names no model estimated from every worker's speed but only
    the plain queue's jobs: those workers give turns to their own model's queue too, so jobs
    waiting there are ahead of it, and the estimate ran short."""
    from bailan.jobs import Keys

    publish_worker(redis_conn, "w2", model="other", samples_per_s=5.0, step_s=0.25, backlog=0)
    redis_conn.sadd(Keys.models(QUEUE), "other")  # as the worker's liveness registers its model
    for _ in range(2):
        submit(client, steps=10, model="other")
    # One turn of the model's queue before it (round robin): (0 + 1 x 10) / 5, then 10 x 0.25 s.
    assert submit(client, steps=10)["eta_s"] == pytest.approx(4.5)


def test_malformed_rates_are_unknown_not_500(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards against a worker key with odd rate fields turning the status path into a 500."""
    announce(redis_conn, "odd", json.dumps({"model": "tiny", "samples_per_s": "fast", "step_s": True, "backlog": -3}))
    job = submit(client, steps=10, width=64, height=64)
    response = client.get(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200 and response.json()["eta_s"] is None


# ---------------------------------------------------------------- a real worker


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(redis_url, tiny_model_dir, tmp_path_factory.mktemp("eta"), queue="eta")
    svc.add_worker()
    svc.wait_ready()
    yield svc
    svc.close()


def test_real_worker_rate_gives_queued_job_a_positive_eta(service: Service) -> None:
    """Guards the whole path: a worker that ran steps publishes its measured rate beside its
    heartbeat, and a job queued behind its full batch shows a positive eta_s."""
    running = [service.submit(steps=3000, scheduler="euler", preview_every=0, width=32, height=32)
               for _ in range(2)]
    try:
        for job in running:
            wait_for(lambda j=job: service.view(j["id"])["progress"]["step"] > 0, 60, "the job to run")
        queued = service.submit(steps=20, width=32, height=32)
        view = wait_for(lambda: (v := service.view(queued["id"]))["eta_s"] and v, 20, "an eta_s", 0.1)
        assert view["status"] == "queued" and view["queue_position"] == 1
        assert view["eta_s"] > 0
        conn = redis.Redis.from_url(service.env["BAILAN_REDIS_URL"])
        # The worker key is renewed every second: the beat after the jobs started carries their backlog.
        published = wait_for(lambda: (p := json.loads(conn.get(Keys.worker("eta-w0")) or "{}")).get("backlog") and p,
                             10, "the worker key to carry the running jobs' backlog", 0.1)
        assert published["samples_per_s"] > 0 and published["step_s"] > 0 and published["backlog"] > 0
        service.http.post(f"/v1/jobs/{queued['id']}/cancel")
    finally:
        for job in running:
            service.http.post(f"/v1/jobs/{job['id']}/cancel")
