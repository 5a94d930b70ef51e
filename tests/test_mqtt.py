"""MqttLink against a real mosquitto on loopback: delivery, last will, outages, auth, TLS,
MQTT 5 properties; and the topic layout."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.config import MqttConfig, TlsConfig
from edgeagent.errors import ConfigError
from edgeagent.mqtt import MqttLink, Topics
from tests.broker import Mosquitto, MqttReader, free_port, publish_once
from tests.waiting import wait_until

Reader = Callable[..., MqttReader]
Factory = Callable[..., Mosquitto]

DEVICE = "pi-test-01"
WILL = b'{"state":"offline","why":"will"}'
GOODBYE = b'{"state":"offline","why":"stop"}'
ONLINE = b'{"state":"online"}'
LINK_LOGGER = "edgeagent.mqtt.link"


class Recorder:
    """The link's callbacks, recorded so a test can wait for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.connects = 0
        self.messages: list[tuple[str, bytes, dict[str, Any]]] = []
        self.threads: set[str] = set()
        self.link: MqttLink | None = None

    def on_connected(self) -> None:
        self.threads.add(threading.current_thread().name)
        if self.link is not None:  # what the agent does: re-publish the retained status
            self.link.publish(self.link.topics.status, ONLINE, qos=1, retain=True)
        with self._cond:
            self.connects += 1
            self._cond.notify_all()

    def on_message(self, topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        self.threads.add(threading.current_thread().name)
        with self._cond:
            self.messages.append((topic, payload, properties))
            self._cond.notify_all()

    def wait_connects(self, count: int, timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.connects >= count, timeout), (
                f"on_connected ran {self.connects} times, expected {count}"
            )

    def wait_message(self, timeout: float = 10.0) -> tuple[str, bytes, dict[str, Any]]:
        with self._cond:
            assert self._cond.wait_for(lambda: bool(self.messages), timeout), "no message"
            return self.messages[0]


@pytest.fixture
def make_link() -> Iterator[Callable[..., tuple[MqttLink, Recorder]]]:
    """Builds links whose callbacks go to a Recorder; every link is stopped at teardown."""
    links: list[MqttLink] = []

    def make(config: MqttConfig, *, republish: bool = True) -> tuple[MqttLink, Recorder]:
        recorder = Recorder()
        link = MqttLink(
            config,
            DEVICE,
            will_payload=WILL,
            on_connected=recorder.on_connected,
            on_message=recorder.on_message,
        )
        if republish:
            recorder.link = link
        links.append(link)
        return link, recorder

    yield make
    for link in links:
        link.stop()


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The link's debug lines for each failed attempt after the first of an outage."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LINK_LOGGER and r.getMessage().startswith("still cannot connect")
    ]


def _link_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LINK_LOGGER and r.levelno >= logging.WARNING
    ]


# --- delivery --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_qos1_results_arrive_in_order_and_are_acknowledged(
    protocol: str, mosquitto: Mosquitto, mqtt_reader: Reader, make_link: Any
) -> None:
    topics = Topics("edgeagent", DEVICE)
    reader = mqtt_reader(mosquitto, topics.results("cam"), protocol=protocol)
    link, recorder = make_link(mosquitto.mqtt_config(protocol=protocol))
    link.start()
    recorder.wait_connects(1)

    tickets = [link.publish(topics.results("cam"), b"%d" % i, qos=1) for i in range(200)]

    assert link.wait_acked(timeout=10)
    assert link.outstanding == 0
    assert all(t.ok for t in tickets)
    got = reader.wait_for_count(200, lambda m: m.topic == topics.results("cam"))
    assert [m.payload for m in got] == [b"%d" % i for i in range(200)]
    assert {m.qos for m in got} == {1}
    assert link.connected
    assert link.reconnects == 0
    assert recorder.threads == {"edgeagent-mqtt-dispatch"}  # never paho's network thread


def test_qos0_ticket_is_complete_when_sent(mosquitto: Mosquitto, make_link: Any) -> None:
    link, recorder = make_link(mosquitto.mqtt_config(), republish=False)
    before_start = link.publish(link.topics.telemetry, b"{}", qos=0)
    link.start()
    recorder.wait_connects(1)
    sent = link.publish(link.topics.telemetry, b"{}", qos=0)

    assert sent.ok
    assert not before_start.ok
    assert before_start.failure is not None
    assert "not connected" in before_start.failure
    assert link.outstanding == 0


# --- last will and clean stop ----------------------------------------------------------

