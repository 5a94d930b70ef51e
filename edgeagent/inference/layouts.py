"""How a YOLO detection head is laid out, told from its shape (and the number of labels).

Pure shape logic, shared by the decoder (`tasks`) and by the rules that infer a model's
task from its graph (`edgeagent.modelfile.introspect`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from edgeagent.errors import ModelError

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class YoloHead:
    """How one [1, A, B] YOLO output is laid out."""

    transposed: bool  # rows on the last axis: [1, 4 + C, N]
    objectness: bool  # a YOLOv5 objectness score after the box
    classes: int
    reason: str  # how the layout was told, for people


def read_yolo_head(shape: Sequence[int], layout: str, classes: int | None) -> YoloHead:
    """The layout of a YOLO head of `shape` (see the module docstring); `classes` is the
    number of labels when known. Raises ModelError when the shape is not a YOLO head."""
    shape = tuple(shape)
    name = "yolov5" if layout == "yolov5" else "yolov8"
    if len(shape) != 3 or shape[0] != 1:
        raise ModelError(
            f"detection layout {name} needs one [1, N, 4 + classes] output (or "
            f"[1, 4 + classes, N]; [1, N, 5 + classes] for yolov5), but the output has shape "
            f"{list(shape)}"
        )
    rows_first, rows_last = shape[1], shape[2]
    extras = {"yolov5": (5,), "auto": (4, 5)}.get(layout, (4,))
    if classes:
        fits = [
            (transposed, extra)
            for transposed, width in ((False, rows_last), (True, rows_first))
            for extra in extras
            if width == extra + classes
        ]
        if fits:
            # Both orientations fit only for a square head: rows are the longer axis.
            transposed, extra = sorted(fits, key=lambda f: f[0] != (rows_first < rows_last))[0]
            width = extra + classes
            pattern = f"[1, {width}, N]" if transposed else f"[1, N, {width}]"
            box = "4 box values + objectness" if extra == 5 else "4 box values"
            return YoloHead(
                transposed, extra == 5, classes, f"{pattern} = {box} + {classes} classes"
            )
        _log.warning(
            "the YOLO head %s fits neither 4 nor 5 values plus the %d labels; reading it by its "
            "shape alone",
            list(shape),
            classes,
        )
    objectness = layout == "yolov5"
    extra = 5 if objectness else 4
    # The rows are the longer axis, unless the shorter one is too short to be a row.
    transposed = extra < rows_first < rows_last
    width = rows_first if transposed else rows_last
    if width < extra + 1:
        raise ModelError(
            f"detection layout {name} needs 4 box values{' and objectness' if objectness else ''} "
            f"and at least one class score per row, but the output has shape {list(shape)}"
        )
    why = "rows on the longer axis" + (
        "" if objectness or layout == "yolov8" else "; no objectness column assumed (YOLOv8)"
    )
    return YoloHead(transposed, objectness, width - extra, why)
