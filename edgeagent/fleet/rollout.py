"""How a rollout converges, seen from the fleet's side.

The desired state (retained, on `<prefix>/<device>/desired` or
`<prefix>/group/<group>/desired`) says which model version each pipeline should run; its
type, `merge_desired` (set or clear one pipeline, keep the rest) and the device-over-group
merge live in `mqtt.protocol`, shared with the agent. `parse_desired` words what `fleet
deploy` cannot update with the fix.

`Rollout` folds what devices publish (`status`, `reported`, `events`, `desired`, formats in
docs/protocol.md "Model delivery") into one view per device and says whether every
watched device runs what it should. A device's effective desired state is its group's
(when one is watched) with its own on top, pipeline by pipeline, as the device reads it
(`protocol.effective_desired`).

A failure counts against a rollout only when it is for the desired model version and not
older than the desired state (a `last_failure` left from an earlier attempt at another
version, or from before the operator deployed again, is history, not a verdict). A device
that refused the desired version (a bad model, a `downgrade`) still runs its old one in
state `running`: that pipeline is `failed` for the rollout by its `last_failure`, never
converged, since what runs is not what is desired.
"""

from __future__ import annotations

import getpass
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeagent.mqtt.payload import from_json
from edgeagent.mqtt.protocol import (
    DesiredState,
    DesiredStateError,
    effective_desired,
    json_number,
    merge_desired,
    status_online,
)
from edgeagent.mqtt.topics import FleetTopics

PipelineStatus = Literal["converged", "waiting", "failed", "unmanaged"]
FAILURE_EVENTS = frozenset({"rejected", "rolled-back"})
_WATCHED_KINDS = ("status", "reported", "events", "desired")


def parse_desired(payload: bytes, topic: str) -> DesiredState | None:
    """The desired state in a retained payload; None for an empty (cleared) one.
    DesiredStateError, saying how to fix it, when it cannot be updated."""
    try:
        return DesiredState.parse(payload)
    except DesiredStateError as exc:
        if exc.problem == "not-json":
            message = (
                f"the retained desired state on {topic} is not JSON ({exc.detail}): replace it "
                "with --replace, or clear it (an empty retained message)"
            )
        elif exc.problem == "not-object":
            message = (
                f"the retained desired state on {topic} is a JSON {exc.detail}, not an "
                "object: replace it with --replace"
            )
        else:
            message = f"the existing desired state's 'pipelines' is a {exc.detail}, not an object"
        raise DesiredStateError(exc.problem, exc.detail, message) from exc


