"""One MQTT connection that outlives broker outages: `MqttLink` wraps one paho client made by
`edgeagent.mqtt.client.make_client`.

Threads (two, both started by `start()` and joined by `stop()`):

- paho's network thread ("paho-mqtt-client-<id>") runs the socket loop and every paho
  callback. Our callbacks only update state under a short lock, re-send subscriptions
  and hand work to the dispatcher; they never block, wait for an ack or run user code.
- the dispatcher ("edgeagent-mqtt-dispatch") runs the user's `on_connected` and
  `on_message` in arrival order. Its inbox holds at most `INBOX_SIZE` messages; when it
  is full, newly arriving messages are dropped, counted (`dropped_messages`) and logged,
  because blocking would stall the network thread. A pending `on_connected` is never
  dropped (repeated connects before it ran are coalesced into one call).

Errors say what went wrong and what to do: `last_error` (shown by `edgeagent status`)
names a TLS client talking to a plain listener, a plain client talking to a TLS one, an
untrusted certificate, a refused connection or refused credentials, with the config key
to change (`explain_connect_error`).

Publishing never blocks. QoS 1 messages are kept by paho in memory (unbounded) while the
broker is away and are re-sent after the reconnect; `PublishTicket.acked` is set when
the broker acknowledges one.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent.mqtt.backoff import ReconnectBackoff
from edgeagent.mqtt.client import (
    Will,
    agent_client_id,
    explain_connect_error,
    explain_early_close,
    make_client,
)
from edgeagent.mqtt.topics import Topics

if TYPE_CHECKING:
    from edgeagent.config import MqttConfig

log = logging.getLogger(__name__)

INBOX_SIZE: Final = 1000
"""Received messages waiting for the dispatcher before new ones are dropped."""

# Our names for the MQTT 5 message properties, in `on_message` and in `publish()`.
_PROPERTY_NAMES: Final = {
    "response_topic": "ResponseTopic",
    "correlation_data": "CorrelationData",
    "message_expiry_interval": "MessageExpiryInterval",
    "content_type": "ContentType",
    "user_properties": "UserProperty",
}
# CONNACK reason codes that mean the credentials are wrong or not allowed.
_AUTH_REFUSALS: Final = frozenset({0x86, 0x87})
_MISSING: Final[Any] = object()  # a sentinel: "no early ack recorded"

OnConnected = Callable[[], None]
OnMessage = Callable[[str, bytes, dict[str, Any]], None]


class PublishTicket:
    """What became of one `MqttLink.publish`. `acked` is set when the broker acknowledged
    a QoS 1 message; a QoS 0 message has no acknowledgement, so its ticket is set as soon
    as paho takes it while connected. `failure` says why a message was refused."""

    __slots__ = ("_failure", "acked", "mid", "qos", "topic")

    def __init__(self, topic: str, qos: int, mid: int) -> None:
        self.topic = topic
        self.qos = qos
        self.mid = mid
        self.acked = threading.Event()
        self._failure: str | None = None

    def __repr__(self) -> str:
        state = "acked" if self.acked.is_set() else "pending"
        if self._failure:
            state = f"failed: {self._failure}"
        return f"PublishTicket(mid={self.mid}, topic={self.topic!r}, qos={self.qos}, {state})"

    @property
    def failure(self) -> str | None:
        """None, or why the broker refused the message (an MQTT 5 PUBACK reason) or why
        it was never sent (a QoS 0 message while disconnected)."""
        return self._failure

    @property
    def ok(self) -> bool:
        """True once the message was delivered to the broker without a refusal."""
        return self.acked.is_set() and self._failure is None

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until acknowledged; True if it was within `timeout` seconds."""
        return self.acked.wait(timeout)

    def _resolve(self, failure: str | None) -> None:
        self._failure = failure
        self.acked.set()


