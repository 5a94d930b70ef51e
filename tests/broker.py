"""A real mosquitto on loopback for tests and bench scripts, and a subscriber that collects.

`Mosquitto` runs one broker process with a generated config (anonymous, password file or
TLS listener) and can be stopped and started again on the same port for outage tests.
`MqttReader` subscribes with its own paho client and lets a test wait for messages.
`Dashboard` plays the fleet: sends commands to a device and collects the replies.
`body` and `all_running` read what a device publishes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.config import MqttConfig, TlsConfig
from edgeagent.mqtt.broker import LOOPBACK, find_mosquitto, free_port
from edgeagent.mqtt.client import make_client
from tests.waiting import wait_until

__all__ = ["LOOPBACK", "find_mosquitto", "free_port"]  # re-exported for the tests

# --- TLS material ----------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""

    ca_file: Path
    server_cert: Path
    server_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_tls_files(directory: Path) -> TlsFiles:
    """Generates a CA and a server certificate it signed, valid for a day, into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeagent test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca_file=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
    )
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(files.server_key, server_key)
    return files


# --- the broker ------------------------------------------------------------------------


class BrokerError(RuntimeError):
    """mosquitto did not start; the message carries its log."""


class Mosquitto:
    """One mosquitto process on 127.0.0.1. `start()` picks a free port the first time and
    reuses it on every restart; `stop()` ends the process (clients see the connection drop).
    """

    host = LOOPBACK

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str,
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        tls: bool = False,
        persistence: bool = False,
    ) -> None:
        self.workdir = workdir
        # With persistence, sessions and their queued messages survive a restart (saved on
        # SIGTERM), as on a production broker.
        self.persistence = persistence
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.port = port or 0
        self._fixed_port = port is not None
        self.users = dict(users or {})
        self.tls = make_tls_files(workdir / "tls") if tls else None
        self.log_file = workdir / "mosquitto.log"
        self._stderr_file = workdir / "mosquitto.stderr"
        self._proc: subprocess.Popen[bytes] | None = None
        if self.users:
            self._write_password_file()

    def __repr__(self) -> str:
        return f"Mosquitto({self.host}:{self.port}, running={self.running})"

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _write_password_file(self) -> None:
        passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        path = self.workdir / "passwd"
        for i, (user, password) in enumerate(self.users.items()):
            create = ["-c"] if i == 0 else []
            subprocess.run(
                [passwd, *create, "-b", str(path), user, password],
                check=True,
                capture_output=True,
                timeout=10,
            )

    def _config_text(self) -> str:
        lines = [
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # The defaults (1000 queued, 20 in flight) drop messages to slow subscribers.
            "max_queued_messages 100000",
            "max_inflight_messages 0",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto' and cannot log
        if self.users:
            lines += ["allow_anonymous false", f"password_file {self.workdir / 'passwd'}"]
        else:
            lines.append("allow_anonymous true")
        lines.append(f"listener {self.port} {LOOPBACK}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> None:
        """Starts the broker and waits until it accepts TCP connections."""
        if self.running:
            return
        attempts = 1 if self._fixed_port or self.port else 5
        for attempt in range(attempts):
            if not self._fixed_port and not self.port:
                self.port = free_port()
            if self._spawn(timeout):
                return
            if attempt + 1 < attempts and "in use" in self.log_text():
                self.port = 0  # someone took the port between bind and start: pick another
                continue
            break
        raise BrokerError(f"mosquitto did not start on {self.host}:{self.port}:\n{self.log_text()}")

    def _spawn(self, timeout: float) -> bool:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self._config_text(), encoding="utf-8")
        with self._stderr_file.open("ab") as stderr:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            with contextlib.suppress(OSError):
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the broker (SIGTERM, then SIGKILL) and reaps it; a no-op when stopped."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def log_text(self) -> str:
        """The broker's log file and anything it wrote to stderr."""
        parts = [
            p.read_text(errors="replace") for p in (self.log_file, self._stderr_file) if p.exists()
        ]
        return "".join(parts)

    def mqtt_config(
        self, *, username: str | None = None, password: str | None = None, **overrides: Any
    ) -> MqttConfig:
        """An `MqttConfig` for this broker with fast reconnects (0.1-0.5 s). With `username`,
        its password (from `users` unless given) is written to a password file with a
        trailing newline, as an editor would leave it."""
        values: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
            "keepalive": 5,
        }
        if self.tls is not None:
            values["tls"] = TlsConfig(ca_file=self.tls.ca_file)
        if username is not None:
            secret = password if password is not None else self.users[username]
            path = self.workdir / f"{username}-{len(list(self.workdir.glob('*.secret')))}.secret"
            path.write_text(secret + "\n", encoding="utf-8")
            values.update(username=username, password_file=path)
        values.update(overrides)
        return MqttConfig(**values)


