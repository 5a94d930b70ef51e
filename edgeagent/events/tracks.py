"""`mode: events`: the policies that publish `new`/`update`/`end` on `tracks/<pipeline>`.

`TrackedObjects` follows detections with the tracker (edgeagent/events/tracking.py) and
sends each object's best snapshot; `LabelDwell` treats a classification's top label as
the one object, begun once it held for `dwell_s`; `AnomalyEpisodes` begins an episode
after `anomaly_min_s` of anomalous scores and ends it after `anomaly_cooldown_s` of normal
ones (hysteresis), instead of a message per window. All three send the same event shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeagent.events.policy import Emit, ResultPolicy, _detections, _result, _top
from edgeagent.events.settings import EventsPublish, ZoneSettings
from edgeagent.events.snapshots import BestSnapshots
from edgeagent.events.tracking import DetectionTracker, Track, TrackEvent, track_event
from edgeagent.mqtt.topics import Topics


class _Events(ResultPolicy):
    settings: EventsPublish

    def __init__(
        self,
        pipeline: str,
        settings: EventsPublish,
        topics: Topics,
        emit: Emit,
        zones: tuple[ZoneSettings, ...],
        *,
        id_prefix: str,
    ) -> None:
        super().__init__(pipeline, settings, topics, emit, zones)
        self._id_prefix = id_prefix
        self._serial = 0

    def _event(self, event: TrackEvent) -> None:
        self._send(self.topics.tracks(self.pipeline), event)

    def _next_id(self) -> str:
        self._serial += 1
        return f"{self._id_prefix}-{self._serial}"


class TrackedObjects(_Events):
    """Detections -> tracked objects -> events, counts by label and zone, snapshots."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._snapshots = BestSnapshots(self.settings.snapshots)
        self._image: np.ndarray | None = None
        self._tracker = DetectionTracker(
            self.settings.tracking,
            self._zones,
            id_prefix=self._id_prefix,
            on_seen=self._seen,
        )

    def _seen(self, track: Track, detection: Mapping[str, Any]) -> None:
        if self._image is None or not track.announced:
            return
        jpeg = self._snapshots.offer(
            track.id, self._image, detection, track.label, self._frame_time
        )
        if jpeg is not None:
            self._send(self.topics.snapshot(self.pipeline, track.id), jpeg)

    def _feed(self, payload: dict[str, Any], image: np.ndarray | None, now: float) -> None:
        self._image, self._frame_time = image, now
        detections = _detections(_result(payload), self.settings.filters)
        for event in self._tracker.update(detections, now):
            self._event(event)
            if event["type"] == "end":
                self._finish(event["id"])
        self._image = None
        self._count_tracks()

    def _finish(self, track_id: str) -> None:
        jpeg = self._snapshots.finish(track_id)
        if jpeg is not None:
            self._send(self.topics.snapshot(self.pipeline, track_id), jpeg)

    def _count_tracks(self) -> None:
        labels: dict[str, int] = {}
        zones: dict[str, dict[str, int]] = {z.name: {} for z in self._zones}
        for track in self._tracker.announced():
            labels[track.label] = labels.get(track.label, 0) + 1
            for zone in track.zones:
                zones[zone][track.label] = zones[zone].get(track.label, 0) + 1
        self._count((labels, zones))

    def _close(self) -> None:
        for event in self._tracker.close():
            self._event(event)
            self._finish(event["id"])
        self._count_tracks()


class _Episode:
    """The one object of a classification or anomaly pipeline."""

    def __init__(self, id_: str, label: str, start: float, score: float) -> None:
        self.id, self.label, self.start = id_, label, start
        self.score = self.sent_score = score
        self.last = start
        self.sent_at = start

    def event(self, kind: str, end: float | None = None) -> TrackEvent:
        return track_event(kind, self.id, self.label, self.score, self.start, end=end)


class _EpisodeEvents(_Events):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._current: _Episode | None = None

    def _begin(self, label: str, start: float, score: float) -> None:
        self._current = _Episode(self._next_id(), label, start, score)
        self._event(self._current.event("new"))

    def _end(self) -> None:
        if self._current is not None:
            self._event(self._current.event("end", end=self._current.last))
            self._current = None

    def _progress(self, score: float, now: float) -> None:
        """The current episode was seen again: an update on a better score or keep-alive."""
        episode = self._current
        if episode is None:
            return
        episode.last = now
        episode.score = max(episode.score, score)
        tracking = self.settings.tracking
        better = episode.score >= episode.sent_score + tracking.better_score
        if (better and now - episode.sent_at >= tracking.score_update_s) or (
            now - episode.sent_at >= tracking.keepalive_s
        ):
            episode.sent_score, episode.sent_at = episode.score, now
            self._event(episode.event("update"))

    def _close(self) -> None:
        self._end()
        self._count_current()

    def _count_current(self) -> None:
        labels = {self._current.label: 1} if self._current is not None else {}
        self._count((labels, {}))


class LabelDwell(_EpisodeEvents):
    """A classification's top label: `new` once a label held for `dwell_s`, `end` when
    another label (or none) held for `dwell_s`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._candidate: str | None = None
        self._since = 0.0
        self._candidate_score = 0.0

    def _feed(self, payload: dict[str, Any], image: np.ndarray | None, now: float) -> None:
        result = _result(payload)
        top = _top(result, self.settings.min_score)
        classes = result.get("classes") or ()
        score = float(classes[0].get("score", 0.0)) if classes and top is not None else 0.0
        current = self._current.label if self._current is not None else None
        if top == current:
            self._candidate = None
            self._progress(score, now)
        else:
            if top != self._candidate:
                self._candidate, self._since, self._candidate_score = top, now, score
            self._candidate_score = max(self._candidate_score, score)
            if now - self._since >= self.settings.dwell_s:
                if self._current is not None:
                    self._current.last = self._since
                self._end()
                if top is not None:
                    self._begin(top, self._since, self._candidate_score)
                self._candidate = None
        self._count_current()


class AnomalyEpisodes(_EpisodeEvents):
    """Anomaly start (`new`) after `anomaly_min_s` of anomalous windows, end after
    `anomaly_cooldown_s` of normal ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._anomalous_since: float | None = None
        self._normal_since: float | None = None
        self._peak = 0.0

    def _feed(self, payload: dict[str, Any], image: np.ndarray | None, now: float) -> None:
        result = _result(payload)
        anomalous = bool(result.get("anomaly"))
        score = float(result.get("score") or 0.0)
        if anomalous:
            self._normal_since = None
            if self._current is not None:
                self._progress(score, now)
            else:
                if self._anomalous_since is None:
                    self._anomalous_since, self._peak = now, score
                self._peak = max(self._peak, score)
                if now - self._anomalous_since >= self.settings.anomaly_min_s:
                    self._begin("anomaly", self._anomalous_since, self._peak)
                    self._current_last(now)
        else:
            self._anomalous_since = None
            if self._current is not None:
                if self._normal_since is None:
                    self._normal_since = now
                if now - self._normal_since >= self.settings.anomaly_cooldown_s:
                    self._end()
                    self._normal_since = None
        self._count_current()

    def _current_last(self, now: float) -> None:
        if self._current is not None:
            self._current.last = now
