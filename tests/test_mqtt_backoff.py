"""Reconnect back-off with full jitter (edgeagent/mqtt/backoff.py): the waits' bounds and
spread with seeded RNGs, and a real link's connect attempts against a TCP listener that
hangs up on every one (so each attempt is seen, with its time)."""

from __future__ import annotations

import itertools
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from edgeagent.config import MqttConfig
from edgeagent.mqtt import MqttLink
from edgeagent.mqtt.backoff import ReconnectBackoff
from tests.waiting import wait_until


def test_full_jitter_waits_stay_under_the_doubling_ceiling_and_restart_after_a_connect() -> None:
    backoff = ReconnectBackoff(1.0, 60.0, rng=random.Random(7))
    for _outage in range(5):
        for attempt in range(12):
            ceiling = min(60.0, 2.0**attempt)
            assert 0.0 <= backoff.next_delay() <= ceiling
        backoff.reset()
    assert backoff.next_delay() <= 1.0  # after reset: the first attempt's window again


def test_without_jitter_the_waits_are_paho_s_doubling_sequence() -> None:
    backoff = ReconnectBackoff(1.0, 60.0, jitter="none")
    assert [backoff.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_a_fleet_s_first_retries_spread_over_the_whole_window() -> None:
    """1,000 devices that lost the broker at once: with full jitter their first retries
    fill [0, 1 s] evenly (each tenth holds 5-15 % of them); without, all 1,000 come at 1 s."""
    firsts = [ReconnectBackoff(1.0, 60.0, rng=random.Random(i)).next_delay() for i in range(1000)]
    bins = [0] * 10
    for delay in firsts:
        bins[min(int(delay * 10), 9)] += 1
    assert all(50 <= count <= 150 for count in bins), bins
    plain = {ReconnectBackoff(1.0, 60.0, jitter="none").next_delay() for _ in range(1000)}
    assert plain == {1.0}
    # Later attempts spread over their doubled windows too: the 5th lands anywhere in [0, 16].
    fifth = []
    for i in range(1000):
        backoff = ReconnectBackoff(1.0, 60.0, rng=random.Random(i))
        fifth.append([backoff.next_delay() for _ in range(5)][-1])
    assert max(fifth) <= 16.0
    assert min(fifth) < 1.0
    assert max(fifth) > 15.0


def test_a_bad_floor_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        ReconnectBackoff(0.0, 1.0)


class _HangUp:
    """A TCP listener on loopback that accepts each connection, notes when, and closes it
    before any CONNACK: every connect attempt of a client is one entry in `attempts`."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.attempts: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-hangup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.attempts.append(time.monotonic())
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def hang_up() -> Iterator[_HangUp]:
    listener = _HangUp()
    yield listener
    listener.close()


def _attempt_gaps(listener: _HangUp, jitter: str, count: int) -> list[float]:
    config = MqttConfig(
        host="127.0.0.1",
        port=listener.port,
        reconnect_min_s=0.8,
        reconnect_max_s=0.8,
        reconnect_jitter=jitter,  # type: ignore[arg-type]
    )
    link = MqttLink(config, "backoff-test", will_payload=b"{}")
    link.start()
    try:
        wait_until(
            lambda: len(listener.attempts) >= count,
            timeout=60,
            message=lambda: f"{count} connect attempts (got {len(listener.attempts)})",
        )
    finally:
        link.stop()
    times = listener.attempts[:count]
    return [b - a for a, b in itertools.pairwise(times)]


def test_a_link_waits_a_jittered_time_between_connect_attempts(hang_up: _HangUp) -> None:
    """paho alone waits exactly 0.8 s (min = max) between attempts; with full jitter the
    link hands paho a random wait in [0, 0.8] each time, so some gaps are far shorter
    (the chance that 9 uniform waits are all over 0.5 s is 0.375**9, about 1e-4)."""
    gaps = _attempt_gaps(hang_up, "full", 10)
    assert min(gaps) < 0.5, gaps
    assert len({round(g, 2) for g in gaps}) > 3, gaps  # not one fixed wait


def test_without_jitter_a_link_keeps_paho_s_fixed_wait(hang_up: _HangUp) -> None:
    gaps = _attempt_gaps(hang_up, "none", 4)
    assert min(gaps) >= 0.75, gaps  # never sooner than the configured wait
