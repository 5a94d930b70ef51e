"""The optional Prometheus endpoint: `PrometheusExporter` (thread `edgeagent-prometheus`,
stdlib `http.server`) serves `render_prometheus(snapshot())`, a telemetry payload (as built by
`edgeagent.telemetry.report.build_telemetry`) in the text format 0.0.4, at
`http://<host>:<port>/metrics`. Figures that are null in the payload are absent here."""

from __future__ import annotations

import http.server
import logging
import math
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeagent.config import PrometheusConfig
from edgeagent.errors import ConfigError
from edgeagent.telemetry.report import Snapshot

log = logging.getLogger(__name__)


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
            ("failovers", "Failovers to a slower accelerator while running"),
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
