"""Publishing the outbox: `OutboxPublisher` drains an `Outbox` into the MQTT link; an entry
is deleted only once the broker acknowledged it (the store's durability contract is at the
top of `edgeagent.outbox.store`).

It owns one thread, "edgeagent-outbox". After every (re)connect, what was stored before it
is the backlog: it goes out in id order at no more than `backlog_rate` messages/s,
interleaved with live entries (stored after the reconnect), which go out at once (within
2 ms, so that a fast producer's results are published in batches rather than one per
wake-up). At most `window` messages are unacknowledged at any time, at most half of them
from the backlog, so memory stays bounded and live results always find room. Acknowledged
entries are deleted in batches.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Final, Protocol

from edgeagent.config import OutboxConfig
from edgeagent.outbox.store import CHECKPOINT_INTERVAL_S, Entry, Outbox, Reporter

log = logging.getLogger(__name__)


class OutboxTicket(Protocol):
    """What `OutboxLink.publish` returns (`edgeagent.mqtt.PublishTicket`)."""

    @property
    def acked(self) -> threading.Event: ...

    @property
    def failure(self) -> str | None: ...


class OutboxLink(Protocol):
    """The part of `edgeagent.mqtt.MqttLink` the publisher uses."""

    @property
    def connected(self) -> bool: ...

    def publish(
        self, topic: str, payload: bytes, *, qos: int, retain: bool = False
    ) -> OutboxTicket: ...


WINDOW: Final = 256
"""Messages published and not yet acknowledged, at most."""

_ACK_POLL_S: Final = 0.01  # tickets are events without callbacks: look at them this often
_MIN_STEP_S: Final = 0.002  # what a live result may wait so that results go out in batches
_IDLE_S: Final = CHECKPOINT_INTERVAL_S
_REMOVE_BATCH: Final = 128
_REMOVE_AFTER_S: Final = 0.2  # acknowledged entries are deleted at least this often
_STALE_AFTER_S: Final = 60.0  # connected and still no ack: publish it again
_BURST_S: Final = 0.1  # the backlog may go out in bursts of this many seconds' worth


class _Sent:
    __slots__ = ("backlog", "qos", "sent_at", "ticket")

    def __init__(self, ticket: OutboxTicket, qos: int, sent_at: float, backlog: bool) -> None:
        self.ticket = ticket
        self.qos = qos
        self.sent_at = sent_at
        self.backlog = backlog


class OutboxPublisher:
    """Drains an `Outbox` into an MQTT link on its own thread, "edgeagent-outbox".

    Call `on_reconnected()` from the link's `on_connected`, after republishing retained
    status: it marks the boundary between backlog and live entries and lets the drain
    begin. While the link is down nothing is published; messages already handed to the
    link are re-sent by it (paho) after the reconnect, everything else comes from disk."""

    def __init__(
        self,
        outbox: Outbox,
        link: OutboxLink,
        *,
        backlog_rate: float = 200.0,
        window: int = WINDOW,
        reconnect_grace_s: float = 5.0,
    ) -> None:
        """`reconnect_grace_s`: if the link has been up this long and `on_reconnected()`
        was not called, the publisher resumes on its own (and logs a warning)."""
        if backlog_rate <= 0:
            raise ValueError(f"backlog_rate must be positive, not {backlog_rate!r}")
        if window < 2:
            raise ValueError(f"window must be at least 2, not {window!r}")
        self._outbox = outbox
        self._link = link
        self._rate = backlog_rate
        self._burst = max(1.0, backlog_rate * _BURST_S)
        self._window = window
        self._grace_s = reconnect_grace_s
        self._thread = threading.Thread(target=self._run, name="edgeagent-outbox", daemon=True)

        # Shared with other threads, under _cond.
        self._cond = threading.Condition()
        self._woken = False
        self._reconnected = False
        self._stopping = False
        self._flushers = 0

        # The thread's own state.
        self._in_flight: dict[int, _Sent] = {}
        self._backlog_in_flight = 0
        self._done: set[int] = set()  # acknowledged, not yet deleted
        self._done_since = 0.0
        self._awaiting = True  # no publishing until on_reconnected()
        self._up_since: float | None = None
        self._rewind = False
        self._connected_at = 0.0
        self._boundary = 0  # ids up to here are backlog
        self._live_cursor = 0
        self._backlog_cursor = 0
        self._backlog_active = False
        self._backlog_sent = 0
        self._drain_started = 0.0
        self._tokens = 0.0
        self._tokens_at = 0.0
        self._housekept = 0.0
        self._acks_at = 0.0
        self._timeout = _IDLE_S
        self._reporter = Reporter()

        self.published = 0
        self.acked = 0
        self.refused = 0  # refused by the broker or the link: removed, never retried

    @classmethod
    def from_config(cls, outbox: Outbox, link: OutboxLink, config: OutboxConfig) -> OutboxPublisher:
        return cls(outbox, link, backlog_rate=config.backlog_rate)

    @property
    def in_flight(self) -> int:
        """Published and not yet acknowledged."""
        return len(self._in_flight)

    @property
    def draining_backlog(self) -> bool:
        return self._backlog_active

    # --- other threads -------------------------------------------------------------------

    def start(self) -> None:
        if self._link.connected:
            self.on_reconnected()
        self._thread.start()

    def submit(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> int | None:
        """Stores the message (`Outbox.put`) and wakes the thread to publish it."""
        entry_id = self._outbox.put(topic, payload, qos=qos, retain=retain)
        if entry_id is not None:
            self.notify()
        return entry_id

    def notify(self) -> None:
        """Wakes the thread: something was put into the outbox."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def on_reconnected(self) -> None:
        """The link (re)connected and retained status went out: what is stored now is the
        backlog; drain it behind live entries."""
        with self._cond:
            self._reconnected = True
            self._woken = True
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Waits until the outbox is empty; False if it was not within `timeout` seconds
        (the broker is away, or the backlog is longer than the time allows)."""
        with self._cond:
            self._flushers += 1
            self._woken = True
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._outbox.stats().depth == 0, timeout)
            finally:
                self._flushers -= 1

    def stop(self) -> None:
        """Ends the thread after deleting what was acknowledged; the rest stays stored."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        stepped_at = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._woken, self._timeout)
            # A put right after a step waits (at most _MIN_STEP_S) for the next one, so a
            # producer faster than that has its results published many to a step.
            pause = stepped_at + _MIN_STEP_S - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            stepped_at = time.monotonic()
            with self._cond:
                if self._stopping:
                    break
                self._woken = False
                reconnected, self._reconnected = self._reconnected, False
                flushing = self._flushers > 0
            try:
                self._timeout = self._step(stepped_at, reconnected, flushing)
            except sqlite3.Error as exc:
                self._timeout = 1.0
                if self._reporter.due("storage"):
                    log.error(
                        "the outbox publisher cannot read or update the outbox: %s; "
                        "retrying every second",
                        exc,
                    )
            except Exception:
                self._timeout = 1.0
                log.exception("the outbox publisher failed; retrying in 1 s")
            if flushing:
                with self._cond:
                    self._cond.notify_all()
        try:
            self._collect_acks(time.monotonic(), connected=False)
            self._remove_done(time.monotonic(), force=True)
        except sqlite3.Error as exc:
            log.error("could not delete acknowledged entries from the outbox: %s", exc)

    def _step(self, now: float, reconnected: bool, flushing: bool) -> float:
        connected = self._link.connected
        resume = reconnected
        if self._awaiting and connected and not resume:
            if self._up_since is None:
                self._up_since = now
            elif now - self._up_since >= self._grace_s:
                log.warning(
                    "the MQTT link has been up for %.1f s but on_reconnected() was not "
                    "called; the outbox resumes publishing on its own",
                    now - self._up_since,
                )
                resume = True
        elif not connected:
            self._up_since = None
            if not self._awaiting:
                self._awaiting = True  # a disconnect: wait for on_reconnected()
                log.info(
                    "MQTT link down: results wait in the outbox (%d published and not "
                    "yet acknowledged will be re-sent by the link)",
                    len(self._in_flight),
                )

        # Looking at every ticket costs more than publishing one: do it every
        # _ACK_POLL_S, not on every wake-up by a put, unless the window is full.
        if resume or now - self._acks_at >= _ACK_POLL_S or len(self._in_flight) >= self._window:
            self._acks_at = now
            self._collect_acks(now, connected)
        resume = resume or (self._rewind and not self._awaiting)
        self._remove_done(now, force=flushing or resume)
        if resume:
            self._resume(now)
        if connected and not self._awaiting:
            self._send_live(now)
            self._send_backlog(now)
        if now - self._housekept >= _IDLE_S:
            self._housekept = now
            self._outbox.expire()
            self._outbox.checkpoint()
        return self._next_timeout(now, connected)

    def _resume(self, now: float) -> None:
        self._awaiting = False
        self._rewind = False
        self._up_since = None
        self._connected_at = now
        self._boundary = self._outbox.last_id
        self._live_cursor = self._boundary
        self._backlog_cursor = 0
        waiting = self._outbox.stats().depth - len(self._in_flight)
        self._tokens = self._burst
        self._tokens_at = now
        if waiting > 0:
            if not self._backlog_active:
                self._drain_started = now
                self._backlog_sent = 0
            self._backlog_active = True
            log.info(
                "draining an outbox backlog of about %d entries at up to %g/s behind live results",
                waiting,
                self._rate,
            )

    def _collect_acks(self, now: float, connected: bool) -> None:
        for entry_id, sent in list(self._in_flight.items()):
            if sent.ticket.acked.is_set():
                failure = sent.ticket.failure
                if failure is not None and sent.qos == 0:
                    self._rewind = True  # a QoS 0 message the link could not send: again
                elif failure is not None:
                    self.refused += 1
                    log.warning("the broker refused outbox entry %d: %s", entry_id, failure)
                    self._mark_done(entry_id, now)
                else:
                    self.acked += 1
                    self._mark_done(entry_id, now)
            elif connected and now - max(sent.sent_at, self._connected_at) > _STALE_AFTER_S:
                log.warning(
                    "outbox entry %d was not acknowledged within %.0f s; publishing it again",
                    entry_id,
                    _STALE_AFTER_S,
                )
                self._rewind = True
            else:
                continue
            del self._in_flight[entry_id]
            if sent.backlog:
                self._backlog_in_flight -= 1

    def _mark_done(self, entry_id: int, now: float) -> None:
        if not self._done:
            self._done_since = now
        self._done.add(entry_id)

    def _remove_done(self, now: float, *, force: bool) -> None:
        if not self._done:
            return
        if force or len(self._done) >= _REMOVE_BATCH or now - self._done_since >= _REMOVE_AFTER_S:
            self._outbox.remove(self._done)
            self._done = set()

    def _send_live(self, now: float) -> None:
        room = self._window - len(self._in_flight)
        if room <= 0:
            return
        for entry in self._outbox.pending(self._live_cursor, room):
            if not self._send(entry, now, backlog=False):
                return
            self._live_cursor = entry.id

    def _send_backlog(self, now: float) -> None:
        if not self._backlog_active:
            return
        self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        room = min(
            int(self._tokens),
            self._window // 2 - self._backlog_in_flight,
            self._window - len(self._in_flight),
        )
        while room > 0:
            entries = self._outbox.pending(self._backlog_cursor, room)
            if not entries:
                self._backlog_drained(now)
                return
            for entry in entries:
                if entry.id > self._boundary:
                    self._backlog_drained(now)
                    return
                # Still with the link since before the outage (it re-sends those itself),
                # or acknowledged and not yet deleted.
                if entry.id not in self._in_flight and entry.id not in self._done:
                    if not self._send(entry, now, backlog=True):
                        return
                    self._tokens -= 1
                    self._backlog_sent += 1
                    room -= 1
                self._backlog_cursor = entry.id

    def _backlog_drained(self, now: float) -> None:
        self._backlog_active = False
        if self._backlog_sent:
            log.info(
                "outbox backlog drained: %d entries published in %.1f s",
                self._backlog_sent,
                now - self._drain_started,
            )

    def _send(self, entry: Entry, now: float, *, backlog: bool) -> bool:
        """Publishes one entry; False if the link cannot take messages now."""
        try:
            ticket = self._link.publish(
                entry.topic, entry.payload, qos=entry.qos, retain=entry.retain
            )
        except ValueError as exc:  # a topic or QoS the link can never publish
            self.refused += 1
            log.error("dropping outbox entry %d for %s: %s", entry.id, entry.topic, exc)
            self._mark_done(entry.id, now)
            return True
        except RuntimeError as exc:  # stopped, or out of message ids
            log.debug("the link did not take outbox entry %d: %s", entry.id, exc)
            return False
        self.published += 1
        self._in_flight[entry.id] = _Sent(ticket, entry.qos, now, backlog)
        if backlog:
            self._backlog_in_flight += 1
        return True

    def _next_timeout(self, now: float, connected: bool) -> float:
        if not connected or self._awaiting:
            return 0.1  # watch for the link coming back (in case on_reconnected never comes)
        waits = [_IDLE_S - (now - self._housekept)]
        if self._in_flight:
            waits.append(_ACK_POLL_S)
        if self._done:
            waits.append(_REMOVE_AFTER_S - (now - self._done_since))
        if self._backlog_active and self._tokens < 1:
            waits.append((1 - self._tokens) / self._rate)
        return max(0.001, min(waits))
