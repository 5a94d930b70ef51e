"""Telemetry: one JSON message every `interval_s` on `<prefix>/<device>/telemetry`; the same
figures are served for Prometheus by `edgeagent.telemetry.prometheus` when configured.

`build_telemetry` turns plain snapshots (system facts, one `PipelineSnapshot` per
pipeline, an `MqttSnapshot`) into the payload, so it needs neither the agent nor a
broker. `TelemetryPublisher` (thread `edgeagent-telemetry`) calls a snapshot function on
its own schedule and hands the JSON to a publish function. Figures the device cannot know
are null in JSON and absent in Prometheus, never made up.

Payload (latencies in milliseconds, times in seconds, pipelines keyed by name):

    {"device", "ts", "version",
     "system": {"cpu_percent", "load_average", "mem_total_bytes", "mem_available_bytes",
                "mem_used_percent", "disk_path", "disk_total_bytes", "disk_free_bytes",
                "cpu_temp_c", "throttling": {"raw", "ok", "problems"} | null, "uptime_s"},
     "pipelines": {"<name>": {"state", "frames_in", "results_out", "frames_dropped", "fps",
                   "latency_ms": {"<stage>": {"p50", "p95", "p99", "samples"}},
                   "accelerator", "fallbacks", "fallback_reasons", "failovers",
                   "model": {"name", "version"}}},
     "mqtt": {"connected", "reconnects", "outbox_depth", "outbox_oldest_age_s",
              "dropped_messages"}}
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np

from edgeagent.hal.system import SystemFacts
from edgeagent.mqtt.payload import to_json

log = logging.getLogger(__name__)

STAGES: Final = ("capture", "preprocess", "invoke", "postprocess")
"""The stages of one sample whose latency a pipeline reports (docs/protocol.md)."""
QUANTILES: Final = (50.0, 95.0, 99.0)
FPS_HORIZON_S: Final = 10.0
"""Frames per second are counted over this many recent seconds."""

Snapshot = Callable[[], Mapping[str, Any]]


# --- latency ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StagePercentiles:
    """Latency percentiles of one stage over the recent samples; None without samples."""

    p50: float | None
    p95: float | None
    p99: float | None
    samples: int

    def to_json(self) -> dict[str, Any]:
        return {"p50": self.p50, "p95": self.p95, "p99": self.p99, "samples": self.samples}


class LatencyWindow:
    """The last `size` samples of one pipeline: per-stage latencies (ms) and when each
    sample was recorded. `add` is cheap and thread-safe (the decode thread calls it);
    `percentiles` and `fps` read a copy."""

    def __init__(
        self,
        size: int = 1024,
        stages: Sequence[str] = STAGES,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 1:
            raise ValueError(f"a latency window holds at least one sample, not {size}")
        self.stages = tuple(stages)
        self._index = {stage: i for i, stage in enumerate(self.stages)}
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._values = np.full((len(self.stages), size), np.nan)
        self._times = np.zeros(size)
        self._count = 0  # samples ever added
        self._created = clock()

    def add(self, latency_ms: Mapping[str, float], at: float | None = None) -> None:
        """Records one sample: milliseconds per stage (stages not given stay unknown,
        unknown stages are ignored); `at` defaults to the clock's now."""
        when = self._clock() if at is None else at
        with self._lock:
            slot = self._count % self._size
            self._values[:, slot] = np.nan
            for stage, ms in latency_ms.items():
                row = self._index.get(stage)
                if row is not None:
                    self._values[row, slot] = ms
            self._times[slot] = when
            self._count += 1

    def percentiles(self, last: int | None = None) -> dict[str, StagePercentiles]:
        """p50/p95/p99 (numpy's linear interpolation) of each stage's recent samples, or of
        only the `last` ones (at most what the ring holds)."""
        with self._lock:
            filled = min(self._count, self._size)
            take = filled if last is None else max(0, min(last, filled))
            newest = (self._count - 1 - np.arange(take)) % self._size
            values = self._values[:, newest].copy()
        result: dict[str, StagePercentiles] = {}
        for stage, row in zip(self.stages, values, strict=True):
            known = row[np.isfinite(row)]
            if known.size == 0:
                result[stage] = StagePercentiles(None, None, None, 0)
                continue
            p50, p95, p99 = (float(v) for v in np.percentile(known, QUANTILES))
            result[stage] = StagePercentiles(
                round(p50, 3), round(p95, 3), round(p99, 3), int(known.size)
            )
        return result

    def fps(self, horizon_s: float = FPS_HORIZON_S, now: float | None = None) -> float:
        """Samples per second over the last `horizon_s` seconds (or since the window was
        made, or over what the ring still holds, whichever is shorter)."""
        now = self._clock() if now is None else now
        with self._lock:
            filled = min(self._count, self._size)
            times = self._times[:filled].copy()
            full = self._count >= self._size
        since = max(now - horizon_s, self._created)
        if full and filled:
            since = max(since, float(times.min()))
        span = now - since
        if span <= 0:
            return 0.0
        recent = int(np.count_nonzero(times >= since))
        return round(recent / span, 2)