# What the `mosquitto_factory` fixture (conftest.py) yields: start(users=, tls=, port=, ...).
MosquittoFactory = Callable[..., Mosquitto]


# --- a subscriber that collects --------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


def body(message: Received) -> dict[str, Any]:
    """A message's JSON payload (an object)."""
    data: dict[str, Any] = json.loads(message.payload)
    return data


def result_seqs(messages: list[Received], topic: str) -> dict[str, set[int]]:
    """The `seq` numbers of the results on `topic`, per agent run (duplicates counted once)."""
    runs: dict[str, set[int]] = {}
    for message in messages:
        if message.topic == topic:
            result = body(message)
            runs.setdefault(result["run"], set()).add(result["seq"])
    return runs


def all_running(root: str) -> Callable[[Received], bool]:
    """Matches the `online` status of the device at `root` once every pipeline runs."""

    def running(message: Received) -> bool:
        if message.topic != f"{root}/status":
            return False
        status = body(message)
        return status["state"] == "online" and all(
            p["state"] == "running" for p in status["pipelines"]
        )

    return running


OnMessage = Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]


def subscriber(
    broker: Mosquitto,
    filters: Sequence[tuple[str, int]],
    on_message: OnMessage,
    *,
    client_id: str,
    session_expiry_s: int | None = None,
    timeout: float = 10.0,
    **settings: Any,
) -> mqtt.Client:
    """A running client (`make_client` with `broker.mqtt_config(**settings)`) that
    subscribes to `filters` on every connect and hands each message to `on_message` (on
    paho's thread); returns once the broker acknowledged the first subscription,
    TimeoutError otherwise. Stop it with `disconnect()` and `loop_stop()`."""
    subscribed = threading.Event()
    client = make_client(
        broker.mqtt_config(**settings), client_id=client_id, session_expiry_s=session_expiry_s
    )
    client.on_message = on_message
    client.on_subscribe = lambda *_args: subscribed.set()
    client.on_connect = lambda c, *_args: c.subscribe(list(filters))
    client.reconnect()
    client.loop_start()
    if not subscribed.wait(timeout):
        client.disconnect()
        client.loop_stop()
        raise TimeoutError(f"could not subscribe to {[f for f, _ in filters]} on {broker}")
    return client


def durable_subscriber(
    broker: Mosquitto, topic_filter: str, on_message: OnMessage, *, client_id: str
) -> mqtt.Client:
    """A QoS 1 `subscriber` whose session the broker keeps while it is away (MQTT 3.1.1,
    clean session off) and that reconnects within 0.2 s: a results consumer that must
    miss nothing across a broker outage (the outbox tests and bench)."""
    return subscriber(
        broker,
        [(topic_filter, 1)],
        on_message,
        client_id=client_id,
        session_expiry_s=3600,
        protocol="3.1.1",
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
    )


