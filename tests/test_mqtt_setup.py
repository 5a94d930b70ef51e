"""MQTT client set-up in one place: the cross-field rules of `mqtt:` in the config model,
and `make_client`, through which the agent's link, the fleet connection and doctor all log
in to a real mosquitto in the same way."""

from __future__ import annotations

import re
import threading
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgeagent.config import MqttConfig, TlsConfig, parse_config
from edgeagent.doctor import Environment, Verdict, broker_mqtt_result, run_checks
from edgeagent.errors import ConfigError
from edgeagent.fleet.connection import FleetConnection, broker_config
from edgeagent.mqtt import MqttLink
from edgeagent.mqtt.client import PasswordFileError, TlsSetupError, make_client
from tests.broker import Mosquitto, free_port

Factory = Callable[..., Mosquitto]

DEVICE = "pi-a"
FAST = Environment(timeout_s=3.0)

# --- the rules, where the config is read ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "mqtt:\n  host: broker.lan\n  password_file: /run/credentials/mqtt\n",
            "agent.yaml:3: mqtt.password_file: Value error, a password needs a user name: "
            "set username as well",
        ),
        (
            "mqtt:\n  tls:\n    ca_file: /etc/ca.pem\n    key_file: /etc/client.key\n",
            "agent.yaml:4: mqtt.tls.key_file: Value error, a client key needs its "
            "certificate: set cert_file as well",
        ),
    ],
)
def test_cross_field_rules_name_the_line_and_the_fix(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "agent.yaml")
    assert expected in str(caught.value)


def test_the_fleet_options_follow_the_same_rules() -> None:
    options = {"host": "h", "port": None, "tls_ca": None, "protocol": "5", "prefix": "p"}
    secret = Path("/run/credentials/mqtt")
    with pytest.raises(ConfigError) as caught:
        broker_config(Namespace(**options, username=None, password_file=secret))
    assert "--password-file: a password needs a user name: set --username as well" in str(
        caught.value
    )
    assert broker_config(Namespace(**options, username="fleet", password_file=secret)).username
    with pytest.raises(ValidationError, match="client key needs its certificate"):
        TlsConfig(key_file=Path("/etc/client.key"))
    # A certificate alone is fine: its PEM file may hold the key as well (Python's ssl).
    assert TlsConfig(cert_file=Path("/etc/client.pem")).key_file is None


def test_doctor_reports_the_rule_as_the_agent_would(tmp_path: Path) -> None:
    """Doctor used to connect anonymously with such a config while the agent refused it."""
    config = tmp_path / "config.yaml"
    secret = tmp_path / "secret"
    secret.write_text("pw\n", encoding="utf-8")
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"mqtt:\n  port: {free_port()}\n  password_file: {secret}\n",
        encoding="utf-8",
    )
    checks = {c.name: c for c in run_checks(config, env=FAST)}
    assert checks["config"].verdict is Verdict.FAIL
    assert f"{config}:4: mqtt.password_file" in checks["config"].finding
    assert checks["broker.mqtt"].verdict is Verdict.SKIP


# --- the factory ---------------------------------------------------------------------------


def test_factory_reports_unusable_files_as_config_errors(tmp_path: Path) -> None:
    with pytest.raises(PasswordFileError, match=r"nope\.secret"):
        make_client(MqttConfig(username="u", password_file=tmp_path / "nope.secret"), client_id="x")
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n", encoding="utf-8")
    with pytest.raises(TlsSetupError, match=r"ca\.pem"):
        make_client(MqttConfig(tls=TlsConfig(ca_file=not_pem)), client_id="x")
    assert issubclass(PasswordFileError, ConfigError)
    assert issubclass(TlsSetupError, ConfigError)


# mosquitto's log of one login: "... as <client id> (p5, c1, k5, u'pi-a')."
_LOGIN = re.compile(r"New client connected from \S+ as (\S+) \((p\d), c\d, (k\d+), u'([^']*)'\)")


def _logins(broker: Mosquitto) -> dict[str, tuple[str, str, str]]:
    """Client id -> (protocol, keepalive, user name) of every login the broker logged."""
    return {m[1]: (m[2], m[3], m[4]) for m in _LOGIN.finditer(broker.log_text())}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_link_fleet_and_doctor_log_in_the_same_way(
    mosquitto_factory: Factory, protocol: str
) -> None:
    broker = mosquitto_factory(users={DEVICE: "s3cret-a"}, tls=True)
    settings = broker.mqtt_config(username=DEVICE, protocol=protocol)
    assert settings.tls is not None
    assert settings.password_file is not None

    agent_up = threading.Event()
    link = MqttLink(settings, DEVICE, will_payload=b"offline", on_connected=agent_up.set)
    connected = []
    try:
        link.start()
        assert agent_up.wait(10), link.last_error
        # A fleet command and a doctor run while the agent is connected.
        with FleetConnection(settings, name="test") as fleet:
            fleet.wait_acked(
                [fleet.publish("edgeagent/pi-a/probe", b"1", retain=False)], stall_timeout=10
            )
        doctor = broker_mqtt_result(settings, DEVICE, FAST)
        assert doctor.verdict is Verdict.OK, doctor
        assert f"over TLS as {DEVICE}" in doctor.finding
        assert link.wait_acked(10)
        connected.append(link.connected)
        reconnects = link.reconnects
    finally:
        link.stop()

    logins = _logins(broker)
    assert link.client_id in logins, broker.log_text()
    agent = logins.pop(link.client_id)
    # mosquitto numbers MQTT 3.1.1 "p2".
    assert agent == ("p5" if protocol == "5" else "p2", f"k{settings.keepalive}", DEVICE)
    assert len(logins) == 2, logins  # the fleet connection and doctor, nobody else
    assert set(logins.values()) == {agent}, logins
    # Doctor's id shares the agent's prefix but is never the agent's: the running agent
    # was not taken over by the doctor run.
    (doctor_id,) = [cid for cid in logins if "-doctor-" in cid]
    assert doctor_id.startswith(f"{link.client_id}-doctor-")
    assert connected == [True]
    assert reconnects == 0


def test_a_free_port_for_a_broker_started_later_is_below_the_ephemeral_range() -> None:
    # A client retrying an ephemeral-range port with nothing listening can be handed that
    # port as its own source port (a TCP self-connect): the broker then cannot bind it.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(1024 <= free_port() < low for _ in range(20))
