"""The shared contract: RQ status -> job state, settings shared by every process, and worker settings that fail fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import ApiSettings
from bailan.jobs import JobState, RecordField, public_state
from bailan.launch import LaunchSettings
from bailan.settings import SharedSettings
from worker.settings import WorkerSettings

PROCESS_SETTINGS = (ApiSettings, WorkerSettings, LaunchSettings)


@pytest.mark.parametrize(
    ("rq_status", "expected"),
    [
        ("queued", JobState.queued),
        ("deferred", JobState.queued),
        ("scheduled", JobState.queued),
        ("started", JobState.running),
        ("finished", JobState.succeeded),
        ("failed", JobState.failed),
        ("stopped", JobState.failed),
        ("canceled", JobState.canceled),
    ],
)
def test_every_rq_status_has_one_state(rq_status: str, expected: JobState) -> None:
    """Guards against an RQ status falling through to a wrong or missing state."""
    assert public_state(rq_status, {}) is expected


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({}, JobState.queued),
        ({RecordField.started_at: "1"}, JobState.running),
        ({RecordField.started_at: "1", RecordField.finished_at: "2"}, JobState.succeeded),
        ({RecordField.finished_at: "2", RecordField.error_code: "worker_lost"}, JobState.failed),
        ({RecordField.finished_at: "2", RecordField.cancel_requested: "1"}, JobState.canceled),
    ],
)
def test_record_decides_when_rq_forgot_the_job(record: dict[str, str], expected: JobState) -> None:
    """Guards against a job whose RQ hash expired first reading as queued forever."""
    assert public_state(None, record) is expected


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({RecordField.started_at: "1"}, JobState.running),
        ({RecordField.finished_at: "2", RecordField.images: "[]"}, JobState.succeeded),
        ({RecordField.finished_at: "2", RecordField.error_code: "internal"}, JobState.failed),
        ({RecordField.finished_at: "2", RecordField.cancel_requested: "1"}, JobState.canceled),
        # A cancel that came after the last step: the worker tells RQ it finished.
        ({RecordField.finished_at: "2", RecordField.cancel_requested: "1", RecordField.images: "[]"},
         JobState.succeeded),
    ],
)
def test_a_job_ends_when_its_record_says_so(record: dict[str, str], expected: JobState) -> None:
    """Guards against a client waiting for RQ's bookkeeping (several round trips a job, queued
    up behind a burst that ended at one step) after its worker had stored the outcome: RQ
    still says started then, and the record decides, as RQ will."""
    assert public_state("started", record) is expected
    if expected is not JobState.running:
        rq_says = {JobState.succeeded: "finished", JobState.failed: "failed", JobState.canceled: "canceled"}
        assert public_state(rq_says[expected], record) is expected  # no flip once RQ has caught up
        assert public_state(None, record) is expected  # nor once RQ's hash expired


def test_worker_settings_fail_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Guards against a worker starting with settings that cannot work (silent misconfiguration)."""
    # The default model path is relative to the working directory: the repository root.
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv("BAILAN_MODEL", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="BAILAN_MODEL"):
        WorkerSettings()
    monkeypatch.delenv("BAILAN_MODEL")
    monkeypatch.setenv("BAILAN_HEARTBEAT_TTL_S", "3")
    monkeypatch.setenv("BAILAN_HEARTBEAT_INTERVAL_S", "5")
    with pytest.raises(ValidationError, match="HEARTBEAT_TTL"):
        WorkerSettings()
    monkeypatch.setenv("BAILAN_HEARTBEAT_TTL_S", "30")
    monkeypatch.setenv("BAILAN_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        WorkerSettings()
    monkeypatch.setenv("BAILAN_DEVICE", "cpu")
    # An empty directory setting is the current directory (the checkout): refused, as is a URL
    # without its scheme (found only after the model had loaded).
    for variable, value in (("BAILAN_COMPILE_CACHE_DIR", ""), ("BAILAN_BLOB_DIR", " "),
                            ("BAILAN_REDIS_URL", "localhost:6379")):
        monkeypatch.setenv(variable, value)
        with pytest.raises(ValidationError, match=variable.removeprefix("BAILAN_").lower()):
            WorkerSettings()
        monkeypatch.delenv(variable)
    monkeypatch.setenv("BAILAN_MAX_BATCH", "4")
    settings = WorkerSettings()
    assert settings.max_batch == 4 and settings.device == "cpu" and settings.model == Path("models/bailan-shapes")


def test_seeds_of_every_image_stay_in_range() -> None:
    """Guards against reporting an image seed (seed + i) that the API would refuse as input."""
    from bailan.jobs import SEED_MAX, JobRequest

    assert JobRequest(prompt="x", seed=SEED_MAX - 3, num_images=4).seed == SEED_MAX - 3
    with pytest.raises(ValidationError, match="seed"):
        JobRequest(prompt="x", seed=SEED_MAX - 2, num_images=4)


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("BAILAN_RESULT_TTL_S", "60", True),
        ("BAILAN_RESULT_TTL_S", "59", False),
        ("BAILAN_RESULT_TTL_S", "1", False),
        ("BAILAN_PREVIEW_TTL_S", "1", True),
        ("BAILAN_PREVIEW_TTL_S", "0", False),
        ("BAILAN_REAP_INTERVAL_S", "0.5", True),
        ("BAILAN_REAP_INTERVAL_S", "0", False),
        ("BAILAN_QUEUE_NAME", "jobs", True),
        ("BAILAN_QUEUE_NAME", "", False),
        ("BAILAN_REDIS_URL", "redis://queue-host:6379/3", True),
    ],
)
def test_processes_accept_and_refuse_the_same_shared_values(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, accepted: bool
) -> None:
    """Guards: the API and the workers validating a shared setting differently (result_ttl_s was
    ge=60 in the API and ge=1 in the worker), so one process starts with a value the other refuses."""
    for name in [n for n in os.environ if n.startswith("BAILAN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv(variable, value)
    field = variable.removeprefix("BAILAN_").lower()
    for settings_class in PROCESS_SETTINGS:
        assert issubclass(settings_class, SharedSettings)
        if accepted:
            read = getattr(settings_class(), field)
            assert str(read) == value or read == float(value), settings_class
        else:
            with pytest.raises(ValidationError, match=field):
                settings_class()


def test_job_params_read_back_as_the_api_stored_them() -> None:
    """Guards: strict numeric types refusing the params record the API itself wrote (JSON in Redis),
    so the worker (model_validate_json) or a job view (model_validate of json.loads) fails every job."""
    import json

    from bailan.jobs import JobParams

    params = JobParams(prompt="x", seed=9, width=64, height=48, steps=8, guidance_scale=7, preview_every=0)
    stored = params.model_dump_json()
    assert JobParams.model_validate_json(stored) == params
    assert JobParams.model_validate(json.loads(stored)) == params
    # A record written before the types were strict: guidance as 7.0, sizes left to the worker.
    old = '{"prompt":"x","negative_prompt":"","width":null,"height":null,"steps":25,"guidance_scale":7.0,' \
          '"seed":1,"scheduler":"dpmpp_2m","num_images":1,"preview_every":5,"preview_full_decode":false,' \
          '"output_format":"png"}'
    assert JobParams.model_validate_json(old).guidance_scale == 7.0
    with pytest.raises(ValidationError, match="steps"):
        JobParams.model_validate_json(stored.replace('"steps":8', '"steps":true'))
