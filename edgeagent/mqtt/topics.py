"""Every MQTT topic the agent or the fleet tools publish to or subscribe to: the one place
they are built and parsed.

Per device, under `<prefix>/<device>/`: `status` (retained online/offline), `results/<pipeline>`,
`tracks/<pipeline>`, `state/<pipeline>` (retained summary), `snapshots/<pipeline>/<id>`,
`events`, `telemetry`, `reply`, `cmd/<name>`, `desired` and `reported`. Fleet-wide topics
live under `<prefix>/group/<group>/...` and `<prefix>/models/<name>/<version>/...`
(docs/protocol.md); `group` and `models` are therefore reserved and cannot be device ids.
`Topics` is one device's view; `FleetTopics` is the fleet side's (any device, wildcard
filters, a received topic parsed into its parts). Home Assistant's discovery topics live
under their own prefix (`discovery_config`, `discovery_birth`).
"""

from __future__ import annotations

from typing import NamedTuple

from edgeagent.names import GROUPS_LEVEL as _GROUPS
from edgeagent.names import MODELS_LEVEL as _MODELS
from edgeagent.names import RESERVED_DEVICE_IDS, check_not_reserved

_FORBIDDEN = frozenset("/+#\0")
DEVICE_KINDS = frozenset(
    {
        "status",
        "results",
        "events",
        "telemetry",
        "reply",
        "cmd",
        "desired",
        "reported",
        "tracks",
        "state",
        "snapshots",
    }
)
"""The first level under `<prefix>/<device>/`."""


def _level(value: str, what: str) -> str:
    """Returns `value` if it is usable as one topic level; raises ValueError naming `what`."""
    if not value:
        raise ValueError(f"{what} must not be empty (it becomes an MQTT topic level)")
    bad = sorted(_FORBIDDEN.intersection(value))
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(
            f"{what} {value!r} contains {shown}, which cannot be in an MQTT topic level"
        )
    return value


def _device(device_id: str) -> str:
    return check_not_reserved(_level(device_id, "device id"))


class DeviceTopic(NamedTuple):
    """A received per-device topic: `<prefix>/<device>/<kind>[/<rest>]` (rest may be "")."""

    device: str
    kind: str
    rest: str


class GroupTopic(NamedTuple):
    """A received group topic: `<prefix>/group/<group>/<kind>[/<rest>]`."""

    group: str
    kind: str
    rest: str


class ModelTopic(NamedTuple):
    """A received model topic: the manifest (`chunk` None) or chunk number `chunk`."""

    name: str
    version: str
    chunk: int | None