class _Dispatcher:
    """Runs user callbacks on its own thread, fed without blocking by paho's callbacks."""

    def __init__(self, on_connected: OnConnected | None, on_message: OnMessage | None) -> None:
        self._on_connected = on_connected
        self._on_message = on_message
        self._cond = threading.Condition()
        self._messages: collections.deque[tuple[str, bytes, dict[str, Any]]] = collections.deque()
        self._connected_pending = False
        self._closing = False
        self._dropping = 0
        self.dropped = 0
        self._thread = threading.Thread(
            target=self._run, name="edgeagent-mqtt-dispatch", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            left = len(self._messages)
            self._cond.notify_all()
        if left:
            log.info("discarding %d received MQTT messages not yet handled at stop", left)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def connected(self) -> None:
        if self._on_connected is None:
            return
        with self._cond:
            self._connected_pending = True
            self._cond.notify()

    def message(self, topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        if self._on_message is None:
            return
        with self._cond:
            if len(self._messages) >= INBOX_SIZE:
                self.dropped += 1
                self._dropping += 1
                if self._dropping == 1:
                    log.warning(
                        "MQTT inbox full (%d messages): dropping received messages until "
                        "the handler catches up (first dropped: %s)",
                        INBOX_SIZE,
                        topic,
                    )
                return
            if self._dropping:
                log.warning("MQTT inbox has room again; %d messages were dropped", self._dropping)
                self._dropping = 0
            self._messages.append((topic, payload, properties))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closing or self._connected_pending or bool(self._messages)
                )
                if self._closing:
                    return
                run_connected = self._connected_pending
                self._connected_pending = False
                item = None if run_connected else self._messages.popleft()
            if run_connected and self._on_connected is not None:
                try:
                    self._on_connected()
                except Exception:
                    log.exception("the on_connected handler failed")
            elif item is not None and self._on_message is not None:
                try:
                    self._on_message(*item)
                except Exception:
                    log.exception("the handler of an MQTT message on %s failed", item[0])


def _to_paho_properties(properties: Mapping[str, Any]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for key, value in properties.items():
        name = _PROPERTY_NAMES.get(key)
        if name is None:
            raise ValueError(
                f"unknown MQTT property {key!r}; expected one of {sorted(_PROPERTY_NAMES)}"
            )
        if name == "UserProperty":
            setattr(props, name, [(str(k), str(v)) for k, v in value])
        else:
            setattr(props, name, value)
    return props


def _from_paho_properties(props: Properties | None) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if props is None:
        return found
    for key, name in _PROPERTY_NAMES.items():
        if hasattr(props, name):
            value = getattr(props, name)
            found[key] = list(value) if name == "UserProperty" else value
    return found


class MqttLink:
    """One device's connection to the broker: connects in the background, retries with
    back-off for as long as it runs, restores subscriptions after every reconnect and
    tells the caller through `on_connected` (run off the network thread)."""

    def __init__(
        self,
        config: MqttConfig,
        device_id: str,
        *,
        will_payload: bytes,
        on_connected: OnConnected | None = None,
        on_message: OnMessage | None = None,
    ) -> None:
        """Raises ConfigError for an unreadable password file or unusable TLS files, and
        ValueError for a device id that is no topic level. Does no network I/O."""
        self.topics = Topics(config.prefix, device_id)
        self._config = config
        self._v5 = config.protocol == "5"
        self.client_id = agent_client_id(config, device_id)
        self._client = make_client(
            config, client_id=self.client_id, will=Will(self.topics.status, will_payload)
        )
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._dispatcher = _Dispatcher(on_connected, on_message)
        # Jittered: a fleet that lost one broker does not retry in step (mqtt/backoff.py).
        self._backoff = ReconnectBackoff(
            config.reconnect_min_s, config.reconnect_max_s, jitter=config.reconnect_jitter
        )

        # Everything below is guarded by _lock, which is only ever held for a few
        # dictionary operations (paho's callbacks take it too; see _on_publish).
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when _pending empties
        self._pending: dict[int, PublishTicket] = {}  # QoS 1, waiting for PUBACK
        self._early: dict[int, str | None] = {}  # acks that beat publish() to _pending
        self._qos0_mids: set[int] = set()  # QoS 0 mids whose on_publish is still to come
        self._subscriptions: dict[str, int] = {}
        self._connected = False
        self._connects = 0
        self._state = "new"  # new -> running -> stopped
        self._outage_since: float | None = None
        self._outage_errors: set[str] = set()
        self._last_error: str | None = None
        self._answered = False  # the broker answered this attempt's CONNECT (CONNACK)

    # --- state for telemetry -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def reconnects(self) -> int:
        """Successful connects after the first one."""
        return max(0, self._connects - 1)

    @property
    def outstanding(self) -> int:
        """QoS 1 messages not yet acknowledged by the broker (queued or in flight)."""
        with self._lock:
            return len(self._pending)

    @property
    def last_error(self) -> str | None:
        """Why the last connect attempt failed or the connection was lost; None if never."""
        return self._last_error

    @property
    def dropped_messages(self) -> int:
        """Received messages dropped because the inbox was full."""
        return self._dispatcher.dropped

    @property
    def supports_properties(self) -> bool:
        """True with MQTT 5, whose messages carry properties (response topic etc.)."""
        return self._v5

    @property
    def _where(self) -> str:
        return f"{self._config.host}:{self._config.port}"

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Starts connecting in the background. Never raises because the broker is away:
        it logs once per outage and keeps retrying until `stop()`."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"MqttLink.start() called on a link that is {self._state}")
            self._state = "running"
            self._outage_since = time.monotonic()
        self._dispatcher.start()
        # make_client told paho where to connect (connect_async). paho 2.x retries a failed
        # first connect in loop_start's thread as well (loop_forever(
        # retry_first_connection=True)); tests/test_mqtt.py proves it.
        self._client.loop_start()
        log.info(
            "connecting to MQTT broker %s (MQTT %s) as %s",
            self._where,
            self._config.protocol,
            self.client_id,
        )

    def stop(self, *, publish_offline: bytes | None = None, timeout: float = 5.0) -> None:
        """Publishes `publish_offline` retained to the status topic (if connected) and waits
        up to `timeout` s for its ack, disconnects cleanly (so the broker does not send the
        last will) and joins both threads. QoS 1 messages still unacknowledged are lost;
        call `wait_acked()` first to flush them."""
        with self._lock:
            if self._state == "stopped":
                return
            was_running = self._state == "running"
            self._state = "stopped"
            connected = self._connected
        if was_running and publish_offline is not None:
            if connected:
                ticket = self._publish(self.topics.status, publish_offline, 1, True, None)
                if not ticket.wait(timeout):
                    log.warning(
                        "the broker did not acknowledge the offline status within %.1f s",
                        timeout,
                    )
            else:
                log.info("not connected at stop: the broker publishes the last will instead")
        self._client.disconnect()
        if was_running:
            self._client.loop_stop()
            self._dispatcher.stop()
        with self._lock:
            self._connected = False
            lost = len(self._pending)
        if lost:
            log.warning("%d QoS 1 messages were never acknowledged by the broker", lost)
        log.info("disconnected from MQTT broker %s", self._where)

    # --- subscriptions -------------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribes now if connected, and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
            connected = self._connected
        if connected:
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            known = self._subscriptions.pop(topic_filter, None) is not None
            connected = self._connected
        if known and connected:
            self._client.unsubscribe(topic_filter)

    # --- publishing ----------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool = False,
        properties: Mapping[str, Any] | None = None,
    ) -> PublishTicket:
        """Queues a message and returns at once. `properties` (MQTT 5 only) takes the keys
        response_topic, correlation_data, message_expiry_interval, content_type and
        user_properties (a list of (key, value) pairs). Raises ValueError for a bad topic,
        QoS or property, RuntimeError after `stop()`."""
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, not {qos!r}")
        if properties and not self._v5:
            raise ValueError("message properties need MQTT 5; this link speaks MQTT 3.1.1")
        if self._state == "stopped":
            raise RuntimeError("MqttLink.publish() called after stop()")
        paho_props = _to_paho_properties(properties) if properties else None
        return self._publish(topic, payload, qos, retain, paho_props)

    def _publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, props: Properties | None
    ) -> PublishTicket:
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise RuntimeError(
                "paho refused the publish: every MQTT message id is taken by an "
                "unacknowledged message (65535 outstanding)"
            )
        ticket = PublishTicket(topic, qos, info.mid)
        resolved: str | None = None
        done = False
        with self._lock:
            early = self._early.pop(info.mid, _MISSING)
            if qos == 0:
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    resolved, done = "not connected: QoS 0 message dropped", True
                else:
                    # No ack to wait for; only make sure its on_publish is not mistaken
                    # for the early ack of a QoS 1 message.
                    if early is _MISSING:
                        self._qos0_mids.add(info.mid)
                    done = True
            else:
                self._qos0_mids.discard(info.mid)  # a reused mid: that entry was stale
                if early is _MISSING:
                    self._pending[info.mid] = ticket
                else:
                    resolved, done = early, True
        if done:
            ticket._resolve(resolved)
        return ticket

    def wait_acked(self, timeout: float) -> bool:
        """Waits until every QoS 1 message published so far is acknowledged; True if all
        were within `timeout` seconds. Do not call it from an `on_message` handler while
        the broker is away: it waits the full timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    # --- paho callbacks (network thread: no blocking, no user code) ----------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._answered = True
        if reason_code.is_failure:
            hint = ""
            if reason_code.value in _AUTH_REFUSALS:
                hint = " (check mqtt.username and the password in mqtt.password_file)"
            self._note_failure(f"the broker refused the connection: {reason_code}{hint}")
            return
        with self._lock:
            self._connected = True
            self._connects += 1
            subscriptions = list(self._subscriptions.items())
            outage = self._outage_since
            self._outage_since = None
            self._outage_errors.clear()
            first = self._connects == 1
        self._backoff.reset()
        for topic_filter, qos in subscriptions:
            client.subscribe(topic_filter, qos)
        took = time.monotonic() - outage if outage is not None else 0.0
        if first:
            log.info("connected to MQTT broker %s after %.1f s", self._where, took)
        else:
            log.info("reconnected to MQTT broker %s after %.1f s away", self._where, took)
        self._dispatcher.connected()

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # paho calls this inside its `except OSError:` block and passes no error.
        exc = sys.exc_info()[1]
        with self._lock:
            self._answered = False
        self._arm_backoff(client)
        self._note_failure(
            explain_connect_error(exc, where=self._where, tls=self._config.tls is not None)
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            was_connected = self._connected
            self._connected = False
            # Unsent QoS 0 packets are discarded on reconnect; their on_publish never comes.
            self._qos0_mids.clear()
            stopping = self._state == "stopped"
            if was_connected and not stopping:
                self._outage_since = time.monotonic()
                self._outage_errors.clear()
            answered, self._answered = self._answered, False
        if not stopping:
            self._arm_backoff(client)
        if stopping or not was_connected:
            log.debug("MQTT connection closed: %s", reason_code)
            if not stopping and not answered:
                # A TCP connection the broker closed without a CONNACK.
                self._note_failure(
                    explain_early_close(where=self._where, tls=self._config.tls is not None)
                )
            return
        if flags.is_disconnect_packet_from_server:
            why = f"the broker disconnected us: {reason_code}"
        else:
            why = "the connection closed (broker stopped, restarted or network lost)"
        with self._lock:
            self._last_error = why
            self._outage_errors.add(why)
        log.warning(
            "lost the connection to MQTT broker %s: %s; reconnecting with back-off "
            "%.3g-%.3g s (jitter: %s), %d QoS 1 messages wait for it",
            self._where,
            why,
            self._config.reconnect_min_s,
            self._config.reconnect_max_s,
            self._config.reconnect_jitter,
            self.outstanding,
        )

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        properties = _from_paho_properties(getattr(msg, "properties", None))
        properties["retain"] = bool(msg.retain)
        self._dispatcher.message(msg.topic, bytes(msg.payload), properties)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        failure = str(reason_code) if reason_code.is_failure else None
        with self._lock:
            ticket = self._pending.pop(mid, None)
            if ticket is None:
                if mid in self._qos0_mids:
                    self._qos0_mids.discard(mid)
                else:
                    self._early[mid] = failure
                return
            if not self._pending:
                self._idle.notify_all()
        if failure is not None:
            log.warning("the broker refused the message to %s: %s", ticket.topic, failure)
        ticket._resolve(failure)

    def _arm_backoff(self, client: mqtt.Client) -> None:
        """Sets paho's very next reconnect wait (it resets its own delay to this one)."""
        wait = self._backoff.next_delay()
        # paho annotates the delays as int but sleeps for float seconds.
        client.reconnect_delay_set(wait, wait)  # type: ignore[arg-type]
        log.debug("next connect attempt to %s in %.2f s", self._where, wait)

    def _note_failure(self, error: str) -> None:
        with self._lock:
            self._last_error = error
            new = error not in self._outage_errors
            self._outage_errors.add(error)
            if self._outage_since is None:
                self._outage_since = time.monotonic()
        if new:
            log.warning(
                "cannot connect to MQTT broker %s: %s; retrying with back-off %.3g-%.3g s "
                "until it answers",
                self._where,
                error,
                self._config.reconnect_min_s,
                self._config.reconnect_max_s,
            )
        else:
            log.debug("still cannot connect to MQTT broker %s: %s", self._where, error)
