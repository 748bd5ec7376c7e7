"""A failure fixture: a command that ran on the server, and whose answer never came back.

`LostReply` is a TCP proxy in front of the real Redis-compatible server. It forwards every
byte both ways, except once: when what a client sent on its connection matches `trigger`,
it goes on passing the client's bytes to the server (the rest of a command cut across
reads), and the server's next answer, which says the command ran, it drops, closing the
client's connection. The client sees a broken connection (redis-py: ConnectionError) for a
command whose effects are in Redis, which is what a retry that sends it again doubles.
With `hold`, the connection stays open instead and the answer never comes: the client
times out (redis-py: TimeoutError), which no retry of the API's follows. With `stall` (and
`hold`), from then on no answer comes on any connection, new ones included: a server that
stopped answering (a paused process, a network partition) in the middle of a request.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable
from types import TracebackType

EXEC = b"\r\nEXEC\r\n"


def transaction_with(*parts: bytes) -> Callable[[bytes], bool]:
    """A trigger: a whole MULTI/EXEC transaction sent on one connection, naming each of `parts`."""
    return lambda sent: sent.endswith(EXEC) and all(part in sent[sent.rfind(b"MULTI"):] for part in parts)


def command_with(*parts: bytes) -> Callable[[bytes], bool]:
    """A trigger: the bytes sent since the last transaction name each of `parts` (a single command)."""
    return lambda sent: all(part in sent for part in parts) and sent.endswith(b"\r\n")


class LostReply:
    """`with LostReply(port, trigger) as proxy:` clients connect to `proxy.port`; `proxy.fired`
    says whether the answer was dropped."""

    def __init__(self, server_port: int, trigger: Callable[[bytes], bool], host: str = "127.0.0.1",
                 hold: bool = False, stall: bool = False) -> None:
        self.server = (host, server_port)
        self.trigger = trigger
        self.hold = hold or stall
        self.stall = stall
        self.fired = threading.Event()
        self._armed = threading.Event()
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> LostReply:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=2)

    def url(self, db: int) -> str:
        return f"redis://{self.server[0]}:{self.port}/{db}"

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._pump, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pump(self, client: socket.socket) -> None:
        server = socket.create_connection(self.server)
        sent = b""
        armed = False  # the trigger matched: the server's next answer is lost
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, server], [], [], 0.1)
                for side in ready:
                    data = side.recv(65536)
                    if not data:
                        return
                    if side is server:
                        if armed or (self.stall and self.fired.is_set()):
                            self.fired.set()  # it ran; its answer goes nowhere
                            if self.hold:
                                continue  # nor does the connection: the client waits, and times out
                            return
                        client.sendall(data)
                        continue
                    server.sendall(data)
                    sent += data
                    if not armed and not self._armed.is_set() and self.trigger(sent):
                        self._armed.set()  # once for the proxy, not once per connection
                        armed = True
                    if sent.endswith(EXEC):
                        sent = b""
        except OSError:
            return
        finally:
            client.close()
            server.close()
