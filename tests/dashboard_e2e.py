"""What the dashboard tests share: `edgeagent fleet dashboard` as a real subprocess against
a test broker, and small HTTP helpers that speak to it as a browser or a foreign page
would. Used by tests/test_dashboard.py and tests/test_dashboard_browser.py."""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.broker import Mosquitto

CLI = [sys.executable, "-m", "edgeagent.cli.main"]
_URL = re.compile(r"dashboard: (http://\S+/)")


class DashboardProcess:
    """`edgeagent fleet dashboard --listen 127.0.0.1:0` on `broker`; `url` once it serves."""

    def __init__(self, broker: Mosquitto, log: Path, *extra: str, timeout: float = 120) -> None:
        self.log = log
        self._err = log.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            [
                *CLI,
                "fleet",
                "dashboard",
                "--listen",
                "127.0.0.1:0",
                "--host",
                broker.host,
                "--port",
                str(broker.port),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        self.url = self._wait_url(timeout)

    def _wait_url(self, timeout: float) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                line = self.process.stdout.readline()
                found = _URL.search(line)
                if found:
                    return found.group(1)
            if self.process.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"the dashboard did not start: {self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(30)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            self._err.close()
        return code


@contextmanager
def running_dashboard(broker: Mosquitto, log: Path, *extra: str) -> Iterator[DashboardProcess]:
    dashboard = DashboardProcess(broker, log, *extra)
    try:
        yield dashboard
    finally:
        dashboard.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


def http(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed; (status, headers, body), errors included."""
    assert url.startswith("http://127.0.0.1:"), url  # the test's own loopback server
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    status, _, body = http(url, headers=headers)
    assert status == 200, (status, body)
    return json.loads(body)


def post_json(
    url: str, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    status, _, body = http(
        url,
        method="POST",
        body=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")
