"""The local control socket: how `edgeagent status` asks the running daemon, even when
the broker is down.

A Unix stream socket (mode 0660, in the runtime directory). Each connection carries one
request line, `{"op": "status", "args": {...}}`, and gets one response line,
`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. A peer is served only
when its uid is root's or the agent's, or its gid is the agent's (checked with
SO_PEERCRED, not only the file mode). Malformed requests get an error, never a crash.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgeagent.errors import EdgeAgentError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
_TIMEOUT_S = 5.0

Handler = Callable[[dict[str, Any]], Any]


class ControlServer:
    """Serves `handlers` by name on `path`, one thread, one request per connection."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self._handlers = dict(handlers)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Binds the socket; a failure is logged (the agent runs on without it)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            if self.path.is_socket():
                self.path.unlink()  # left by a process that died; we own this path
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(self.path))
            self.path.chmod(0o660)
            sock.listen(8)
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
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._sock is not None:
            self._sock.close()
            self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                log.error("control socket: accept failed: %s", exc)
                continue
            with conn:
                conn.settimeout(_TIMEOUT_S)
                try:
                    response = self._answer(conn)
                except Exception as exc:  # a failing operation must not stop the socket
                    log.exception("control socket: the request failed")
                    response = {"ok": False, "error": f"the agent failed: {exc!r}"}
                try:
                    conn.sendall(json.dumps(response, default=str).encode() + b"\n")
                except OSError as exc:
                    log.debug("control socket: client went away: %s", exc)

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        if not _peer_allowed(conn):
            return {"ok": False, "error": "permission denied: run as root or the agent's user"}
        data = b""
        while not data.endswith(b"\n") and len(data) <= MAX_REQUEST_BYTES:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
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
