"""Replays a PCM WAV file (the standard library's `wave`) as mono windows in [-1, 1]."""

from __future__ import annotations

import logging
import time
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgeagent.errors import SourceError
from edgeagent.hal.audio.settings import WavAudio
from edgeagent.hal.audio.windows import SampleWindows
from edgeagent.hal.pacing import Pacer
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample

logger = logging.getLogger(__name__)


def read_wav(path: Path) -> tuple[npt.NDArray[np.float32], int]:
    """(mono samples in [-1, 1], sample rate); SourceError when the file is not PCM WAV."""
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except FileNotFoundError as exc:
        raise SourceError(f"wav source: {path} does not exist; correct source.path") from exc
    except (wave.Error, EOFError, OSError) as exc:
        raise SourceError(
            f"wav source: {path} is not a PCM WAV file ({exc}); convert it, e.g. with "
            "`sox in.mp3 -b 16 out.wav`"
        ) from exc
    if width == 1:
        values = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        values = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        ints = bytes3[:, 0].astype(np.int32) | (bytes3[:, 1].astype(np.int32) << 8)
        ints |= bytes3[:, 2].astype(np.int32) << 16
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        values = ints.astype(np.float32) / float(1 << 23)
    else:
        values = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    mono: npt.NDArray[np.float32] = values.reshape(-1, channels).mean(axis=1).astype(np.float32)
    return mono, rate


class WavSource:
    """Windows of `window` samples every `hop`, paced at the file's sample rate."""

    kind: SampleKind = "window"

    def __init__(self, config: WavAudio) -> None:
        self.config = config
        self.rate_hz = 0
        self._samples: npt.NDArray[np.float32] | None = None
        self._position = 0
        self._windows = SampleWindows(config.window, config.hop_samples)
        self._pacer = Pacer(0.0)
        self._sequence = 0

    def open(self) -> None:
        samples, rate = read_wav(Path(self.config.path))
        if len(samples) < self.config.window:
            raise SourceError(
                f"wav source: {self.config.path} holds {len(samples)} samples, fewer than one "
                f"window of {self.config.window}"
            )
        self._samples, self.rate_hz, self._position, self._sequence = samples, rate, 0, 0
        self._pacer = Pacer(self.config.hop_samples / rate if self.config.realtime else 0.0)
        logger.info(
            "wav source: %s, %.1f s at %d Hz, windows of %d every %d samples",
            self.config.path,
            len(samples) / rate,
            rate,
            self.config.window,
            self.config.hop_samples,
        )

    def read(self) -> Sample:
        samples = self._samples
        if samples is None:
            raise SourceError("wav source: read() before open() or after close()")
        started = time.monotonic()
        popped = self._windows.pop()
        while popped is None:
            if self._position >= len(samples):
                if not self.config.loop:
                    raise SourceError(
                        f"wav source exhausted: {self.config.path} has no further window "
                        "and loop is false"
                    )
                self._position = 0
            chunk = samples[self._position : self._position + self._windows.needed]
            self._position += len(chunk)
            self._windows.push(chunk)
            popped = self._windows.pop()
        capture_s = time.monotonic() - started
        self._pacer.wait()
        sequence = self._sequence
        self._sequence += 1
        return Sample(
            popped[0][:, np.newaxis],
            captured_at=time.time(),
            capture_s=capture_s,
            sequence=sequence,
        )

    def close(self) -> None:
        self._samples = None
