"""Tracked objects from per-frame detections: norfair (the tracker Frigate uses, here its
maintained fork `norfair-enough`) associates boxes across frames; this module turns its
tracks into `new`, `update` and `end` events (docs/protocol.md, "Tracks").

Contract, per tracked object: exactly one `new` (after `min_hits` frames), then `update`s
only on a zone change, a label change, a score better by `better_score` (at most once
per `score_update_s`), or a keep-alive when nothing was sent for `keepalive_s`; a
stationary object (its box still for `stationary_s`) sends keep-alives only; exactly one
`end` (after `max_misses` frames unseen, or when the pipeline stops). Time is the frames'
capture time, so the same frames give the same events.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from norfair import Detection, Tracker

from edgeagent.events.settings import TrackingSettings, ZoneSettings
from edgeagent.events.zones import label_of, zones_of

TrackEvent = dict[str, Any]
_LABEL_VOTES = 10  # a track's label is the most frequent of its last matched detections


@dataclass(slots=True)
class Track:
    """What the agent knows of one tracked object."""

    id: str
    start: float
    label: str
    box: list[float]
    score: float
    last_seen: float
    votes: Counter[str] = field(default_factory=Counter)
    recent: list[str] = field(default_factory=list)
    zones: tuple[str, ...] = ()
    entered: list[str] = field(default_factory=list)
    stationary: bool = False
    still_box: list[float] = field(default_factory=list)
    still_since: float = 0.0
    zone_streaks: dict[str, int] = field(default_factory=dict)  # frames the zone disagreed
    announced: bool = False
    sent_at: float = 0.0
    sent_label: str = ""
    sent_zones: tuple[str, ...] = ()
    sent_score: float = 0.0

    def event(self, kind: str, end: float | None = None) -> TrackEvent:
        return track_event(
            kind,
            self.id,
            self.label,
            self.score,
            self.start,
            end=end,
            box=self.box,
            zones=self.zones,
            entered=self.entered,
            stationary=self.stationary,
        )


def track_event(
    kind: str,
    id_: str,
    label: str,
    score: float,
    start: float,
    *,
    end: float | None,
    box: Sequence[float] | None = None,
    zones: Sequence[str] = (),
    entered: Sequence[str] = (),
    stationary: bool = False,
) -> TrackEvent:
    """A `kind` event of one object (docs/protocol.md, "Tracks"); `end` only on `end`
    events, `box` None for an object that has none (a classification's episode)."""
    event: TrackEvent = {
        "type": kind,
        "id": id_,
        "label": label,
        "score": round(score, 4),
        "box": None if box is None else [round(v, 4) for v in box],
        "zones": list(zones),
        "entered_zones": list(entered),
        "start": round(start, 3),
        "stationary": stationary,
    }
    if end is not None:
        event["end"] = round(end, 3)
    return event


class DetectionTracker:
    """Feeds one pipeline's detections to norfair and yields its track events. One
    thread only (the pipeline's decode thread)."""

    def __init__(
        self,
        settings: TrackingSettings,
        zones: Sequence[ZoneSettings],
        *,
        id_prefix: str,
        on_seen: Callable[[Track, Mapping[str, Any]], None] | None = None,
    ) -> None:
        """`id_prefix` makes ids unique across restarts; `on_seen(track, detection)` is
        told of every detection matched to an announced track (the snapshots)."""
        self._settings = settings
        self._zones = tuple(zones)
        self._prefix = id_prefix
        self._on_seen = on_seen
        self._tracker = Tracker(
            distance_function="iou",
            distance_threshold=settings.max_distance,
            initialization_delay=settings.min_hits - 1,
            hit_counter_max=settings.max_misses,
            past_detections_length=1,
        )
        self.tracks: dict[int, Track] = {}
        # Capture times of the recent frames: a track announced after `min_hits` frames
        # started `age` frames ago.
        self._times: deque[float] = deque(maxlen=settings.min_hits + settings.max_misses + 2)

    def update(self, detections: Sequence[Mapping[str, Any]], now: float) -> list[TrackEvent]:
        """One frame's (already filtered) detections at capture time `now`."""
        norfair_detections = [
            Detection(
                points=np.array([d["box"][:2], d["box"][2:4]], dtype=np.float64),
                data=d,
            )
            for d in detections
            if _usable(d["box"])
        ]
        self._times.append(now)
        active = self._tracker.update(detections=norfair_detections)
        matched = {id(d.data) for d in norfair_detections}  # norfair copies detections
        events: list[TrackEvent] = []
        alive: set[int] = set()
        for obj in active:
            key = int(obj.id) if obj.id is not None else -1
            alive.add(key)
            last = obj.last_detection
            seen = last is not None and id(last.data) in matched
            detection: Mapping[str, Any] | None = last.data if seen and last is not None else None
            track = self.tracks.get(key)
            if track is None:
                if detection is None:
                    continue
                age = int(getattr(obj, "age", 0) or 0)
                start = self._times[-1 - age] if age < len(self._times) else self._times[0]
                track = self._begin(key, detection, start)
                self.tracks[key] = track
            if detection is not None:
                self._observe(track, detection, now)
            event = self._decide(track, now)
            if event is not None:
                events.append(event)
            if detection is not None and self._on_seen is not None:
                self._on_seen(track, detection)
        for key in [k for k in self.tracks if k not in alive]:
            ended = self.tracks.pop(key)
            if ended.announced:
                events.append(ended.event("end", end=ended.last_seen))
        return events

    def close(self) -> list[TrackEvent]:
        """Ends every announced track (the pipeline stops)."""
        events = [t.event("end", end=t.last_seen) for t in self.tracks.values() if t.announced]
        self.tracks.clear()
        return events

    def announced(self) -> list[Track]:
        return [t for t in self.tracks.values() if t.announced]

    def _begin(self, key: int, detection: Mapping[str, Any], now: float) -> Track:
        box = [float(v) for v in detection["box"]]
        return Track(
            id=f"{self._prefix}-{key}",
            start=now,
            label=label_of(detection),
            box=box,
            score=float(detection["score"]),
            last_seen=now,
            still_box=list(box),
            still_since=now,
        )

    def _observe(self, track: Track, detection: Mapping[str, Any], now: float) -> None:
        label = label_of(detection)
        track.recent.append(label)
        track.votes[label] += 1
        if len(track.recent) > _LABEL_VOTES:
            track.votes[track.recent.pop(0)] -= 1
        track.label = track.votes.most_common(1)[0][0]
        track.box = [float(v) for v in detection["box"]]
        track.score = max(track.score, float(detection["score"]))
        track.last_seen = now
        track.zones = self._zones_with_inertia(track)
        if track.announced:
            track.entered.extend(z for z in track.zones if z not in track.entered)
        moved = max(abs(a - b) for a, b in zip(track.box, track.still_box, strict=True))
        if moved > self._settings.stationary_motion:
            track.still_box, track.still_since = list(track.box), now
            track.stationary = False
        elif now - track.still_since >= self._settings.stationary_s:
            track.stationary = True

    def _zones_with_inertia(self, track: Track) -> tuple[str, ...]:
        """The zones `track` is in: where its box is, until it is announced; then a zone
        is entered (left) only after `inertia` frames in a row inside (outside) it."""
        seen = zones_of(track.box, track.label, self._zones)
        if not track.announced:
            return seen
        current = set(track.zones)
        for zone in self._zones:
            if (zone.name in seen) == (zone.name in current):
                track.zone_streaks.pop(zone.name, None)
                continue
            streak = track.zone_streaks.get(zone.name, 0) + 1
            if streak >= zone.inertia:
                current ^= {zone.name}
                streak = 0
            track.zone_streaks[zone.name] = streak
        return tuple(z.name for z in self._zones if z.name in current)

    def _decide(self, track: Track, now: float) -> TrackEvent | None:
        """The event this frame gives `track`, if any (see the module's contract)."""
        if not track.announced:
            track.announced = True
            track.entered = list(track.zones)
            return self._sent(track, "new", now)
        if now - track.sent_at >= self._settings.keepalive_s:
            return self._sent(track, "update", now)
        if track.stationary:
            return None
        s = self._settings
        changed = (
            track.zones != track.sent_zones
            or track.label != track.sent_label
            or (
                track.score >= track.sent_score + s.better_score
                and now - track.sent_at >= s.score_update_s
            )
        )
        return self._sent(track, "update", now) if changed else None

    @staticmethod
    def _sent(track: Track, kind: str, now: float) -> TrackEvent:
        track.sent_at, track.sent_label = now, track.label
        track.sent_zones, track.sent_score = track.zones, track.score
        return track.event(kind)


def _usable(box: Sequence[float]) -> bool:
    """norfair's IoU needs a box with area."""
    return len(box) >= 4 and box[2] > box[0] and box[3] > box[1]
