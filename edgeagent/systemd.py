"""Talking to systemd as a `Type=notify` service, with the standard library only.

The sd_notify protocol (man sd_notify) is one datagram of newline-separated
`KEY=VALUE` lines sent to the AF_UNIX socket named by `$NOTIFY_SOCKET` (a path, or an
abstract-namespace name when it starts with `@`). Without `$NOTIFY_SOCKET` (not under
systemd) every call is a no-op, so the daemon behaves the same in a terminal.

- `Notifier` sends READY=1, STATUS=, STOPPING=1, WATCHDOG=1 and reads the watchdog
  interval from `$WATCHDOG_USEC` / `$WATCHDOG_PID` (sd_watchdog_enabled semantics).
- `Watchdog` is a thread that pings WATCHDOG=1 every half interval, but only while every
  pipeline makes progress; a hung `invoke()` or a stuck camera withholds the ping and
  systemd restarts the service (`WatchdogSec=`, `Restart=on-failure`).
- `ReadyGate` sends READY=1 once the first result of any pipeline is safe: stored in the
  outbox or, with the outbox disabled, acknowledged by the broker; or after a timeout with
  a STATUS that says why none is (see the class for the choice).
- `PipelineProgress` is the progress function the agent gives the `Watchdog`.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

log = logging.getLogger(__name__)

# systemd reads at most this much of one notification; STATUS= texts are kept far below.
_STATUS_MAX = 1024
_ACK_POLL_S = 0.1  # how often ReadyGate checks results waiting for the broker's ack
_SENT_KEPT = 16  # unacknowledged results ReadyGate watches (the newest)


def _one_line(text: str) -> str:
    """STATUS= is one line of the datagram: newlines would start new (bogus) fields."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _STATUS_MAX else flat[: _STATUS_MAX - 3] + "..."


