"""The suite's one polling wait: `wait_until(predicate, timeout, message)`.

A test waits on what it can observe (a message, a status field, a file, a process state),
never with a bare `time.sleep`. Where the thing waited on signals by itself (a condition
variable, `MqttReader.wait_for`), wait on that instead; this is for state that can only be
looked at. A sleep that lets time pass to prove something did NOT happen is the one
exception, and says so in a comment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    message: str | Callable[[], str] = "the condition",
    *,
    interval: float = 0.02,
) -> T:
    """Calls `predicate` every `interval` seconds until it returns something truthy, and
    returns that. After `timeout` seconds raises AssertionError naming `message` (a callable
    is called then, so it can show the state at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
