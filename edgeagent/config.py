"""The agent's configuration: YAML in, frozen validated models out.

Unknown keys are rejected. Every error names the key path and the line in the file, and
says what was expected. Each key is documented in docs/configuration.md.

A leaf: every section is defined here (a source's settings in its backend's light
settings module), and nothing here imports the runtime (the MQTT client, LiteRT, SQLite,
numpy), so a command that only reads the configuration starts fast. Runtime modules
import their section from here, never the reverse.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from edgeagent.errors import ConfigError
from edgeagent.events.settings import EveryPublish, PublishSettings
from edgeagent.hal.audio.settings import AlsaMicrophone, SyntheticSounds, WavAudio
from edgeagent.hal.camera.settings import ImagesCamera, OpenCVCamera, PiCamera, SyntheticCamera
from edgeagent.hal.sensor.settings import CsvSensor, Mpu6050Sensor, SyntheticVibration
from edgeagent.hal.settings import SourceSettings
from edgeagent.names import check_device_id, check_name

log = logging.getLogger(__name__)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _topic_prefix(value: str) -> str:
    if not value or value.startswith("/") or any(c in value for c in "#+\0"):
        raise ValueError("must be a non-empty topic without '#', '+' or a leading '/'")
    return value.rstrip("/")


def _needs_key(value: Path | None, info: ValidationInfo, other: str, message: str) -> Path | None:
    """`value`, refused with `message` when it is set and the key `other` is not."""
    # `other` is declared first, so it is in info.data unless it was itself invalid.
    if value is not None and other in info.data and info.data[other] is None:
        raise ValueError(message)
    return value


def _group_names(value: tuple[str, ...]) -> tuple[str, ...]:
    for group in value:
        check_name(group, "group name")
    return value


# --- sources -------------------------------------------------------------------------


SOURCE_BACKENDS: tuple[type[SourceSettings], ...] = (
    SyntheticCamera,
    ImagesCamera,
    OpenCVCamera,
    PiCamera,
    SyntheticVibration,
    CsvSensor,
    Mpu6050Sensor,
    SyntheticSounds,
    WavAudio,
    AlsaMicrophone,
)
"""Every camera, sensor and audio backend, by its settings model: the one list that the
`source:` union and the backend registry (edgeagent/hal/sources.py) are built from."""

if TYPE_CHECKING:
    # Code past the configuration uses only what every backend declares.
    SourceConfig = SourceSettings
else:
    SourceConfig = Annotated[Union[SOURCE_BACKENDS], Field(discriminator="type")]  # noqa: UP007

# --- inference specs (also in a model's manifest) -------------------------------------------


class ImagePreprocess(_Model):
    """Camera frames -> input tensor: resize, colour order, then (pixel - mean) / std.

    The float result is quantised with the input tensor's own scale and zero point, so the
    same spec serves float, int8 and uint8 models.
    """

    type: Literal["image"] = "image"
    resize: Literal["stretch", "letterbox", "crop"] = "stretch"
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (255.0,)


class WindowPreprocess(_Model):
    """Sensor windows -> input tensor: the last `length` samples (the model's length when
    omitted), then (value - mean) / std per channel."""

    type: Literal["window"] = "window"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


Preprocess = Annotated[ImagePreprocess | WindowPreprocess, Field(discriminator="type")]


class ClassificationTask(_Model):
    type: Literal["classification"] = "classification"
    top_k: int = Field(default=3, ge=1)
    threshold: float = Field(default=0.0, ge=0.0, le=1.0)


class DetectionTask(_Model):
    """`postprocess`: the four outputs of TFLite_Detection_PostProcess (boxes, classes,
    scores, count); `box_index` gives the positions of left, top, right and bottom in each
    box (the op's own order, ymin xmin ymax xmax, by default). `yolov8` (also called `raw`):
    one head of (cx, cy, w, h) then one score per class, as [1, N, 4 + C] or transposed
    [1, 4 + C, N] (YOLOv8/v11). `yolov5`: [1, N, 5 + C] with an objectness score after the
    box. Box coordinates are normalised to the model input or, with `coordinates: pixels`,
    in input pixels (`auto` tells them apart by their size); the agent runs class-wise
    non-maximum suppression on YOLO heads. `auto` picks postprocess for four outputs and
    a YOLO layout for one."""

    type: Literal["detection"] = "detection"
    layout: Literal["auto", "postprocess", "raw", "yolov8", "yolov5"] = "auto"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.45, gt=0.0, le=1.0)
    max_detections: int = Field(default=20, ge=1)
    coordinates: Literal["auto", "normalized", "pixels"] = "auto"
    box_index: tuple[int, int, int, int] = (1, 0, 3, 2)

    @field_validator("box_index")
    @classmethod
    def _permutation(cls, value: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        if sorted(value) != [0, 1, 2, 3]:
            raise ValueError("must hold the positions 0, 1, 2 and 3, each once")
        return value


class PoseTask(_Model):
    """MoveNet: one [1, 1, 17, 3] pose (SinglePose) or [1, K, 56] poses (MultiPose), each
    keypoint (y, x, score) normalised to the model input, in COCO order. A pose is reported
    when its score (MultiPose's own, SinglePose's mean keypoint score) is >= `threshold`."""

    type: Literal["pose"] = "pose"
    threshold: float = Field(default=0.2, ge=0.0, le=1.0)
    max_poses: int = Field(default=6, ge=1)


class SegmentationTask(_Model):
    """One [1, H, W, C] output: C class scores per pixel (argmax), or C = 1 foreground
    probability (or logit) compared with `threshold`. The result is each class's fraction
    of the source image; the mask itself is kept for the snapshot, never published."""

    type: Literal["segmentation"] = "segmentation"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    min_fraction: float = Field(default=0.0, ge=0.0, le=1.0)


class AnomalyTask(_Model):
    """`output`: the model's first output is the anomaly score. `reconstruction`: the model
    is an autoencoder and the score is the mean squared error between its (normalised)
    input and its output."""

    type: Literal["anomaly"] = "anomaly"
    score: Literal["output", "reconstruction"] = "output"
    threshold: float


class RawTask(_Model):
    type: Literal["raw"] = "raw"


AnyTask = ClassificationTask | DetectionTask | PoseTask | SegmentationTask | AnomalyTask | RawTask
Task = Annotated[AnyTask, Field(discriminator="type")]


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
    # What is published of the results (edgeagent/events/settings.py).
    publish: PublishSettings = Field(default_factory=EveryPublish)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)


# --- MQTT ----------------------------------------------------------------------------


class TlsConfig(_Model):
    ca_file: Path | None = None  # default: the system's trust store
    cert_file: Path | None = None  # client certificate (mutual TLS); may hold its key too
    key_file: Path | None = None  # needs cert_file; default: the key is in cert_file
    insecure: bool = False  # skip host name verification (test brokers only)

    @field_validator("key_file")
    @classmethod
    def _key_needs_certificate(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _needs_key(
            value,
            info,
            "cert_file",
            "a client key needs its certificate: set cert_file as well (or remove key_file)",
        )


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
    # full: each wait is random in [0, min(max, min * 2**attempt)] (edgeagent/mqtt/backoff.py);
    # none: min, 2 min, 4 min ... max, the same instants on every device.
    reconnect_jitter: Literal["full", "none"] = "full"

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as an int and `3.1.1` as a string.
        return str(value) if isinstance(value, int | float) else value

    @field_validator("password_file")
    @classmethod
    def _password_needs_username(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _needs_key(
            value,
            info,
            "username",
            "a password needs a user name: set username as well (or remove password_file)",
        )

    _prefix = field_validator("prefix")(_topic_prefix)


class DeviceConfig(_Model):
    id: str = Field(default_factory=socket.gethostname)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check_device_id(value)


_MIB = 1 << 20


class DeliveryConfig(_Model):
    """`delivery:` (formerly `models:`): the on-device model store, trusted signing keys,
    limits and probation for models delivered over MQTT (docs/model-delivery.md)."""

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

    _groups = field_validator("groups")(_group_names)


# --- outbox, commands, telemetry, Home Assistant ----------------------------------------

_DAY_S = 24 * 3600.0


class OutboxConfig(_Model):
    """`outbox:`: the durable store of results and events (edgeagent/outbox/store.py)."""

    path: Path | None = None  # default: <state_dir>/outbox.db (edgeagent/paths.py)
    max_bytes: int = Field(default=256 * _MIB, gt=0)  # topic + payload bytes stored
    max_rows: int | None = Field(default=None, gt=0)
    max_age_s: float | None = Field(default=7 * _DAY_S, gt=0)
    backlog_rate: float = Field(default=200.0, gt=0)  # backlog messages/s after a reconnect
    enabled: bool = True


BUILTIN_COMMANDS = frozenset(
    {
        "ping",
        "status",
        "config.get",
        "config.set",
        "pipeline.start",
        "pipeline.stop",
        "pipeline.restart",
        "model.rollback",
        "snapshot",
        "bench",
        "logs",
        "restart",
    }
)
"""Every command the agent knows (edgeagent/commands/router.py routes them); `commands.allow`
picks from these."""


class CommandsConfig(_Model):
    """`commands:`: which commands run here and how requests are bounded."""

    allow: tuple[str, ...] | None = None  # None: every built-in command
    max_payload_bytes: int = Field(default=64 * 1024, ge=256, le=16 * 1024 * 1024)
    groups: tuple[str, ...] = ()  # fan-out groups this device answers in
    dedup_size: int = Field(default=1024, ge=1, le=1_000_000)  # request ids remembered
    dedup_ttl_s: float = Field(default=3600.0, gt=0)
    # Bytes of recorded replies (and ids) the repeat-id cache may hold (commands/ledger.py).
    dedup_max_bytes: int = Field(default=1024 * 1024, ge=16 * 1024, le=1024 * 1024 * 1024)
    # Folders under which a file path set by `config.set` (an images, csv or wav source's
    # `path`, an opencv `uri` that is a file, a pipeline's `model`) or `bench`'s `model`
    # must resolve, symlinks followed. Empty: remote commands may name no file at all.
    remote_paths: tuple[Path, ...] = ()

    @field_validator("allow")
    @classmethod
    def _known_commands(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        unknown = sorted(set(value or ()) - BUILTIN_COMMANDS)
        if unknown:
            raise ValueError(
                f"unknown command(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(BUILTIN_COMMANDS))}"
            )
        return value

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        _group_names(value)
        if len(set(value)) != len(value):
            raise ValueError("group names must be unique")
        return value

    @field_validator("remote_paths")
    @classmethod
    def _absolute(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        relative = [str(p) for p in value if not p.expanduser().is_absolute()]
        if relative:
            raise ValueError(f"must be absolute folders; relative: {', '.join(relative)}")
        return tuple(p.expanduser() for p in value)


class PrometheusConfig(_Model):
    host: str = "127.0.0.1"  # loopback: expose it wider on purpose, not by default
    port: int = Field(default=9108, ge=0, le=65535)  # 0: any free port


class TelemetryConfig(_Model):
    """`telemetry:` (edgeagent/telemetry/report.py)."""

    interval_s: float = Field(default=30.0, gt=0)
    prometheus: PrometheusConfig | None = None  # None: no HTTP endpoint


class DiscoveryConfig(_Model):
    """`homeassistant:`: Home Assistant MQTT discovery (edgeagent/telemetry/homeassistant.py)."""

    enabled: bool = False
    prefix: str = "homeassistant"  # HA's discovery prefix; its birth topic is <prefix>/status

    _prefix = field_validator("prefix")(_topic_prefix)


class AgentConfig(_Model):
    device: DeviceConfig = Field(default_factory=DeviceConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    pipelines: tuple[PipelineConfig, ...] = ()
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    commands: CommandsConfig = Field(default_factory=CommandsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    homeassistant: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
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


def _tags(node: dict[Any, Any]) -> tuple[Any, ...]:
    """The discriminators a mapping may carry: a backend's `type:`, a publish `mode:`."""
    return (node.get("type"), node.get("mode"))


def _key_path(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """The location as keys in the file: pydantic adds each union member's tag (for
    example 'synthetic' in pipelines.0.source.synthetic.fps, 'events' in
    pipelines.0.publish.events.zones), which is no key."""
    path: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and part in _tags(node):
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
            key = str(error.get("ctx", {}).get("discriminator", "'type'")).strip("'")
            message = f"needs a '{key}:' key"
        messages.append(f"{where}: {dotted}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(messages)


def _nearest_line(path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    for end in range(len(path), -1, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return None


RENAMED_KEYS: Final = {"models": "delivery"}
"""Top-level keys renamed since they were introduced: the old name keeps working for now,
with a warning that names the new one."""


def rename_legacy_keys(
    data: dict[str, Any], source: str, lines: dict[tuple[Any, ...], int] | None = None
) -> dict[str, Any]:
    """`data` with each old top-level key in `RENAMED_KEYS` under its new name (warning
    once per key); ConfigError when both names are given."""
    for old, new in RENAMED_KEYS.items():
        if old not in data:
            continue
        line = (lines or {}).get((old,))
        where = f"{source}:{line}" if line else source
        if new in data:
            raise ConfigError(f"{where}: {old}: is the old name of {new}:; give only {new}:")
        log.warning(
            "%s: '%s:' is now called '%s:'; the old name still works for now", where, old, new
        )
        data = {(new if key == old else key): value for key, value in data.items()}
        if lines is not None:
            for path in [p for p in lines if p[:1] == (old,)]:
                lines[(new, *path[1:])] = lines.pop(path)
    return data


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
    data = rename_legacy_keys(data, source, lines)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, data, lines, source)) from exc


def validate_config_data(data: dict[str, Any], source: str) -> AgentConfig:
    """Validates already-parsed configuration data (no line numbers to report)."""
    data = rename_legacy_keys(data, source)
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
