"""The JSON messages the device and the fleet side exchange, typed; built and parsed here.

docs/protocol.md is the contract: these types change no byte of it. The device builds
`status` (and its last will), `events`, `reported`, command replies and the common result
envelope through them; both sides read the desired state through `DesiredState`, and
`effective_desired` is the one device-over-group merge (the agent applies it, the fleet
CLI predicts it). A builder returns the plain JSON object (`mqtt.payload.to_json` encodes
it); a parser never trusts what it reads: the device rejects a malformed desired state
with a reason, the fleet side ignores what it cannot read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeagent.errors import EdgeAgentError

# --- desired state -----------------------------------------------------------------------

DesiredProblem = Literal["not-json", "not-object", "pipelines-not-object"]
_ENTRY_SHAPE = (
    '{"model": "<name>", "version": "<version>"} (and optionally "allow_downgrade": true or false)'
)


class DesiredStateError(EdgeAgentError):
    """A desired-state message that cannot be read as a whole. `problem` says what is
    wrong and `detail` the decoder's complaint or the JSON type found; each side words
    its own message from them (the device in an event, the fleet CLI with the fix)."""

    def __init__(self, problem: DesiredProblem, detail: str, message: str | None = None):
        super().__init__(message or f"desired state: {problem}: {detail}")
        self.problem: DesiredProblem = problem
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DesiredEntry:
    """One pipeline's desired model. `error` is why the entry is unusable (it then fails
    with `malformed-desired`); `allow_downgrade` lets it go below the highest version
    the device ever activated."""

    model: str
    version: str
    allow_downgrade: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"model": self.model, "version": self.version}
        if self.allow_downgrade:
            entry["allow_downgrade"] = True
        return entry


@dataclass(frozen=True, slots=True)
class DesiredState:
    """A retained desired state (`<prefix>/<device>/desired`, `<prefix>/group/<g>/desired`):
    `{"pipelines": {"<p>": entry}, "ts": <float>, "by": "<user@host>"}`. `document` is the
    object as received, so that an update keeps members this version does not know."""

    pipelines: Mapping[str, DesiredEntry]
    ts: float | None = None
    by: str | None = None
    document: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, payload: bytes, where: str = "device") -> DesiredState | None:
        """The state in a payload; None for an empty (cleared) retained message. Raises
        DesiredStateError when it is not a JSON object whose `pipelines` is an object; an
        unusable entry is kept with its `error` (naming `where`: "device", "group lab")."""
        if not payload.strip():
            return None
        try:
            document = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DesiredStateError("not-json", str(exc)) from exc
        if not isinstance(document, dict):
            raise DesiredStateError("not-object", type(document).__name__)
        entries = {
            str(name): _entry(name, entry, where)
            for name, entry in _pipelines_member(document).items()
        }
        by = document.get("by")
        return cls(
            entries, json_number(document.get("ts")), by if isinstance(by, str) else None, document
        )


def _pipelines_member(document: Mapping[str, Any]) -> dict[str, Any]:
    pipelines = document.get("pipelines", {})
    if not isinstance(pipelines, dict):
        raise DesiredStateError("pipelines-not-object", type(pipelines).__name__)
    return pipelines


def _entry(pipeline: str, entry: Any, where: str) -> DesiredEntry:
    if (
        isinstance(entry, dict)
        and isinstance(entry.get("model"), str)
        and isinstance(entry.get("version"), str)
        and isinstance(entry.get("allow_downgrade", False), bool)
    ):
        return DesiredEntry(
            entry["model"], entry["version"], allow_downgrade=entry.get("allow_downgrade", False)
        )
    model = entry.get("model") if isinstance(entry, dict) else None
    version = entry.get("version") if isinstance(entry, dict) else None
    return DesiredEntry(
        str(model) if model is not None else "",
        str(version) if version is not None else "",
        error=f"the {where} desired state of pipeline {pipeline} must be {_ENTRY_SHAPE}, "
        f"got {entry!r:.200}",
    )


def merge_desired(
    existing: DesiredState | Mapping[str, Any] | None,
    pipeline: str,
    target: tuple[str, str] | None,
    *,
    by: str,
    ts: float | None = None,
    allow_downgrade: bool = False,
) -> dict[str, Any]:
    """`existing` with `pipeline` set to (model, version) (with `"allow_downgrade": true`
    when asked), or removed when `target` is None; other pipelines and unknown top-level
    members are kept as they were. DesiredStateError when `pipelines` is not an object."""
    document = existing.document if isinstance(existing, DesiredState) else existing
    state = dict(document or {})
    pipelines = dict(_pipelines_member(state))
    if target is None:
        pipelines.pop(pipeline, None)
    else:
        entry = DesiredEntry(target[0], target[1], allow_downgrade=allow_downgrade)
        pipelines[pipeline] = entry.to_json()
    state.update(pipelines=pipelines, ts=time.time() if ts is None else ts, by=by)
    return state


def desired_payload(state: Mapping[str, Any]) -> bytes:
    """A desired state as the fleet CLI publishes it (compact, keys sorted)."""
    return json.dumps(state, sort_keys=True, separators=(",", ":")).encode("utf-8")


def effective_desired(
    device: DesiredState | None, groups: Iterable[DesiredState | None]
) -> dict[str, tuple[DesiredEntry, float | None]]:
    """Per pipeline, the entry that applies and the `ts` of the state it came from: the
    device's own entry when there is one, else the first group's (in `groups` order) that
    names the pipeline."""
    found: dict[str, tuple[DesiredEntry, float | None]] = {}
    for state in (device, *groups):
        if state is None:
            continue
        for name, entry in state.pipelines.items():
            found.setdefault(name, (entry, state.ts))
    return found


# --- what the device publishes -----------------------------------------------------------

StatusState = Literal["online", "offline"]


def status_message(state: StatusState, device: str, **online: Any) -> dict[str, Any]:
    """The retained `status` (`offline` is also the last will); `online` carries the
    version, run, pipelines and accelerators (docs/protocol.md "Status")."""
    return {"state": state, "device": device, "ts": _now(), **online}


def status_online(data: Any) -> bool | None:
    """What a received status says: True online, False offline, None unknown."""
    state = data.get("state") if isinstance(data, dict) else None
    return None if state is None else state == "online"


def event_message(kind: str, pipeline: str | None, **details: Any) -> dict[str, Any]:
    """One message on `events`: `{"ts", "type", "pipeline", ...details}`."""
    return {"ts": _now(), "type": kind, "pipeline": pipeline, **details}


ReportedState = Literal["running", "probation", "failed"]


@dataclass(frozen=True, slots=True)
class ReportedPipeline:
    """One pipeline in the retained `reported`: what runs (`state` describes it, never a
    refused delivery), the transfer staged, the last refused or rolled-back version."""

    model: str
    version: str | None
    state: ReportedState
    staged: dict[str, Any] | None = None
    last_failure: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "state": self.state,
            "staged": self.staged,
            "last_failure": self.last_failure,
        }


def reported_message(pipelines: Mapping[str, ReportedPipeline]) -> dict[str, Any]:
    return {"ts": _now(), "pipelines": {n: p.to_json() for n, p in pipelines.items()}}


def failure_record(version: str, code: str, reason: str) -> dict[str, Any]:
    """`reported.pipelines.<p>.last_failure`."""
    return {"version": version, "code": code, "reason": reason, "ts": _now()}


def reply_message(
    request_id: str | None, command: str | None, device: str, stage: str, **body: Any
) -> dict[str, Any]:
    """One command reply: `{"id", "command", "device", "stage", "ts", ...body}` where body
    is `result`, `reason` or `progress` (commands/router.py)."""
    return {
        "id": request_id,
        "command": command,
        "device": device,
        "stage": stage,
        "ts": _now(),
        **body,
    }


@dataclass(frozen=True, slots=True)
class ResultEnvelope:
    """What every result on `results/<pipeline>` carries around the task's `result`;
    (`run`, `seq`) never repeats for a pipeline (docs/protocol.md "Results")."""

    captured_at: float
    run: str
    seq: int
    frame: int
    pipeline: str
    model: str
    version: str
    accelerator: str
    # A dict, put into the message as it is (json.dumps takes no other Mapping): each
    # result has its own, which nothing changes after.
    latency_ms: dict[str, float]

    def to_json(self, result: Any, **extra: Any) -> dict[str, Any]:
        return {
            "ts": round(time.time(), 6),
            "captured_at": round(self.captured_at, 6),
            "run": self.run,
            "seq": self.seq,
            "frame": self.frame,
            "pipeline": self.pipeline,
            "model": {"name": self.model, "version": self.version},
            "accelerator": self.accelerator,
            "latency_ms": self.latency_ms,
            "result": result,
            **extra,
        }


def _now() -> float:
    return round(time.time(), 3)


def json_number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (booleans included)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


__all__ = [
    "DesiredEntry",
    "DesiredState",
    "DesiredStateError",
    "ReportedPipeline",
    "ResultEnvelope",
    "StatusState",
    "desired_payload",
    "effective_desired",
    "event_message",
    "failure_record",
    "json_number",
    "merge_desired",
    "reply_message",
    "reported_message",
    "status_message",
    "status_online",
]
