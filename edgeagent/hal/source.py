"""What every camera and sensor source delivers, and the protocol each backend implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgeagent.hal.settings import SampleKind


@dataclass(frozen=True, slots=True)
class Sample:
    """One frame or one sensor window.

    `data` is an RGB image of shape (height, width, 3), dtype uint8, for cameras, and a
    window of shape (samples, channels), dtype float32, for sensors. `truth` carries the
    ground truth of synthetic sources (boxes, fault labels) so quality can be measured.
    """

    data: npt.NDArray[Any]
    captured_at: float  # wall-clock seconds (time.time()) when the sample was taken
    capture_s: float  # seconds spent producing it (decode, read, render)
    sequence: int  # per-source counter, starting at 0
    truth: dict[str, Any] | None = field(default=None)
    # A camera that infers on a low-resolution stream sets this: its main stream, taken
    # when called (for snapshots; a frame or so later than `data`). None: `data` is all.
    full_frame: Callable[[], npt.NDArray[np.uint8]] | None = field(default=None)


class Source(Protocol):
    """A camera or a sensor. `read` blocks until the next sample is due (it paces itself
    to the configured fps or rate) and raises `SourceError` when the device fails."""

    kind: SampleKind

    def open(self) -> None: ...

    def read(self) -> Sample: ...

    def close(self) -> None: ...


def as_image(data: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Checks that `data` is an (H, W, 3) uint8 image and returns it typed as one."""
    if data.dtype != np.uint8 or data.ndim != 3 or data.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {data.shape} {data.dtype}")
    return data
