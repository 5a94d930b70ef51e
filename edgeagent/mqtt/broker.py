"""A real MQTT broker on loopback for `edgeagent demo`: mosquitto when it is installed,
otherwise amqtt running in-process (MQTT 3.1.1 only)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from edgeagent.errors import MissingDependencyError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def find_mosquitto() -> str | None:
    """The mosquitto binary (on PATH or where Debian puts it), or None."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )


def free_port() -> int:
    """A loopback port nothing listens on, below the kernel's ephemeral range when it can:
    a client that keeps connecting to an ephemeral-range port while nothing listens there
    can be given that very port as its own source port (a TCP self-connect), and then the
    broker started on it later cannot bind it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(50):
        port = rng.randrange(min(20000, low // 2), low) if low > 2048 else 0
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class LocalBroker:
    """Starts a broker bound to 127.0.0.1 only. `protocol` says what it speaks."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.kind: Literal["mosquitto", "amqtt"] = "mosquitto"
        self.protocol: Literal["5", "3.1.1"] = "5"
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._amqtt: Any = None

    def start(self) -> LocalBroker:
        binary = find_mosquitto()
        if binary:
            self._start_mosquitto(binary)
        else:
            self._start_amqtt()
        if not wait_listening(self.port, 10.0):
            self.stop()
            raise RuntimeError(f"the {self.kind} broker did not listen on {LOOPBACK}:{self.port}")
        log.info("%s broker on %s:%d (MQTT %s)", self.kind, LOOPBACK, self.port, self.protocol)
        return self

    def _start_mosquitto(self, binary: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeagent-broker-")
        conf = Path(self._tmp.name) / "mosquitto.conf"
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "allow_anonymous true",
            "persistence false",
            # The default (1000) silently drops messages to a slow subscriber.
            "max_queued_messages 100000",
            f"log_dest file {Path(self._tmp.name) / 'mosquitto.log'}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # as root, mosquitto drops to 'mosquitto' and loses its log
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        # Its own session: Ctrl-C reaches the demo, which stops the agent first and the
        # broker last, so the view still sees the agent go offline.
        self._process = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.kind, self.protocol = "mosquitto", "5"

    def _start_amqtt(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise MissingDependencyError(
                "an MQTT broker for the demo",
                "install mosquitto (sudo apt install mosquitto) or pip install 'edgeagent[demo]'",
            ) from exc
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)

            async def boot() -> None:
                self._amqtt = Broker(config, loop=self._loop)
                await self._amqtt.start()

            self._loop.run_until_complete(boot())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
        self._thread.start()
        started.wait(10.0)
        self.kind, self.protocol = "amqtt", "3.1.1"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._loop is not None and self._amqtt is not None:
            asyncio.run_coroutine_threadsafe(self._amqtt.shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop.close()
            self._loop = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
