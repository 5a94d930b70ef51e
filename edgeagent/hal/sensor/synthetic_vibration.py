"""A synthetic accelerometer on a running machine, with faults that can be injected.

`VibrationGenerator` produces a continuous 3-axis signal (x, y radial, z axial plus
gravity): shaft harmonics, broadband noise and a slow drift. A fault changes the physics
of the next samples the way it would on a real machine:

- `imbalance`: the 1x (shaft speed) component jumps, mostly on the radial axes.
- `bearing`: periodic impacts at the outer-race defect frequency ring a structural
  resonance, adding high-frequency energy.
- `looseness`: many harmonics and half-harmonics, and the signal clips (parts hit stops).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from edgeagent.errors import SourceError
from edgeagent.hal.sensor.settings import SyntheticVibration as SyntheticVibrationConfig
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample

logger = logging.getLogger(__name__)

FAULTS: tuple[str, ...] = ("imbalance", "bearing", "looseness")
_GRAVITY = np.array([0.0, 0.0, 1.0], dtype=np.float32)  # in g; the z axis is vertical
_BPFO = 3.57  # outer-race defect frequency in shaft orders, typical of a 6205 bearing


class VibrationGenerator:
    """A phase-continuous 3-channel signal at `rate_hz`; `window(n, fault)` returns the
    next n samples as float32 (n, 3), with the named fault (or none) present throughout."""

    def __init__(self, rate_hz: float = 1000.0, seed: int = 0) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        self.rate_hz = rate_hz
        self._rng = np.random.default_rng(seed)
        rng = self._rng
        # The machine: its speed, the amplitudes of its harmonics on each axis, its noise.
        self._shaft_hz = float(rng.uniform(22.0, 32.0))
        self._harmonics = np.array([1.0, 0.35, 0.12], dtype=np.float64)
        self._axis_gain = rng.uniform(0.6, 1.0, size=3) * np.array([1.0, 0.9, 0.4])
        self._axis_phase = rng.uniform(0, 2 * np.pi, size=(3, 3))  # (harmonic, axis)
        self._noise = float(rng.uniform(0.08, 0.15))
        self._drift_hz = float(rng.uniform(0.02, 0.1))
        self._drift_phase = rng.uniform(0, 2 * np.pi, size=3)
        self._resonance_hz = min(0.3 * rate_hz, 3000.0)
        self._t = 0  # samples generated so far
        self._shaft_phase = 0.0  # radians, carried across windows

    @property
    def shaft_hz(self) -> float:
        """The machine's nominal running speed (the 1x order), in Hz."""
        return self._shaft_hz

    def window(self, n: int, fault: str | None = None) -> npt.NDArray[np.float32]:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS} or None")
        rng = self._rng
        t = (self._t + np.arange(n)) / self.rate_hz
        # The speed wanders a little from window to window, as a real motor's does.
        shaft_hz = self._shaft_hz * (1.0 + rng.normal(0.0, 0.01))
        shaft = self._shaft_phase + 2 * np.pi * shaft_hz * (np.arange(n) / self.rate_hz)
        gains = self._axis_gain * rng.uniform(0.9, 1.1, size=3)
        signal = np.zeros((n, 3), dtype=np.float64)
        for k, amplitude in enumerate(self._harmonics, start=1):
            signal += amplitude * gains * np.sin(k * shaft[:, None] + self._axis_phase[k - 1])

        if fault == "imbalance":
            boost = rng.uniform(0.8, 3.0)  # from a slipped counterweight to a lost blade
            gain = np.array([1.0, 1.0, 0.2]) * self._axis_gain
            signal += boost * gain * np.sin(shaft[:, None] + self._axis_phase[0])
        elif fault == "bearing":
            signal += self._bearing_impacts(t, shaft_hz, n)
        elif fault == "looseness":
            for k in range(2, 11):
                amplitude = rng.uniform(0.15, 0.4) / np.sqrt(k)
                signal += amplitude * gains * np.sin(k * shaft[:, None] + rng.uniform(0, 6.3))
            for order in (0.5, 1.5, 2.5):
                signal += rng.uniform(0.1, 0.3) * gains * np.sin(order * shaft[:, None])
            limit = rng.uniform(0.6, 0.9) * np.abs(signal).max(axis=0)
            signal = np.clip(signal, -limit, limit)

        drift = 0.2 * np.sin(2 * np.pi * self._drift_hz * t[:, None] + self._drift_phase)
        noise = rng.normal(0.0, self._noise, size=(n, 3))
        self._t += n
        self._shaft_phase = float((shaft[-1] + 2 * np.pi * shaft_hz / self.rate_hz) % (2 * np.pi))
        return (signal + drift + noise + _GRAVITY).astype(np.float32)

    def _bearing_impacts(
        self, t: npt.NDArray[np.float64], shaft_hz: float, n: int
    ) -> npt.NDArray[np.float64]:
        rng = self._rng
        interval = 1.0 / (_BPFO * shaft_hz)
        impacts = np.arange(rng.uniform(0, interval) + t[0], t[-1], interval)
        decay = rng.uniform(120.0, 250.0)  # 1/s: how fast each ring dies out
        strength = rng.uniform(0.5, 2.5)  # early pitting to a spalled race
        out = np.zeros(n, dtype=np.float64)
        for t0 in impacts:
            dt = t - t0
            live = dt >= 0
            out[live] += np.exp(-decay * dt[live]) * np.sin(
                2 * np.pi * self._resonance_hz * dt[live]
            )
        axes = np.array([1.0, 0.8, 0.5]) * strength
        return out[:, None] * axes


