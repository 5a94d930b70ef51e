"""The broker example in deploy/mosquitto/ run for real: a mosquitto started from that
config (paths and port rewritten to a temporary directory, the ACL file used as is) with
a password per device, proving what each device may publish and read."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent.config import load_config
from edgeagent.mqtt.client import make_client
from tests.broker import LOOPBACK, Mosquitto

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "mosquitto"
USERS = {
    "pi-a": "secret-a",
    "pi-b": "secret-b",
    "fleet": "secret-fleet",
    "dashboard": "secret-dashboard",
    "homeassistant": "secret-homeassistant",
}

pytestmark = pytest.mark.broker


class DeployedMosquitto(Mosquitto):
    """mosquitto with deploy/mosquitto/edgeagent.conf, rewritten only where it names a
    file or the public listener, and persistence as `persistence=` says (off by default,
    under the workdir when on); the ACL is deploy/mosquitto/edgeagent.acl itself."""

    def _config_text(self) -> str:
        assert self.tls is not None
        rewrite = {
            "listener": f"listener {self.port} {LOOPBACK}",
            "persistence": f"persistence {'true' if self.persistence else 'false'}",
            "persistence_location": (
                f"persistence_location {self.workdir}/" if self.persistence else None
            ),
            "cafile": f"cafile {self.tls.ca_file}",
            "certfile": f"certfile {self.tls.server_cert}",
            "keyfile": f"keyfile {self.tls.server_key}",
            "password_file": f"password_file {self.workdir / 'passwd'}",
            "acl_file": f"acl_file {DEPLOY / 'edgeagent.acl'}",
        }
        seen, lines = set(), []
        for line in (DEPLOY / "edgeagent.conf").read_text().splitlines():
            key = line.split(" ", 1)[0]
            if key in rewrite:
                seen.add(key)
                if rewrite[key] is not None:
                    lines.append(rewrite[key])
            else:
                lines.append(line)
        assert seen == set(rewrite), f"deploy config lacks {set(rewrite) - seen}"
        lines += [f"log_dest file {self.log_file}", "log_type all"]
        if os.geteuid() == 0:
            lines.append("user root")
        return "\n".join(lines) + "\n"


@pytest.fixture
def broker(mosquitto_binary: str, tmp_path: Path) -> Iterator[DeployedMosquitto]:
    broker = DeployedMosquitto(tmp_path / "broker", binary=mosquitto_binary, users=USERS, tls=True)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


class Client:
    """A TLS MQTT 5 client logged in as one user; keeps what it receives."""

    def __init__(self, broker: Mosquitto, username: str, password: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._suback: dict[int, list[ReasonCode]] = {}
        self.connect_reason: ReasonCode | None = None
        self._client = make_client(
            broker.mqtt_config(username=username, password=password),
            client_id=f"acl-test-{username}-{id(self):x}",
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.reconnect()
        self._client.loop_start()

    def _on_connect(
        self, _c: object, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        self.connect_reason = reason
        self._connected.set()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _on_subscribe(
        self, _c: object, _u: object, mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        with self._cond:
            self._suback[mid] = codes
            self._cond.notify_all()

    def wait_connected(self) -> bool:
        """True when the broker accepted the login."""
        assert self._connected.wait(10), "no CONNACK"
        assert self.connect_reason is not None
        return not self.connect_reason.is_failure

    def subscribe(self, topic_filter: str) -> ReasonCode:
        """Subscribes (QoS 1) and returns the broker's SUBACK reason code."""
        _rc, mid = self._client.subscribe(topic_filter, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._suback, 10), "no SUBACK"
            return self._suback[mid][0]

    def publish(self, topic: str, payload: bytes) -> None:
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)

    def wait_for(self, topic: str) -> list[tuple[str, bytes]]:
        """Every message received up to and including the first on `topic`."""
        with self._cond:
            ok = self._cond.wait_for(lambda: any(t == topic for t, _ in self.messages), 10)
            assert ok, f"nothing on {topic}; received {self.messages}"
            return list(self.messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def login(broker: DeployedMosquitto) -> Iterator[type[Client]]:
    clients: list[Client] = []

    def connect(username: str, password: str | None = None) -> Client:
        client = Client(broker, username, password)
        clients.append(client)
        return client

    yield connect  # type: ignore[misc]
    for client in clients:
        client.close()


def test_a_device_publishes_only_below_its_own_topic(login: type[Client]) -> None:
    fleet = login("fleet")
    assert fleet.wait_connected()
    assert not fleet.subscribe("edgeagent/#").is_failure
    device = login("pi-a")
    assert device.wait_connected()

    # Denied first, then an allowed marker: mosquitto keeps one client's messages in
    # order, so once the marker arrived, a denied message that got through would have too.
    for topic in [
        "edgeagent/pi-b/results/shapes",
        "edgeagent/pi-b/status",
        "edgeagent/pi-b/cmd/reboot",
        "edgeagent/group/all/cmd/reboot",
        "edgeagent/models/shapes/2.0.0/manifest",
        "other/pi-a/results/shapes",
    ]:
        device.publish(topic, b"forged")
    device.publish("edgeagent/pi-a/results/shapes", b"ok")

    received = fleet.wait_for("edgeagent/pi-a/results/shapes")
    assert received == [("edgeagent/pi-a/results/shapes", b"ok")]


def test_a_device_reads_its_own_and_group_commands_not_another_devices(
    login: type[Client],
) -> None:
    device = login("pi-a")
    assert device.wait_connected()
    own = [
        "edgeagent/pi-a/cmd/#",
        "edgeagent/pi-a/desired",
        "edgeagent/group/+/cmd/#",
        "edgeagent/group/kitchen/desired",
        "edgeagent/models/#",
    ]
    for topic_filter in own:
        assert not device.subscribe(topic_filter).is_failure, topic_filter
    # mosquitto 2.0's ACL file grants these subscriptions and checks read access on
    # every message instead: what matters is that nothing of device B arrives.
    device.subscribe("edgeagent/pi-b/cmd/#")
    device.subscribe("edgeagent/pi-b/desired")
    fleet = login("fleet")
    assert fleet.wait_connected()

    for topic in ["edgeagent/pi-b/cmd/reboot", "edgeagent/pi-b/desired"]:
        fleet.publish(topic, b"for b")
    for topic in [
        "edgeagent/pi-a/cmd/reboot",
        "edgeagent/group/kitchen/cmd/snapshot",
        "edgeagent/models/shapes/2.0.0/manifest",
        "edgeagent/pi-a/desired",
    ]:
        fleet.publish(topic, b"for a")

    received = device.wait_for("edgeagent/pi-a/desired")
    assert received == [
        ("edgeagent/pi-a/cmd/reboot", b"for a"),
        ("edgeagent/group/kitchen/cmd/snapshot", b"for a"),
        ("edgeagent/models/shapes/2.0.0/manifest", b"for a"),
        ("edgeagent/pi-a/desired", b"for a"),
    ]


def test_a_wildcard_subscription_does_not_leak_other_devices_commands(
    login: type[Client],
) -> None:
    device = login("pi-a")
    assert device.wait_connected()
    device.subscribe("edgeagent/+/cmd/#")
    fleet = login("fleet")
    assert fleet.wait_connected()

    fleet.publish("edgeagent/pi-b/cmd/reboot", b"for b")
    fleet.publish("edgeagent/pi-a/cmd/reboot", b"for a")

    assert device.wait_for("edgeagent/pi-a/cmd/reboot") == [("edgeagent/pi-a/cmd/reboot", b"for a")]


def test_the_operator_commands_devices_but_cannot_speak_for_them(login: type[Client]) -> None:
    viewer = login("dashboard")
    assert viewer.wait_connected()
    assert not viewer.subscribe("edgeagent/#").is_failure
    fleet = login("fleet")
    assert fleet.wait_connected()

    # What a device says about itself cannot come from the operator's credentials.
    for topic in [
        "edgeagent/pi-a/status",
        "edgeagent/pi-a/results/shapes",
        "edgeagent/pi-a/events",
        "edgeagent/pi-a/telemetry",
        "edgeagent/pi-a/reported",
        "edgeagent/pi-a/reply",
    ]:
        fleet.publish(topic, b"forged")
    allowed = [
        "edgeagent/pi-a/cmd/ping",
        "edgeagent/pi-a/desired",
        "edgeagent/group/kitchen/cmd/ping",
        "edgeagent/group/kitchen/desired",
        "edgeagent/models/shapes/2.0.0/manifest",
    ]
    for topic in allowed:
        fleet.publish(topic, b"ok")

    received = viewer.wait_for(allowed[-1])
    assert [topic for topic, _ in received] == allowed


def test_the_read_only_dashboard_reads_everything_and_writes_nothing(
    login: type[Client],
) -> None:
    device = login("pi-a")
    assert device.wait_connected()
    assert not device.subscribe("edgeagent/pi-a/cmd/#").is_failure
    assert not device.subscribe("edgeagent/pi-a/desired").is_failure
    viewer = login("dashboard")
    assert viewer.wait_connected()
    assert not viewer.subscribe("edgeagent/#").is_failure

    for topic in ["edgeagent/pi-a/cmd/restart", "edgeagent/pi-a/desired"]:
        viewer.publish(topic, b"forged")
    device.publish("edgeagent/pi-a/results/shapes", b"ok")
    assert viewer.wait_for("edgeagent/pi-a/results/shapes")[-1] == (
        "edgeagent/pi-a/results/shapes",
        b"ok",
    )
    fleet = login("fleet")
    assert fleet.wait_connected()
    fleet.publish("edgeagent/pi-a/cmd/ping", b"marker")
    # The viewer's commands, published before the marker, never reached the device.
    assert device.wait_for("edgeagent/pi-a/cmd/ping") == [("edgeagent/pi-a/cmd/ping", b"marker")]


def test_home_assistant_discovers_a_devices_own_entities_only(login: type[Client]) -> None:
    """What the agent publishes with `homeassistant.enabled` gets through, under its own
    node id only; Home Assistant's birth message reaches the devices."""
    assistant = login("homeassistant")
    assert assistant.wait_connected()
    assert not assistant.subscribe("homeassistant/#").is_failure
    device = login("pi-a")
    assert device.wait_connected()
    assert not device.subscribe("homeassistant/status").is_failure
    for topic in [
        "homeassistant/sensor/pi-b/cpu/config",  # another device's node id
        "homeassistant/status",  # speaking for Home Assistant
        "homeassistant/sensor/pi-a/cpu/state",  # not a config
    ]:
        device.publish(topic, b"forged")
    own = "homeassistant/sensor/pi-a/cpu_percent/config"
    device.publish(own, b"{}")
    assert assistant.wait_for(own) == [(own, b"{}")]
    # The birth message, to which the agent answers by publishing its configs again.
    assistant.publish("homeassistant/status", b"online")
    assert device.wait_for("homeassistant/status") == [("homeassistant/status", b"online")]
    # Home Assistant commands nothing: its command, sent before the operator's marker,
    # never reaches the device.
    assert not device.subscribe("edgeagent/pi-a/cmd/#").is_failure
    assistant.publish("edgeagent/pi-a/cmd/restart", b"forged")
    fleet = login("fleet")
    assert fleet.wait_connected()
    fleet.publish("edgeagent/pi-a/cmd/ping", b"marker")
    received = device.wait_for("edgeagent/pi-a/cmd/ping")
    assert [m for m in received if m[0].startswith("edgeagent/")] == [
        ("edgeagent/pi-a/cmd/ping", b"marker")
    ]


def test_logins_need_the_right_password(login: type[Client]) -> None:
    assert not login("pi-a", "wrong").wait_connected()
    assert login("pi-b").wait_connected()


def test_the_agent_config_for_this_broker_validates() -> None:
    config = load_config(REPO / "deploy" / "edgeagent-tls.yaml")
    assert config.mqtt.port == 8883
    assert config.mqtt.tls is not None
    assert config.mqtt.username == config.device.id, "the ACL's %u is the device id"
    assert config.mqtt.prefix == "edgeagent"
