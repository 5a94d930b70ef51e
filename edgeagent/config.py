"""The agent's configuration: YAML in, frozen validated models out.

Unknown keys are rejected. Every error names the key path and the line in the file, and
says what was expected. Each key is documented in docs/configuration.md.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgeagent.errors import ConfigError
from edgeagent.inference.spec import Preprocess, Task
from edgeagent.mqtt.commands import CommandsConfig
from edgeagent.mqtt.discovery import DiscoveryConfig
from edgeagent.mqtt.outbox import OutboxConfig
from edgeagent.mqtt.telemetry import TelemetryConfig
from edgeagent.mqtt.topics import SAFE_NAME


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _topic_safe(value: str) -> str:
    if not SAFE_NAME.fullmatch(value):
        raise ValueError(
            "must be 1-64 characters of letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (it becomes an MQTT topic level)"
        )
    return value


# --- sources -------------------------------------------------------------------------


class SyntheticCamera(_Model):
    """A deterministic scene of moving shapes on a noisy background."""

    type: Literal["synthetic"]
    width: int = Field(default=640, ge=32, le=4096)
    height: int = Field(default=480, ge=32, le=4096)
    fps: float = Field(default=30.0, ge=0)  # 0: as fast as the consumer reads
    seed: int = 0
    shapes: int = Field(default=3, ge=0, le=16)


class ImagesCamera(_Model):
    """Image files from a folder or a glob, played in name order and looped."""

    type: Literal["images"]
    path: str
    fps: float = Field(default=1.0, ge=0)
    loop: bool = True


class OpenCVCamera(_Model):
    """A video file, a V4L2 device (/dev/video0 or an index) or an RTSP URL via OpenCV."""

    type: Literal["opencv"]
    uri: str
    fps: float = Field(default=0, ge=0)  # 0: the stream's own pace
    width: int | None = None
    height: int | None = None


class PiCamera(_Model):
    """The Raspberry Pi camera through picamera2 (libcamera)."""

    type: Literal["picamera2"]
    width: int = 640
    height: int = 480
    fps: float = Field(default=30.0, gt=0)
    camera: int = 0


class SyntheticVibration(_Model):
    """An accelerometer-like signal with faults that can be injected."""

    type: Literal["synthetic-vibration"]
    rate_hz: float = Field(default=1000.0, gt=0)
    window: int = Field(default=256, ge=8)  # samples per window
    hop: int | None = Field(default=None, ge=1)  # samples between windows; default: window
    seed: int = 0
    fault_rate: float = Field(default=0.1, ge=0, le=1)  # fraction of windows with a fault
    realtime: bool = True  # pace windows at rate_hz; false: as fast as read


class CsvSensor(_Model):
    """Replays a CSV file, one row per sample, one numeric column per channel."""

    type: Literal["csv"]
    path: str
    rate_hz: float = Field(default=100.0, gt=0)
    window: int = Field(default=256, ge=1)
    hop: int | None = Field(default=None, ge=1)
    columns: tuple[str, ...] | None = None  # default: every numeric column
    loop: bool = True


class Mpu6050Sensor(_Model):
    """An MPU-6050 accelerometer on the I2C bus via smbus2."""

    type: Literal["mpu6050"]
    bus: int = 1
    address: int = 0x68
    rate_hz: float = Field(default=200.0, gt=0, le=1000)
    window: int = Field(default=256, ge=1)
    hop: int | None = Field(default=None, ge=1)


class SyntheticSounds(_Model):
    """Labelled sounds (background, beep, siren, knock), one class per segment, at random."""

    type: Literal["synthetic-sounds"]
    rate_hz: float = Field(default=8000.0, gt=0)
    window: int = Field(default=8000, ge=8)  # samples per window
    hop: int | None = Field(default=None, ge=1)  # samples between windows; default: window
    segment: int | None = Field(default=None, ge=1)  # samples per sound; default: window
    sounds: tuple[str, ...] | None = None  # the classes to play; default: all
    seed: int = 0
    realtime: bool = True  # pace windows at rate_hz; false: as fast as read


class WavAudio(_Model):
    """Replays a PCM WAV file (8, 16, 24 or 32 bit) as mono windows in [-1, 1]."""

    type: Literal["wav"]
    path: str
    window: int = Field(default=8000, ge=1)
    hop: int | None = Field(default=None, ge=1)
    loop: bool = True
    realtime: bool = True  # pace windows at the file's sample rate


class AlsaMicrophone(_Model):
    """A microphone through ALSA (pyalsaaudio, the `audio` extra), mono windows in [-1, 1]."""

    type: Literal["alsa"]
    device: str = "default"
    rate_hz: int = Field(default=16000, ge=1000, le=192000)
    channels: int = Field(default=1, ge=1, le=8)  # captured, then mixed to mono
    window: int = Field(default=16000, ge=1)
    hop: int | None = Field(default=None, ge=1)
    period: int = Field(default=1024, ge=32)  # frames per ALSA read


SourceConfig = Annotated[
    SyntheticCamera
    | ImagesCamera
    | OpenCVCamera
    | PiCamera
    | SyntheticVibration
    | CsvSensor
    | Mpu6050Sensor
    | SyntheticSounds
    | WavAudio
    | AlsaMicrophone,
    Field(discriminator="type"),
]

AcceleratorName = Literal["auto", "edgetpu", "gpu", "cpu"]


class PipelineConfig(_Model):
    name: str
    source: SourceConfig
    model: str  # a bundled model name or a path to a .tflite
    accelerator: AcceleratorName = "auto"
    # After a failover, how often to check whether the faster accelerator is back.
    accelerator_reprobe_s: float = Field(default=30.0, gt=0)
    threads: int = Field(default=2, ge=1, le=64)
    max_fps: float | None = Field(default=None, gt=0)
    # Override or supply (for models with no manifest) the model's description.
    task: Task | None = None
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess | None = None
    enabled: bool = True

    _name = field_validator("name")(_topic_safe)


# --- MQTT ----------------------------------------------------------------------------


class TlsConfig(_Model):
    ca_file: Path | None = None  # default: the system's trust store
    cert_file: Path | None = None  # client certificate (mutual TLS)
    key_file: Path | None = None
    insecure: bool = False  # skip host name verification (test brokers only)


class MqttConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    prefix: str = "edgeagent"
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None  # default: edgeagent-<device id>
    username: str | None = None
    password_file: Path | None = None  # read at start; e.g. a systemd credential
    tls: TlsConfig | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    qos: Literal[0, 1] = 1  # results
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as an int and `3.1.1` as a string.
        return str(value) if isinstance(value, int | float) else value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "#+\0") or value.startswith("/"):
            raise ValueError("must be a non-empty topic without '#', '+' or a leading '/'")
        return value.rstrip("/")


class DeviceConfig(_Model):
    id: str = Field(default_factory=socket.gethostname)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        from edgeagent.mqtt.topics import Topics  # the topic rules live there; lazy: no cycle

        _topic_safe(value)
        Topics("edgeagent", value)  # raises ValueError for reserved ids
        return value


_MIB = 1 << 20


class DeliveryConfig(_Model):
    """`models:`: the on-device model store, trusted signing keys, limits and probation
    for models delivered over MQTT (docs/model-delivery.md)."""

    store: Path | None = None  # default: <state_dir>/models (edgeagent/paths.py)
    trusted_keys: tuple[Path, ...] = ()  # Ed25519 public key PEM files
    allow_unsigned: bool = False  # development only
    keep: int = Field(default=3, ge=1)  # versions kept for rollback
    quota_bytes: int = Field(default=512 * _MIB, gt=0)
    max_model_bytes: int = Field(default=128 * _MIB, gt=0)
    chunk_timeout_s: float = Field(default=120.0, gt=0)  # no progress for this long: timeout
    gate_timeout_s: float = Field(default=60.0, gt=0)
    probation_s: float = Field(default=120.0, ge=0)
    probation_min_results: int = Field(default=20, ge=0)
    latency_factor: float = Field(default=3.0, gt=0)  # new p95 invoke over the old p95
    # ... and by at least this much: on sub-millisecond models scheduler noise alone
    # can triple a p95.
    latency_floor_ms: float = Field(default=2.0, ge=0)
    groups: tuple[str, ...] = ()  # this device's groups; the first that names a pipeline wins

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for group in value:
            _topic_safe(group)
        return value


class AgentConfig(_Model):
    device: DeviceConfig = Field(default_factory=DeviceConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    pipelines: tuple[PipelineConfig, ...] = ()
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    commands: CommandsConfig = Field(default_factory=CommandsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    homeassistant: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    models: DeliveryConfig = Field(default_factory=DeliveryConfig)
    # Durable state (outbox, model store); default: $STATE_DIRECTORY (systemd), else
    # /var/lib/edgeagent. See edgeagent/paths.py.
    state_dir: Path | None = None
    # The local control socket `edgeagent status` talks to; default: see edgeagent/paths.py.
    control_socket: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("pipelines")
    @classmethod
    def _unique_names(cls, value: tuple[PipelineConfig, ...]) -> tuple[PipelineConfig, ...]:
        names = [p.name for p in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"pipeline names must be unique; repeated: {', '.join(duplicates)}")
        return value


# --- loading -------------------------------------------------------------------------


class _LineLoader(yaml.SafeLoader):
    """A safe loader that remembers the line of every mapping key and sequence item."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    lines = {
        loader.construct_object(key, deep=True): key.start_mark.line + 1 for key, _ in node.value
    }
    mapping["__lines__"] = lines
    return mapping


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> list[Any]:
    items = loader.construct_sequence(node, deep=True)
    return [
        _Positioned(item, child.start_mark.line + 1)
        for item, child in zip(items, node.value, strict=True)
    ]


