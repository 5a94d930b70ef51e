"""The wait before each reconnect attempt: exponential back-off with "full jitter".

paho's own back-off (`reconnect_delay_set`) doubles the wait from `reconnect_min_s` up to
`reconnect_max_s` without randomness, so every device that lost a restarted broker at the
same instant retries at the same instants (1 s, 3 s, 7 s... after the loss): a thundering
herd of CONNECTs at the broker, again and again. With `mqtt.reconnect_jitter: full` (the
default) attempt n (from 0) waits a uniformly random time in

    [0, min(reconnect_max_s, reconnect_min_s * 2**n)]

("full jitter", from the AWS Architecture Blog's "Exponential Backoff And Jitter"): the
retries of a fleet spread over the whole window, so the broker sees a steady trickle of
connects instead of spikes, and a broker that is back soon is found sooner on average.
`none` keeps paho's sequence (min, 2 min, 4 min ... max) exactly. A successful connect
(CONNACK accepted) starts the sequence again.

`MqttLink` asks for the next wait in its paho callbacks for a failed attempt or a lost
connection, and hands it to paho with `reconnect_delay_set(wait, wait)`, which paho uses
for the very next wait (public API: its delay is reset by that call).
"""

from __future__ import annotations

import random
import threading
from typing import Final, Literal

Jitter = Literal["full", "none"]

_MAX_DOUBLINGS: Final = 62  # 2**n stays a float far beyond any cap; no overflow


class ReconnectBackoff:
    """The waits of one connection's reconnect attempts (see the module doc); thread-safe."""

    def __init__(
        self,
        low_s: float,
        high_s: float,
        *,
        jitter: Jitter = "full",
        rng: random.Random | None = None,
    ) -> None:
        """`low_s` > 0 and `high_s` >= `low_s` (a smaller `high_s` is raised to `low_s`);
        `rng` makes the sequence reproducible (tests)."""
        if low_s <= 0:
            raise ValueError("the reconnect back-off floor must be positive")
        self.low_s = low_s
        self.high_s = max(high_s, low_s)
        self.jitter: Jitter = jitter
        self._rng = rng or random.Random()
        self._attempt = 0
        self._lock = threading.Lock()

    def ceiling(self, attempt: int) -> float:
        """The longest wait before attempt `attempt` (from 0): min(high, low * 2**attempt)."""
        return min(self.high_s, self.low_s * 2.0 ** min(attempt, _MAX_DOUBLINGS))

    def next_delay(self) -> float:
        """The wait before the next attempt; each call is one more attempt."""
        with self._lock:
            attempt = self._attempt
            self._attempt += 1
            ceiling = self.ceiling(attempt)
            if self.jitter == "none":
                return ceiling
            return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        """A connect succeeded: the next outage starts from the shortest wait again."""
        with self._lock:
            self._attempt = 0


__all__ = ["Jitter", "ReconnectBackoff"]
