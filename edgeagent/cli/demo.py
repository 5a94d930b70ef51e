"""`edgeagent demo`: the whole agent on this machine with nothing set up by hand.

Starts a real MQTT broker on loopback, the agent with simulated sources and the bundled
models, the fleet dashboard on loopback (its URL printed first; the `dashboard` extra,
aiohttp, which `.[demo]` pulls) and a console view that subscribes to the device's topics
and shows results and status live.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt

from edgeagent.config import AgentConfig, MqttConfig, parse_config
from edgeagent.errors import EdgeAgentError
from edgeagent.modelfile.catalog import samples_dir
from edgeagent.mqtt.broker import LOOPBACK, LocalBroker
from edgeagent.mqtt.client import make_client
from edgeagent.mqtt.topics import Topics
from edgeagent.service import Agent

DEMO_CONFIG = """
device: {{id: demo}}
state_dir: "{state}"
control_socket: "{state}/control.sock"
mqtt: {{host: {host}, port: {port}, prefix: edgeagent, protocol: "{protocol}"}}
pipelines:
  - name: shapes
    source: {{type: synthetic, width: 640, height: 480, fps: 15}}
    model: shapes-detector
    threads: 1
  - name: digits
    source: {{type: images, path: "{samples}/digit-*.png", fps: 2}}
    model: digits-classifier
    threads: 1
  - name: vibration
    source: {{type: synthetic-vibration, rate_hz: 1000, window: 256, fault_rate: 0.25}}
    model: vibration-anomaly
    threads: 1
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="run a broker, the agent and a live view on this machine",
        description="Start an MQTT broker on loopback (mosquitto if installed, else the "
        "in-process amqtt), the agent with a synthetic camera, sample digit images and a "
        "synthetic vibration sensor on the bundled models, and a live console view of "
        "what a dashboard subscribed to the device receives. Ctrl-C stops everything.",
    )
    parser.add_argument(
        "--duration", type=float, default=0, help="stop after SECONDS (0: run until Ctrl-C)"
    )
    parser.add_argument("--port", type=int, default=0, help="broker port (default: a free one)")
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=8080,
        help="the dashboard's port on 127.0.0.1 (default 8080, or a free one when taken)",
    )
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    parser.set_defaults(handler=execute)


def demo_config(port: int, protocol: str, state: Path) -> AgentConfig:
    text = DEMO_CONFIG.format(
        host=LOOPBACK, port=port, protocol=protocol, samples=samples_dir(), state=state
    )
    return parse_config(text, "<demo>")


@dataclass
class _PipelineView:
    count: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=64))

    def rate(self) -> float:
        if len(self.arrivals) < 2:
            return 0.0
        span = self.arrivals[-1] - self.arrivals[0]
        return (len(self.arrivals) - 1) / span if span > 0 else 0.0


class DashboardView:
    """Subscribes to `<prefix>/<device>/#` and renders what arrives."""

    def __init__(self, broker: MqttConfig, device: str) -> None:
        self.port = broker.port
        self.topics = Topics(broker.prefix, device)
        self.status: dict[str, Any] = {}
        self.pipelines: dict[str, _PipelineView] = {}
        self.dashboard_url: str | None = None
        self._lock = threading.Lock()
        self._client = make_client(broker, client_id="edgeagent-demo-view")
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def start(self) -> None:
        self._client.loop_start()  # connects in the background (make_client: connect_async)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        client.subscribe(self.topics.fleet.device_filter(self.topics.device_id), qos=1)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            payload = json.loads(message.payload)
        except ValueError:
            return
        pipeline = self.topics.result_pipeline(message.topic)
        with self._lock:
            if message.topic == self.topics.status:
                # `offline` carries no pipelines: keep showing the last ones we knew.
                self.status = {**self.status, **payload}
            elif pipeline is not None:
                view = self.pipelines.setdefault(pipeline, _PipelineView())
                view.count += 1
                view.last = payload
                view.arrivals.append(time.monotonic())

    def render(self) -> str:
        with self._lock:
            status = dict(self.status)
            views = {name: (v.count, v.rate(), dict(v.last)) for name, v in self.pipelines.items()}
        every = self.topics.fleet.device_filter(self.topics.device_id)
        lines = [
            f"edgeagent demo - device {status.get('device', '?')} is "
            f"{status.get('state', 'unknown')} (agent {status.get('version', '?')})",
            f"watch it yourself: mosquitto_sub -h {LOOPBACK} -p {self.port} -t '{every}' -v",
            "",
        ]
        if self.dashboard_url:
            lines[2:2] = [f"dashboard: {self.dashboard_url}#/device/{self.topics.device_id}"]
        accelerators = ", ".join(
            f"{a['name']}: {a['state']}" for a in status.get("accelerators", [])
        )
        if accelerators:
            lines += [f"accelerators: {accelerators}", ""]
        for info in status.get("pipelines", []):
            name = info["name"]
            count, rate, last = views.get(name, (0, 0.0, {}))
            model = info.get("model", {})
            head = (
                f"[{name}] {model.get('name', '?')} {model.get('version', '')} "
                f"on {info.get('accelerator', '-')}"
            )
            if info.get("state") == "failed":
                lines += [head, f"    FAILED: {info.get('error')}", ""]
                continue
            lat = last.get("latency_ms", {})
            lines.append(
                f"{head}: {count} results, {rate:5.1f}/s, invoke {lat.get('invoke', 0):.2f} ms"
            )
            lines.append("    " + summarise(last.get("result", {}), last.get("truth")))
            lines.append("")
        return "\n".join(lines)