class MqttReader:
    """A paho client subscribed to `topic_filter` that keeps every message it receives.
    Construction returns once the broker has acknowledged the subscription."""

    def __init__(
        self,
        broker: Mosquitto,
        topic_filter: str,
        *,
        protocol: str = "5",
        qos: int = 1,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        session: str | None = None,
    ) -> None:
        """`session`: a client id whose session the broker keeps while the reader is away
        (clean session off), so it queues what is published meanwhile."""
        self._lock = threading.Condition()
        self._messages: list[Received] = []
        self._client = subscriber(
            broker,
            [(topic_filter, qos)],
            self._on_message,
            client_id=session or f"test-reader-{id(self):x}",
            session_expiry_s=None if session is None else 3600,
            timeout=timeout,
            username=username,
            password=password,
            protocol=protocol,
        )

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props: dict[str, Any] = {}
        paho_props = getattr(msg, "properties", None)
        for name in ("ResponseTopic", "CorrelationData", "MessageExpiryInterval", "UserProperty"):
            if paho_props is not None and hasattr(paho_props, name):
                props[name] = getattr(paho_props, name)
        received = Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), props)
        with self._lock:
            self._messages.append(received)
            self._lock.notify_all()

    @property
    def messages(self) -> list[Received]:
        """A snapshot of every message received so far, in arrival order."""
        with self._lock:
            return list(self._messages)

    def wait_for(
        self, predicate: Callable[[Received], bool] = lambda _m: True, timeout: float = 10.0
    ) -> Received:
        """The first message matching `predicate`; AssertionError listing what did arrive if
        none does within `timeout` seconds."""
        return self.wait_for_count(1, predicate, timeout)[0]

    def wait_for_count(
        self,
        count: int,
        predicate: Callable[[Received], bool] = lambda _m: True,
        timeout: float = 10.0,
    ) -> list[Received]:
        """The first `count` messages matching `predicate`, waiting up to `timeout` seconds."""
        with self._lock:
            ok = self._lock.wait_for(
                lambda: sum(1 for m in self._messages if predicate(m)) >= count, timeout
            )
            matching = [m for m in self._messages if predicate(m)]
            if not ok:
                seen = "\n  ".join(f"{m.topic} {m.payload[:80]!r}" for m in self._messages[-20:])
                raise AssertionError(
                    f"{len(matching)} of {count} expected messages within {timeout} s; "
                    f"{len(self._messages)} received, the last:\n  {seen}"
                )
            return matching[:count]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Publisher:
    """An MQTT 5 client that publishes and waits for each message to be sent and (QoS 1)
    acknowledged, as the fleet side does; `close()` disconnects."""

    def __init__(self, broker: Mosquitto, *, client_id: str | None = None, **settings: Any) -> None:
        """`settings` go to `broker.mqtt_config` (a `username`, say)."""
        self.broker = broker
        self._client = make_client(
            broker.mqtt_config(**settings),
            client_id=client_id or f"test-publisher-{time.monotonic_ns():x}",
        )
        self._client.reconnect()
        self._client.loop_start()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = True,
        properties: Mapping[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> None:
        """`properties` uses paho's names (ResponseTopic, CorrelationData...); TimeoutError
        when the broker did not acknowledge within `timeout` seconds."""
        props = None
        if properties:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            for name, value in properties.items():
                setattr(props, name, value)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic} on {self.broker} was not acknowledged")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def publish_once(
    broker: Mosquitto,
    topic: str,
    payload: bytes,
    *,
    qos: int = 1,
    retain: bool = False,
    properties: Mapping[str, Any] | None = None,
    timeout: float = 10.0,
    **settings: Any,
) -> None:
    """Publishes one message from a fresh `Publisher` (`settings` as for it) and returns
    once it was sent and (QoS 1) acknowledged."""
    publisher = Publisher(broker, **settings)
    try:
        publisher.publish(
            topic, payload, qos=qos, retain=retain, properties=properties, timeout=timeout
        )
    finally:
        publisher.close()


class Dashboard:
    """A fleet dashboard: sends commands, collects replies by request id."""

    def __init__(self, broker: Mosquitto, protocol: str, root: str = "edgeagent/cp") -> None:
        self.protocol = protocol
        self.root = root  # the device's topic root: <prefix>/<device id>
        self.response_topic = f"dashboard/{uuid.uuid4().hex[:8]}/replies"
        self._cond = threading.Condition()
        self.replies: list[Received] = []
        # `X/#` matches X itself too: one filter each, or replies arrive twice.
        filters = [(f"{self.root}/reply/#", 1), (f"{self.response_topic}/#", 1)]
        self._client = subscriber(
            broker,
            filters,
            self._on_message,
            client_id=f"dashboard-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        props = {}
        if getattr(message, "properties", None) is not None and hasattr(
            message.properties, "CorrelationData"
        ):
            props["CorrelationData"] = message.properties.CorrelationData
        with self._cond:
            self.replies.append(
                Received(message.topic, bytes(message.payload), message.qos, message.retain, props)
            )
            self._cond.notify_all()

    def send(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        raw: bytes | None = None,
    ) -> str:
        request_id = request_id or uuid.uuid4().hex
        payload = (
            raw if raw is not None else json.dumps({"id": request_id, "args": args or {}}).encode()
        )
        properties = None
        if self.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = self.response_topic
            properties.CorrelationData = request_id.encode()
        self._client.publish(f"{self.root}/cmd/{name}", payload, qos=1, properties=properties)
        return request_id

    def json_replies(self, request_id: str | None) -> list[dict[str, Any]]:
        out = []
        with self._cond:
            messages = list(self.replies)
        for message in messages:
            try:
                body = json.loads(message.payload)
            except ValueError:
                continue
            if isinstance(body, dict) and body.get("id") == request_id and "stage" in body:
                out.append(body)
        return out

    def terminal_replies(self, request_id: str | None) -> list[dict[str, Any]]:
        return [r for r in self.json_replies(request_id) if r["stage"] in ("succeeded", "failed")]

    def wait_terminal(self, request_id: str | None, timeout: float = 60) -> dict[str, Any]:
        terminal = wait_until(
            lambda: self.terminal_replies(request_id),
            timeout,
            lambda: f"a terminal reply to {request_id}; got {self.json_replies(request_id)}",
        )
        return terminal[0]

    def call(
        self, name: str, args: dict[str, Any] | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        return self.wait_terminal(self.send(name, args), timeout)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
