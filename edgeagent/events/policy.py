"""What a pipeline publishes of its results: a `ResultPolicy` per pipeline, built by
`make_policy` from the pipeline's `publish:` section (edgeagent/events/settings.py).

    every     each result on `results/<pipeline>` (the default, as before)
    interval  one aggregate per `interval_s` on `results/<pipeline>`
    change    a result on `results/<pipeline>` when the top label (or the set of
              labels) changed and held for `dwell_s`
    events    `new`/`update`/`end` on `tracks/<pipeline>`: tracked objects (detection),
              the top label held for `dwell_s` (classification), anomalies with a
              minimum duration and a cool-down (anomaly scores)

Every mode keeps the retained summary `state/<pipeline>` (current counts by label and by
zone), sent when it changes, at most once per `summary_s`. Everything goes to `emit`,
which the agent points at the durable outbox. Contract: `feed` and `close` are called
from one thread (the pipeline's decode thread); time is each result's `captured_at`, so
the same results give the same messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgeagent.errors import ConfigError
from edgeagent.events.settings import (
    AnyPublish,
    ChangePublish,
    EventsPublish,
    EveryPublish,
    IntervalPublish,
    LabelFilter,
    ZoneSettings,
)
from edgeagent.events.zones import count, label_of, passes
from edgeagent.mqtt.payload import to_json
from edgeagent.mqtt.topics import Topics

log = logging.getLogger(__name__)

Emit = Callable[[str, bytes, bool], None]  # (topic, payload, retain)
Counts = tuple[dict[str, int], dict[str, dict[str, int]]]

EVENT_TASKS = ("detection", "classification", "anomaly")
"""The tasks `mode: events` can follow; pose, segmentation and raw results have no
objects to track."""


def _now(payload: Mapping[str, Any]) -> float:
    value = payload.get("captured_at")
    return float(value) if isinstance(value, int | float) else time.time()


def _result(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    result = payload.get("result")
    return result if isinstance(result, Mapping) else {}


def _detections(
    result: Mapping[str, Any], filters: Mapping[str, LabelFilter]
) -> list[Mapping[str, Any]]:
    return [d for d in result.get("detections", ()) if passes(d, filters)]


def _top(result: Mapping[str, Any], min_score: float) -> str | None:
    """The result's one label: the top class (at least `min_score`), or `anomaly` /
    `normal` for an anomaly score; None when it has neither."""
    if "anomaly" in result:
        return "anomaly" if result["anomaly"] else "normal"
    classes = result.get("classes") or ()
    if classes and classes[0].get("score", 0.0) >= min_score:
        return label_of(classes[0])
    return None


class ResultPolicy:
    """Turns one pipeline's results into messages; the base keeps the summary."""

    def __init__(
        self,
        pipeline: str,
        settings: AnyPublish,
        topics: Topics,
        emit: Emit,
        zones: tuple[ZoneSettings, ...] = (),
    ) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.topics = topics
        self._emit = emit
        self._zones = zones
        self._summary: Counts | None = None
        self._summary_sent: Counts | None = None
        self._summary_at = float("-inf")
        self.messages = 0  # messages emitted, for tests and the benchmark

    def feed(self, payload: dict[str, Any], image: np.ndarray | None = None) -> None:
        """One result envelope (and the sample it came from, for snapshots)."""
        now = _now(payload)
        self._feed(payload, image, now)
        self._summarise(now)

    def close(self) -> None:
        """The pipeline stops: what is pending goes out, and the summary is sent."""
        self._close()
        self._summarise(float("inf"), force=True)

    # --- for subclasses ----------------------------------------------------------------

    def _feed(self, payload: dict[str, Any], image: np.ndarray | None, now: float) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """Nothing pending by default."""

    def _send(self, topic: str, message: Mapping[str, Any] | bytes, retain: bool = False) -> None:
        self.messages += 1
        data = message if isinstance(message, bytes) else to_json(dict(message))
        self._emit(topic, data, retain)

    def _count(self, counts: Counts) -> None:
        """The current counts, for the retained summary."""
        self._summary = counts

    def _summarise(self, now: float, *, force: bool = False) -> None:
        summary = self._summary
        if summary is None or summary == self._summary_sent:
            return
        if not force and now - self._summary_at < self.settings.summary_s:
            return
        self._summary_sent, self._summary_at = summary, now
        labels, zones = summary
        at = now if now != float("inf") else time.time()
        self._send(
            self.topics.state(self.pipeline),
            {
                "pipeline": self.pipeline,
                "mode": self.settings.mode,
                "at": round(at, 3),
                "counts": labels,
                "zones": zones,
            },
            retain=True,
        )


class EveryResult(ResultPolicy):
    """Each result as it is (today's behaviour)."""

    def _feed(self, payload: dict[str, Any], image: np.ndarray | None, now: float) -> None:
        self._send(self.topics.results(self.pipeline), payload)
        self._count(_frame_counts(_result(payload), {}, self._zones))


