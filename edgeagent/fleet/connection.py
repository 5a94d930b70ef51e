"""A short-lived MQTT connection for fleet tools (`edgeagent model publish`, `fleet deploy`,
`fleet watch`): connect, publish and wait for the acknowledgements, read a retained
message, follow topics, disconnect.

Unlike `MqttLink` it does not reconnect: a fleet command that loses the broker fails with a
message saying so, and the operator runs it again (every publish is retained and
idempotent). Threads: paho's network thread, started by `connect()` and joined by
`close()`. Its callbacks only record acknowledgements under a lock or put a received
message into a bounded queue (messages arriving while the queue is full are dropped and
counted; the reader is a person's terminal, so 10,000 are plenty).
"""

from __future__ import annotations

import logging
import os
import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import paho.mqtt.client as mqtt

from edgeagent.config import MqttConfig
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.mqtt.client import make_client

log = logging.getLogger(__name__)

QUEUE_SIZE: Final = 10_000
BROKER_MESSAGE_CAP: Final = 128 * 1024
"""The largest MQTT message a fleet broker is assumed to accept (a design bound: a broker's
`message_size_limit`, if set, must be at least this); chunks and manifests fit under it."""


class BrokerError(EdgeAgentError):
    """The broker could not be reached, refused us, or did not acknowledge in time."""


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


class FleetConnection:
    """One MQTT connection for the length of one fleet command; a context manager."""

    def __init__(self, config: MqttConfig, *, name: str = "fleet") -> None:
        """Raises ConfigError for an unreadable password file or TLS files."""
        self._config = config
        self._client = make_client(
            config, client_id=f"edgeagent-{name}-{os.getpid()}-{os.urandom(3).hex()}"
        )
        self._lock = threading.Condition()
        self._connect_result: str | None = None  # None: waiting; "" ok; else why not
        self._disconnected: str | None = None
        self._acked: dict[int, str | None] = {}  # mid -> None (ok) or a refusal reason
        self._subacks: set[int] = set()
        self.messages: queue.Queue[Message] = queue.Queue(QUEUE_SIZE)
        self.dropped = 0
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._started = False

    @property
    def where(self) -> str:
        return f"{self._config.host}:{self._config.port}"

    # --- paho callbacks (network thread): record and notify only -------------------------

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._lock:
            self._connect_result = str(reason) if reason.is_failure else ""
            self._lock.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._lock:
            self._disconnected = str(reason)
            if self._connect_result is None:
                self._connect_result = str(reason)
            self._lock.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            self._acked[mid] = str(reason) if reason.is_failure else None
            self._lock.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        with self._lock:
            self._subacks.add(mid)
            self._lock.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.messages.put_nowait(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("more than %d MQTT messages waiting; dropping new ones", QUEUE_SIZE)

    # --- the caller's side ---------------------------------------------------------------

    def __enter__(self) -> FleetConnection:
        self.connect()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self, timeout: float = 10.0) -> None:
        """Connects and waits for the broker's CONNACK; BrokerError saying why not."""
        try:
            self._client.reconnect()  # the first connect: make_client recorded where to
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(
                f"cannot reach the MQTT broker at {self.where}: {exc}: check --host, --port "
                "and --tls-ca, and that the broker is running"
            ) from exc
        self._client.loop_start()
        self._started = True
        with self._lock:
            self._lock.wait_for(lambda: self._connect_result is not None, timeout)
            result = self._connect_result
        if result is None:
            self.close()
            raise BrokerError(
                f"the MQTT broker at {self.where} did not answer the connection within "
                f"{timeout:g} s: check that it is an MQTT port (and whether it needs --tls-ca)"
            )
        if result:
            self.close()
            raise BrokerError(
                f"the MQTT broker at {self.where} refused the connection: {result}: check "
                "--username and --password-file, and the broker's ACL for this user"
            )

    def close(self) -> None:
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False

    def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> int:
        """Queues one message; returns its message id for `wait_acked`."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(
                f"cannot publish to {topic}: {mqtt.error_string(info.rc)} (the connection to "
                f"{self.where} was lost?): run the command again"
            )
        return int(info.mid)

    def wait_acked(
        self,
        mids: Iterable[int],
        *,
        stall_timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Waits until the broker acknowledged every message in `mids`. BrokerError when
        it refuses one, when the connection drops, or when no new acknowledgement arrives
        for `stall_timeout` seconds."""
        pending = set(mids)
        total = len(pending)

        def news() -> bool:
            return bool(pending & self._acked.keys()) or bool(self._disconnected)

        while True:
            with self._lock:
                arrived = self._lock.wait_for(news, stall_timeout)
                done = pending & self._acked.keys()
                refused = [(mid, self._acked[mid]) for mid in done if self._acked[mid]]
                pending -= done
                disconnected = self._disconnected
            if refused:
                raise BrokerError(
                    f"the MQTT broker at {self.where} refused a message: {refused[0][1]}: "
                    "check the broker's ACL for this user and its message_size_limit"
                )
            if progress is not None and done:
                progress(total - len(pending))
            if not pending:
                return
            if disconnected:
                raise BrokerError(
                    f"lost the connection to the MQTT broker at {self.where} ({disconnected}) "
                    f"with {len(pending)} message(s) unacknowledged: run the command again"
                )
            if not arrived:
                raise BrokerError(
                    f"the MQTT broker at {self.where} acknowledged nothing for "
                    f"{stall_timeout:g} s ({len(pending)} of {total} message(s) pending): "
                    "check the link, or raise --timeout"
                )

    def subscribe(self, filters: Iterable[str], timeout: float = 10.0) -> None:
        """Subscribes (QoS 1) and waits for the SUBACK; received messages go to `messages`."""
        topics = [(f, 1) for f in filters]
        result, mid = self._client.subscribe(topics)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"cannot subscribe at {self.where}: {mqtt.error_string(result)}")
        self._wait_mid(mid, timeout, "subscription")

    def unsubscribe(self, topic: str, timeout: float = 10.0) -> None:
        result, mid = self._client.unsubscribe(topic)
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._wait_mid(mid, timeout, "unsubscription")

    def _wait_mid(self, mid: int, timeout: float, what: str) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._subacks, timeout):
                raise BrokerError(f"the MQTT broker at {self.where} did not confirm the {what}")

    def read_retained(self, topic: str, timeout: float) -> bytes | None:
        """The retained message on `topic`, or None when none arrives within `timeout`
        seconds of the subscription (a broker sends it right after the SUBACK)."""
        self.subscribe([topic])
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    message = self.messages.get(timeout=left)
                except queue.Empty:
                    return None
                if message.topic == topic and message.retain:
                    return message.payload
        finally:
            self.unsubscribe(topic)


