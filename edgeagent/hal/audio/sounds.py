"""Labelled sounds, generated: what the synthetic audio source plays and the bundled
`sound-classifier` was trained on.

Every clip is a mono float32 signal in [-1, 1] with a random level of background noise
under it; each class is a different physical kind of sound, with its parameters drawn at
random so that no two clips are alike:

- `background`: the room alone (noise, a faint mains hum).
- `beep`: a steady tone, 500 to 2500 Hz, switched on and off 1 to 4 times a second.
- `siren`: a tone whose pitch sweeps up and down (600 to 1600 Hz, 0.5 to 2 sweeps/s).
- `knock`: 2 to 6 short decaying thumps (a 80 to 300 Hz resonance) at random times.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

SOUNDS: tuple[str, ...] = ("background", "beep", "siren", "knock")


class SoundGenerator:
    """`clip(label, n)`: the next n samples at `rate_hz` of a sound of class `label`."""

    def __init__(self, rate_hz: float = 8000.0, seed: int = 0) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        self.rate_hz = rate_hz
        self._rng = np.random.default_rng(seed)

    def clip(self, label: str, n: int) -> npt.NDArray[np.float32]:
        if label not in SOUNDS:
            raise ValueError(f"unknown sound {label!r}; expected one of {SOUNDS}")
        rng = self._rng
        t = np.arange(n) / self.rate_hz
        noise_level = rng.uniform(0.01, 0.2)
        signal = noise_level * rng.normal(0.0, 1.0, n)
        hum = rng.uniform(0.0, 0.02) * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t)
        signal += hum
        level = rng.uniform(0.03, 0.8)
        if label == "beep":
            frequency = rng.uniform(500.0, 2500.0)
            rate = rng.uniform(1.0, 4.0)
            gate = (np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)) > -0.2).astype(
                np.float64
            )
            signal += level * gate * np.sin(2 * np.pi * frequency * t)
        elif label == "siren":
            low, high = rng.uniform(600.0, 900.0), rng.uniform(1100.0, 1600.0)
            sweep = rng.uniform(0.5, 2.0)
            phase0 = rng.uniform(0, 2 * np.pi)
            sweeping = low + (high - low) * 0.5 * (1 + np.sin(2 * np.pi * sweep * t + phase0))
            phase = 2 * np.pi * np.cumsum(sweeping) / self.rate_hz
            signal += level * np.sin(phase)
        elif label == "knock":
            resonance = rng.uniform(80.0, 300.0)
            for start in rng.uniform(0, max(t[-1] - 0.05, 0.0), rng.integers(2, 7)):
                k = int(start * self.rate_hz)
                tail = t[: n - k]
                signal[k:] += (
                    level
                    * 2.0
                    * np.exp(-tail * rng.uniform(25.0, 60.0))
                    * np.sin(2 * np.pi * resonance * tail)
                )
        clipped: npt.NDArray[np.float32] = np.clip(signal, -1.0, 1.0).astype(np.float32)
        return clipped
