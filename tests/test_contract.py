"""The shared contract: RQ status -> job state, and worker settings that fail fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bailan.jobs import JobState, RecordField, public_state
from worker.settings import WorkerSettings


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
    monkeypatch.setenv("BAILAN_MAX_BATCH", "4")
    settings = WorkerSettings()
    assert settings.max_batch == 4 and settings.device == "cpu" and settings.model == Path("models/bailan-shapes")


def test_seeds_of_every_image_stay_in_range() -> None:
    """Guards against reporting an image seed (seed + i) that the API would refuse as input."""
    from bailan.jobs import SEED_MAX, JobRequest

    assert JobRequest(prompt="x", seed=SEED_MAX - 3, num_images=4).seed == SEED_MAX - 3
    with pytest.raises(ValidationError, match="seed"):
        JobRequest(prompt="x", seed=SEED_MAX - 2, num_images=4)