# --- snapshots -------------------------------------------------------------------------


class PipelineCounters(Protocol):
    """What `pipeline.PipelineStats` counts."""

    @property
    def frames_in(self) -> int: ...
    @property
    def results_out(self) -> int: ...
    @property
    def frames_dropped(self) -> int: ...
    @property
    def fallbacks(self) -> int: ...  # failovers while running


class LinkFigures(Protocol):
    """What `MqttLink` says about itself."""

    @property
    def connected(self) -> bool: ...
    @property
    def reconnects(self) -> int: ...
    @property
    def outstanding(self) -> int: ...
    @property
    def dropped_messages(self) -> int: ...


class OutboxFigures(Protocol):
    """What `outbox.OutboxStats` says: entries waiting and the age of the oldest."""

    @property
    def depth(self) -> int: ...
    @property
    def oldest_age_s(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class PipelineSnapshot:
    """One pipeline's figures at one moment."""

    name: str
    state: str
    frames_in: int
    results_out: int
    frames_dropped: int
    fps: float
    latency_ms: Mapping[str, StagePercentiles]
    accelerator: str | None = None
    fallbacks: tuple[str, ...] = ()  # why each better accelerator was not used
    failovers: int = 0  # of those, the ones that happened while running
    model_name: str | None = None
    model_version: str | None = None

    @classmethod
    def capture(
        cls,
        name: str,
        counters: PipelineCounters,
        window: LatencyWindow,
        *,
        state: str = "running",
        accelerator: str | None = None,
        fallbacks: Iterable[str] = (),
        model_name: str | None = None,
        model_version: str | None = None,
    ) -> PipelineSnapshot:
        return cls(
            name=name,
            state=state,
            frames_in=counters.frames_in,
            results_out=counters.results_out,
            frames_dropped=counters.frames_dropped,
            fps=window.fps(),
            latency_ms=window.percentiles(),
            accelerator=accelerator,
            fallbacks=tuple(fallbacks),
            failovers=counters.fallbacks,
            model_name=model_name,
            model_version=model_version,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "frames_in": self.frames_in,
            "results_out": self.results_out,
            "frames_dropped": self.frames_dropped,
            "fps": self.fps,
            "latency_ms": {stage: p.to_json() for stage, p in self.latency_ms.items()},
            "accelerator": self.accelerator,
            "fallbacks": len(self.fallbacks),
            "fallback_reasons": list(self.fallbacks),
            "failovers": self.failovers,
            "model": {"name": self.model_name, "version": self.model_version},
        }


@dataclass(frozen=True, slots=True)
class MqttSnapshot:
    """The MQTT link's figures; the outbox holds QoS 1 messages not yet acknowledged."""

    connected: bool
    reconnects: int
    outbox_depth: int
    outbox_oldest_age_s: float | None = None  # None: empty, or the outbox cannot tell
    dropped_messages: int = 0  # received messages dropped because the inbox was full

    @classmethod
    def of(cls, link: LinkFigures, outbox: OutboxFigures | None = None) -> MqttSnapshot:
        """The link's figures; the durable outbox's depth and age when there is one,
        else the QoS 1 messages paho holds (whose age nobody records)."""
        return cls(
            connected=link.connected,
            reconnects=link.reconnects,
            outbox_depth=link.outstanding if outbox is None else outbox.depth,
            outbox_oldest_age_s=None if outbox is None else outbox.oldest_age_s,
            dropped_messages=link.dropped_messages,
        )

    def to_json(self) -> dict[str, Any]:
        age = self.outbox_oldest_age_s
        return {
            "connected": self.connected,
            "reconnects": self.reconnects,
            "outbox_depth": self.outbox_depth,
            "outbox_oldest_age_s": None if age is None else round(age, 3),
            "dropped_messages": self.dropped_messages,
        }


def _system_json(facts: SystemFacts) -> dict[str, Any]:
    used: float | None = None
    if facts.mem_total_bytes and facts.mem_available_bytes is not None:
        used = round(100.0 * (1 - facts.mem_available_bytes / facts.mem_total_bytes), 1)
    throttling = None
    if facts.throttling is not None:
        throttling = {
            "raw": facts.throttling.raw,
            "ok": facts.throttling.ok,
            "problems": facts.throttling.problems(),
        }
    return {
        "cpu_percent": facts.cpu_percent,
        "load_average": list(facts.load_average) if facts.load_average else None,
        "mem_total_bytes": facts.mem_total_bytes,
        "mem_available_bytes": facts.mem_available_bytes,
        "mem_used_percent": used,
        "disk_path": facts.disk_path,
        "disk_total_bytes": facts.disk_total_bytes,
        "disk_free_bytes": facts.disk_free_bytes,
        "cpu_temp_c": facts.cpu_temp_c,
        "throttling": throttling,
        "uptime_s": facts.uptime_s,
    }


def build_telemetry(
    device_id: str,
    *,
    system: SystemFacts,
    pipelines: Sequence[PipelineSnapshot],
    mqtt: MqttSnapshot,
    version: str,
    ts: float | None = None,
) -> dict[str, Any]:
    """The telemetry payload (module docstring) as a dict of JSON values."""
    return {
        "device": device_id,
        "ts": round(time.time() if ts is None else ts, 3),
        "version": version,
        "system": _system_json(system),
        "pipelines": {p.name: p.to_json() for p in pipelines},
        "mqtt": mqtt.to_json(),
    }


# --- publishing ------------------------------------------------------------------------


class TelemetryPublisher:
    """Publishes `snapshot()` as JSON through `publish` at start and then every
    `interval_s` seconds, on its own thread, until `stop()`."""

    def __init__(
        self, interval_s: float, snapshot: Snapshot, publish: Callable[[bytes], object]
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"the telemetry interval must be positive, not {interval_s!r}")
        self._interval = interval_s
        self._snapshot = snapshot
        self._publish = publish
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeagent-telemetry", daemon=True)
        self._latest: Mapping[str, Any] | None = None
        self.published = 0

    @property
    def latest(self) -> Mapping[str, Any] | None:
        """The last payload built, or None before the first."""
        return self._latest

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def publish_now(self) -> bool:
        """Builds and publishes one message; False (logged) if that failed."""
        try:
            payload = self._snapshot()
            data = to_json(payload)
            self._publish(data)
        except Exception:
            log.exception("cannot publish telemetry")
            return False
        self._latest = payload
        self.published += 1
        return True

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stopping.is_set():
            self.publish_now()
            due += self._interval
            now = time.monotonic()
            if due < now:  # fell behind (a slow snapshot, a suspended device): skip ahead
                due = now + self._interval
            if self._stopping.wait(due - now):
                return
