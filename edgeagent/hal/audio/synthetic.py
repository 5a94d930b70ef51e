"""A synthetic microphone that plays labelled sounds (`sounds.SOUNDS`) one after another,
each for `segment` samples, chosen at random; windows carry the class that fills most of
them as `truth`, so the accuracy of an audio pipeline can be measured."""

from __future__ import annotations

import logging
import time

import numpy as np

from edgeagent.errors import SourceError
from edgeagent.hal.audio.settings import SyntheticSounds
from edgeagent.hal.audio.sounds import SOUNDS, SoundGenerator
from edgeagent.hal.audio.windows import SampleWindows
from edgeagent.hal.pacing import Pacer
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample

logger = logging.getLogger(__name__)


class SyntheticSoundsSource:
    """Mono windows (window, 1) float32 in [-1, 1] at `rate_hz`, every `hop` samples."""

    kind: SampleKind = "window"

    def __init__(self, config: SyntheticSounds) -> None:
        self.config = config
        self.sounds = config.sounds or SOUNDS
        self._segment = config.segment or config.window
        self._windows = SampleWindows(config.window, config.hop_samples)
        self._generator = SoundGenerator(config.rate_hz, config.seed)
        self._rng = np.random.default_rng(config.seed + 1)
        period = config.hop_samples / config.rate_hz if config.realtime else 0.0
        self._pacer = Pacer(period)
        self._sequence = 0
        self._open = False

    def open(self) -> None:
        unknown = [s for s in self.sounds if s not in SOUNDS]
        if unknown or not self.sounds:
            raise SourceError(
                f"synthetic-sounds: unknown sound(s) {unknown or '(none given)'}; "
                f"choose from {', '.join(SOUNDS)}"
            )
        self._open = True
        self._pacer.reset()
        logger.info(
            "synthetic-sounds source: %s at %g Hz, windows of %d every %d samples",
            ", ".join(self.sounds),
            self.config.rate_hz,
            self._windows.window,
            self._windows.hop,
        )

    def read(self) -> Sample:
        if not self._open:
            raise SourceError("synthetic-sounds source: read() before open() or after close()")
        started = time.monotonic()
        popped = self._windows.pop()
        while popped is None:
            label = str(self._rng.choice(self.sounds))
            clip = self._generator.clip(label, self._segment)
            self._windows.push(clip, np.full(len(clip), SOUNDS.index(label), np.int16))
            popped = self._windows.pop()
        window, tags = popped
        counts = np.bincount(tags[tags >= 0], minlength=len(SOUNDS))
        truth = {"sound": SOUNDS[int(np.argmax(counts))]}
        capture_s = time.monotonic() - started
        self._pacer.wait()
        sequence = self._sequence
        self._sequence += 1
        return Sample(
            window[:, np.newaxis],
            captured_at=time.time(),
            capture_s=capture_s,
            sequence=sequence,
            truth=truth,
        )

    def close(self) -> None:
        self._open = False