def who() -> str:
    """`user@host` of who runs this, for a deploy's `by` (`fleet deploy`, the dashboard)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class DeviceView:
    """What is known about one device, updated message by message."""

    name: str
    online: bool | None = None
    desired: DesiredState | None = None  # its own retained desired state
    reported: dict[str, Any] | None = None
    events: dict[str, dict[str, Any]] = field(default_factory=dict)  # pipeline -> last event


@dataclass(frozen=True, slots=True)
class PipelineView:
    desired: dict[str, str] | None
    desired_ts: float | None
    running: dict[str, str] | None  # model, version, state
    staged: dict[str, Any] | None
    last_failure: dict[str, Any] | None
    last_event: dict[str, Any] | None
    status: PipelineStatus
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "desired": self.desired,
            "running": self.running,
            "staged": self.staged,
            "last_failure": self.last_failure,
            "last_event": self.last_event,
            "status": self.status,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    converged: bool
    failures: tuple[str, ...]  # one sentence per failed device pipeline
    waiting: tuple[str, ...]  # one sentence per device or pipeline not there yet


class Rollout:
    """Follows the devices of one rollout (see the module doc)."""

    def __init__(self, prefix: str, devices: Iterable[str] = (), group: str | None = None):
        self.topics = FleetTopics(prefix)
        self.prefix = self.topics.prefix
        self.group = group
        self.explicit = tuple(devices)
        self.devices: dict[str, DeviceView] = {d: DeviceView(d) for d in self.explicit}
        self.group_desired: DesiredState | None = None

    def filters(self) -> list[str]:
        """The topic filters to subscribe to."""
        found = [self.topics.every_device(kind) for kind in _WATCHED_KINDS]
        if self.group is not None:
            found.append(self.topics.group_desired(self.group))
        return found

    def feed(self, topic: str, payload: bytes) -> tuple[str | None, dict[str, Any] | None]:
        """Takes one message; returns (the device it changed, or "*" for the group's
        desired state, or None when ignored; the event it carried, if any)."""
        group = self.topics.parse_group(topic)
        if group is not None:
            if (group.group, group.kind, group.rest) != (self.group, "desired", ""):
                return None, None
            self.group_desired = _desired(payload)
            return "*", None
        parsed = self.topics.parse_device(topic)
        if parsed is None or parsed.kind not in _WATCHED_KINDS or parsed.rest:
            return None, None
        name, kind = parsed.device, parsed.kind
        if self.explicit and name not in self.devices:
            return None, None
        view = self.devices.setdefault(name, DeviceView(name))
        if kind == "desired":
            view.desired = _desired(payload)
            return name, None
        data = from_json(payload)
        event = None
        if kind == "status":
            view.online = status_online(data)
        elif kind == "reported":
            view.reported = data if isinstance(data, dict) else None
        elif isinstance(data, dict) and isinstance(data.get("pipeline"), str):
            view.events[data["pipeline"]] = data
            event = data
        return name, event

    def effective_desired(self, view: DeviceView) -> dict[str, tuple[dict[str, str], float | None]]:
        """Per pipeline the usable desired entry (model, version) that applies to the device
        and the `ts` of its state: `protocol.effective_desired`, the device's own rule."""
        found = effective_desired(view.desired, [self.group_desired])
        return {
            name: ({"model": entry.model, "version": entry.version}, ts)
            for name, (entry, ts) in found.items()
            if entry.error is None
        }

    def pipelines(self, view: DeviceView) -> dict[str, PipelineView]:
        desired = self.effective_desired(view)
        reported = (view.reported or {}).get("pipelines")
        reported = reported if isinstance(reported, dict) else {}
        names = sorted(set(desired) | set(reported))
        return {n: self._pipeline(view, n, desired.get(n), reported.get(n)) for n in names}

    def _pipeline(
        self,
        view: DeviceView,
        name: str,
        desired: tuple[dict[str, str], float | None] | None,
        report: Any,
    ) -> PipelineView:
        report = report if isinstance(report, dict) else {}
        running = None
        if "version" in report:
            running = {
                "model": str(report.get("model", "")),
                "version": str(report["version"]),
                "state": str(report.get("state", "")),
            }
        staged = report.get("staged") if isinstance(report.get("staged"), dict) else None
        failure = report.get("last_failure")
        failure = failure if isinstance(failure, dict) else None
        event = view.events.get(name)
        want, want_ts = desired if desired is not None else (None, None)
        status, detail = self._judge(
            view, want, want_ts, running=running, staged=staged, failure=failure, event=event
        )
        return PipelineView(want, want_ts, running, staged, failure, event, status, detail)

    def _judge(
        self,
        view: DeviceView,
        want: dict[str, str] | None,
        want_ts: float | None,
        *,
        running: dict[str, str] | None,
        staged: dict[str, Any] | None,
        failure: dict[str, Any] | None,
        event: dict[str, Any] | None,
    ) -> tuple[PipelineStatus, str]:
        if want is None:
            return "unmanaged", "no desired version"
        target = f"{want['model']} {want['version']}"

        def current(ts: Any) -> bool:
            stamp = json_number(ts)
            return want_ts is None or stamp is None or stamp >= want_ts

        if (
            failure
            and str(failure.get("version")) == want["version"]
            and current(failure.get("ts"))
        ):
            why = f"{failure.get('code', 'failed')}: {failure.get('reason', '')}".rstrip(": ")
            return "failed", f"{target} failed: {why}"
        if (
            event
            and event.get("type") in FAILURE_EVENTS
            and str(event.get("version")) == want["version"]
            and event.get("model", want["model"]) == want["model"]
            and current(event.get("ts"))
        ):
            why = f"{event.get('code', event['type'])}: {event.get('reason', '')}".rstrip(": ")
            return "failed", f"{target} {event['type']}: {why}"
        matches = (
            running is not None
            and running["model"] == want["model"]
            and running["version"] == want["version"]
        )
        if matches and running is not None and running["state"] == "running":
            return "converged", f"running {target}"
        if matches and running is not None and running["state"] == "failed":
            return "failed", f"{target} is in state failed"
        if view.online is False:
            return "waiting", f"device offline; wants {target}"
        if view.reported is None:
            return "waiting", f"no report yet; wants {target}"
        if matches and running is not None:
            return "waiting", f"{target} in {running['state']}"
        progress = download_progress(want, staged, event)
        have = f"running {running['model']} {running['version']}" if running else "not running"
        if progress is not None:
            return "waiting", f"{have}; fetching {target}: {progress:.0%}"
        if event and str(event.get("version")) == want["version"]:
            return "waiting", f"{have}; {target} {event.get('type')}"
        return "waiting", f"{have}; wants {target}"

    def verdict(self) -> Verdict:
        failures: list[str] = []
        waiting: list[str] = []
        if not self.devices:
            waiting.append("no device has reported yet")
        for name in sorted(self.devices):
            view = self.devices[name]
            for pipeline, p in self.pipelines(view).items():
                if p.status == "failed":
                    failures.append(f"{name} {pipeline}: {p.detail}")
                elif p.status == "waiting":
                    waiting.append(f"{name} {pipeline}: {p.detail}")
            if view.reported is None and not any(w.startswith(f"{name} ") for w in waiting):
                waiting.append(f"{name}: no report yet")
            elif not self.effective_desired(view):
                # Not vacuously converged: its desired state may simply not have arrived.
                waiting.append(f"{name}: no desired state (deploy first, or pass --group)")
        return Verdict(not failures and not waiting, tuple(failures), tuple(waiting))

    def device_json(self, name: str) -> dict[str, Any]:
        view = self.devices[name]
        pipelines = self.pipelines(view)
        return {
            "type": "device",
            "ts": round(time.time(), 3),
            "device": name,
            "online": view.online,
            "pipelines": {n: p.to_json() for n, p in pipelines.items()},
            "converged": view.reported is not None
            and all(p.status in ("converged", "unmanaged") for p in pipelines.values()),
        }


def download_progress(
    want: dict[str, str], staged: dict[str, Any] | None, event: dict[str, Any] | None
) -> float | None:
    """How far the desired version's download is (0..1), from the last event or the
    reported `staged`; None when neither is about that version."""
    if (
        event
        and event.get("type") == "download-progress"
        and str(event.get("version")) == want["version"]
        and json_number(event.get("progress")) is not None
    ):
        return json_number(event.get("progress"))
    if staged and str(staged.get("version")) == want["version"]:
        return json_number(staged.get("progress"))
    return None


def _desired(payload: bytes) -> DesiredState | None:
    """A desired state as the device will read it; None when cleared or unreadable."""
    try:
        return DesiredState.parse(payload)
    except DesiredStateError:
        return None


__all__ = [
    "FAILURE_EVENTS",
    "DesiredStateError",
    "DeviceView",
    "PipelineView",
    "Rollout",
    "Verdict",
    "download_progress",
    "merge_desired",
    "parse_desired",
    "who",
]