class FleetTopics:
    """The topics of every device and group under one prefix, as the fleet side sees them."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        prefix = prefix.rstrip("/")
        if not prefix or prefix.startswith("/") or any(c in prefix for c in "+#\0"):
            raise ValueError(
                f"MQTT prefix {prefix!r} must be a non-empty topic without '+', '#' "
                "or a leading '/'"
            )
        for level in prefix.split("/"):
            _level(level, "each level of the MQTT prefix")
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"FleetTopics(prefix={self.prefix!r})"

    def device_root(self, device_id: str) -> str:
        """`<prefix>/<device>`; its topics are this plus `/<kind>...`."""
        return f"{self.prefix}/{_device(device_id)}"

    def device_filter(self, device_id: str) -> str:
        """Every topic of one device."""
        return f"{self.device_root(device_id)}/#"

    def every_device(self, kind: str) -> str:
        """The filter for one kind (`status`, `reported`...) of every device."""
        if kind not in DEVICE_KINDS:
            raise ValueError(f"no per-device topic {kind!r} (one of {sorted(DEVICE_KINDS)})")
        return f"{self.prefix}/+/{kind}"

    def desired(self, device_id: str) -> str:
        return f"{self.device_root(device_id)}/desired"

    def group_desired(self, group: str) -> str:
        return f"{self._group(group)}/desired"

    def group_cmd(self, group: str, name: str) -> str:
        return f"{self._group(group)}/cmd/{_level(name, 'command name')}"

    def group_cmd_filter(self, group: str) -> str:
        return f"{self._group(group)}/cmd/#"

    def _group(self, group: str) -> str:
        return f"{self.prefix}/{_GROUPS}/{_level(group, 'group name')}"

    def model_manifest(self, name: str, version: str) -> str:
        return f"{self._model(name, version)}/manifest"

    def model_chunk(self, name: str, version: str, index: int) -> str:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"chunk index must be a non-negative int, not {index!r}")
        return f"{self._model(name, version)}/chunk/{index}"

    def model_chunk_pattern(self, name: str, version: str) -> str:
        """How a chunk topic reads, for people: `.../chunk/<i>`."""
        return f"{self._model(name, version)}/chunk/<i>"

    def _model(self, name: str, version: str) -> str:
        name = _level(name, "model name")
        return f"{self.prefix}/{_MODELS}/{name}/{_level(version, 'model version')}"

    # --- parsing received topics ---------------------------------------------------------

    def _levels(self, topic: str) -> list[str] | None:
        if not topic.startswith(self.prefix + "/"):
            return None
        return topic[len(self.prefix) + 1 :].split("/")

    def parse_device(self, topic: str) -> DeviceTopic | None:
        """(device, kind, rest) of a per-device topic; None for any other topic."""
        levels = self._levels(topic)
        if levels is None or len(levels) < 2 or levels[0] in RESERVED_DEVICE_IDS:
            return None
        if not levels[0] or levels[1] not in DEVICE_KINDS:
            return None
        return DeviceTopic(levels[0], levels[1], "/".join(levels[2:]))

    def parse_group(self, topic: str) -> GroupTopic | None:
        """(group, kind, rest) of a group topic; None for any other topic."""
        levels = self._levels(topic)
        if levels is None or len(levels) < 3 or levels[0] != _GROUPS or not levels[1]:
            return None
        return GroupTopic(levels[1], levels[2], "/".join(levels[3:]))

    def parse_model(self, topic: str) -> ModelTopic | None:
        """The model, version and chunk index (None: the manifest) of a model topic."""
        levels = self._levels(topic)
        if levels is None or levels[0] != _MODELS:
            return None
        parts = levels[1:]
        if len(parts) == 3 and parts[2] == "manifest":
            return ModelTopic(parts[0], parts[1], None)
        if len(parts) == 4 and parts[2] == "chunk" and parts[3].isdigit() and len(parts[3]) < 10:
            return ModelTopic(parts[0], parts[1], int(parts[3]))
        return None

    def is_model_topic(self, topic: str) -> bool:
        return topic.startswith(f"{self.prefix}/{_MODELS}/")


class Topics:
    """The topics of one device under one prefix; arguments are validated as topic levels."""

    __slots__ = ("_base", "device_id", "fleet", "prefix")

    def __init__(self, prefix: str, device_id: str) -> None:
        self.fleet = FleetTopics(prefix)
        self.prefix = self.fleet.prefix
        self.device_id = _device(device_id)
        self._base = f"{self.prefix}/{device_id}"

    def __repr__(self) -> str:
        return f"Topics(prefix={self.prefix!r}, device_id={self.device_id!r})"

    # --- this device ---------------------------------------------------------------------

    @property
    def status(self) -> str:
        """Retained `online`/`offline` JSON; also the last will."""
        return f"{self._base}/status"

    def results(self, pipeline: str) -> str:
        return f"{self._base}/results/{_level(pipeline, 'pipeline name')}"

    def tracks(self, pipeline: str) -> str:
        """Tracked-object events `new`/`update`/`end` (`publish: {mode: events}`)."""
        return f"{self._base}/tracks/{_level(pipeline, 'pipeline name')}"

    def state(self, pipeline: str) -> str:
        """The retained summary of a pipeline: current counts by label and by zone."""
        return f"{self._base}/state/{_level(pipeline, 'pipeline name')}"

    def snapshot(self, pipeline: str, track_id: str) -> str:
        """The best JPEG of one tracked object."""
        pipeline = _level(pipeline, "pipeline name")
        return f"{self._base}/snapshots/{pipeline}/{_level(track_id, 'track id')}"

    @property
    def events(self) -> str:
        return f"{self._base}/events"

    @property
    def telemetry(self) -> str:
        return f"{self._base}/telemetry"

    @property
    def reply(self) -> str:
        """Where command replies go when the request named no MQTT 5 response topic."""
        return f"{self._base}/reply"

    def cmd(self, name: str) -> str:
        return f"{self._base}/cmd/{_level(name, 'command name')}"

    @property
    def cmd_filter(self) -> str:
        return f"{self._base}/cmd/#"

    @property
    def desired(self) -> str:
        return f"{self._base}/desired"

    @property
    def reported(self) -> str:
        return f"{self._base}/reported"

    # --- fleet-wide ----------------------------------------------------------------------

    def group_desired(self, group: str) -> str:
        return self.fleet.group_desired(group)

    def group_cmd(self, group: str, name: str) -> str:
        return self.fleet.group_cmd(group, name)

    def group_cmd_filter(self, group: str) -> str:
        return self.fleet.group_cmd_filter(group)

    def model_manifest(self, name: str, version: str) -> str:
        return self.fleet.model_manifest(name, version)

    def model_chunk(self, name: str, version: str, index: int) -> str:
        return self.fleet.model_chunk(name, version, index)

    # --- parsing incoming topics ---------------------------------------------------------

    def cmd_name(self, topic: str) -> str | None:
        """The command name (may span levels) of a topic under `cmd_filter` or any
        `group_cmd_filter`; None for any other topic."""
        own = self.fleet.parse_device(topic)
        if own is not None and own.device == self.device_id and own.kind == "cmd":
            return own.rest or None
        group = self.fleet.parse_group(topic)
        if group is not None and group.kind == "cmd":
            return group.rest or None
        return None

    def result_pipeline(self, topic: str) -> str | None:
        """The pipeline of one of this device's result topics; None for any other topic."""
        parsed = self.fleet.parse_device(topic)
        if parsed is None or parsed.device != self.device_id or parsed.kind != "results":
            return None
        return parsed.rest if parsed.rest and "/" not in parsed.rest else None


# --- Home Assistant MQTT discovery (its own prefix, `homeassistant` by default) --------------


def discovery_config(ha_prefix: str, node: str, object_id: str, component: str = "sensor") -> str:
    """Where the retained config of one entity (a `sensor`, a `binary_sensor`) goes."""
    node, object_id = _level(node, "node id"), _level(object_id, "object id")
    return f"{ha_prefix}/{component}/{node}/{object_id}/config"


def discovery_birth(ha_prefix: str) -> str:
    """Where Home Assistant publishes `online` when it starts."""
    return f"{ha_prefix}/status"
