"""Desired model versions and how a rollout converges, from the fleet's side.

The desired state (retained, on `<prefix>/<device>/desired` or
`<prefix>/group/<group>/desired`) says which model version each pipeline should run:

    {"pipelines": {"<pipeline>": {"model": "<name>", "version": "<version>"
                                  [, "allow_downgrade": true]}},
     "ts": <float>, "by": "<user@host>"}

`merge_desired` updates one pipeline of an existing state and keeps the others; an entry
says `allow_downgrade` only when that deployment asked for it (a later deploy of the
pipeline without it drops it).
`Rollout` folds what devices publish (`status`, `reported`, `events`, `desired`, formats in
docs/protocol.md "Model delivery") into one view per device and says whether every
watched device runs what it should. A device's effective desired state is its group's
(when one is watched) with its own on top, pipeline by pipeline.

A failure counts against a rollout only when it is for the desired model version and not
older than the desired state (a `last_failure` left from an earlier attempt at another
version, or from before the operator deployed again, is history, not a verdict). A device
that refused the desired version (a bad model, a `downgrade`) still runs its old one in
state `running`: that pipeline is `failed` for the rollout by its `last_failure`, never
converged, since what runs is not what is desired.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeagent.errors import EdgeAgentError

PipelineStatus = Literal["converged", "waiting", "failed", "unmanaged"]
FAILURE_EVENTS = frozenset({"rejected", "rolled-back"})
_DEVICE_KINDS = frozenset({"status", "reported", "events", "desired"})


class DesiredStateError(EdgeAgentError):
    """The retained desired state on a topic is not one this tool can update."""


def merge_desired(
    existing: Mapping[str, Any] | None,
    pipeline: str,
    target: tuple[str, str] | None,
    *,
    by: str,
    ts: float | None = None,
    allow_downgrade: bool = False,
) -> dict[str, Any]:
    """`existing` with `pipeline` set to (model, version) (with `"allow_downgrade": true`
    when asked), or removed when `target` is None; other pipelines and unknown top-level
    members are kept."""
    state = dict(existing or {})
    pipelines = state.get("pipelines", {})
    if not isinstance(pipelines, dict):
        raise DesiredStateError(
            f"the existing desired state's 'pipelines' is a {type(pipelines).__name__}, "
            "not an object"
        )
    pipelines = dict(pipelines)
    if target is None:
        pipelines.pop(pipeline, None)
    else:
        entry: dict[str, Any] = {"model": target[0], "version": target[1]}
        if allow_downgrade:
            entry["allow_downgrade"] = True
        pipelines[pipeline] = entry
    state.update(pipelines=pipelines, ts=time.time() if ts is None else ts, by=by)
    return state


def parse_desired(payload: bytes, topic: str) -> dict[str, Any] | None:
    """The desired state in a retained payload; None for an empty (cleared) one."""
    if not payload:
        return None
    try:
        state = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DesiredStateError(
            f"the retained desired state on {topic} is not JSON ({exc}): replace it with "
            "--replace, or clear it (an empty retained message)"
        ) from exc
    if not isinstance(state, dict):
        raise DesiredStateError(
            f"the retained desired state on {topic} is a JSON {type(state).__name__}, not an "
            "object: replace it with --replace"
        )
    return state


def _pipelines(state: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(state, dict) or not isinstance(state.get("pipelines"), dict):
        return {}
    found = {}
    for name, entry in state["pipelines"].items():
        if isinstance(entry, dict) and "model" in entry and "version" in entry:
            found[str(name)] = {"model": str(entry["model"]), "version": str(entry["version"])}
    return found


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass
class DeviceView:
    """What is known about one device, updated message by message."""

    name: str
    online: bool | None = None
    desired: dict[str, Any] | None = None  # its own retained desired state
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
        self.prefix = prefix.rstrip("/")
        self.group = group
        self.explicit = tuple(devices)
        self.devices: dict[str, DeviceView] = {d: DeviceView(d) for d in self.explicit}
        self.group_desired: dict[str, Any] | None = None

    def filters(self) -> list[str]:
        """The topic filters to subscribe to."""
        found = [f"{self.prefix}/+/{kind}" for kind in ("status", "reported", "events", "desired")]
        if self.group is not None:
            found.append(f"{self.prefix}/group/{self.group}/desired")
        return found

    def feed(self, topic: str, payload: bytes) -> tuple[str | None, dict[str, Any] | None]:
        """Takes one message; returns (the device it changed, or "*" for the group's
        desired state, or None when ignored; the event it carried, if any)."""
        if not topic.startswith(self.prefix + "/"):
            return None, None
        levels = topic[len(self.prefix) + 1 :].split("/")
        if self.group is not None and levels == ["group", self.group, "desired"]:
            self.group_desired = _loads(payload)
            return "*", None
        if len(levels) != 2 or levels[1] not in _DEVICE_KINDS or levels[0] in ("group", "models"):
            return None, None
        name, kind = levels
        if self.explicit and name not in self.devices:
            return None, None
        view = self.devices.setdefault(name, DeviceView(name))
        data = _loads(payload)
        event = None
        if kind == "status":
            state = data.get("state") if isinstance(data, dict) else None
            view.online = None if state is None else state == "online"
        elif kind == "reported":
            view.reported = data if isinstance(data, dict) else None
        elif kind == "desired":
            view.desired = data if isinstance(data, dict) else None
        elif isinstance(data, dict) and isinstance(data.get("pipeline"), str):
            view.events[data["pipeline"]] = data
            event = data
        return name, event

    def effective_desired(self, view: DeviceView) -> dict[str, tuple[dict[str, str], float | None]]:
        found = {}
        group_ts = _number((self.group_desired or {}).get("ts"))
        for name, entry in _pipelines(self.group_desired).items():
            found[name] = (entry, group_ts)
        own_ts = _number((view.desired or {}).get("ts"))
        for name, entry in _pipelines(view.desired).items():
            found[name] = (entry, own_ts)
        return found

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
            stamp = _number(ts)
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
        progress = _progress(want, staged, event)
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


def _progress(
    want: dict[str, str], staged: dict[str, Any] | None, event: dict[str, Any] | None
) -> float | None:
    if (
        event
        and event.get("type") == "download-progress"
        and str(event.get("version")) == want["version"]
        and _number(event.get("progress")) is not None
    ):
        return _number(event.get("progress"))
    if staged and str(staged.get("version")) == want["version"]:
        return _number(staged.get("progress"))
    return None


def _loads(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


__all__ = [
    "FAILURE_EVENTS",
    "DesiredStateError",
    "DeviceView",
    "PipelineView",
    "Rollout",
    "Verdict",
    "merge_desired",
    "parse_desired",
]
