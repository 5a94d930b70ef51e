"""A microphone through ALSA with pyalsaaudio (the `audio` extra), the Pi's own sound
stack: 16-bit capture at `rate_hz`, mixed to mono, cut into windows every `hop` samples.
`read` blocks on the device, which paces the source."""

from __future__ import annotations

import logging
import time
from types import ModuleType
from typing import Any

import numpy as np

from edgeagent.errors import MissingDependencyError, SourceError
from edgeagent.hal.audio.settings import ALSA_INSTALL_HINT, AlsaMicrophone
from edgeagent.hal.audio.windows import SampleWindows
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample

logger = logging.getLogger(__name__)


def _alsaaudio() -> ModuleType:
    try:
        import alsaaudio  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise MissingDependencyError("the ALSA microphone source", ALSA_INSTALL_HINT) from exc
    module: ModuleType = alsaaudio
    return module


class AlsaSource:
    kind: SampleKind = "window"

    def __init__(self, config: AlsaMicrophone) -> None:
        self.config = config
        self._pcm: Any = None
        self._windows = SampleWindows(config.window, config.hop_samples)
        self._sequence = 0

    def open(self) -> None:
        alsa = _alsaaudio()
        try:
            self._pcm = alsa.PCM(
                type=alsa.PCM_CAPTURE,
                mode=alsa.PCM_NORMAL,
                device=self.config.pcm,
                channels=self.config.channels,
                rate=self.config.rate_hz,
                format=alsa.PCM_FORMAT_S16_LE,
                periodsize=self.config.period,
            )
        except alsa.ALSAAudioError as exc:
            raise SourceError(
                f"alsa source: cannot open capture device {self.config.pcm!r} ({exc}); "
                "list the PCMs with `arecord -L` and set source.pcm"
            ) from exc
        self._sequence = 0
        logger.info(
            "alsa source: %s at %d Hz, %d channel(s), windows of %d every %d samples",
            self.config.pcm,
            self.config.rate_hz,
            self.config.channels,
            self.config.window,
            self._windows.hop,
        )

    def read(self) -> Sample:
        if self._pcm is None:
            raise SourceError("alsa source: read() before open() or after close()")
        started = time.monotonic()
        popped = self._windows.pop()
        while popped is None:
            try:
                frames, data = self._pcm.read()
            except Exception as exc:
                raise SourceError(
                    f"alsa source: reading {self.config.pcm!r} failed: {exc}"
                ) from exc
            if frames < 0:  # an overrun: samples were lost; go on with the next period
                logger.warning("alsa source: overrun on %s, samples lost", self.config.pcm)
                continue
            ints = np.frombuffer(data, "<i2")[: frames * self.config.channels]
            mono = ints.reshape(-1, self.config.channels).mean(axis=1) / 32768.0
            self._windows.push(mono.astype(np.float32))
            popped = self._windows.pop()
        sequence = self._sequence
        self._sequence += 1
        return Sample(
            popped[0][:, np.newaxis],
            captured_at=time.time(),
            capture_s=time.monotonic() - started,
            sequence=sequence,
        )

    def close(self) -> None:
        pcm, self._pcm = self._pcm, None
        if pcm is not None:
            pcm.close()
