"""What delivery says: the retained `reported` state (what each pipeline runs, its staged
transfer, its last failure) and the delivery events. Owned by the delivery worker thread:
every method is called from it only."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from edgeagent.delivery.agent_view import DeliveryLink, PipelineLookup
from edgeagent.mqtt.payload import to_json
from edgeagent.mqtt.protocol import (
    ReportedPipeline,
    ReportedState,
    event_message,
    failure_record,
    reported_message,
)
from edgeagent.mqtt.topics import Topics

_log = logging.getLogger(__name__)

DELIVERY_CODES: Final = frozenset(
    {
        "malformed-desired",
        "unknown-pipeline",
        "wrong-model",
        "downgrade",
        "probation-failed",
        "rolled-back",
    }
)
"""Reason codes of model delivery, beside `signing.REASON_CODES` (every code may appear in
`reported.last_failure.code` and in events)."""

PipelineState = ReportedState
"""What a pipeline runs, as `reported` says: `running` its version; `probation` a new
version not yet proven; `failed`: the pipeline does not run at all (it could not start).
A refused or rolled-back delivery shows in `last_failure`, never here."""
EventType = Literal[
    "download-progress",
    "downloaded",
    "validated",
    "activated",
    "rejected",
    "rolled-back",
    "probation-passed",
]


@dataclass(slots=True)
class _PipelineReport:
    staged: dict[str, Any] | None = None
    last_failure: dict[str, Any] | None = None


class DeliveryReport:
    """Each pipeline's staged transfer and last failure, the versions that failed (not
    tried again until the desired version changes), and their publication."""

    def __init__(
        self,
        link: DeliveryLink,
        topics: Topics,
        pipelines: PipelineLookup,
        publish_event: Callable[[str, bytes], object],
        on_probation: Callable[[str], bool],
    ) -> None:
        self._link = link
        self._topics = topics
        self._pipelines = pipelines
        self._publish_event = publish_event
        self._on_probation = on_probation
        self._reports: defaultdict[str, _PipelineReport] = defaultdict(_PipelineReport)
        self._failed: defaultdict[str, dict[tuple[str, str], str]] = defaultdict(dict)

    def set_staged(self, pipeline: str, staged: dict[str, Any] | None) -> None:
        """Records the transfer in progress (`{"version", "progress"}`), or none; published
        with the next `publish()`."""
        self._reports[pipeline].staged = staged

    def has_failed(self, pipeline: str, model: str, version: str) -> bool:
        return (model, version) in self._failed[pipeline]

    def forget_failures(self, pipeline: str) -> None:
        """A new desired version: the versions that failed may be tried again."""
        self._failed[pipeline].clear()

    def fail(
        self,
        pipeline: str,
        model: str,
        version: str,
        code: str,
        reason: str,
        *,
        event: EventType = "rejected",
    ) -> None:
        """Records a refused or rolled-back version: `last_failure` and an event. The
        pipeline's state is untouched: it runs what it ran."""
        _log.warning("pipeline %s: %s %s %s: %s", pipeline, model, version, code, reason)
        self._failed[pipeline][(model, version)] = code
        report = self._reports[pipeline]
        report.staged = None
        report.last_failure = failure_record(version, code, reason)
        self.event(event, pipeline, model, version, code=code, reason=reason)
        self.publish()

    def event(
        self,
        kind: EventType,
        pipeline: str | None,
        model: str | None,
        version: str | None,
        **extra: Any,
    ) -> None:
        body = event_message(kind, pipeline, model=model, version=version, **extra)
        self._publish_event(self._topics.events, to_json(body))

    def publish(self) -> None:
        """Publishes `reported` (retained) for every pipeline the agent has now."""
        pipelines: dict[str, ReportedPipeline] = {}
        for name, pipeline in self._pipelines.pipelines().items():
            running = pipeline.model
            report = self._reports[name]
            state: PipelineState = "probation" if self._on_probation(name) else "running"
            pipelines[name] = ReportedPipeline(
                running.name if running is not None else pipeline.config.model,
                running.version if running is not None else None,
                state if running is not None else "failed",
                report.staged,
                report.last_failure,
            )
        body = reported_message(pipelines)
        self._link.publish(self._topics.reported, to_json(body), qos=1, retain=True)


__all__ = ["DELIVERY_CODES", "DeliveryReport", "EventType", "PipelineState"]