def summarise(result: dict[str, Any], truth: dict[str, Any] | None = None) -> str:
    """One line that says what a result found."""
    if "detections" in result:
        found = ", ".join(
            f"{d['label']} {d['score']:.2f} @({d['box'][0]:.2f},{d['box'][1]:.2f})"
            for d in result["detections"]
        )
        line = f"detections: {found or 'none'}"
        if truth and "boxes" in truth:
            line += f"   (scene has: {', '.join(b['label'] for b in truth['boxes']) or 'nothing'})"
        return line
    if "classes" in result:
        return "classes: " + ", ".join(f"{c['label']} {c['score']:.2f}" for c in result["classes"])
    if "score" in result:
        verdict = "ANOMALY" if result["anomaly"] else "normal"
        line = f"anomaly score {result['score']:.3f} (threshold {result['threshold']}): {verdict}"
        if truth is not None:
            line += f"   (injected fault: {truth.get('fault') or 'none'})"
        return line
    return "waiting for results..." if not result else json.dumps(result)[:100]


def execute(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with (
        LocalBroker(args.port or None) as broker,
        tempfile.TemporaryDirectory(prefix="edgeagent-demo-") as state,
    ):
        config = demo_config(broker.port, broker.protocol, Path(state))
        view = DashboardView(config.mqtt, config.device.id)
        view.start()
        web = None if args.no_dashboard else _start_dashboard(config.mqtt, args.dashboard_port)
        view.dashboard_url = web.dashboard.url if web is not None else None
        agent = Agent(config)
        agent.start()
        deadline = time.monotonic() + args.duration if args.duration else None
        interactive = sys.stdout.isatty()
        try:
            while not stop.wait(0.5 if interactive else 2.0):
                if interactive:
                    sys.stdout.write("\x1b[H\x1b[J" + view.render() + "\n\nCtrl-C to stop\n")
                else:
                    sys.stdout.write(view.render() + "\n")
                sys.stdout.flush()
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            agent.stop()
            time.sleep(0.3)  # let the view see the retained 'offline'
            print(view.render())
            view.stop()
            if web is not None:
                web.stop()
    return 0


def _start_dashboard(broker: MqttConfig, port: int) -> Any:
    """The fleet dashboard on loopback, on `port` or a free one; prints its URL. None (and
    a line saying why) when aiohttp is missing."""
    try:
        from edgeagent.fleet.dashboard import Dashboard, DashboardThread
    except ImportError as exc:
        print(f"no dashboard ({exc}): pip install 'edgeagent[dashboard]'", flush=True)
        return None
    for choice in dict.fromkeys((port, 0)):
        web = DashboardThread(Dashboard(broker, host=LOOPBACK, port=choice))
        try:
            url = web.start()
        except EdgeAgentError:
            web.stop()
            continue
        print(f"dashboard: {url}  (open it in a browser; device page: {url}#/device/demo)")
        print(flush=True)
        return web
    return None