def add_broker_options(parser: Any) -> None:
    """The broker options every fleet command takes."""
    group = parser.add_argument_group("broker")
    group.add_argument("--host", default="127.0.0.1", help="MQTT broker (default 127.0.0.1)")
    group.add_argument("--port", type=int, help="default 1883, or 8883 with --tls-ca")
    group.add_argument("--username", help="MQTT user name")
    group.add_argument(
        "--password-file", type=Path, help="file holding the MQTT password (never on argv)"
    )
    group.add_argument("--tls-ca", type=Path, help="use TLS, trusting this CA certificate (PEM)")
    group.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="default 5")
    group.add_argument("--prefix", default="edgeagent", help="topic prefix (default edgeagent)")


def broker_config(args: Any) -> MqttConfig:
    """An MqttConfig from the options of `add_broker_options`; ConfigError when invalid."""
    from pydantic import ValidationError

    from edgeagent.config import TlsConfig

    values: dict[str, Any] = {
        "host": args.host,
        "port": args.port or (8883 if args.tls_ca else 1883),
        "prefix": args.prefix,
        "protocol": args.protocol,
        "username": args.username,
        "password_file": args.password_file,
    }
    if args.tls_ca is not None:
        values["tls"] = TlsConfig(ca_file=args.tls_ca)
    try:
        return MqttConfig(**values)
    except ValidationError as exc:
        # The model's messages name its keys; here they are options.
        options = {"password_file": "--password-file", "username": "--username"}
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            for key, option in options.items():
                message = message.replace(key, option)
            where = ".".join(str(p) for p in error["loc"]).replace("_", "-")
            problems.append(f"--{where}: {message}")
        raise ConfigError(f"invalid broker options: {'; '.join(problems)}") from exc


__all__ = [
    "BROKER_MESSAGE_CAP",
    "BrokerError",
    "FleetConnection",
    "Message",
    "add_broker_options",
    "broker_config",
]
