"""Telemetry: one JSON message every `interval_s` on `<prefix>/<device>/telemetry`, and,
when configured, the same figures for Prometheus at `http://<host>:<port>/metrics`.

`build_telemetry` turns plain snapshots (system facts, one `PipelineSnapshot` per
pipeline, an `MqttSnapshot`) into the payload, so it needs neither the agent nor a
broker. `TelemetryPublisher` (thread `edgeagent-telemetry`) calls a snapshot function on
its own schedule and hands the JSON to a publish function; `PrometheusExporter` (thread
`edgeagent-prometheus`, stdlib `http.server`) renders a snapshot per scrape with
`render_prometheus`. Figures the device cannot know are null in JSON and absent in
Prometheus, never made up.

Payload (latencies in milliseconds, times in seconds, pipelines keyed by name):

    {"device", "ts", "version",
     "system": {"cpu_percent", "load_average", "mem_total_bytes", "mem_available_bytes",
                "mem_used_percent", "disk_path", "disk_total_bytes", "disk_free_bytes",
                "cpu_temp_c", "throttling": {"raw", "ok", "problems"} | null, "uptime_s"},
     "pipelines": {"<name>": {"state", "frames_in", "results_out", "frames_dropped", "fps",
                   "latency_ms": {"<stage>": {"p50", "p95", "p99", "samples"}},
                   "accelerator", "fallbacks", "fallback_reasons",
                   "model": {"name", "version"}}},
     "mqtt": {"connected", "reconnects", "outbox_depth", "outbox_oldest_age_s",
              "dropped_messages"}}
"""

from __future__ import annotations

import http.server
import logging
import math
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np

from edgeagent.config import PrometheusConfig
from edgeagent.errors import ConfigError
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


# --- Prometheus ------------------------------------------------------------------------


@dataclass(slots=True)
class _Family:
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


