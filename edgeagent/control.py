"""The local control socket: how `edgeagent status` asks the running daemon, even when
the broker is down.

A Unix stream socket (mode 0660, in the runtime directory). Each connection carries one
request line, `{"op": "status", "args": {...}}`, and gets one response line,
`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. A peer is served only
when its uid is root's or the agent's, or its gid is the agent's (checked with
SO_PEERCRED, not only the file mode). Malformed requests get an error, never a crash.

Each connection is served on its own short-lived thread (`edgeagent-control-client-N`),
at most `MAX_CLIENTS` at once, each given `READ_TIMEOUT_S` to send its request: a slow or
silent client holds only its own thread and cannot delay anyone else's `status`. A
connection beyond `MAX_CLIENTS` is answered at once with a `busy` error and closed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from edgeagent.errors import EdgeAgentError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES: Final = 64 * 1024
MAX_CLIENTS: Final = 8
"""Connections served at once; more are refused with a `busy` error."""
READ_TIMEOUT_S: Final = 5.0
"""How long a client has to send its request line (and to take the answer)."""
_STOP_WAIT_S = 5.0

Handler = Callable[[dict[str, Any]], Any]


class ControlServer:
    """Serves `handlers` by name on `path`: an accepting thread, and one thread per
    connection (at most `max_clients`), one request per connection."""

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        max_clients: int = MAX_CLIENTS,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self.path = path
        self._handlers = dict(handlers)
        self._max_clients = max_clients
        self._read_timeout_s = read_timeout_s
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._clients: dict[threading.Thread, socket.socket] = {}
        self._numbers = itertools.count(1)

    def start(self) -> None:
        """Binds the socket; a failure is logged (the agent runs on without it)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            if self.path.is_socket():
                self.path.unlink()  # left by a process that died; we own this path
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(self.path))
            self.path.chmod(0o660)
            sock.listen(16)
            sock.settimeout(0.5)
        except OSError as exc:
            log.error(
                "control socket %s unavailable (%s): `edgeagent status` will not reach this agent",
                self.path,
                exc.strerror or exc,
            )
            return
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="edgeagent-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops accepting, cuts the connections still open and waits (bounded) for their
        threads to end."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(_STOP_WAIT_S)
        if self._sock is not None:
            self._sock.close()
            self.path.unlink(missing_ok=True)
        with self._lock:
            clients = dict(self._clients)
        for conn in clients.values():
            with contextlib.suppress(OSError):  # closed meanwhile
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread waiting for a silent client
        deadline = time.monotonic() + _STOP_WAIT_S
        for thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                log.error("control socket: accept failed: %s", exc)
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            with self._lock:
                busy = len(self._clients) >= self._max_clients
                if not busy:
                    thread = threading.Thread(
                        target=self._serve_client,
                        args=(conn,),
                        name=f"edgeagent-control-client-{next(self._numbers)}",
                        daemon=True,
                    )
                    self._clients[thread] = conn
            if busy:
                self._refuse_busy(conn)
                continue
            try:
                thread.start()
            except RuntimeError as exc:  # the system is out of threads
                log.error("control socket: cannot start a thread for a client: %s", exc)
                with self._lock:
                    self._clients.pop(thread, None)
                self._refuse_busy(conn)

    def _refuse_busy(self, conn: socket.socket) -> None:
        """Answers `busy` at once and closes; the client's request is not read."""
        log.warning("control socket: busy (%d clients at most); refusing one", self._max_clients)
        with conn:
            conn.settimeout(0.5)
            error = f"busy: {self._max_clients} requests in progress; retry in a moment"
            try:
                conn.sendall(json.dumps({"ok": False, "error": error}).encode() + b"\n")
            except OSError as exc:
                log.debug("control socket: refused client went away: %s", exc)

    def _serve_client(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(self._read_timeout_s)
                try:
                    response = self._answer(conn)
                except Exception as exc:  # a failing operation must not stop the socket
                    log.exception("control socket: the request failed")
                    response = {"ok": False, "error": f"the agent failed: {exc!r}"}
                try:
                    conn.settimeout(self._read_timeout_s)  # a client that never reads
                    conn.sendall(json.dumps(response, default=str).encode() + b"\n")
                except OSError as exc:
                    log.debug("control socket: client went away: %s", exc)
        finally:
            with self._lock:
                self._clients.pop(threading.current_thread(), None)

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        if not _peer_allowed(conn):
            return {"ok": False, "error": "permission denied: run as root or the agent's user"}
        try:
            data = self._read_request(conn)
        except TimeoutError:
            return {
                "ok": False,
                "error": f"no complete request line within {self._read_timeout_s:g} s",
            }
        if len(data) > MAX_REQUEST_BYTES:
            return {"ok": False, "error": f"request over {MAX_REQUEST_BYTES} bytes"}
        try:
            request = json.loads(data)
        except ValueError as exc:
            return {"ok": False, "error": f"request is not JSON: {exc}"}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": 'a request is {"op": NAME, "args": {...}}'}
        args = request.get("args", {})
        handler = self._handlers.get(request["op"])
        if handler is None:
            return {"ok": False, "error": f"unknown op; known: {', '.join(sorted(self._handlers))}"}
        if not isinstance(args, dict):
            return {"ok": False, "error": "'args' must be an object"}
        try:
            return {"ok": True, "result": handler(args)}
        except (EdgeAgentError, KeyError, ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}

    def _read_request(self, conn: socket.socket) -> bytes:
        """The request line (or more than MAX_REQUEST_BYTES); TimeoutError when it does not
        arrive within one deadline, so a client trickling a byte at a time is no faster."""
        data = b""
        deadline = time.monotonic() + self._read_timeout_s
        while not data.endswith(b"\n") and len(data) <= MAX_REQUEST_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            conn.settimeout(remaining)
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def _peer_allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid()) or gid == os.getgid()


def ask(path: Path, op: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """Sends one request to the daemon's control socket; EdgeAgentError saying why not."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            # A busy server answers without reading: the answer is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise EdgeAgentError(
            f"no agent is running here (no control socket at {path}); "
            "start it with `systemctl start edgeagent` or `edgeagent run`"
        ) from None
    except PermissionError:
        raise EdgeAgentError(
            f"permission denied on {path}: run as root or the agent's user"
        ) from None
    except OSError as exc:
        raise EdgeAgentError(f"cannot reach the agent at {path}: {exc.strerror or exc}") from exc
    try:
        response = json.loads(data)
    except ValueError as exc:
        raise EdgeAgentError(f"the agent sent an unreadable answer: {exc}") from exc
    if not response.get("ok"):
        raise EdgeAgentError(f"the agent refused: {response.get('error')}")
    return response["result"]
