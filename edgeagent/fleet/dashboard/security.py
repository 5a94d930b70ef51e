"""Who may use the dashboard, and which requests a foreign web page cannot forge.

The contract (docs/dashboard.md "Security"):

- Listening on a loopback address needs no login; any other address is refused unless a
  token file is given (`--token-file`; the token is the file's first line, at least 16
  characters). With a token, every page, API call and WebSocket needs a session: `POST
  /login` with the token sets an `HttpOnly`, `SameSite=Strict` session cookie (random,
  kept in memory only, `SESSION_TTL_S`).
- Every state-changing request (POST) needs the header `X-CSRF-Token` with the token the
  page got from `GET /api/session` (per session with a login, per server without), and an
  `Origin`, when the browser sends one, equal to the dashboard's own. A foreign page can
  neither read that token nor set the header on a cross-site request without a CORS
  preflight, which the dashboard never grants. The WebSocket checks `Origin` the same way.
- API calls and the WebSocket refuse a browser's cross-site request (`Sec-Fetch-Site`),
  so a foreign `<img>` cannot make the dashboard ask devices for snapshots; every
  response forbids framing (`X-Frame-Options`, CSP `frame-ancestors 'none'`) against
  clickjacking, and the page's CSP allows only its own scripts and connections.
- On loopback the `Host` header must name the loopback address the dashboard serves, so
  a DNS-rebinding page (a foreign name resolving to 127.0.0.1) gets nothing. Beyond
  loopback `Origin` is compared with the `Host` the browser asked for (the dashboard may
  be reached by several names); the login, always on there, keeps rebinding pages out.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from edgeagent.errors import ConfigError

SESSION_COOKIE: Final = "edgeagent_session"
CSRF_HEADER: Final = "X-CSRF-Token"
SESSION_TTL_S: Final = 12 * 3600.0
MAX_SESSIONS: Final = 1000
MIN_TOKEN_CHARS: Final = 16
OPEN_PATHS: Final = frozenset({"/login", "/static/login.css"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PAGE_HEADERS: Final = {
    # No foreign page may frame the dashboard and trick a click on a command.
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make Origin "null"
}


def is_loopback(host: str) -> bool:
    """Whether a listen host is a loopback address (`localhost` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: Path) -> str:
    """The token in `path`; ConfigError naming the file when unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read the dashboard token file {path}: {why}") from exc
    token = text.splitlines()[0].strip() if text.strip() else ""
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"the dashboard token in {path} has {len(token)} characters; use at least "
            f"{MIN_TOKEN_CHARS} random ones (e.g. `openssl rand -hex 24 > {path}`)"
        )
    return token


def check_listen(host: str, token: str | None) -> None:
    """ConfigError when the dashboard would listen beyond loopback without a token."""
    if not is_loopback(host) and token is None:
        raise ConfigError(
            f"refusing to serve the dashboard on {host} without authentication: anyone who "
            "can reach that address could command the fleet. Give --token-file FILE (a "
            "secret of at least 16 characters), or listen on 127.0.0.1 and reach it through "
            "an SSH tunnel"
        )


class Guard:
    """Sessions, CSRF tokens and the origin checks of the module doc."""

    def __init__(self, token: str | None, *, loopback: bool) -> None:
        self.token = token
        self.loopback = loopback
        self.allowed_hosts: set[str] = set()  # filled in once the port is known
        self._server_csrf = secrets.token_urlsafe(24)
        self._sessions: dict[str, tuple[float, str]] = {}  # id -> (expiry, csrf)

    def serve_on(self, host: str, port: int) -> None:
        """Records the address the dashboard serves, for the Host and Origin checks."""
        names = {host}
        if is_loopback(host):
            names |= {"127.0.0.1", "localhost", "[::1]"}
        self.allowed_hosts = {f"{name}:{port}" for name in names}

    # --- sessions ------------------------------------------------------------------------

    def login(self, offered: str) -> str | None:
        """A new session id when `offered` is the token; None otherwise."""
        if self.token is None or not hmac.compare_digest(offered.encode(), self.token.encode()):
            return None
        now = time.monotonic()
        self._sessions = {k: v for k, v in self._sessions.items() if v[0] > now}
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        session = secrets.token_urlsafe(32)
        self._sessions[session] = (now + SESSION_TTL_S, secrets.token_urlsafe(24))
        return session

    def logout(self, request: web.Request) -> None:
        self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)

    def csrf(self, request: web.Request) -> str | None:
        """The CSRF token of the request's session (or of the server without a login);
        None when the request has no valid session."""
        if self.token is None:
            return self._server_csrf
        found = self._sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if found is None or found[0] <= time.monotonic():
            return None
        return found[1]

    # --- checks --------------------------------------------------------------------------

    def same_origin(self, request: web.Request) -> bool:
        """False when the browser says the request comes from another origin."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser's cross-site request (those always carry Origin)
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc in self._hosts(request)

    def _hosts(self, request: web.Request) -> set[str]:
        """The `host:port` a same-origin request names. On loopback: the address served.
        Elsewhere (often a wildcard like 0.0.0.0, reached by any of the machine's names)
        the Host the browser asked for: a foreign page's request names its own origin
        there, and a DNS-rebinding page, whose origin would match, has no session cookie
        for that name, and the login is always on beyond loopback."""
        if self.loopback and self.allowed_hosts:
            return self.allowed_hosts
        return {request.host}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await self._checked(request, handler)
        except web.HTTPException as exc:
            exc.headers.update(PAGE_HEADERS)
            raise
        response.headers.update(PAGE_HEADERS)
        return response

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.loopback and request.host not in self._hosts(request):
            raise web.HTTPMisdirectedRequest(
                text=f"this dashboard answers only as {sorted(self._hosts(request))}\n"
            )
        site = request.headers.get("Sec-Fetch-Site", "same-origin")
        if request.path.startswith(("/api/", "/ws")) and site not in ("same-origin", "none"):
            # A foreign page's <img src=/api/live/...> would ask the device for snapshots.
            raise web.HTTPForbidden(text=f"{site} request refused\n")
        if request.path not in OPEN_PATHS and self.csrf(request) is None:
            if request.path.startswith(("/api/", "/ws")):
                raise web.HTTPUnauthorized(text="log in first: POST /login with the token\n")
            raise web.HTTPSeeOther("/login")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            if not self.same_origin(request):
                raise web.HTTPForbidden(text="cross-origin request refused\n")
            if request.path != "/login":
                expected = self.csrf(request) or ""
                offered = request.headers.get(CSRF_HEADER, "")
                if not hmac.compare_digest(offered.encode(), expected.encode()):
                    raise web.HTTPForbidden(
                        text=f"missing or wrong {CSRF_HEADER} header: reload the page\n"
                    )
        return await handler(request)


__all__ = [
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "Guard",
    "check_listen",
    "is_loopback",
    "read_token",
]