class _Exposition:
    """Metric families in the Prometheus text format 0.0.4, in the order first added."""

    def __init__(self, device: str) -> None:
        self._device = device
        self._families: dict[str, _Family] = {}

    def add(self, name: str, kind: str, help_text: str, value: object, **labels: str) -> None:
        family = self._families.setdefault(name, _Family(kind, help_text))
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int | float) and math.isfinite(value):
            family.samples.append(({"device": self._device, **labels}, float(value)))

    def render(self) -> str:
        lines: list[str] = []
        for name, family in self._families.items():
            lines.append(f"# HELP {name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {name} {family.kind}")
            for labels, value in family.samples:
                shown = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{shown}}} {_number(value)}")
        return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def render_prometheus(telemetry: Mapping[str, Any]) -> str:
    """A telemetry payload (as built by `build_telemetry`) as Prometheus text."""
    out = _Exposition(str(telemetry.get("device", "")))
    system = telemetry.get("system") or {}
    out.add("edgeagent_cpu_percent", "gauge", "CPU busy percent", system.get("cpu_percent"))
    for period, value in zip(("1m", "5m", "15m"), system.get("load_average") or (), strict=False):
        out.add("edgeagent_load_average", "gauge", "Load average", value, period=period)
    out.add(
        "edgeagent_memory_total_bytes", "gauge", "Memory in total", system.get("mem_total_bytes")
    )
    out.add(
        "edgeagent_memory_available_bytes",
        "gauge",
        "Memory available without swapping",
        system.get("mem_available_bytes"),
    )
    out.add(
        "edgeagent_disk_total_bytes",
        "gauge",
        "Size of the data disk",
        system.get("disk_total_bytes"),
    )
    out.add(
        "edgeagent_disk_free_bytes",
        "gauge",
        "Free space on the data disk",
        system.get("disk_free_bytes"),
    )
    out.add(
        "edgeagent_cpu_temperature_celsius", "gauge", "CPU temperature", system.get("cpu_temp_c")
    )
    throttling = system.get("throttling") or {}
    out.add(
        "edgeagent_throttling_flags",
        "gauge",
        "vcgencmd get_throttled bits (0: never throttled since boot)",
        throttling.get("raw"),
    )
    out.add("edgeagent_uptime_seconds", "gauge", "Seconds since boot", system.get("uptime_s"))

    for name, pipe in (telemetry.get("pipelines") or {}).items():
        model = pipe.get("model") or {}
        out.add(
            "edgeagent_pipeline_info",
            "gauge",
            "A pipeline's model, accelerator and state (always 1)",
            1,
            pipeline=name,
            state=str(pipe.get("state")),
            accelerator=str(pipe.get("accelerator") or ""),
            model=str(model.get("name") or ""),
            model_version=str(model.get("version") or ""),
        )
        for key, help_text in (
            ("frames_in", "Frames or windows captured"),
            ("results_out", "Results published"),
            ("frames_dropped", "Frames dropped because the model was busy"),
        ):
            out.add(
                f"edgeagent_pipeline_{key}_total",
                "counter",
                help_text,
                pipe.get(key),
                pipeline=name,
            )
        out.add(
            "edgeagent_pipeline_fps",
            "gauge",
            "Results per second, recently",
            pipe.get("fps"),
            pipeline=name,
        )
        out.add(
            "edgeagent_pipeline_fallbacks",
            "gauge",
            "Accelerators tried and not used",
            pipe.get("fallbacks"),
            pipeline=name,
        )
        for stage, figures in (pipe.get("latency_ms") or {}).items():
            for quantile in ("p50", "p95", "p99"):
                ms = figures.get(quantile)
                out.add(
                    "edgeagent_pipeline_latency_seconds",
                    "gauge",
                    "Latency of one stage over recent samples",
                    None if ms is None else ms / 1000.0,
                    pipeline=name,
                    stage=stage,
                    quantile=f"0.{quantile[1:]}",
                )

    mqtt = telemetry.get("mqtt") or {}
    out.add(
        "edgeagent_mqtt_connected",
        "gauge",
        "1 while connected to the broker",
        mqtt.get("connected"),
    )
    out.add(
        "edgeagent_mqtt_reconnects_total",
        "counter",
        "Reconnects since start",
        mqtt.get("reconnects"),
    )
    out.add(
        "edgeagent_mqtt_outbox_depth",
        "gauge",
        "QoS 1 messages not yet acknowledged by the broker",
        mqtt.get("outbox_depth"),
    )
    out.add(
        "edgeagent_mqtt_outbox_oldest_age_seconds",
        "gauge",
        "Age of the oldest message in the outbox",
        mqtt.get("outbox_oldest_age_s"),
    )
    return out.render()


class _MetricsServer(http.server.HTTPServer):
    def __init__(self, address: tuple[str, int], render: Callable[[], str]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.render = render
        super().__init__(address, _MetricsHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS query we do not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    server: _MetricsServer
    timeout = 5.0  # a client that stops sending does not hold the (single) server thread

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        try:
            body = self.server.render().encode("utf-8")
        except Exception:
            log.exception("cannot render Prometheus metrics")
            self.send_error(500, "cannot render the metrics; see the agent's log")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("prometheus scrape from %s: %s", self.client_address[0], format % args)


class PrometheusExporter:
    """Serves `render_prometheus(snapshot())` on `http://<host>:<port>/metrics` from one
    thread; `start` binds (raises ConfigError if it cannot), `stop` closes the socket."""

    def __init__(self, config: PrometheusConfig, snapshot: Snapshot) -> None:
        self._config = config
        self._snapshot = snapshot
        self._server: _MetricsServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; the port is the chosen one once started."""
        if self._server is None:
            return self._config.host, self._config.port
        return str(self._server.server_address[0]), int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("PrometheusExporter.start() called twice")
        host, port = self._config.host, self._config.port
        try:
            server = _MetricsServer((host, port), lambda: render_prometheus(self._snapshot()))
        except OSError as exc:
            raise ConfigError(
                f"cannot serve Prometheus metrics on {host}:{port}: {exc.strerror or exc}; "
                "choose another telemetry.prometheus.port or host"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="edgeagent-prometheus",
            daemon=True,
        )
        self._thread.start()
        log.info("serving Prometheus metrics on %s", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