class IntervalAggregate(ResultPolicy):
    """Counts per label, max and mean score, anomaly rate: one message per interval."""

    settings: IntervalPublish

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset(None)

    def _reset(self, start: float | None) -> None:
        self._start = start
        self._end = start
        self._frames = 0
        self._anomalies = 0
        self._scored = 0
        self._labels: dict[str, dict[str, float]] = {}
        self._model: Any = None

    def _feed(self, payload: dict[str, Any], image: np.ndarray | None, now: float) -> None:
        if self._start is not None and now - self._start >= self.settings.interval_s:
            self._flush()
        if self._start is None:
            self._reset(now)
        self._end = now
        self._frames += 1
        self._model = payload.get("model")
        result = _result(payload)
        if "anomaly" in result:
            self._scored += 1
            self._anomalies += bool(result["anomaly"])
        items = list(_detections(result, self.settings.filters))
        items += list(result.get("classes", ())[:1])
        seen: dict[str, int] = {}
        for item in items:
            label = label_of(item)
            score = float(item.get("score", item.get("fraction", 0.0)))
            entry = self._labels.setdefault(
                label, {"count": 0, "frames": 0, "max_count": 0, "max_score": 0.0, "sum": 0.0}
            )
            entry["count"] += 1
            entry["sum"] += score
            entry["max_score"] = max(entry["max_score"], score)
            seen[label] = seen.get(label, 0) + 1
        for label, n in seen.items():
            self._labels[label]["frames"] += 1
            self._labels[label]["max_count"] = max(self._labels[label]["max_count"], n)
        self._count(_frame_counts(result, self.settings.filters, self._zones))

    def _flush(self) -> None:
        if self._start is None or self._frames == 0:
            return
        labels = {
            label: {
                "count": int(e["count"]),
                "frames": int(e["frames"]),
                "max_count": int(e["max_count"]),
                "max_score": round(e["max_score"], 4),
                "mean_score": round(e["sum"] / e["count"], 4),
            }
            for label, e in sorted(self._labels.items())
        }
        self._send(
            self.topics.results(self.pipeline),
            {
                "type": "interval",
                "pipeline": self.pipeline,
                "model": self._model,
                "start": round(self._start, 3),
                "end": round(self._end or self._start, 3),
                "frames": self._frames,
                "labels": labels,
                "anomaly_rate": (
                    round(self._anomalies / self._scored, 4) if self._scored else None
                ),
            },
        )
        self._reset(None)

    def _close(self) -> None:
        self._flush()


class ChangeOnly(ResultPolicy):
    """A result when its label(s) changed and the change held for `dwell_s`."""

    settings: ChangePublish

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._published: tuple[str, ...] | None = None
        self._candidate: tuple[str, ...] | None = None
        self._since = 0.0

    def _key(self, result: Mapping[str, Any]) -> tuple[str, ...]:
        if "detections" in result:
            return tuple(sorted({label_of(d) for d in _detections(result, self.settings.filters)}))
        top = _top(result, self.settings.min_score)
        return (top,) if top is not None else ()

    def _feed(self, payload: dict[str, Any], image: np.ndarray | None, now: float) -> None:
        result = _result(payload)
        key = self._key(result)
        self._count(_frame_counts(result, self.settings.filters, self._zones))
        if key == self._published:
            self._candidate = None
            return
        if key != self._candidate:
            self._candidate, self._since = key, now
        if now - self._since >= self.settings.dwell_s:
            previous, self._published, self._candidate = self._published, key, None
            change = {"from": list(previous) if previous is not None else None, "to": list(key)}
            self._send(self.topics.results(self.pipeline), {**payload, "change": change})


def _frame_counts(
    result: Mapping[str, Any], filters: Mapping[str, LabelFilter], zones: tuple[ZoneSettings, ...]
) -> Counts:
    if "detections" in result:
        return count(_detections(result, filters), zones)
    top = _top(result, 0.0)
    return ({top: 1} if top is not None else {}), {z.name: {} for z in zones}


def make_policy(
    pipeline: str,
    settings: AnyPublish,
    task: str,
    topics: Topics,
    emit: Emit,
    *,
    id_prefix: str | None = None,
) -> ResultPolicy:
    """The policy for a pipeline whose model does `task`; ConfigError when the mode
    cannot follow that task."""
    zones = settings.zones if isinstance(settings, EventsPublish) else ()
    if isinstance(settings, EveryPublish):
        return EveryResult(pipeline, settings, topics, emit)
    if isinstance(settings, IntervalPublish):
        return IntervalAggregate(pipeline, settings, topics, emit)
    if isinstance(settings, ChangePublish):
        return ChangeOnly(pipeline, settings, topics, emit)
    if task not in EVENT_TASKS:
        raise ConfigError(
            f"pipeline {pipeline}: publish mode 'events' follows {', '.join(EVENT_TASKS)} "
            f"models, and this model does {task}; use mode every, interval or change"
        )
    from edgeagent.events.tracks import AnomalyEpisodes, LabelDwell, TrackedObjects

    prefix = id_prefix or format(int(time.time() * 1000), "x")
    if task == "detection":
        return TrackedObjects(pipeline, settings, topics, emit, zones, id_prefix=prefix)
    if task == "classification":
        return LabelDwell(pipeline, settings, topics, emit, zones, id_prefix=prefix)
    return AnomalyEpisodes(pipeline, settings, topics, emit, zones, id_prefix=prefix)
