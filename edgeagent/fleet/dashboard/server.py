"""`edgeagent fleet dashboard`'s web server (aiohttp): the pages, a JSON API, and one
WebSocket per browser tab that pushes what changed.

Concurrency: one asyncio event loop runs the HTTP server, the WebSockets and two tasks:
`edgeagent-dashboard-drain` moves received MQTT messages from the bridge's bounded queue
into `FleetState` every `DRAIN_INTERVAL_S`, and `edgeagent-dashboard-push` sends, at most
every `PUSH_INTERVAL_S`, the rows of the devices that changed (coalesced: a device that
published 50 messages in that time is one row) to every fleet page, and the device's new
telemetry, events and results to a tab watching that device. A tab that cannot keep up
(its send buffer above `WS_BACKLOG_BYTES`) is skipped for that round and sent the full
state once it drained, so one slow browser never holds the others back or grows memory.

Everything served is in `static/` in this package (no CDN, no build step). Routes:
`/` the single page (fleet, device, rollouts and events views), `/login`, `/api/session`,
`/api/fleet`, `/api/device/<id>`, `/api/live/<id>/<pipeline>` (a snapshot at most once a
second per pipeline, for the live view), `POST /api/command`, `POST /api/deploy`, `/ws`.
Security (who may do what) is `security.Guard`'s contract.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiohttp import WSMsgType, web

from edgeagent.config import MqttConfig
from edgeagent.delivery.signing import check_safe_id, check_version
from edgeagent.errors import EdgeAgentError
from edgeagent.fleet.dashboard.bridge import CommandError, FleetBridge, Reply
from edgeagent.fleet.dashboard.fleet_state import FleetState
from edgeagent.fleet.dashboard.security import (
    SESSION_COOKIE,
    SESSION_TTL_S,
    Guard,
    check_listen,
    is_loopback,
)
from edgeagent.fleet.rollout import who

log = logging.getLogger(__name__)

STATIC: Final = Path(__file__).resolve().parent / "static"
DRAIN_INTERVAL_S: Final = 0.05
PUSH_INTERVAL_S: Final = 0.3
WS_BACKLOG_BYTES: Final = 4 * 1024 * 1024
LIVE_MIN_INTERVAL_S: Final = 1.0
COMMANDS: Final = frozenset(
    {
        "ping",
        "status",
        "config.get",
        "logs",
        "snapshot",
        "pipeline.start",
        "pipeline.stop",
        "pipeline.restart",
        "model.rollback",
        "restart",
    }
)
"""What the page may send; `config.set` and `bench` stay with the command line."""
APP_KEY: Final = web.AppKey("dashboard", object)


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Tab:
    """One browser tab's WebSocket and what it has been sent."""

    socket: web.WebSocketResponse
    transport: asyncio.Transport | None
    watching: str | None = None
    serial: int = 0  # the watched device's last telemetry/event serial sent
    results: dict[str, int] = field(default_factory=dict)  # pipeline -> results seen, sent
    tracks: int = 0
    stale: bool = False  # skipped a round: send everything next time


@dataclass
class _Live:
    """The last live-view image of one pipeline, and when it was asked for."""

    asked: float = 0.0
    image: bytes | None = None
    content_type: str = "image/jpeg"
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)


