"""The one factory of paho clients, and what a failed connection means.

`make_client` is the one place a paho client is set up from an `MqttConfig` (client id,
protocol, credentials, TLS, last will, back-off, keepalive): the link (`edgeagent.mqtt.link`),
the fleet CLI's connection, doctor's broker check, the demo's view, the tests and the bench
all use it, so they log in the same way. It trusts the validated config (the cross-field rules
live in `MqttConfig`/`TlsConfig`) and only reports what cannot be known before run time.

Errors say what went wrong and what to do: `explain_connect_error` and `explain_early_close`
name a TLS client talking to a plain listener, a plain client talking to a TLS one, an
untrusted certificate or a refused connection, with the config key to change.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.errors import ConfigError

if TYPE_CHECKING:  # config.py imports this package's config models: no cycle at run time
    from edgeagent.config import MqttConfig, TlsConfig

log = logging.getLogger(__name__)

# TCP ports brokers usually listen on, for hints: plain MQTT and MQTT over TLS.
_PLAIN_PORT: Final = 1883
_TLS_PORT: Final = 8883
# paho's ERROR lines that the link reports itself (as connection state or `last_error`).
_DEMOTED: Final = ("Client is not connected", "failed to receive on socket")


class _DemoteNotConnected(logging.Filter):
    """paho 2.x logs "Client is not connected" at ERROR when its loop runs once more after
    a clean disconnect, and "failed to receive on socket" for every retry against a
    listener that hangs up; the link reports both itself, so they are debug noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith(_DEMOTED):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return log.isEnabledFor(logging.DEBUG)
        return True


_paho_log = logging.getLogger(f"{__name__}.paho")
_paho_log.addFilter(_DemoteNotConnected())


class PasswordFileError(ConfigError):
    """`mqtt.password_file` cannot be read or is empty."""


class TlsSetupError(ConfigError):
    """The TLS files in `mqtt.tls` cannot be used (missing, not PEM, key not matching)."""


def read_password(path: Path) -> str:
    """The password in `path` (one line; a systemd credential, say); PasswordFileError
    naming the file when it cannot be read or is empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise PasswordFileError(f"cannot read the MQTT password file {path}: {reason}") from exc
    password = text.rstrip("\r\n")
    if not password:
        raise PasswordFileError(f"the MQTT password file {path} is empty")
    return password


def _describe_os_error(exc: BaseException) -> str:
    """'connection reset by peer' rather than '[Errno 104] Connection reset by peer'."""
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def explain_connect_error(exc: BaseException | None, *, where: str, tls: bool) -> str:
    """One line for a failed connect to `where` ('host:port'): what went wrong and what to
    change. `tls`: whether mqtt.tls is set (the link speaks TLS)."""
    if exc is None:
        return f"cannot connect to {where}: connection failed"
    detail = _describe_os_error(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS handshake with {where} failed: the broker's certificate is not trusted "
            f"({detail}): set mqtt.tls.ca_file to the CA that signed it, and make mqtt.host "
            "match a name in the certificate"
        )
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the broker's host name in {where} ({detail}): check mqtt.host"
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"connection to {where} refused: no broker listens there (is it running, and "
            "are mqtt.host and mqtt.port right?)"
        )
    if tls and isinstance(
        exc, ConnectionResetError | ConnectionAbortedError | ssl.SSLError | EOFError
    ):
        return (
            f"TLS handshake with {where} failed ({detail}): is this port a TLS listener? "
            f"mqtt.tls is set, so the agent speaks TLS; the usual TLS port is {_TLS_PORT} "
            f"and {_PLAIN_PORT} is plain MQTT. Point mqtt.port at the broker's TLS listener, "
            "or remove mqtt.tls for a plain one"
        )
    return f"cannot connect to {where}: {detail}"


def explain_early_close(*, where: str, tls: bool) -> str:
    """The broker closed the connection before it answered CONNECT: a plain client on a
    TLS listener, most often."""
    if tls:
        return (
            f"the broker at {where} closed the connection before answering MQTT CONNECT "
            "(after the TLS handshake): check its log; it may require a client certificate "
            "(mqtt.tls.cert_file, mqtt.tls.key_file) or refuse this client id"
        )
    return (
        f"the broker at {where} closed the connection before answering MQTT CONNECT: is "
        f"this port a TLS listener? mqtt.tls is not set, so the agent speaks plain MQTT; the "
        f"usual TLS port is {_TLS_PORT}. Set mqtt.tls (mqtt.tls.ca_file for a private CA), "
        f"or point mqtt.port at a plain listener (usually {_PLAIN_PORT})"
    )


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for a client that vanishes without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def agent_client_id(config: MqttConfig, device_id: str) -> str:
    """The client id the agent connects with: `mqtt.client_id`, else edgeagent-<device id>."""
    return config.client_id or f"edgeagent-{device_id}"


def make_client(
    config: MqttConfig,
    *,
    client_id: str,
    will: Will | None = None,
    session_expiry_s: int | None = None,
    connect_timeout_s: float | None = None,
) -> mqtt.Client:
    """A paho client (callback API 2) set up as `config` says: protocol, credentials (the
    password is read from `password_file` now), TLS, reconnect back-off, and `will`.

    It is told where to connect but does no network I/O: `loop_start()` then connects in
    the background and retries with the back-off; `reconnect()` connects now (blocking;
    OSError or ssl.SSLError when it cannot). `session_expiry_s`: the broker keeps the
    session (subscriptions, queued QoS 1 messages) while the client is away (MQTT 5: for
    that long; 3.1.1: as long as the broker keeps sessions); None: a clean session on
    every connect. `connect_timeout_s`: how long one connect attempt may take (default:
    paho's 5 s). Raises PasswordFileError or TlsSetupError (both ConfigError)."""
    v5 = config.protocol == "5"
    keep_session = session_expiry_s is not None
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not keep_session,
    )
    if connect_timeout_s is not None:
        client.connect_timeout = connect_timeout_s
    client.enable_logger(_paho_log)
    # An exception escaping a callback would end paho's network thread for good.
    client.suppress_exceptions = True
    low = config.reconnect_min_s
    # paho annotates the delays as int but sleeps for float seconds.
    client.reconnect_delay_set(low, max(config.reconnect_max_s, low))  # type: ignore[arg-type]
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    if config.username is not None:
        password = read_password(config.password_file) if config.password_file else None
        client.username_pw_set(config.username, password)
    if config.tls is not None:
        _set_tls(client, config.tls)
    properties = None
    if v5 and keep_session:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry_s
    client.connect_async(
        config.host,
        config.port,
        keepalive=config.keepalive,
        clean_start=not keep_session if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
    )
    return client


def _set_tls(client: mqtt.Client, tls: TlsConfig) -> None:
    try:
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
        )
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        files = ", ".join(str(p) for p in (tls.ca_file, tls.cert_file, tls.key_file) if p)
        raise TlsSetupError(
            f"cannot set up MQTT TLS with {files or 'the system trust store'}: {exc}"
        ) from exc
    if tls.insecure:
        client.tls_insecure_set(True)