_KILLED_AGENT = """
import sys, threading
from edgeagent.config import MqttConfig, TlsConfig
from edgeagent.mqtt import MqttLink
host, port = sys.argv[1], int(sys.argv[2])
ready = threading.Event()
link = None
def connected():
    link.publish(link.topics.status, b'{"state":"online"}', qos=1, retain=True).wait(10)
    ready.set()
link = MqttLink(MqttConfig(host=host, port=port), "pi-test-01",
                will_payload=b'{"state":"offline","why":"will"}', on_connected=connected)
link.start()
ready.wait(20)
sys.stdout.write("ready\\n")
sys.stdout.flush()
threading.Event().wait()
"""


def test_broker_publishes_retained_last_will_when_the_agent_dies(
    mosquitto: Mosquitto, mqtt_reader: Reader
) -> None:
    topics = Topics("edgeagent", DEVICE)
    watcher = mqtt_reader(mosquitto, topics.status)
    agent = subprocess.Popen(
        [sys.executable, "-c", _KILLED_AGENT, mosquitto.host, str(mosquitto.port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None
        assert agent.stdout.readline() == b"ready\n"
        watcher.wait_for(lambda m: m.payload == ONLINE)
        agent.kill()  # SIGKILL: no DISCONNECT packet, the socket just closes
    finally:
        agent.kill()
        agent.wait(10)
        if agent.stdout is not None:
            agent.stdout.close()

    watcher.wait_for(lambda m: m.payload == WILL)
    late = mqtt_reader(mosquitto, topics.status)
    retained = late.wait_for()
    assert (retained.payload, retained.retain) == (WILL, True)


def test_clean_stop_publishes_offline_retained_and_no_last_will(
    mosquitto: Mosquitto, mqtt_reader: Reader, make_link: Any
) -> None:
    topics = Topics("edgeagent", DEVICE)
    watcher = mqtt_reader(mosquitto, topics.status)
    link, recorder = make_link(mosquitto.mqtt_config())
    link.start()
    recorder.wait_connects(1)
    watcher.wait_for(lambda m: m.payload == ONLINE)

    link.stop(publish_offline=GOODBYE)

    watcher.wait_for(lambda m: m.payload == GOODBYE)
    late = mqtt_reader(mosquitto, topics.status)
    retained = late.wait_for()
    assert (retained.payload, retained.retain) == (GOODBYE, True)
    time.sleep(0.5)  # a last will would follow the disconnect at once
    assert WILL not in [m.payload for m in watcher.messages + late.messages]
    assert not link.connected


# --- outages ---------------------------------------------------------------------------


def test_unreachable_broker_at_start_is_retried_until_it_appears(
    mosquitto_factory: Factory, make_link: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LINK_LOGGER)
    broker = mosquitto_factory(port=free_port(), started=False)
    link, recorder = make_link(broker.mqtt_config())
    link.subscribe(link.topics.cmd_filter)
    link.start()  # must not raise although nothing listens on the port
    queued = link.publish(link.topics.results("cam"), b"early", qos=1)
    wait_until(lambda: len(_retries(caplog)) >= 2, message="two more connection attempts")

    assert not link.connected
    assert not link.wait_acked(timeout=0.2)
    assert link.outstanding == 1
    warnings = _link_warnings(caplog)
    assert len(warnings) == 1, warnings  # once per outage, not once per retry
    assert f"127.0.0.1:{broker.port}" in warnings[0]
    assert "refused" in warnings[0]
    assert "retrying" in warnings[0]
    assert link.last_error is not None
    assert "refused" in link.last_error

    broker.start()
    recorder.wait_connects(1)
    assert link.wait_acked(timeout=10)
    assert queued.ok
    publish_once(broker, link.topics.cmd("ping"), b"{}")
    topic, payload, _props = recorder.wait_message()
    assert (topic, payload) == (link.topics.cmd("ping"), b"{}")


def test_broker_restart_reconnects_and_delivers_what_was_queued(
    mosquitto: Mosquitto, mqtt_reader: Reader, make_link: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LINK_LOGGER)
    link, recorder = make_link(mosquitto.mqtt_config())
    link.subscribe(link.topics.cmd_filter)
    link.start()
    recorder.wait_connects(1)
    assert link.wait_acked(timeout=10)  # the online status

    mosquitto.stop()
    wait_until(lambda: not link.connected, message="the link to notice the broker is gone")
    # Retained, so that they can be read after the reconnect whoever subscribes first.
    topics = [link.topics.results(f"p{i}") for i in range(20)]
    tickets = [link.publish(t, b"queued", qos=1, retain=True) for t in topics]
    assert link.outstanding == 20
    assert not any(t.acked.is_set() for t in tickets)

    mosquitto.start()  # same port, no persistence: it forgot every retained message
    recorder.wait_connects(2)
    assert link.wait_acked(timeout=10)
    assert all(t.ok for t in tickets)
    assert link.reconnects == 1
    reader = mqtt_reader(mosquitto, f"edgeagent/{DEVICE}/#")
    got = reader.wait_for_count(21, lambda m: m.retain)
    assert {m.topic for m in got} == {*topics, link.topics.status}
    status = next(m for m in got if m.topic == link.topics.status)
    assert status.payload == ONLINE  # re-published by on_connected after the restart
    publish_once(mosquitto, link.topics.cmd("ping"), b"again")  # subscription restored
    assert recorder.wait_message()[1] == b"again"
    lost = [w for w in _link_warnings(caplog) if w.startswith("lost the connection")]
    assert len(lost) == 1, _link_warnings(caplog)


# --- authentication and TLS ------------------------------------------------------------


def test_username_and_password_from_file(
    mosquitto_factory: Factory, mqtt_reader: Reader, make_link: Any
) -> None:
    broker = mosquitto_factory(users={"device": "s3cret pass", "fleet": "other"})
    reader = mqtt_reader(broker, "edgeagent/#", username="fleet", password="other")  # noqa: S106
    link, recorder = make_link(broker.mqtt_config(username="device"))
    link.start()
    recorder.wait_connects(1)
    link.publish(link.topics.events, b"hello", qos=1)
    assert reader.wait_for(lambda m: m.topic == link.topics.events).payload == b"hello"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_wrong_password_is_logged_once_and_retried(
    protocol: str,
    mosquitto_factory: Factory,
    make_link: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LINK_LOGGER)
    broker = mosquitto_factory(users={"device": "s3cret"})
    config = broker.mqtt_config(username="device", password="wrong", protocol=protocol)  # noqa: S106
    link, recorder = make_link(config)
    link.start()
    wait_until(
        lambda: broker.log_text().count("disconnected, not authorised") >= 2,
        message="two refused attempts in the broker's log",
    )

    assert not link.connected
    assert recorder.connects == 0
    warnings = _link_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "refused" in warnings[0]
    assert "password_file" in warnings[0]
    # It kept trying (the wait above): refused at least twice, warned once.


def test_unreadable_password_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.secret"
    config = MqttConfig(username="device", password_file=missing)
    with pytest.raises(ConfigError, match=str(missing)):
        MqttLink(config, DEVICE, will_payload=WILL, on_connected=None, on_message=None)


def test_tls_listener_with_the_generated_ca(
    mosquitto_factory: Factory, mqtt_reader: Reader, make_link: Any
) -> None:
    broker = mosquitto_factory(tls=True)
    reader = mqtt_reader(broker, "edgeagent/#")
    link, recorder = make_link(broker.mqtt_config())
    link.start()
    recorder.wait_connects(1)
    link.publish(link.topics.telemetry, b"{}", qos=1)
    assert reader.wait_for(lambda m: m.topic == link.topics.telemetry).payload == b"{}"


def test_tls_with_an_untrusted_ca_fails_verification_and_keeps_retrying(
    mosquitto_factory: Factory, make_link: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LINK_LOGGER)
    broker = mosquitto_factory(tls=True)
    link, _ = make_link(broker.mqtt_config(tls={}))  # the system trust store
    link.start()
    wait_until(lambda: len(_retries(caplog)) >= 2, message="two more connection attempts")
    assert not link.connected
    assert link.last_error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in link.last_error
    assert len(_link_warnings(caplog)) == 1


def _wait_last_error(link: MqttLink, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while link.last_error is None:
        assert time.monotonic() < deadline, "no connect error was recorded"
        time.sleep(0.05)
    return link.last_error


def test_tls_against_a_plain_listener_says_so(
    mosquitto_factory: Factory, make_link: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LINK_LOGGER)
    plain = mosquitto_factory()
    tls_broker = mosquitto_factory(tls=True)
    assert tls_broker.tls is not None
    config = plain.mqtt_config(tls=TlsConfig(ca_file=tls_broker.tls.ca_file))
    link, _ = make_link(config)
    link.start()
    error = _wait_last_error(link)
    assert not link.connected
    assert f"TLS handshake with 127.0.0.1:{plain.port} failed" in error
    assert "is this port a TLS listener?" in error
    assert "mqtt.tls is set" in error
    assert "8883" in error
    time.sleep(1.0)  # several retries: still one warning for the outage
    warnings = _link_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "TLS listener" in warnings[0]


def test_plain_mqtt_against_a_tls_listener_says_so(
    mosquitto_factory: Factory, make_link: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LINK_LOGGER)
    broker = mosquitto_factory(tls=True)
    link, _ = make_link(broker.mqtt_config(tls=None))
    link.start()
    error = _wait_last_error(link)
    assert not link.connected
    assert f"the broker at 127.0.0.1:{broker.port} closed the connection before" in error
    assert "is this port a TLS listener? mqtt.tls is not set" in error
    assert "Set mqtt.tls" in error
    time.sleep(1.0)
    warnings = _link_warnings(caplog)
    assert len(warnings) == 1, warnings
    paho_errors = [
        r for r in caplog.records if r.name.endswith(".paho") and r.levelno >= logging.ERROR
    ]
    assert paho_errors == [], "paho's per-retry socket errors are not logged as errors"


# --- MQTT 5 properties -----------------------------------------------------------------


def _answered_probe(broker: Mosquitto, link: MqttLink, replies: MqttReader) -> bool:
    """Publishes one probe command; True once any probe has been answered."""
    if any(m.topic == "fleet/replies/probe" for m in replies.messages):
        return True
    publish_once(
        broker,
        link.topics.cmd("ping"),
        b"probe",
        properties={"ResponseTopic": "fleet/replies/probe", "CorrelationData": b"probe"},
    )
    return False


def test_v5_response_topic_and_correlation_data_round_trip(
    mosquitto: Mosquitto, mqtt_reader: Reader, make_link: Any
) -> None:
    replies = mqtt_reader(mosquitto, "fleet/replies/#")
    link: MqttLink | None = None

    def reply(topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        assert link is not None
        link.publish(
            properties["response_topic"],
            b"pong:" + payload,
            qos=1,
            properties={
                "correlation_data": properties["correlation_data"],
                "message_expiry_interval": 60,
                "user_properties": [("cmd", topic.rsplit("/", 1)[-1])],
            },
        )

    link = MqttLink(
        mosquitto.mqtt_config(), DEVICE, will_payload=WILL, on_connected=None, on_message=reply
    )
    try:
        link.subscribe(link.topics.cmd_filter)
        link.start()
        # The SUBACK follows the CONNACK: probe until a ping is answered, then the real one.
        wait_until(
            lambda: _answered_probe(mosquitto, link, replies),
            message="the link to answer a probe (its subscription is live)",
            interval=0.25,
        )
        publish_once(
            mosquitto,
            link.topics.cmd("ping"),
            b"1",
            properties={"ResponseTopic": "fleet/replies/42", "CorrelationData": b"\x00\x2a"},
        )
        got = replies.wait_for(lambda m: m.topic == "fleet/replies/42")
    finally:
        link.stop()

    assert (got.topic, got.payload) == ("fleet/replies/42", b"pong:1")
    assert got.properties["CorrelationData"] == b"\x00\x2a"
    assert got.properties["UserProperty"] == [("cmd", "ping")]
    assert 0 < got.properties["MessageExpiryInterval"] <= 60


def test_properties_need_mqtt5(mosquitto: Mosquitto) -> None:
    link = MqttLink(
        mosquitto.mqtt_config(protocol="3.1.1"),
        DEVICE,
        will_payload=WILL,
        on_connected=None,
        on_message=None,
    )
    assert not link.supports_properties
    with pytest.raises(ValueError, match="MQTT 5"):
        link.publish("t", b"", qos=1, properties={"response_topic": "r"})
    link.stop()


# --- topics ----------------------------------------------------------------------------


def test_topic_layout() -> None:
    t = Topics("acme/edge/", "pi-01")
    assert t.status == "acme/edge/pi-01/status"
    assert t.results("cam") == "acme/edge/pi-01/results/cam"
    assert t.events == "acme/edge/pi-01/events"
    assert t.telemetry == "acme/edge/pi-01/telemetry"
    assert t.reply == "acme/edge/pi-01/reply"
    assert t.cmd("ping") == "acme/edge/pi-01/cmd/ping"
    assert t.cmd_filter == "acme/edge/pi-01/cmd/#"
    assert t.desired == "acme/edge/pi-01/desired"
    assert t.reported == "acme/edge/pi-01/reported"
    assert t.group_desired("lab") == "acme/edge/group/lab/desired"
    assert t.group_cmd_filter("lab") == "acme/edge/group/lab/cmd/#"
    assert t.model_manifest("det", "1.2.0") == "acme/edge/models/det/1.2.0/manifest"
    assert t.model_chunk("det", "1.2.0", 7) == "acme/edge/models/det/1.2.0/chunk/7"
    assert t.cmd_name(t.cmd("ping")) == "ping"
    assert t.cmd_name(t.group_cmd("lab", "reboot")) == "reboot"
    assert t.cmd_name(t.status) is None


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x\0y"])
def test_topic_levels_reject_wildcards_and_separators(bad: str) -> None:
    t = Topics("edgeagent", "pi-01")
    with pytest.raises(ValueError, match="pipeline name"):
        t.results(bad)
    with pytest.raises(ValueError, match="device id"):
        Topics("edgeagent", bad)


def test_device_ids_cannot_shadow_fleet_topics() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Topics("edgeagent", "group")