class SyntheticVibration:
    """The `synthetic-vibration` sensor: windows of `config.window` samples every `hop`.

    Each window is normal or carries one fault (about `fault_rate` of them, chosen at
    random, or forced with `inject`). A window never mixes conditions: when the condition
    changes, the next window is generated whole rather than overlapping the previous one.
    """

    kind: SampleKind = "window"

    def __init__(
        self,
        config: SyntheticVibrationConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.hop = config.hop_samples
        self._clock = clock
        self._sleep = sleep
        self._generator: VibrationGenerator | None = None
        self._rng = np.random.default_rng(config.seed + 1)
        self._buffer: npt.NDArray[np.float32] | None = None
        self._condition: str | None = None
        self._forced: list[str | None] = []
        self._sequence = 0
        self._anchor = 0.0

    def inject(self, fault: str | None, windows: int = 1) -> None:
        """Forces the next `windows` windows to carry `fault` (None: force normal ones)."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS} or None")
        self._forced.extend([fault] * windows)

    def open(self) -> None:
        cfg = self.config
        self._generator = VibrationGenerator(cfg.rate_hz, cfg.seed)
        self._rng = np.random.default_rng(cfg.seed + 1)
        self._buffer = None
        self._sequence = 0
        self._anchor = self._clock()
        logger.info(
            "synthetic vibration at %.0f Hz, window %d, hop %d, fault rate %.2f",
            cfg.rate_hz,
            cfg.window,
            self.hop,
            cfg.fault_rate,
        )

    def due_at(self, sequence: int) -> float:
        """Monotonic time at which window `sequence` is complete (realtime pacing)."""
        samples = self.config.window + sequence * self.hop
        return self._anchor + samples / self.config.rate_hz

    def read(self) -> Sample:
        generator = self._generator
        if generator is None:
            raise SourceError("synthetic vibration read before open(); call open() first")
        if self.config.realtime:
            delay = self.due_at(self._sequence) - self._clock()
            if delay > 0:
                self._sleep(delay)
        started = time.perf_counter()
        condition = self._next_condition()
        window = self.config.window
        if self._buffer is None or condition != self._condition or self.hop >= window:
            data = generator.window(window, condition)
        else:
            fresh = generator.window(self.hop, condition)
            data = np.concatenate([self._buffer[self.hop :], fresh])
        self._buffer = data
        self._condition = condition
        sample = Sample(
            data=data.copy(),
            captured_at=time.time(),
            capture_s=time.perf_counter() - started,
            sequence=self._sequence,
            truth={"fault": condition},
        )
        self._sequence += 1
        return sample

    def _next_condition(self) -> str | None:
        if self._forced:
            return self._forced.pop(0)
        if self._rng.random() < self.config.fault_rate:
            return FAULTS[int(self._rng.integers(len(FAULTS)))]
        return None

    def close(self) -> None:
        self._generator = None
        self._buffer = None
