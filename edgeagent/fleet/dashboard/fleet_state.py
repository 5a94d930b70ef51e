"""The dashboard's picture of the fleet, folded from what devices publish.

`FleetState.feed(topic, payload)` takes every message the dashboard subscribes to
(docs/protocol.md: status, telemetry, results, tracks, state, events, desired, reported,
the model repository's manifests) and keeps, per device, what the pages show. It is not
thread-safe: the server's event loop is its only caller.

Rollouts are judged by `fleet.rollout.Rollout`, the model `fleet watch` uses: one
`Rollout` holds every device's status, reported state, events and own desired state; a
device in a group is judged with that group's desired state underneath its own (its first
group, the one its status names first).

Every buffer is bounded, whatever the fleet sends: per device the last `RESULTS_KEPT`
results of each pipeline (and at most `PIPELINES_KEPT` pipelines), the last
`EVENTS_KEPT` events and failures, an hour of telemetry (at most `TELEMETRY_KEPT`
points); fleet-wide the last `TRACKS_KEPT` tracked-object events and at most
`MAX_DEVICES` devices (a device id seen beyond that is counted in `ignored_devices`, not
stored). A payload that is not the JSON object the protocol names is ignored. A stored
event gets a `serial` and `failed` (its type is one of `FAILURE_TYPES`) for the page.

`take_dirty()` returns the devices changed since the last call, and whether the models or
the group names changed: the server pushes their rows (and those lists), coalesced, at
most every `PUSH_INTERVAL_S`. Tracks reach the tabs by `tracks_since`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from edgeagent.fleet.rollout import FAILURE_EVENTS, DeviceView, Rollout, download_progress
from edgeagent.mqtt.payload import from_json
from edgeagent.mqtt.protocol import json_number
from edgeagent.mqtt.topics import FleetTopics

HISTORY_S: Final = 3600.0
TELEMETRY_KEPT: Final = 3600
RESULTS_KEPT: Final = 20
PIPELINES_KEPT: Final = 32
EVENTS_KEPT: Final = 100
TRACKS_KEPT: Final = 500
MAX_DEVICES: Final = 20_000
MODELS_KEPT: Final = 1000
# Events the device page shows as failures: a refused or rolled-back delivery, a source or
# accelerator that failed while running.
FAILURE_TYPES: Final = FAILURE_EVENTS | {"source-error", "accelerator-fallback"}


@dataclass
class DeviceRecord:
    """Everything the dashboard keeps about one device (see the module doc for bounds)."""

    name: str
    last_seen: float | None = None
    status: dict[str, Any] = field(default_factory=dict)  # the last `online` status
    telemetry: dict[str, Any] = field(default_factory=dict)  # the last telemetry
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=TELEMETRY_KEPT))
    results: dict[str, deque[dict[str, Any]]] = field(default_factory=dict)
    results_seen: dict[str, int] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # state/<pipeline>
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    serial: int = 0  # grows with every stored telemetry point or event (page deltas)


class FleetState:
    """See the module doc."""

    def __init__(self, prefix: str, *, clock: Callable[[], float] = time.time) -> None:
        self.topics = FleetTopics(prefix)
        self.prefix = self.topics.prefix
        self.rollout = Rollout(self.prefix)
        self._group_rollouts: dict[str, Rollout] = {}
        self.devices: dict[str, DeviceRecord] = {}
        self.desired_raw: dict[str, bytes] = {}  # retained desired payloads by topic
        self.models: dict[tuple[str, str], dict[str, Any]] = {}  # (name, version) -> manifest
        self.tracks: deque[dict[str, Any]] = deque(maxlen=TRACKS_KEPT)
        self.ignored_devices = 0
        self.messages = 0
        self._dirty: set[str] = set()
        self._dirty_fleet = False  # models, a group's desired state or a device's groups
        self._clock = clock
        self._track_serial = 0

    def filters(self) -> list[str]:
        """The topic filters the dashboard subscribes to."""
        kinds = ("status", "telemetry", "events", "desired", "reported")
        found = [self.topics.every_device(kind) for kind in kinds]
        found += [f"{self.prefix}/+/{kind}/+" for kind in ("results", "tracks", "state")]
        found += [f"{self.prefix}/group/+/desired", f"{self.prefix}/models/+/+/manifest"]
        return found

    # --- feeding -------------------------------------------------------------------------

    def feed(self, topic: str, payload: bytes) -> None:
        """Takes one received message (see the module doc)."""
        self.messages += 1
        model = self.topics.parse_model(topic)
        if model is not None:
            if model.chunk is None:
                self._feed_manifest(model.name, model.version, payload)
            return
        group = self.topics.parse_group(topic)
        if group is not None:
            if group.kind == "desired" and not group.rest:
                self.desired_raw[topic] = payload
                self._group_rollout(group.group).feed(topic, payload)
                self._dirty.update(self.devices)
                self._dirty_fleet = True
            return
        parsed = self.topics.parse_device(topic)
        if parsed is None:
            return
        record = self._record(parsed.device)
        if record is None:
            return
        kind, rest = parsed.kind, parsed.rest
        if kind in ("status", "reported", "events", "desired") and not rest:
            if kind == "desired":
                self.desired_raw[topic] = payload
            self.rollout.feed(topic, payload)
        if kind == "desired":
            self._dirty.add(record.name)
            return  # written by the fleet, not a sign of life from the device
        record.last_seen = self._clock()
        self._dirty.add(record.name)
        data = from_json(payload)
        if not isinstance(data, dict):
            return
        if kind == "status" and not rest:
            if data.get("state") == "online":
                if data.get("groups") != record.status.get("groups"):
                    self._dirty_fleet = True  # the deploy form lists every group
                record.status = data
        elif kind == "telemetry" and not rest:
            self._feed_telemetry(record, data)
        elif kind == "results" and rest and "/" not in rest:
            self._feed_result(record, rest, data)
        elif kind == "state" and rest and "/" not in rest:
            if rest in record.summaries or len(record.summaries) < PIPELINES_KEPT:
                record.summaries[rest] = data
        elif kind == "tracks" and rest and "/" not in rest:
            self._track_serial += 1
            self.tracks.append(
                {**data, "device": record.name, "pipeline": rest, "serial": self._track_serial}
            )
        elif kind == "events" and not rest:
            record.serial += 1
            event_type = data.get("type")
            failed = isinstance(event_type, str) and event_type in FAILURE_TYPES
            record.events.append({**data, "serial": record.serial, "failed": failed})

    def _record(self, name: str) -> DeviceRecord | None:
        record = self.devices.get(name)
        if record is None:
            if len(self.devices) >= MAX_DEVICES:
                self.ignored_devices += 1
                return None
            record = self.devices[name] = DeviceRecord(name)
        return record

    def _group_rollout(self, group: str) -> Rollout:
        rollout = self._group_rollouts.get(group)
        if rollout is None:
            rollout = self._group_rollouts[group] = Rollout(self.prefix, group=group)
            rollout.devices = self.rollout.devices  # one view per device, judged per group
        return rollout

    def _feed_manifest(self, name: str, version: str, payload: bytes) -> None:
        if not payload.strip():
            self.models.pop((name, version), None)  # unpublished
        elif (name, version) in self.models or len(self.models) < MODELS_KEPT:
            data = from_json(payload)
            self.models[(name, version)] = data if isinstance(data, dict) else {}
        self._dirty_fleet = True

    def _feed_telemetry(self, record: DeviceRecord, data: dict[str, Any]) -> None:
        record.telemetry = data
        system = _dict(data.get("system"))
        mqtt = _dict(data.get("mqtt"))
        pipelines = _dict(data.get("pipelines"))
        ts = json_number(data.get("ts")) or self._clock()
        record.serial += 1
        point: dict[str, Any] = {
            "serial": record.serial,
            "ts": ts,
            "cpu_temp_c": json_number(system.get("cpu_temp_c")),
            "cpu_percent": json_number(system.get("cpu_percent")),
            "mem_used_percent": json_number(system.get("mem_used_percent")),
            "outbox_depth": json_number(mqtt.get("outbox_depth")),
            "fps": {},
            "p95_ms": {},
        }
        for name, p in list(pipelines.items())[:PIPELINES_KEPT]:
            if isinstance(p, dict):
                point["fps"][name] = json_number(p.get("fps"))
                point["p95_ms"][name] = _p95(p)
        record.history.append(point)
        while record.history and record.history[0]["ts"] < ts - HISTORY_S:
            record.history.popleft()

    def _feed_result(self, record: DeviceRecord, pipeline: str, data: dict[str, Any]) -> None:
        kept = record.results.get(pipeline)
        if kept is None:
            if len(record.results) >= PIPELINES_KEPT:
                return
            kept = record.results[pipeline] = deque(maxlen=RESULTS_KEPT)
        kept.append(data)
        record.results_seen[pipeline] = record.results_seen.get(pipeline, 0) + 1

    # --- reading -------------------------------------------------------------------------

    def take_dirty(self) -> tuple[set[str], bool]:
        """The devices changed since the last call, and whether fleet-wide data changed."""
        dirty, fleet = self._dirty, self._dirty_fleet
        self._dirty, self._dirty_fleet = set(), False
        return dirty, fleet

    def view(self, name: str) -> DeviceView:
        return self.rollout.devices.get(name) or DeviceView(name)

    def groups(self, name: str) -> list[str]:
        groups = self.devices[name].status.get("groups") if name in self.devices else None
        return [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else []

    def rollout_json(self, name: str) -> dict[str, Any]:
        """The device's rollout as `fleet watch --json` words it, judged with its first
        group's desired state underneath, plus each pipeline's download progress."""
        view = self.view(name)
        groups = self.groups(name)
        rollout = self.rollout
        if groups and groups[0] in self._group_rollouts:
            rollout = self._group_rollouts[groups[0]]
        pipelines = rollout.pipelines(view)
        out: dict[str, Any] = {}
        for pipeline, p in pipelines.items():
            entry = p.to_json()
            progress = None
            fetched = (
                p.running is not None
                and p.desired is not None
                and p.running["version"] == p.desired["version"]
            )
            if p.status == "converged" or fetched:
                progress = 1.0  # downloaded; perhaps still on probation
            elif p.desired is not None:
                progress = download_progress(p.desired, p.staged, p.last_event)
            entry["progress"] = progress
            out[pipeline] = entry
        managed = [p for p in pipelines.values() if p.status != "unmanaged"]
        return {
            "group": groups[0] if groups else None,
            "pipelines": out,
            "managed": bool(managed),
            "converged": view.reported is not None
            and all(p.status in ("converged", "unmanaged") for p in pipelines.values()),
            "failed": any(p.status == "failed" for p in pipelines.values()),
        }

    def row(self, name: str) -> dict[str, Any]:
        """The device's row of the fleet table."""
        record = self.devices[name]
        view = self.view(name)
        telemetry = record.telemetry
        live = _dict(telemetry.get("pipelines"))
        pipelines = []
        for p in _list(record.status.get("pipelines")) if view.online is not False else []:
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                continue
            figures = _dict(live.get(p["name"]))
            # A status sent while the pipeline was starting names no model; its telemetry does.
            model = _dict(p.get("model")) or _dict(figures.get("model"))
            pipelines.append(
                {
                    "name": p["name"],
                    "model": model.get("name"),
                    "version": model.get("version"),
                    "state": figures.get("state") or p.get("state"),
                    "error": p.get("error"),
                    "fps": json_number(figures.get("fps")),
                    "p95_ms": _p95(figures),
                    "accelerator": figures.get("accelerator") or p.get("accelerator"),
                    # Failovers while running (`fallbacks` also counts the accelerators
                    # absent at start; an agent that sends no `failovers` shows 0).
                    "failovers": json_number(figures.get("failovers")) or 0,
                    "results": record.results_seen.get(p["name"], 0),
                }
            )
        system = _dict(telemetry.get("system"))
        mqtt = _dict(telemetry.get("mqtt"))
        rollout = self.rollout_json(name)
        return {
            "id": name,
            "online": view.online,
            "last_seen": record.last_seen,
            "groups": self.groups(name),
            "version": record.status.get("version"),
            "pipelines": pipelines,
            "cpu_temp_c": json_number(system.get("cpu_temp_c")),
            "outbox": json_number(mqtt.get("outbox_depth")),
            "rollout": rollout,
        }

    def rows(self, names: set[str] | None = None) -> list[dict[str, Any]]:
        chosen = self.devices if names is None else names & self.devices.keys()
        return [self.row(name) for name in sorted(chosen)]

    def detail(self, name: str, since: int = 0) -> dict[str, Any] | None:
        """The device page: its row, status, latest results, summaries, the telemetry
        points and events newer than `since` (a `serial` the page already has)."""
        record = self.devices.get(name)
        if record is None:
            return None
        view = self.view(name)
        return {
            "row": self.row(name),
            "status": record.status,
            "accelerators": [
                a for a in _list(record.status.get("accelerators")) if isinstance(a, dict)
            ],
            "results": {p: list(kept)[-5:] for p, kept in record.results.items()},
            "summaries": record.summaries,
            "telemetry": [p for p in record.history if p["serial"] > since],
            "events": [e for e in record.events if e["serial"] > since],
            "desired": view.desired.document if view.desired is not None else None,
            "reported": view.reported,
            "serial": record.serial,
        }

    def published_models(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "version": version, "size": manifest.get("size")}
            for (name, version), manifest in sorted(self.models.items())
        ]

    def group_names(self) -> list[str]:
        """Every group a device's status names or a desired state was retained for."""
        found = {g for record in self.devices.values() for g in self.groups(record.name)}
        return sorted(found | self._group_rollouts.keys())

    def tracks_since(self, serial: int) -> list[dict[str, Any]]:
        return [t for t in self.tracks if t["serial"] > serial]

    def fleet_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows(),
            "models": self.published_models(),
            "groups": self.group_names(),
            "tracks": list(self.tracks),
        }


def _p95(figures: dict[str, Any]) -> float | None:
    """The p95 of the `invoke` stage from one pipeline's telemetry figures."""
    latency = figures.get("latency_ms")
    invoke = latency.get("invoke") if isinstance(latency, dict) else None
    return json_number(invoke.get("p95")) if isinstance(invoke, dict) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


__all__ = ["FleetState"]
