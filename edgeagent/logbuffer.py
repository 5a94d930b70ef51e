"""The last log lines, kept in memory so `logs` can answer without journald access."""

from __future__ import annotations

import logging
import threading
from collections import deque


class LogBuffer(logging.Handler):
    """A logging handler that keeps the last `capacity` formatted lines."""

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__()
        self._lines: deque[str] = deque(maxlen=capacity)
        self._guard = threading.Lock()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a log line must never break the caller
            self.handleError(record)
            return
        with self._guard:
            self._lines.append(line)

    def tail(self, count: int) -> list[str]:
        with self._guard:
            lines = list(self._lines)
        return lines[-count:] if count > 0 else []


_buffer: LogBuffer | None = None


def install(capacity: int = 1000) -> LogBuffer:
    """Attaches the process-wide buffer to the root logger (once) and returns it."""
    global _buffer  # noqa: PLW0603 - one buffer per process, like the root logger itself
    if _buffer is None:
        _buffer = LogBuffer(capacity)
        logging.getLogger().addHandler(_buffer)
    return _buffer
