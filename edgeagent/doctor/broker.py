"""The broker checks: a TCP connection to it, then a real MQTT CONNECT with the agent's
settings, whose verdict names the CONNACK reason (or the TLS or network failure)."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from edgeagent.config import MqttConfig
from edgeagent.doctor.base import CheckContext, CheckResult, Environment, Verdict
from edgeagent.mqtt.client import PasswordFileError, TlsSetupError, agent_client_id, make_client


def check_broker(context: CheckContext) -> list[CheckResult]:
    if context.config is None:
        why = f"{context.config_note}: no broker to check"
        return [
            CheckResult("broker.tcp", Verdict.SKIP, False, why),
            CheckResult("broker.mqtt", Verdict.SKIP, False, why),
        ]
    config = context.config
    tcp = broker_tcp_result(config.mqtt, context.env)
    if tcp.verdict is Verdict.FAIL:
        mqtt_check = CheckResult(
            "broker.mqtt", Verdict.SKIP, True, "not tried: the broker is unreachable over TCP"
        )
    else:
        mqtt_check = broker_mqtt_result(config.mqtt, config.device.id, context.env)
    return [tcp, mqtt_check]


def broker_tcp_result(mqtt: MqttConfig, env: Environment) -> CheckResult:
    where = f"{mqtt.host}:{mqtt.port}"
    details = {"host": mqtt.host, "port": mqtt.port}
    started = time.monotonic()
    try:
        with socket.create_connection((mqtt.host, mqtt.port), timeout=env.timeout_s):
            pass
    except socket.gaierror as exc:
        finding = f"broker {where} unreachable: the host name does not resolve ({exc.strerror})"
        fix = "check mqtt.host and the device's DNS (/etc/resolv.conf)"
    except ConnectionRefusedError:
        finding = f"broker {where} unreachable: connection refused (nothing listens there)"
        fix = "start the broker, or correct mqtt.host/mqtt.port (8883 is the usual TLS port)"
    except TimeoutError:
        finding = f"broker {where} unreachable: no answer within {env.timeout_s:g} s"
        fix = "check the network route and firewalls between the device and the broker"
    except OSError as exc:
        finding = f"broker {where} unreachable: {exc.strerror or exc}"
        fix = "check the network (`ip route`, Wi-Fi) and mqtt.host"
    else:
        ms = (time.monotonic() - started) * 1000
        details["connect_ms"] = round(ms, 1)
        return CheckResult(
            "broker.tcp",
            Verdict.OK,
            True,
            f"TCP connection to {where} in {ms:.0f} ms",
            None,
            details,
        )
    return CheckResult("broker.tcp", Verdict.FAIL, True, finding, fix, details)


def broker_mqtt_result(mqtt: MqttConfig, device_id: str, env: Environment) -> CheckResult:
    """A real CONNECT through the agent's own client factory with the agent's settings
    (credentials, TLS, protocol, keepalive); the verdict names the CONNACK reason. The
    client id is the agent's with `-doctor-<pid>` appended: the same prefix (a broker that
    restricts client ids treats both alike), but never the same id, so the running agent's
    session is not taken over. No last will: a doctor run never marks the device offline."""
    outcome = _mqtt_connect(mqtt, device_id, env.timeout_s)
    details = {
        "host": mqtt.host,
        "port": mqtt.port,
        "protocol": mqtt.protocol,
        "tls": mqtt.tls is not None,
        "username": mqtt.username,
        "reason": outcome.reason,
    }
    if outcome.ok:
        return CheckResult(
            "broker.mqtt",
            Verdict.OK,
            True,
            f"MQTT {mqtt.protocol} CONNECT accepted by {mqtt.host}:{mqtt.port}"
            + (" over TLS" if mqtt.tls else "")
            + (f" as {mqtt.username}" if mqtt.username else " (anonymous)"),
            None,
            details,
        )
    return CheckResult("broker.mqtt", Verdict.FAIL, True, outcome.finding, outcome.fix, details)


@dataclass(frozen=True, slots=True)
class _Connect:
    ok: bool
    reason: str
    finding: str = ""
    fix: str | None = None


def _mqtt_connect(mqtt: MqttConfig, device_id: str, timeout_s: float) -> _Connect:
    import paho.mqtt.client as paho

    where = f"{mqtt.host}:{mqtt.port}"
    client_id = f"{agent_client_id(mqtt, device_id)}-doctor-{os.getpid()}"
    try:
        client = make_client(mqtt, client_id=client_id, connect_timeout_s=timeout_s)
    except PasswordFileError as exc:
        return _Connect(False, "password-file", str(exc), "create the file with the password")
    except TlsSetupError as exc:
        return _Connect(
            False,
            "tls-setup",
            f"TLS failure: {exc}",
            "check mqtt.tls.ca_file, cert_file and key_file (PEM, readable, key matches cert)",
        )

    answer: dict[str, Any] = {}

    def on_connect(
        _client: Any, _userdata: Any, _flags: Any, reason_code: Any, _properties: Any
    ) -> None:
        answer["reason"] = reason_code

    client.on_connect = on_connect
    try:
        client.reconnect()  # the first connect: make_client recorded where to
    except ssl.SSLCertVerificationError as exc:
        return _Connect(
            False,
            "tls-verify",
            f"TLS failure with {where}: certificate verify failed: {exc.verify_message}",
            "set mqtt.tls.ca_file to the CA that signed the broker's certificate, and check "
            "that the certificate names mqtt.host",
        )
    except ssl.SSLError as exc:
        return _Connect(
            False,
            "tls-handshake",
            f"TLS failure with {where}: {exc.reason or exc}",
            "check that the port is the broker's TLS listener and that a client certificate "
            "is configured if the broker requires one",
        )
    except (ConnectionResetError, BrokenPipeError) as exc:
        if mqtt.tls is None:
            return _Connect(
                False,
                "closed",
                f"{where} closed the connection during CONNECT: {exc}",
                "check mqtt.port and mqtt.tls against the broker's listener",
            )
        return _Connect(
            False,
            "tls-handshake",
            f"TLS failure with {where}: the connection was reset during the TLS handshake "
            "(a plain MQTT port?)",
            "point mqtt.port at the broker's TLS listener (usually 8883), or remove mqtt.tls",
        )
    except ConnectionRefusedError:
        return _Connect(
            False,
            "unreachable",
            f"broker {where} unreachable: connection refused",
            "start the broker or correct mqtt.host/mqtt.port",
        )
    except OSError as exc:
        return _Connect(
            False,
            "unreachable",
            f"broker {where} unreachable: {exc}",
            "check the network and mqtt.host/mqtt.port",
        )
    deadline = time.monotonic() + timeout_s
    try:
        while "reason" not in answer and time.monotonic() < deadline:
            rc = client.loop(timeout=0.1)
            if rc != paho.MQTT_ERR_SUCCESS and "reason" not in answer:
                return _Connect(
                    False,
                    "closed",
                    f"{where} closed the connection before answering CONNECT"
                    + ("" if mqtt.tls else " (is it a TLS port? then set mqtt.tls)"),
                    "check mqtt.port and mqtt.tls against the broker's listener",
                )
    finally:
        if "reason" in answer and not answer["reason"].is_failure:
            client.disconnect()
            client.loop(timeout=0.1)  # sends DISCONNECT, then paho closes the socket
        sock = client.socket()
        if sock is not None:  # no CONNACK came: close it ourselves
            with contextlib.suppress(OSError):
                sock.close()
    reason = answer.get("reason")
    if reason is None:
        return _Connect(
            False,
            "timeout",
            f"{where} accepted TCP but sent no CONNACK within {timeout_s:g} s",
            "check that the port is an MQTT listener (and TLS or not, as configured)",
        )
    if not reason.is_failure:
        return _Connect(True, str(reason))
    code = int(reason.value)
    text = str(reason)
    if code == 0x86:  # Bad user name or password (3.1.1: 4)
        return _Connect(
            False,
            "bad-credentials",
            f"{where} refused the connection: {text.lower()} (user {mqtt.username or 'none'})",
            "check mqtt.username and the password in mqtt.password_file against the broker's "
            "password file (mosquitto_passwd)",
        )
    if code == 0x87:  # Not authorized (3.1.1: 5)
        if mqtt.username is None:
            return _Connect(
                False,
                "not-authorised",
                f"{where} refused the connection: not authorised ({text}); the broker does "
                "not allow anonymous clients",
                "set mqtt.username and mqtt.password_file to an account the broker knows",
            )
        # mosquitto 2 answers "not authorised", not "bad user name or password", to a
        # wrong password as well, so both causes are named.
        return _Connect(
            False,
            "not-authorised",
            f"{where} refused the connection: not authorised ({text}) for user "
            f"{mqtt.username}: the password is wrong or the user is not allowed",
            "check the password in mqtt.password_file against the broker's password file "
            "(mosquitto_passwd) and that the broker allows this user",
        )
    return _Connect(
        False,
        f"refused-{code}",
        f"{where} refused the connection: {text} (reason code {code})",
        "see the broker's log for why",
    )
