"""The best snapshot of each tracked object: one JPEG of the frame with its box drawn.

`offer` keeps, per object, a bounded copy of the frame where it scored best (by default
a square region around the object, as Frigate's MQTT snapshots; scaled so the longer side
is at most `max_side`); it returns a JPEG to send at once only when the
score is markedly better (`better_score`) than the last one sent and `min_interval_s`
passed since. `finish` returns the best one when the object ends (`on_end`). A JPEG is
re-encoded at lower quality until it fits `max_bytes`; one that cannot is not sent.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from edgeagent.events.settings import SnapshotSettings

log = logging.getLogger(__name__)

_MIN_QUALITY = 30


@dataclass(slots=True)
class _Best:
    picture: Image.Image
    box: list[float]
    label: str
    score: float
    at: float
    sent_score: float
    sent_at: float


class BestSnapshots:
    """One thread only (the pipeline's decode thread)."""

    def __init__(self, settings: SnapshotSettings) -> None:
        self._settings = settings
        self._best: dict[str, _Best] = {}

    def offer(
        self,
        track_id: str,
        image: np.ndarray,
        detection: Mapping[str, Any],
        label: str,
        now: float,
    ) -> bytes | None:
        """The frame `image` shows `detection` of track `track_id`; a JPEG when it is
        markedly better than the one sent last and the rate limit allows."""
        s = self._settings
        if not s.enabled or image.ndim != 3:
            return None
        score = float(detection["score"])
        best = self._best.get(track_id)
        if best is None:
            # The first view is the baseline: it goes out at the end, or a better one does.
            picture, box = self._picture(image, detection["box"])
            self._best[track_id] = _Best(picture, box, label, score, now, score, now)
            return None
        if score <= best.score:
            return None
        best.picture, best.box = self._picture(image, detection["box"])
        best.label, best.score, best.at = label, score, now
        if score >= best.sent_score + s.better_score and now - best.sent_at >= s.min_interval_s:
            return self._render(best, now)
        return None

    def _picture(self, image: np.ndarray, box: Any) -> tuple[Image.Image, list[float]]:
        """The part of `image` to keep (scaled) and `box` in its normalised coordinates."""
        x0, y0, x1, y1 = (float(v) for v in box)
        if self._settings.crop:
            h, w = image.shape[:2]
            side = max(
                (x1 - x0) * w * 1.1, (y1 - y0) * h * 1.1, self._settings.crop_min * min(w, h)
            )
            side = min(side, w, h)
            left = int(min(max(0.0, (x0 + x1) / 2 * w - side / 2), w - side))
            top = int(min(max(0.0, (y0 + y1) / 2 * h - side / 2), h - side))
            size = int(side)
            image = image[top : top + size, left : left + size]
            x0, x1 = (x0 * w - left) / size, (x1 * w - left) / size
            y0, y1 = (y0 * h - top) / size, (y1 * h - top) / size
        clipped = [min(max(v, 0.0), 1.0) for v in (x0, y0, x1, y1)]
        return _scaled(image, self._settings.max_side), clipped

    def finish(self, track_id: str) -> bytes | None:
        """The object ended: its best JPEG (when `on_end`), and it is forgotten."""
        best = self._best.pop(track_id, None)
        if best is None or not self._settings.on_end:
            return None
        return self._render(best, best.at)

    def _render(self, best: _Best, now: float) -> bytes | None:
        best.sent_score, best.sent_at = best.score, now
        picture = best.picture.copy()
        draw = ImageDraw.Draw(picture)
        w, h = picture.size
        x0, y0, x1, y1 = best.box
        draw.rectangle((x0 * w, y0 * h, x1 * w, y1 * h), outline=(255, 64, 64), width=2)
        caption = f"{best.label} {best.score:.2f}"
        draw.text((x0 * w + 3, max(0, y0 * h - 12)), caption, fill=(255, 64, 64))
        quality = self._settings.quality
        while True:
            out = io.BytesIO()
            picture.save(out, format="JPEG", quality=quality)
            data = out.getvalue()
            if len(data) <= self._settings.max_bytes:
                return data
            if quality <= _MIN_QUALITY:
                log.warning(
                    "snapshot of %s is %d bytes at quality %d, over snapshots.max_bytes "
                    "(%d); not sent: raise max_bytes or lower max_side",
                    best.label,
                    len(data),
                    quality,
                    self._settings.max_bytes,
                )
                return None
            quality = max(_MIN_QUALITY, quality - 15)


def _scaled(image: np.ndarray, max_side: int) -> Image.Image:
    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")
    longest = max(picture.size)
    if longest > max_side:
        factor = max_side / longest
        picture = picture.resize(
            (max(1, round(picture.width * factor)), max(1, round(picture.height * factor)))
        )
    return picture
