"""Replays a CSV file as sensor windows: one row per sample, one numeric column per channel."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgeagent.errors import SourceError
from edgeagent.hal.pacing import Pacer
from edgeagent.hal.sensor.settings import CsvSensor
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample

logger = logging.getLogger(__name__)


class CsvSource:
    """Windows of `window` rows every `hop` rows, paced at `rate_hz` rows per second.

    The first row is a header when any of its cells is not a number; without a header the
    columns are named by their index ("0", "1", ...).
    """

    kind: SampleKind = "window"

    def __init__(self, config: CsvSensor) -> None:
        self.config = config
        self.window = config.window
        self.hop = config.hop_samples
        self.channels: tuple[str, ...] = ()
        self._data: npt.NDArray[np.float32] | None = None
        self._position = 0
        self._sequence = 0
        self._pacer = Pacer(self.hop / config.rate_hz)

    def open(self) -> None:
        names, data = load_csv(Path(self.config.path), self.config.columns)
        if len(data) < self.window:
            raise SourceError(
                f"csv source: {self.config.path} has {len(data)} rows, fewer than one "
                f"window of {self.window}"
            )
        self.channels = names
        self._data = data
        self._position = 0
        self._sequence = 0
        self._pacer.reset()
        logger.info(
            "csv source: %s, %d rows of %s, windows of %d every %d rows at %g Hz",
            self.config.path,
            len(data),
            ", ".join(names),
            self.window,
            self.hop,
            self.config.rate_hz,
        )

    def read(self) -> Sample:
        data = self._data
        if data is None:
            raise SourceError("csv source: read() before open() or after close()")
        if self._position + self.window > len(data):
            if not self.config.loop:
                raise SourceError(
                    f"csv source exhausted: {self.config.path} has no further window of "
                    f"{self.window} rows and loop is false"
                )
            self._position = 0
        started = time.monotonic()
        window = data[self._position : self._position + self.window].copy()
        self._position += self.hop
        capture_s = time.monotonic() - started
        self._pacer.wait()
        sequence = self._sequence
        self._sequence += 1
        return Sample(window, captured_at=time.time(), capture_s=capture_s, sequence=sequence)

    def close(self) -> None:
        self._data = None


def load_csv(
    path: Path, columns: tuple[str, ...] | None
) -> tuple[tuple[str, ...], npt.NDArray[np.float32]]:
    """(channel names, rows x channels float32) of the selected numeric columns."""
    try:
        with path.open(newline="", encoding="utf-8") as file:
            rows = [(number, row) for number, row in enumerate(csv.reader(file), 1) if row]
    except FileNotFoundError as exc:
        raise SourceError(f"csv source: {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"csv source: cannot read {path}: {exc}") from exc
    if not rows:
        raise SourceError(f"csv source: {path} is empty")
    first = rows[0][1]
    if all(_is_number(cell) for cell in first):
        names = tuple(str(i) for i in range(len(first)))
    else:
        names = tuple(cell.strip() for cell in first)
        rows = rows[1:]
    for number, row in rows:
        if len(row) != len(names):
            raise SourceError(
                f"csv source: {path}:{number} has {len(row)} cells, expected {len(names)}"
            )
    numeric = [i for i in range(len(names)) if all(_is_number(row[i]) for _, row in rows)]
    if columns is None:
        if not numeric or not rows:
            raise SourceError(f"csv source: {path} has no numeric columns (columns: {names})")
        selected = numeric
    else:
        selected = []
        for name in columns:
            if name not in names:
                raise SourceError(
                    f"csv source: {path} has no column {name!r}; available: {', '.join(names)}"
                )
            index = names.index(name)
            if index not in numeric:
                number, row = next((n, r) for n, r in rows if not _is_number(r[index]))
                raise SourceError(
                    f"csv source: column {name!r} of {path} is not numeric "
                    f"(line {number}: {row[index]!r})"
                )
            selected.append(index)
    data = np.array([[float(row[i]) for i in selected] for _, row in rows], dtype=np.float32)
    return tuple(names[i] for i in selected), data.reshape(len(rows), len(selected))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
