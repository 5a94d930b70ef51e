"""Cuts a stream of audio samples into windows of `window` samples every `hop` samples,
as the sensor sources do: with hop < window the windows overlap, with hop > window the
samples between them are skipped."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class SampleWindows:
    """Push samples in (any amount at a time); `pop()` gives the next full window, or None
    until enough samples have arrived. `tags`, when pushed, travel with the samples (the
    synthetic source's class per sample)."""

    def __init__(self, window: int, hop: int) -> None:
        if window < 1 or hop < 1:
            raise ValueError(f"window and hop must be positive, got {window} and {hop}")
        self.window, self.hop = window, hop
        self._samples = np.zeros(0, np.float32)
        self._tags = np.zeros(0, np.int16)
        self._skip = 0  # samples still to drop when hop > window

    def push(
        self, samples: npt.NDArray[np.float32], tags: npt.NDArray[np.int16] | None = None
    ) -> None:
        if tags is None:
            tags = np.full(len(samples), -1, np.int16)
        if self._skip:
            dropped = min(self._skip, len(samples))
            samples, tags, self._skip = samples[dropped:], tags[dropped:], self._skip - dropped
        self._samples = np.concatenate([self._samples, samples.astype(np.float32, copy=False)])
        self._tags = np.concatenate([self._tags, tags])

    @property
    def needed(self) -> int:
        """Samples still missing before the next window (skipped ones included)."""
        return max(self.window - len(self._samples), 0) + self._skip

    def pop(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int16]] | None:
        if len(self._samples) < self.window:
            return None
        window = self._samples[: self.window].copy()
        tags = self._tags[: self.window].copy()
        advance = min(self.hop, len(self._samples))
        self._samples, self._tags = self._samples[advance:], self._tags[advance:]
        self._skip = self.hop - advance
        return window, tags