class Notifier:
    """Sends sd_notify messages to `$NOTIFY_SOCKET` (read once, at construction).

    Every method returns True when the datagram was sent, False when not under systemd
    or when sending failed (logged once; the daemon never stops over a notification).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._socket_name = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when `$NOTIFY_SOCKET` is set (the process runs as a notify service)."""
        return self._socket_name is not None

    def send(self, *fields: str) -> bool:
        """Sends one datagram of `KEY=VALUE` fields; the low-level call the others use."""
        if self._socket_name is None:
            return False
        name = self._socket_name
        if name.startswith("@"):
            address = "\0" + name[1:]  # abstract namespace
        elif name.startswith("/"):
            address = name
        else:
            self._warn_once(f"$NOTIFY_SOCKET={name!r} is neither a path nor '@' abstract name")
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, address)
        except OSError as exc:
            self._warn_once(f"cannot notify systemd at {name}: {exc}")
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (start-up finished), with an optional STATUS= line."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.send(*fields)

    def status(self, text: str) -> bool:
        """STATUS=: the free-form line `systemctl status` shows."""
        return self.send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun (systemd stops expecting watchdog pings)."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.send(*fields)

    def watchdog(self) -> bool:
        """WATCHDOG=1: one keep-alive ping."""
        return self.send("WATCHDOG=1")

    def notify_failure(self, reason: str, errno: int | None = None) -> bool:
        """STATUS=<reason> (and ERRNO= if given), sent before exiting non-zero, so that
        `systemctl status` shows why the service failed."""
        fields = [f"STATUS={_one_line(reason)}"]
        if errno is not None:
            fields.append(f"ERRNO={errno}")
        return self.send(*fields)

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout systemd enforces, in seconds (`WatchdogSec=`), or None when
        the watchdog is off for this process: `$WATCHDOG_USEC` unset, not a positive
        integer, or `$WATCHDOG_PID` set to another process. Ping at half of it."""
        if not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("ignoring $WATCHDOG_USEC=%r: not an integer", self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                log.warning("ignoring the watchdog: $WATCHDOG_PID=%r", self._watchdog_pid)
                return None
            if pid != os.getpid():
                return None  # meant for another process (e.g. our parent)
        return usec / 1_000_000

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s (further notification failures are not logged)", message)


def notify_failure(reason: str, environ: Mapping[str, str] | None = None) -> bool:
    """Sends STATUS=<reason> with a fresh `Notifier`; for start-up failures (a config
    that does not validate) that happen before the agent exists."""
    return Notifier(environ).notify_failure(reason)


# --- progress of the pipelines ---------------------------------------------------------


class _Stats(Protocol):
    @property
    def frames_in(self) -> int: ...
    @property
    def results_out(self) -> int: ...
    @property
    def source_errors(self) -> int: ...
    @property
    def invoke_errors(self) -> int: ...


class _Watched(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def stats(self) -> _Stats: ...


Progress = Callable[[], Mapping[str, str]]
"""Returns the pipelines that made no progress since the previous call, each with a hint
why (may be ''); an empty mapping means every pipeline made progress."""


class PipelineProgress:
    """A `Progress` over the running pipelines (`edgeagent.pipeline.Pipeline` objects).

    A pipeline made progress when it published a result, or when its source or
    `invoke()` failed again: a thread that keeps failing is alive, retries on its own and
    reports why in the retained status, so restarting the whole service would not help.
    A pipeline first seen (or seen again) only sets its baseline.
    """

    def __init__(self, pipelines: Callable[[], Iterable[_Watched]]) -> None:
        self._pipelines = pipelines
        self._last: dict[str, tuple[int, int, int, int]] = {}

    def __call__(self) -> dict[str, str]:
        stalled: dict[str, str] = {}
        seen: dict[str, tuple[int, int, int, int]] = {}
        for pipeline in self._pipelines():
            s = pipeline.stats
            now = (s.results_out, s.source_errors, s.invoke_errors, s.frames_in)
            seen[pipeline.name] = now
            before = self._last.get(pipeline.name)
            if before is None or now[:3] != before[:3]:
                continue
            if now[3] != before[3]:
                stalled[pipeline.name] = (
                    f"the source delivered {now[3] - before[3]} sample(s) but inference "
                    "produced no result (invoke() hung?)"
                )
            else:
                stalled[pipeline.name] = "no sample from the source (camera or sensor stuck?)"
        self._last = seen
        return stalled


# --- the watchdog thread ---------------------------------------------------------------


class Watchdog:
    """Pings WATCHDOG=1 every `interval / 2` seconds while `progress()` reports no stalled
    pipeline. When one stalls, it sends `STATUS=pipeline X stalled: no result for N s`
    instead and withholds the ping, so systemd kills and restarts the service after
    `WatchdogSec=`. Pings resume if every pipeline recovers before that.

    `interval` defaults to `notifier.watchdog_interval()`; with no interval (not under a
    systemd watchdog) `start()` starts no thread.
    """

    def __init__(
        self,
        notifier: Notifier,
        progress: Progress,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notifier = notifier
        self._progress = progress
        self.interval = interval if interval is not None else notifier.watchdog_interval()
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled_since: dict[str, float] = {}
        self._last_check = clock()
        self.pings = 0

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.interval > 0

    @property
    def stalled(self) -> dict[str, float]:
        """Stalled pipelines and since when (the clock's time of the last good check)."""
        return dict(self._stalled_since)

    def start(self) -> None:
        """Takes the progress baseline, pings once and starts the thread (if enabled)."""
        if not self.enabled or self._thread is not None:
            return
        self._last_check = self._clock()
        self._progress()  # baseline: progress is measured from here
        self._ping()
        self._thread = threading.Thread(target=self._run, name="edgeagent-watchdog", daemon=True)
        self._thread.start()
        log.info("systemd watchdog: pinging every %.1f s while pipelines progress", self._period)

    def stop(self) -> None:
        """Ends the thread (no more pings); call after sending STOPPING=1."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    @property
    def _period(self) -> float:
        assert self.interval is not None
        return self.interval / 2

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.check()

    def check(self) -> bool:
        """One round: asks `progress()`, pings if nothing stalled, else reports the stall.
        Returns whether it pinged. The thread calls this every half interval."""
        now = self._clock()
        try:
            stalled = self._progress()
        except Exception as exc:  # noqa: BLE001 - a broken probe must withhold, not crash
            stalled = {"<progress check>": f"failed: {exc!r}"}
        recovered = bool(self._stalled_since) and not stalled
        previous = self._last_check
        self._stalled_since = {name: self._stalled_since.get(name, previous) for name in stalled}
        self._last_check = now
        if not stalled:
            if recovered:
                self._notifier.status("running: every pipeline is producing results again")
                log.warning("systemd watchdog: every pipeline is progressing again")
            self._ping()
            return True
        parts = []
        for name, hint in sorted(stalled.items()):
            seconds = now - self._stalled_since[name]
            part = f"pipeline {name} stalled: no result for {seconds:.0f} s"
            parts.append(f"{part} ({hint})" if hint else part)
        message = "; ".join(parts)
        self._notifier.status(message)
        log.error("systemd watchdog: %s; withholding the ping (systemd will restart)", message)
        return False

    def _ping(self) -> None:
        if self._notifier.watchdog():
            self.pings += 1


# --- readiness -------------------------------------------------------------------------


class ReadyGate:
    """Sends READY=1 once the first result of any pipeline is safe, so `systemctl start`
    returns when the device really works:

    - `result_stored(pipeline)`: the result is in the durable outbox. It will reach the
      broker whenever the broker is there, so a device whose broker is away is ready.
    - `result_sent(pipeline, acknowledged)`: with `outbox.enabled: false` nothing is
      stored, so READY waits until `acknowledged()` is true for one of the recent
      results (the broker's PUBACK; polled by the gate's thread).

    If none is within `timeout` seconds it still sends READY=1, with `STATUS=running, but
    no result has been stored or acknowledged yet: <reasons()>`. The choice: READY must
    come eventually or `TimeoutStartSec=` kills the service, and a device whose camera is
    unplugged or whose broker is away is better up (reachable over MQTT, its status
    saying why) than in a restart loop that ends in `failed` once the start limit hits.
    A hung pipeline is still caught: that is the `Watchdog`'s job, not this one's.
    Keep `timeout` below the unit's `TimeoutStartSec=`.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        timeout: float = 60.0,
        reasons: Callable[[], str] = lambda: "no reason known",
    ) -> None:
        self._notifier = notifier
        self.timeout = timeout
        self._reasons = reasons
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Results handed to the broker and not yet acknowledged: the newest few, each
        # with its pipeline's name. Older ones make room (a newer one will do as well).
        self._sent: collections.deque[tuple[str, Callable[[], bool]]] = collections.deque(
            maxlen=_SENT_KEPT
        )

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        """Starts the timeout (a thread `edgeagent-ready`); call before the pipelines."""
        if self._thread is not None or self.is_ready:
            return
        self._thread = threading.Thread(target=self._run, name="edgeagent-ready", daemon=True)
        self._thread.start()

    def result_stored(self, pipeline: str, *, durable: bool = True) -> None:
        """A result of `pipeline` is in the outbox; sends READY=1 on the first. `durable`
        False: the outbox fell back to memory (its file is unusable), which the STATUS
        says. Costs one flag check afterwards, so decode threads may call it always."""
        if self._ready.is_set():
            return
        if durable:
            self.release(f"running: first result from pipeline {pipeline} stored in the outbox")
        else:
            self.release(
                f"running: first result from pipeline {pipeline} kept in the outbox in "
                "memory only (the outbox file is unusable; see the log)"
            )

    def result_sent(self, pipeline: str, acknowledged: Callable[[], bool]) -> None:
        """A result of `pipeline` went to the broker unstored (the outbox is disabled);
        READY=1 follows once `acknowledged()` returns True (checked every 0.1 s)."""
        if self._ready.is_set():
            return
        if acknowledged():
            self._release_acknowledged(pipeline)
            return
        with self._lock:
            self._sent.append((pipeline, acknowledged))

    def release(self, status: str) -> bool:
        """Sends READY=1 with `status` now, unless already sent (e.g. no pipeline is
        configured, so no result will ever come). Returns whether this call sent it."""
        with self._lock:
            if self._ready.is_set():
                return False
            self._ready.set()
            self._sent.clear()
        self._stop.set()
        self._notifier.ready(status)
        log.info("ready: %s", status)
        return True

    def stop(self) -> None:
        """Ends the timeout thread without sending anything."""
        self._stop.set()
        if self._thread is not None:
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=5.0)
            self._thread = None

    def _release_acknowledged(self, pipeline: str) -> None:
        self.release(f"running: first result from pipeline {pipeline} acknowledged by the broker")

    def _check_sent(self) -> bool:
        with self._lock:
            sent = list(self._sent)
        for pipeline, acknowledged in sent:
            try:
                done = acknowledged()
            except Exception:  # a broken check must not end the gate
                log.exception("checking a result's acknowledgement failed")
                done = False
            if done:
                self._release_acknowledged(pipeline)
                return True
        return False

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            if self._stop.wait(min(left, _ACK_POLL_S)):
                return
            if self._check_sent():
                return
        try:
            reasons = self._reasons()
        except Exception as exc:  # noqa: BLE001 - READY must still be sent
            reasons = f"(could not tell why: {exc!r})"
        if self.release(f"running, but no result has been stored or acknowledged yet: {reasons}"):
            log.warning(
                "no result was stored or acknowledged within %.0f s: %s", self.timeout, reasons
            )
