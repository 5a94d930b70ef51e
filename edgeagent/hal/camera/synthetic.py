"""A synthetic camera: a seeded scene of moving, bouncing shapes on a noisy background.

`ShapeScene` is a pure function of (seed, frame index), so the model build script trains
on exactly what the agent's camera shows. `SyntheticCamera` wraps it as a `Source`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgeagent.errors import SourceError
from edgeagent.hal.camera.settings import SyntheticCamera as SyntheticCameraConfig
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample

logger = logging.getLogger(__name__)

ShapeLabel = Literal["circle", "square", "triangle"]
LABELS: tuple[ShapeLabel, ...] = ("circle", "square", "triangle")

# Base colours per class (RGB); each shape varies around its class colour so a model must
# learn the geometry too, yet colour remains a strong, plausible cue.
_CLASS_COLOURS: dict[ShapeLabel, tuple[int, int, int]] = {
    "circle": (220, 60, 50),
    "square": (60, 200, 70),
    "triangle": (60, 90, 230),
}
_COLOUR_JITTER = 30
_MIN_SIZE, _MAX_SIZE = 0.08, 0.30  # shape size as a fraction of the image's short side
_BACKGROUNDS = 8  # noise frames cycled by the renderer; precomputed once per scene


@dataclass(frozen=True, slots=True)
class _Shape:
    label: ShapeLabel
    colour: npt.NDArray[np.uint8]
    size: int  # side of the bounding square in pixels
    x0: float  # start position of the box's top-left corner
    y0: float
    vx: float  # pixels per frame
    vy: float
    period: int  # visibility cycle in frames
    phase: int
    duty: float  # fraction of the cycle in which the shape is visible


def _bounce(start: float, velocity: float, t: float, span: float) -> float:
    """Position at time t of a point moving at `velocity` reflected off 0 and `span`."""
    if span <= 0:
        return 0.0
    p = (start + velocity * t) % (2.0 * span)
    return p if p <= span else 2.0 * span - p


class ShapeScene:
    """Frames of up to `shapes` circles, squares and triangles moving on a noisy background.

    `render(t)` depends only on the constructor's arguments and `t`, so any frame can be
    regenerated in any order. Boxes are normalised [x0, y0, x1, y1] in 0..1.
    """

    def __init__(
        self,
        width: int = 640,
        height: int = 480,
        shapes: int = 3,
        seed: int = 0,
        backgrounds: int = _BACKGROUNDS,
    ) -> None:
        if width < 8 or height < 8:
            raise ValueError(f"scene must be at least 8x8 pixels, got {width}x{height}")
        self.width = width
        self.height = height
        rng = np.random.default_rng(seed)
        self._backgrounds = self._make_backgrounds(rng, max(1, backgrounds))
        self._shapes = [self._make_shape(rng) for _ in range(shapes)]

    def _make_backgrounds(
        self, rng: np.random.Generator, count: int
    ) -> list[npt.NDArray[np.uint8]]:
        h, w = self.height, self.width
        base = rng.uniform(40, 160, size=3)
        tilt = rng.uniform(-40, 40, size=(2, 3))
        yy = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None, None]
        xx = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :, None]
        gradient = (base + tilt[0] * xx + tilt[1] * yy).astype(np.float32)
        sigma = rng.uniform(6, 18)
        frames = []
        for _ in range(count):
            noise = rng.normal(0.0, sigma, size=(h, w, 3)).astype(np.float32)
            frames.append(np.clip(gradient + noise, 0, 255).astype(np.uint8))
        return frames

    def _make_shape(self, rng: np.random.Generator) -> _Shape:
        short = min(self.width, self.height)
        label = LABELS[int(rng.integers(len(LABELS)))]
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        colour = np.clip(np.array(_CLASS_COLOURS[label]) + jitter, 0, 255).astype(np.uint8)
        size = max(3, round(short * rng.uniform(_MIN_SIZE, _MAX_SIZE)))
        speed = rng.uniform(1.0, 6.0) * short / 480.0
        angle = rng.uniform(0, 2 * np.pi)
        period = int(rng.integers(60, 400))
        return _Shape(
            label=label,
            colour=colour,
            size=size,
            x0=float(rng.uniform(0, max(1, self.width - size))),
            y0=float(rng.uniform(0, max(1, self.height - size))),
            vx=float(speed * np.cos(angle)),
            vy=float(speed * np.sin(angle)),
            period=period,
            phase=int(rng.integers(period)),
            # Most shapes are on screen most of the time; some blink in and out.
            duty=float(rng.uniform(0.5, 1.0)) if rng.random() < 0.6 else 1.0,
        )

    def render(self, t_index: int) -> tuple[npt.NDArray[np.uint8], list[dict[str, Any]]]:
        """Frame `t_index` as an (H, W, 3) uint8 RGB image and its ground-truth boxes; each
        box's `id` names its shape for the life of the scene (the tracking benchmark's
        truth)."""
        image = self._backgrounds[t_index % len(self._backgrounds)].copy()
        boxes: list[dict[str, Any]] = []
        for shape_id, shape in enumerate(self._shapes):
            if ((t_index + shape.phase) % shape.period) >= shape.duty * shape.period:
                continue
            size = min(shape.size, self.width, self.height)
            x = round(_bounce(shape.x0, shape.vx, t_index, self.width - size))
            y = round(_bounce(shape.y0, shape.vy, t_index, self.height - size))
            stamp = _stamp(shape.label, size)
            window = image[y : y + size, x : x + size]
            for top, bottom, left, right in stamp.blocks:
                window[top:bottom, left:right] = shape.colour
            x0, y0, x1, y1 = stamp.extent
            boxes.append(
                {
                    "id": shape_id,
                    "label": shape.label,
                    "box": [
                        (x + x0) / self.width,
                        (y + y0) / self.height,
                        (x + x1) / self.width,
                        (y + y1) / self.height,
                    ],
                }
            )
        return image, boxes


@dataclass(frozen=True, slots=True)
class _Stamp:
    """A shape's pixels inside its size x size bounding square, as the rectangles a frame
    is painted with (rows top:bottom, columns left:right; runs of equal rows merged, as
    painting a slice costs far less than a boolean mask), and the extent of the pixels
    (x0, y0, x1, y1, exclusive ends) for the truth box."""

    blocks: tuple[tuple[int, int, int, int], ...]
    extent: tuple[int, int, int, int]


_STAMPS: dict[tuple[str, int], _Stamp] = {}


def _mask(label: ShapeLabel, size: int) -> npt.NDArray[np.bool_]:
    """The shape's pixels inside its size x size bounding square."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = centres[:, None], centres[None, :]
    if label == "circle":
        r = size / 2.0
        mask = (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    elif label == "square":
        mask = np.ones((size, size), dtype=bool)
    else:  # an upright isosceles triangle filling the square
        mask = np.abs(xx - size / 2.0) <= 0.5 * yy
    return np.asarray(mask)


def _stamp(label: ShapeLabel, size: int) -> _Stamp:
    """`_mask` as rectangles (cached: sizes repeat). Every row of these convex shapes is
    one run of pixels, so the rectangles paint exactly the mask."""
    key = (label, size)
    cached = _STAMPS.get(key)
    if cached is not None:
        return cached
    mask = _mask(label, size)
    blocks: list[tuple[int, int, int, int]] = []
    for row in range(size):
        columns = np.flatnonzero(mask[row])
        if columns.size == 0:
            continue
        left, right = int(columns[0]), int(columns[-1]) + 1
        if right - left != columns.size:
            raise AssertionError(f"{label} row {row} is not one run of pixels")
        last = blocks[-1] if blocks else None
        if last is not None and last[1] == row and last[2:] == (left, right):
            blocks[-1] = (last[0], row + 1, left, right)
        else:
            blocks.append((row, row + 1, left, right))
    rows, cols = np.nonzero(mask)
    extent = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    stamp = _Stamp(tuple(blocks), extent)
    if len(_STAMPS) < 4096:
        _STAMPS[key] = stamp
    return stamp


class SyntheticCamera:
    """The `synthetic` camera: renders `ShapeScene` frames, paced to `config.fps`.

    Frames are due at open time + sequence / fps on the monotonic clock, so the pace does
    not drift; a reader more than one frame late restarts the schedule instead of bursting.
    """

    kind: SampleKind = "image"

    def __init__(
        self,
        config: SyntheticCameraConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self._scene: ShapeScene | None = None
        self._sequence = 0
        self._anchor = 0.0  # monotonic time at which frame `_anchor_sequence` is due
        self._anchor_sequence = 0

    def open(self) -> None:
        cfg = self.config
        self._scene = ShapeScene(cfg.width, cfg.height, cfg.shapes, cfg.seed)
        self._sequence = 0
        self._anchor = self._clock()
        self._anchor_sequence = 0
        logger.info(
            "synthetic camera %dx%d at %s fps, %d shapes, seed %d",
            cfg.width,
            cfg.height,
            cfg.fps or "unpaced",
            cfg.shapes,
            cfg.seed,
        )

    def due_at(self, sequence: int) -> float:
        """Monotonic time at which frame `sequence` is scheduled (fps > 0)."""
        return self._anchor + (sequence - self._anchor_sequence) / self.config.fps

    def read(self) -> Sample:
        if self._scene is None:
            raise SourceError("synthetic camera read before open(); call open() first")
        if self.config.fps > 0:
            self._wait_until_due()
        started = time.perf_counter()
        image, boxes = self._scene.render(self._sequence)
        capture_s = time.perf_counter() - started
        sample = Sample(
            data=image,
            captured_at=time.time(),
            capture_s=capture_s,
            sequence=self._sequence,
            truth={"boxes": boxes},
        )
        self._sequence += 1
        return sample

    def _wait_until_due(self) -> None:
        period = 1.0 / self.config.fps
        due = self.due_at(self._sequence)
        now = self._clock()
        if now < due:
            self._sleep(due - now)
        elif now - due > period:
            # The consumer fell behind; catching up would deliver a burst of stale frames.
            logger.debug("synthetic camera %.3f s late; restarting its schedule", now - due)
            self._anchor = now
            self._anchor_sequence = self._sequence

    def close(self) -> None:
        self._scene = None
