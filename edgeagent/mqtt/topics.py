"""Every MQTT topic the agent publishes to or subscribes to; the one place they are built.

Per device, under `<prefix>/<device>/`: `status` (retained online/offline), `results/<pipeline>`,
`events`, `telemetry`, `reply`, `cmd/<name>`, `desired` and `reported`. Fleet-wide topics
live under `<prefix>/group/<group>/...` and `<prefix>/models/<name>/<version>/...`
(docs/protocol.md); `group` and `models` are therefore reserved and cannot be device ids.
"""

from __future__ import annotations

from edgeagent.names import GROUPS_LEVEL as _GROUPS
from edgeagent.names import MODELS_LEVEL as _MODELS
from edgeagent.names import RESERVED_DEVICE_IDS

_FORBIDDEN = frozenset("/+#\0")


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


class Topics:
    """The topics of one device under one prefix; arguments are validated as topic levels."""

    __slots__ = ("_base", "_prefix", "device_id", "prefix")

    def __init__(self, prefix: str, device_id: str) -> None:
        prefix = prefix.rstrip("/")
        if not prefix or prefix.startswith("/") or any(c in prefix for c in "+#\0"):
            raise ValueError(
                f"MQTT prefix {prefix!r} must be a non-empty topic without '+', '#' "
                "or a leading '/'"
            )
        for level in prefix.split("/"):
            _level(level, "each level of the MQTT prefix")
        _level(device_id, "device id")
        if device_id in RESERVED_DEVICE_IDS:
            raise ValueError(
                f"device id {device_id!r} is reserved for fleet-wide topics; choose another"
            )
        self.prefix = prefix
        self.device_id = device_id
        self._base = f"{prefix}/{device_id}"

    def __repr__(self) -> str:
        return f"Topics(prefix={self.prefix!r}, device_id={self.device_id!r})"

    # --- this device ---------------------------------------------------------------------

    @property
    def status(self) -> str:
        """Retained `online`/`offline` JSON; also the last will."""
        return f"{self._base}/status"

    def results(self, pipeline: str) -> str:
        return f"{self._base}/results/{_level(pipeline, 'pipeline name')}"

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

    def _model(self, name: str, version: str) -> str:
        name = _level(name, "model name")
        return f"{self.prefix}/{_MODELS}/{name}/{_level(version, 'model version')}"

    # --- parsing incoming topics ---------------------------------------------------------

    def cmd_name(self, topic: str) -> str | None:
        """The command name (may span levels) of a topic under `cmd_filter` or any
        `group_cmd_filter`; None for any other topic."""
        own = f"{self._base}/cmd/"
        if topic.startswith(own):
            return topic[len(own) :] or None
        groups = f"{self.prefix}/{_GROUPS}/"
        if topic.startswith(groups):
            group, sep, rest = topic[len(groups) :].partition("/cmd/")
            if sep and group and "/" not in group and rest:
                return rest
        return None