class _Positioned:
    __slots__ = ("line", "value")

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _strip(node: Any, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> Any:
    """Removes the position bookkeeping, recording the line of each key path."""
    if isinstance(node, _Positioned):
        lines[path] = node.line
        return _strip(node.value, path, lines)
    if isinstance(node, dict):
        key_lines = node.pop("__lines__", {})
        out = {}
        for key, value in node.items():
            if key in key_lines:
                lines[(*path, key)] = key_lines[key]
            out[key] = _strip(value, (*path, key), lines)
        return out
    if isinstance(node, list):
        return [_strip(item, (*path, i), lines) for i, item in enumerate(node)]
    return node


def _key_path(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """The location as keys in the file: pydantic adds each union member's tag (for
    example 'synthetic' in pipelines.0.source.synthetic.fps), which is no key."""
    path: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue
        path.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(path)


def _format_errors(
    exc: ValidationError, data: Any, lines: dict[tuple[Any, ...], int], source: str
) -> str:
    messages = []
    for error in exc.errors():
        path = _key_path(tuple(error["loc"]), data)
        line = _nearest_line(path, lines)
        where = f"{source}:{line}" if line else source
        dotted = ".".join(str(p) for p in path) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling against docs/configuration.md)"
        elif error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] == "union_tag_invalid":
            ctx = error.get("ctx", {})
            message = f"unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
        elif error["type"] == "union_tag_not_found":
            message = "needs a 'type:' key"
        messages.append(f"{where}: {dotted}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(messages)


def _nearest_line(path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    for end in range(len(path), -1, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return None


def parse_config(text: str, source: str = "<config>") -> AgentConfig:
    """Validates YAML text into an `AgentConfig`; raises `ConfigError` naming lines."""
    lines: dict[tuple[Any, ...], int] = {}
    try:
        raw = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    data = _strip(raw, (), lines) if raw is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (device:, mqtt:, ...)")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, data, lines, source)) from exc


def validate_config_data(data: dict[str, Any], source: str) -> AgentConfig:
    """Validates already-parsed configuration data (no line numbers to report)."""
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, data, {}, source)) from exc


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    return parse_config(text, str(path))
