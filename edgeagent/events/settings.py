"""The `publish:` section of a pipeline: what is published of its results.

A configuration leaf (pydantic only, imported by edgeagent/config.py): the runtime lives
in edgeagent/events/policy.py. One model per mode, picked by `mode:`; every key is
documented in docs/configuration.md. Coordinates are normalised (0..1) to the frame.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeagent.names import check_name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelFilter(_Model):
    """A detection of this label counts only with at least this score and box area (a
    fraction of the frame)."""

    min_score: float = Field(default=0.0, ge=0.0, le=1.0)
    min_area: float = Field(default=0.0, ge=0.0, le=1.0)


class ZoneSettings(_Model):
    """A named polygon; an object is in it when the middle of its box's bottom edge is.
    `labels`: only these labels enter the zone (default: every label)."""

    name: str
    polygon: tuple[tuple[float, float], ...]
    labels: tuple[str, ...] | None = None
    # Frames an announced object must be in (out of) the zone before it enters (leaves):
    # a box jittering on the edge does not flip the zone each frame (as Frigate's inertia).
    inertia: int = Field(default=3, ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "zone name")

    @field_validator("polygon")
    @classmethod
    def _polygon(cls, value: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        if len(value) < 3:
            raise ValueError("a polygon needs at least 3 points [x, y]")
        outside = [p for p in value if not (0.0 <= p[0] <= 1.0 and 0.0 <= p[1] <= 1.0)]
        if outside:
            raise ValueError(
                f"points are normalised to the frame (0..1); outside: {list(outside[:3])}"
            )
        return value


class TrackingSettings(_Model):
    """How detections become tracked objects (norfair)."""

    min_hits: int = Field(default=3, ge=1)  # frames seen before `new`
    max_misses: int = Field(default=15, ge=1)  # frames unseen before `end`
    # Largest 1 - IoU between a detection and a track's predicted box that still matches.
    max_distance: float = Field(default=0.8, gt=0.0, le=1.0)
    # An object whose box moved less than this (fraction of the frame, any corner) for
    # `stationary_s` seconds is stationary: it stops producing updates but keep-alives.
    stationary_motion: float = Field(default=0.02, ge=0.0, le=1.0)
    stationary_s: float = Field(default=10.0, gt=0)
    keepalive_s: float = Field(default=300.0, gt=0)  # at most one keep-alive per period
    # An update for a better score only when it gained this much over the one last sent,
    # and at most once per `score_update_s` per object (zone and label changes are not
    # held back): a detector's score wanders from frame to frame, a user needs its best.
    better_score: float = Field(default=0.1, gt=0.0, le=1.0)
    score_update_s: float = Field(default=30.0, ge=0.0)


class SnapshotSettings(_Model):
    """The best JPEG of each tracked object, on `snapshots/<pipeline>/<id>`."""

    enabled: bool = True
    on_end: bool = True
    better_score: float = Field(default=0.15, gt=0.0, le=1.0)  # "markedly better"
    min_interval_s: float = Field(default=30.0, ge=0.0)  # per object, between better ones
    max_bytes: int = Field(default=100_000, ge=4096)  # under the 128 KiB broker cap
    # A square region around the object (at least `crop_min` of the frame's shorter side),
    # as Frigate's MQTT snapshots are; false sends the whole frame.
    crop: bool = True
    crop_min: float = Field(default=0.6, gt=0.0, le=1.0)
    max_side: int = Field(default=320, ge=64)  # the longer side is scaled to at most this
    quality: int = Field(default=70, ge=20, le=95)


class EveryPublish(_Model):
    """Every result, as today."""

    mode: Literal["every"] = "every"
    summary_s: float = Field(default=5.0, gt=0)  # at most one retained summary per period


class IntervalPublish(_Model):
    """One aggregate per `interval_s` seconds on the results topic."""

    mode: Literal["interval"]
    interval_s: float = Field(default=60.0, gt=0)
    summary_s: float = Field(default=5.0, gt=0)
    filters: dict[str, LabelFilter] = Field(default_factory=dict)


class ChangePublish(_Model):
    """A result when the top label (classification, anomaly) or the set of labels
    (detection) changed and held for `dwell_s` seconds."""

    mode: Literal["change"]
    dwell_s: float = Field(default=1.0, ge=0)
    min_score: float = Field(default=0.0, ge=0.0, le=1.0)  # a class below it is no label
    summary_s: float = Field(default=5.0, gt=0)
    filters: dict[str, LabelFilter] = Field(default_factory=dict)


class EventsPublish(_Model):
    """Events on `tracks/<pipeline>`: tracked objects (detection), the top label held
    for `dwell_s` (classification), anomalies with hysteresis (anomaly scores)."""

    mode: Literal["events"]
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    zones: tuple[ZoneSettings, ...] = ()
    filters: dict[str, LabelFilter] = Field(default_factory=dict)
    snapshots: SnapshotSettings = Field(default_factory=SnapshotSettings)
    dwell_s: float = Field(default=1.0, ge=0)  # classification: a new top label holds this long
    min_score: float = Field(default=0.0, ge=0.0, le=1.0)  # classification: below it, no label
    anomaly_min_s: float = Field(default=1.0, ge=0)  # anomalous this long before `new`
    anomaly_cooldown_s: float = Field(default=5.0, ge=0)  # normal this long before `end`
    summary_s: float = Field(default=5.0, gt=0)
    # Labels that get a count and an occupancy entity in Home Assistant, besides those
    # named by a zone's `labels` or by `filters`.
    labels: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _unique_zones(self) -> EventsPublish:
        names = [z.name for z in self.zones]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"zone names must be unique; repeated: {', '.join(repeated)}")
        return self


PublishSettings = Annotated[
    EveryPublish | IntervalPublish | ChangePublish | EventsPublish, Field(discriminator="mode")
]
AnyPublish = EveryPublish | IntervalPublish | ChangePublish | EventsPublish
