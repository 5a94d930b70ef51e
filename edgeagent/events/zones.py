"""Zones and label filters: which detections count, and which zones a box is in.

An object is in a zone when the middle of its box's bottom edge (where it stands) lies
inside the zone's polygon (even-odd rule); a zone with `labels` admits only those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edgeagent.events.settings import LabelFilter, ZoneSettings

Box = Sequence[float]  # normalised [x0, y0, x1, y1]


def anchor(box: Box) -> tuple[float, float]:
    """The point of `box` that decides its zones: the middle of its bottom edge."""
    return ((box[0] + box[2]) / 2.0, box[3])


def inside(point: tuple[float, float], polygon: Sequence[tuple[float, float]]) -> bool:
    """Whether `point` lies inside `polygon` (even-odd ray casting)."""
    x, y = point
    result = False
    j = len(polygon) - 1
    for i, (xi, yi) in enumerate(polygon):
        xj, yj = polygon[j]
        if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
            result = not result
        j = i
    return result


def zones_of(box: Box, label: str, zones: Iterable[ZoneSettings]) -> tuple[str, ...]:
    """The names of the zones, in configured order, that an object `label` at `box` is in."""
    point = anchor(box)
    return tuple(
        z.name
        for z in zones
        if (z.labels is None or label in z.labels) and inside(point, z.polygon)
    )


def label_of(detection: Mapping[str, Any]) -> str:
    """A detection's or class's label; its class index when the model has no labels."""
    label = detection.get("label")
    return str(label) if label else str(detection.get("index", "?"))


def passes(detection: Mapping[str, Any], filters: Mapping[str, LabelFilter]) -> bool:
    """Whether a detection meets its label's minimum score and box area."""
    rule = filters.get(label_of(detection))
    if rule is None:
        return True
    x0, y0, x1, y1 = detection["box"]
    area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return bool(detection["score"] >= rule.min_score and area >= rule.min_area)


def count(
    detections: Iterable[Mapping[str, Any]], zones: Sequence[ZoneSettings]
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Counts by label, and by zone then label (every configured zone, even when empty)."""
    labels: dict[str, int] = {}
    by_zone: dict[str, dict[str, int]] = {z.name: {} for z in zones}
    for detection in detections:
        label = label_of(detection)
        labels[label] = labels.get(label, 0) + 1
        for zone in zones_of(detection["box"], label, zones):
            by_zone[zone][label] = by_zone[zone].get(label, 0) + 1
    return labels, by_zone
