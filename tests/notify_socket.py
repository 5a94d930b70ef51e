"""A real sd_notify endpoint for tests: the AF_UNIX datagram socket systemd would own.

`NotifySocket` binds one (a path, or an abstract-namespace name) and collects what a
process sends to it; `env` is what goes into `$NOTIFY_SOCKET`. No thread: a test reads
with `wait_for(...)`, which receives until a matching message arrives or time runs out.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# sun_path holds 108 bytes; pytest's tmp_path can come close.
_MAX_PATH = 100


@dataclass(frozen=True)
class Notification:
    """One datagram: its `KEY=VALUE` lines in order, and when it arrived (monotonic)."""

    fields: tuple[tuple[str, str], ...]
    raw: bytes
    at: float

    def get(self, key: str) -> str | None:
        return next((v for k, v in self.fields if k == key), None)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


def parse(datagram: bytes, at: float = 0.0) -> Notification:
    fields = []
    for line in datagram.decode("utf-8").split("\n"):
        if line:
            key, sep, value = line.partition("=")
            assert sep, f"not a KEY=VALUE line: {line!r} in {datagram!r}"
            fields.append((key, value))
    return Notification(tuple(fields), datagram, at)


class NotifySocket:
    """Binds a datagram socket at `directory/notify.sock`, or in the abstract namespace
    when `abstract` is true. Close it (or use it as a context manager) when done."""

    def __init__(self, directory: Path | None = None, *, abstract: bool = False) -> None:
        self._tmpdir: str | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"edgeagent-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
            self.path: Path | None = None
        else:
            if directory is None or len(str(directory / "notify.sock")) > _MAX_PATH:
                self._tmpdir = tempfile.mkdtemp(prefix="sdn-")
                directory = Path(self._tmpdir)
            self.path = directory / "notify.sock"
            self.sock.bind(str(self.path))
            self.env = str(self.path)
        self.received: list[Notification] = []

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                Path(self._tmpdir).rmdir()

    def receive(self, timeout: float) -> Notification | None:
        """The next datagram within `timeout` seconds (also kept in `received`), or None."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        notification = parse(data, time.monotonic())
        self.received.append(notification)
        return notification

    def drain(self, duration: float) -> list[Notification]:
        """Everything that arrives within `duration` seconds."""
        got = []
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            n = self.receive(left)
            if n is not None:
                got.append(n)
        return got

    def wait_for(
        self, predicate: Callable[[Notification], bool], timeout: float = 10.0
    ) -> Notification:
        """The first new datagram matching `predicate`; AssertionError listing what did
        arrive otherwise."""
        start = len(self.received)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            n = self.receive(left)
            if n is not None and predicate(n):
                return n
        seen = "\n  ".join(repr(n.raw) for n in self.received[start:][-20:])
        raise AssertionError(f"no matching notification within {timeout} s; got:\n  {seen}")
