"""Audio backends' settings and facts; light, as `hal/camera/settings.py` says.

An audio source delivers mono windows, shape (window, 1), float32 in [-1, 1], so to the
rest of the agent it is a window source like the sensors.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from edgeagent.hal.settings import (
    FileReplay,
    Preflight,
    PreflightEnv,
    RealtimeWindows,
    WindowSettings,
    library_preflight,
)

ALSA_INSTALL_HINT = (
    "sudo apt install libasound2-dev, then pip install 'edgeagent[audio]' (pyalsaaudio)"
)


class _Audio(WindowSettings):
    def sample_shape(self) -> tuple[int, ...]:
        return (self.window, 1)


class SyntheticSounds(_Audio, RealtimeWindows):
    """Labelled sounds (background, beep, siren, knock), one class per segment, at random."""

    implementation: ClassVar[str] = "edgeagent.hal.audio.synthetic:SyntheticSoundsSource"

    type: Literal["synthetic-sounds"]
    rate_hz: float = Field(default=8000.0, gt=0)
    window: int = Field(default=8000, ge=8)  # samples per window
    hop: int | None = Field(default=None, ge=1)  # samples between windows; default: window
    segment: int | None = Field(default=None, ge=1)  # samples per sound; default: window
    sounds: tuple[str, ...] | None = None  # the classes to play; default: all
    seed: int = 0
    realtime: bool = True  # pace windows at rate_hz; false: as fast as read


class WavAudio(_Audio, FileReplay, RealtimeWindows):
    """Replays a PCM WAV file (8, 16, 24 or 32 bit) as mono windows in [-1, 1]."""

    implementation: ClassVar[str] = "edgeagent.hal.audio.wav:WavSource"

    type: Literal["wav"]
    path: str
    window: int = Field(default=8000, ge=1)
    hop: int | None = Field(default=None, ge=1)
    loop: bool = True
    realtime: bool = True  # pace windows at the file's sample rate


class AlsaMicrophone(_Audio):
    """A microphone through ALSA (pyalsaaudio, the `audio` extra), mono windows in [-1, 1]."""

    implementation: ClassVar[str] = "edgeagent.hal.audio.alsa:AlsaSource"

    type: Literal["alsa"]
    # ALSA's name of the capture PCM (`arecord -L`); not `device`, which every source's
    # settings answer as a method (the device family the doctor checks).
    pcm: str = "default"
    rate_hz: int = Field(default=16000, ge=1000, le=192000)
    channels: int = Field(default=1, ge=1, le=8)  # captured, then mixed to mono
    window: int = Field(default=16000, ge=1)
    hop: int | None = Field(default=None, ge=1)
    period: int = Field(default=1024, ge=32)  # frames per ALSA read

    def preflight(self, env: PreflightEnv) -> Preflight:
        del env
        missing = library_preflight("alsaaudio", "pyalsaaudio", ALSA_INSTALL_HINT)
        if missing is not None:
            return missing
        return Preflight(True, f"pyalsaaudio imports; PCM {self.pcm}")