class Dashboard:
    """The server: `await run(stop)` serves until `stop` is set."""

    def __init__(
        self,
        broker: MqttConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        token: str | None = None,
    ) -> None:
        """ConfigError when `host` is not loopback and there is no token."""
        check_listen(host, token)
        self.host, self.port = host, port
        self.state = FleetState(broker.prefix)
        self.bridge = FleetBridge(broker, self.state)
        self.guard = Guard(token, loopback=is_loopback(host))
        self.url: str | None = None
        self._tabs: set[_Tab] = set()
        self._live: dict[tuple[str, str], _Live] = {}
        self.app = self._make_app()

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard.middleware], client_max_size=64 * 1024)
        app[APP_KEY] = self
        app.add_routes(
            [
                web.get("/", self._index),
                web.get("/login", self._login_page),
                web.post("/login", self._login),
                web.post("/logout", self._logout),
                web.get("/api/session", self._session),
                web.get("/api/fleet", self._fleet),
                web.get("/api/device/{device}", self._device),
                web.get("/api/live/{device}/{pipeline}", self._live_image),
                web.post("/api/command", self._command),
                web.post("/api/deploy", self._deploy),
                web.get("/ws", self._socket),
                web.static("/static", STATIC, append_version=False),
            ]
        )
        return app

    # --- running -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready: Callable[[str], None] | None = None) -> None:
        """Serves until `stop` is set; calls `ready(url)` once listening. OSError when the
        address cannot be bound."""
        self.bridge.start()
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            listener = _listen(self.host, self.port)
            await web.SockSite(runner, listener).start()
            port = int(listener.getsockname()[1])
            self.guard.serve_on(self.host, port)
            shown = f"[{self.host}]" if ":" in self.host else self.host
            self.url = f"http://{shown}:{port}/"
            log.info("dashboard serving at %s", self.url)
            if ready is not None:
                ready(self.url)
            async with asyncio.TaskGroup() as tasks:
                drain = tasks.create_task(self._drain_forever(), name="edgeagent-dashboard-drain")
                push = tasks.create_task(self._push_forever(), name="edgeagent-dashboard-push")
                await stop.wait()
                drain.cancel()
                push.cancel()
        finally:
            for tab in list(self._tabs):
                await tab.socket.close()
            await runner.cleanup()
            self.bridge.stop()

    async def _drain_forever(self) -> None:
        while True:
            self.bridge.drain()
            await asyncio.sleep(DRAIN_INTERVAL_S)

    async def _push_forever(self) -> None:
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            try:
                await self._push_round()
            except Exception:  # a bug in one round must not end the pushes
                log.exception("dashboard: a push round failed; the next one sends everything")
                for tab in self._tabs:
                    tab.stale = True

    async def _push_round(self) -> None:
        dirty, fleet = self.state.take_dirty()
        if not self._tabs:
            return
        rows = self.state.rows(dirty) if dirty else []
        extra = self._fleet_extra() if fleet else None
        for tab in list(self._tabs):
            try:
                await self._push(tab, rows, extra, dirty)
            except (ConnectionError, RuntimeError):
                self._tabs.discard(tab)  # the tab went away

    def _fleet_extra(self) -> dict[str, Any]:
        return {
            "models": self.state.published_models(),
            "groups": self.state.group_names(),
        }

    async def _push(
        self, tab: _Tab, rows: list[dict[str, Any]], extra: dict[str, Any] | None, dirty: set[str]
    ) -> None:
        transport = tab.transport
        if transport is not None and transport.get_write_buffer_size() > WS_BACKLOG_BYTES:
            tab.stale = True
            return
        if tab.stale:
            tab.stale = False
            await tab.socket.send_str(json.dumps({"type": "fleet", **self.state.fleet_json()}))
            tab.tracks = self.state.tracks[-1]["serial"] if self.state.tracks else 0
        elif rows or extra:
            await tab.socket.send_str(json.dumps({"type": "rows", "rows": rows, **(extra or {})}))
        tracks = self.state.tracks_since(tab.tracks)
        if tracks:
            tab.tracks = tracks[-1]["serial"]
            await tab.socket.send_str(json.dumps({"type": "tracks", "tracks": tracks}))
        if tab.watching is not None and tab.watching in dirty:
            detail = self.state.detail(tab.watching, tab.serial)
            if detail is not None:
                tab.serial = detail["serial"]
                await tab.socket.send_str(json.dumps({"type": "device", **detail}))

    # --- pages and API -------------------------------------------------------------------

    async def _index(self, _request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers=_NO_STORE)

    async def _login_page(self, _request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "login.html", headers=_NO_STORE)

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        offered = form.get("token")
        session = self.guard.login(offered if isinstance(offered, str) else "")
        if session is None:
            await asyncio.sleep(0.5)  # slows guessing; the token is long anyway
            raise web.HTTPUnauthorized(text="wrong token\n")
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            SESSION_COOKIE,
            session,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            max_age=int(SESSION_TTL_S),
            path="/",
        )
        raise response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        self.guard.logout(request)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    async def _session(self, request: web.Request) -> web.StreamResponse:
        config = self.bridge.config
        return web.json_response(
            {
                "csrf": self.guard.csrf(request),
                "login": self.guard.token is not None,
                "prefix": self.state.prefix,
                "broker": self.bridge.where,
                "tls": config.tls is not None,
                "user": config.username,
                "connected": self.bridge.connected,
                "push_interval_s": PUSH_INTERVAL_S,
            },
            headers=_NO_STORE,
        )

    async def _fleet(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(self.state.fleet_json())

    async def _device(self, request: web.Request) -> web.StreamResponse:
        detail = self.state.detail(request.match_info["device"])
        if detail is None:
            raise web.HTTPNotFound(text="no such device has published anything\n")
        return web.json_response(detail)

    async def _live_image(self, request: web.Request) -> web.StreamResponse:
        """The pipeline's last frame with its result drawn (the `snapshot` command), asked
        for at most once every LIVE_MIN_INTERVAL_S whoever watches."""
        device, pipeline = request.match_info["device"], request.match_info["pipeline"]
        _check_names(self.state, device, pipeline)
        live = self._live.setdefault((device, pipeline), _Live())
        async with live.busy:
            if time.monotonic() - live.asked >= LIVE_MIN_INTERVAL_S:
                live.asked = time.monotonic()
                try:
                    reply = await self.bridge.command(
                        device, "snapshot", {"pipeline": pipeline, "quality": 70}, timeout=5.0
                    )
                except CommandError as exc:
                    if live.image is None:
                        raise web.HTTPServiceUnavailable(text=f"{exc}\n") from exc
                else:
                    if reply.image is not None:
                        live.image, live.content_type = reply.image, reply.content_type or ""
            if live.image is None:
                raise web.HTTPNotFound(text="no image yet\n")
            return web.Response(body=live.image, content_type=live.content_type, headers=_NO_STORE)

    async def _command(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        device, name = body.get("device"), body.get("command")
        args = body.get("args", {})
        if not isinstance(name, str) or name not in COMMANDS:
            raise web.HTTPBadRequest(text=f"command must be one of {sorted(COMMANDS)}\n")
        if not isinstance(device, str) or not isinstance(args, dict):
            raise web.HTTPBadRequest(text="give 'device' (a string) and 'args' (an object)\n")
        _check_names(self.state, device, args.get("pipeline"))
        log.info("dashboard: %s -> %s %s", _operator(request), device, name)
        try:
            reply = await self.bridge.command(device, name, args)
        except CommandError as exc:
            return web.json_response({"error": str(exc)}, status=504)
        return web.json_response(_reply_json(reply))

    async def _deploy(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        device, group = body.get("device"), body.get("group")
        if (device is None) == (group is None):
            raise web.HTTPBadRequest(text="give exactly one of 'device' and 'group'\n")
        try:
            pipeline = check_safe_id(str(body.get("pipeline", "")), "pipeline")
            target = None
            if not body.get("clear"):
                target = (
                    check_safe_id(str(body.get("model", "")), "name"),
                    check_version(str(body.get("version", ""))),
                )
            if device is not None:
                self.state.topics.desired(str(device))
            else:
                self.state.topics.group_desired(str(group))
        except (EdgeAgentError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from exc
        by = f"{_operator(request)} (dashboard)"
        log.info("dashboard: %s deploys %s to %s", by, target, device or f"group {group}")
        try:
            topic, state = await self.bridge.deploy(
                device=None if device is None else str(device),
                group=None if group is None else str(group),
                pipeline=pipeline,
                target=target,
                allow_downgrade=bool(body.get("allow_downgrade")),
                by=by,
            )
        except (CommandError, EdgeAgentError) as exc:
            return web.json_response({"error": str(exc)}, status=502)
        return web.json_response({"topic": topic, "desired": state})

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        if not self.guard.same_origin(request):
            raise web.HTTPForbidden(text="cross-origin WebSocket refused\n")
        socket_ = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4096)
        await socket_.prepare(request)
        transport = request.transport
        tab = _Tab(socket_, transport if isinstance(transport, asyncio.Transport) else None)
        self._tabs.add(tab)
        try:
            await socket_.send_str(json.dumps({"type": "fleet", **self.state.fleet_json()}))
            tab.tracks = self.state.tracks[-1]["serial"] if self.state.tracks else 0
            async for message in socket_:
                if message.type != WSMsgType.TEXT:
                    continue
                with contextlib.suppress(ValueError, AttributeError):
                    wanted = json.loads(message.data).get("watch")
                    tab.watching = wanted if isinstance(wanted, str) else None
                    detail = self.state.detail(tab.watching) if tab.watching else None
                    tab.serial = detail["serial"] if detail else 0
                    if detail is not None:
                        await socket_.send_str(json.dumps({"type": "device", **detail}))
        finally:
            self._tabs.discard(tab)
        return socket_


_NO_STORE: Final = {"Cache-Control": "no-store"}


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port); OSError when it cannot bind."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host.strip("[]"), port))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    return listener


def _check_names(state: FleetState, device: str, pipeline: Any) -> None:
    try:
        state.topics.device_root(device)
        if pipeline is not None:
            check_safe_id(str(pipeline), "pipeline")
    except (EdgeAgentError, ValueError) as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from exc


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"the body is not JSON: {exc}\n") from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object\n")
    return body


def _reply_json(reply: Reply) -> dict[str, Any]:
    out: dict[str, Any] = {"reply": reply.body}
    if reply.image is not None:
        encoded = base64.b64encode(reply.image).decode("ascii")
        out["image"] = f"data:{reply.content_type};base64,{encoded}"
    return out


def _operator(request: web.Request) -> str:
    return f"{who()} from {request.remote}"


class DashboardThread:
    """The dashboard on a thread of its own (`edgeagent-dashboard`), for `edgeagent demo`:
    `start()` returns its URL once it listens; `stop()` ends it."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="edgeagent-dashboard", daemon=True)

    def start(self, timeout: float = 15.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout) or self.dashboard.url is None:
            raise EdgeAgentError(f"the dashboard did not start: {self._error or 'timed out'}")
        return self.dashboard.url

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.dashboard.run(self._stop, lambda _url: self._ready.set())

        try:
            asyncio.run(main())
        except Exception as exc:  # noqa: BLE001 - reported by start() and logged
            self._error = exc
            log.error("the dashboard stopped: %s", exc)
        finally:
            self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)


__all__ = ["COMMANDS", "Dashboard", "DashboardThread"]
