"""Telemetry: latency percentiles and fps, the payload built from real and fixed system
facts, the Prometheus endpoint scraped over HTTP, and the publisher on a real broker."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from edgeagent.config import PrometheusConfig, TelemetryConfig
from edgeagent.errors import ConfigError
from edgeagent.hal.system import CpuSampler, read_system_facts
from edgeagent.mqtt import MqttLink, Topics
from edgeagent.mqtt.payload import to_json
from edgeagent.pipeline import PipelineStats
from edgeagent.telemetry.prometheus import PrometheusExporter, render_prometheus
from edgeagent.telemetry.report import (
    STAGES,
    LatencyWindow,
    MqttSnapshot,
    PipelineSnapshot,
    StagePercentiles,
    TelemetryPublisher,
    build_telemetry,
)
from tests.broker import Mosquitto, MqttReader

DEVICE = "pi-tel-01"
Reader = Callable[..., MqttReader]


# --- latency and fps -------------------------------------------------------------------


def test_percentiles_match_numpy_over_the_most_recent_samples() -> None:
    rng = np.random.default_rng(7)
    window = LatencyWindow(size=100)
    samples = rng.gamma(2.0, 3.0, size=(250, len(STAGES)))
    for row in samples:
        window.add(dict(zip(STAGES, row.tolist(), strict=True)))
    window.add({"invoke": 1.0, "unknown-stage": 5.0})  # the others stay unknown

    got = window.percentiles()

    for i, stage in enumerate(STAGES):
        recent = samples[-99:, i]  # the ring of 100 also holds the last, partial sample
        if stage == "invoke":
            recent = np.append(recent, 1.0)
        expected = np.percentile(recent, [50, 95, 99])
        assert got[stage].samples == len(recent)
        assert [got[stage].p50, got[stage].p95, got[stage].p99] == pytest.approx(
            expected.tolist(), abs=1e-3
        )
    assert set(got) == set(STAGES)


def test_an_empty_window_has_no_percentiles() -> None:
    got = LatencyWindow().percentiles()["invoke"]
    assert (got.p50, got.p95, got.p99, got.samples) == (None, None, None, 0)


def test_fps_counts_recent_samples() -> None:
    now = [100.0]
    window = LatencyWindow(size=1024, clock=lambda: now[0])
    for i in range(60):  # 30 fps for 2 s, just after start
        window.add({"invoke": 1.0}, at=100.0 + i / 30)
    assert window.fps(now=102.0) == pytest.approx(30, abs=0.6)
    for i in range(60, 600):  # 30 fps up to 20 s
        window.add({"invoke": 1.0}, at=100.0 + i / 30)
    assert window.fps(now=120.0) == pytest.approx(30, abs=0.6)
    assert window.fps(now=135.0) == 0.0  # idle for 15 s


def test_fps_of_a_fast_pipeline_uses_what_the_ring_holds() -> None:
    window = LatencyWindow(size=100, clock=lambda: 0.0)
    for i in range(1000):  # 200 fps for 5 s: the ring holds half a second
        window.add({"invoke": 1.0}, at=i / 200)
    assert window.fps(now=5.0) == pytest.approx(200, rel=0.03)


def test_adding_from_many_threads_while_reading_is_safe() -> None:
    window = LatencyWindow(size=512)
    errors: list[BaseException] = []

    def add() -> None:
        try:
            for i in range(3000):
                window.add({"capture": 1.0, "invoke": float(i % 50)})
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=add, name=f"test-add-{i}") for i in range(4)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        assert window.percentiles()["invoke"].samples <= 512
    for thread in threads:
        thread.join()
    assert errors == []
    assert window.percentiles()["capture"] == StagePercentiles(1.0, 1.0, 1.0, 512)


# --- the payload -----------------------------------------------------------------------


def _fake_root(root: Path, *, idle: int) -> None:
    """A /proc and /sys with known numbers."""
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/stat").write_text(f"cpu  {1000 + idle // 3} 0 0 {idle} 0 0 0 0 0 0\n")
    (root / "proc/meminfo").write_text("MemTotal: 1000000 kB\nMemAvailable: 250000 kB\n")
    (root / "proc/loadavg").write_text("0.50 0.40 0.30 1/100 123\n")
    (root / "proc/uptime").write_text("12345.6 20000.0\n")
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("61234\n")


class FakeLink:
    connected = True
    reconnects = 2
    outstanding = 3  # paho's own count; the durable outbox's depth wins
    dropped_messages = 0


class FakeOutbox:  # the figures of outbox.OutboxStats
    depth = 7
    oldest_age_s = 4.25


@pytest.fixture
def payload(tmp_path: Path) -> dict[str, Any]:
    _fake_root(tmp_path, idle=1000)
    sampler = CpuSampler(tmp_path)
    _fake_root(tmp_path, idle=1300)  # 300 idle of 400 jiffies: 25 % busy
    facts = read_system_facts(
        tmp_path, root=tmp_path, sampler=sampler, vcgencmd=lambda: "throttled=0x50005"
    )
    window = LatencyWindow()
    for i in range(100):
        window.add({"capture": 2.0, "preprocess": 1.0, "invoke": float(i), "postprocess": 0.5})
    # Absent at start, then one failover while running (and back).
    stats = PipelineStats(frames_in=120, frames_dropped=20, results_out=100, fallbacks=1)
    shapes = PipelineSnapshot.capture(
        "shapes",
        stats,
        window,
        accelerator="cpu",
        fallbacks=["gpu: absent (no adapter)", "edgetpu: USB transfer error"],
        model_name="shapes-detector",
        model_version="1.0.0",
    )
    return build_telemetry(
        DEVICE,
        system=facts,
        pipelines=[shapes],
        mqtt=MqttSnapshot.of(FakeLink(), FakeOutbox()),
        version="0.1.0",
        ts=1764138000.0,
    )


def test_the_payload_has_every_figure(payload: dict[str, Any]) -> None:
    assert json.loads(to_json(payload)) == payload  # plain JSON, no NaN
    assert payload["device"] == DEVICE
    assert payload["ts"] == 1764138000.0
    system = payload["system"]
    assert system["cpu_percent"] == 25.0
    assert system["load_average"] == [0.5, 0.4, 0.3]
    assert system["mem_used_percent"] == 75.0
    assert system["mem_available_bytes"] == 250000 * 1024
    assert system["disk_free_bytes"] > 0
    assert system["cpu_temp_c"] == pytest.approx(61.234)
    assert system["throttling"] == {
        "raw": 0x50005,
        "ok": False,
        "problems": [
            "under-voltage now",
            "under-voltage since boot",
            "throttled now",
            "throttled since boot",
        ],
    }
    assert system["uptime_s"] == 12345.6

    shapes = payload["pipelines"]["shapes"]
    assert {k: shapes[k] for k in ("frames_in", "results_out", "frames_dropped")} == {
        "frames_in": 120,
        "results_out": 100,
        "frames_dropped": 20,
    }
    assert isinstance(shapes["fps"], float)
    assert set(shapes["latency_ms"]) == set(STAGES)
    invoke = shapes["latency_ms"]["invoke"]
    expected = np.percentile(np.arange(100.0), [50, 95, 99])
    assert [invoke["p50"], invoke["p95"], invoke["p99"]] == pytest.approx(expected.tolist())
    assert invoke["samples"] == 100
    assert shapes["accelerator"] == "cpu"
    assert shapes["fallbacks"] == 2
    assert shapes["failovers"] == 1, "only the failover while running"
    assert shapes["model"] == {"name": "shapes-detector", "version": "1.0.0"}

    assert payload["mqtt"] == {
        "connected": True,
        "reconnects": 2,
        "outbox_depth": 7,
        "outbox_oldest_age_s": 4.25,
        "dropped_messages": 0,
    }


def test_the_payload_from_this_machine_is_plain_json() -> None:
    sampler = CpuSampler()
    sum(range(200_000))  # some CPU time between the two readings
    payload = build_telemetry(
        DEVICE,
        system=read_system_facts(sampler=sampler),
        pipelines=[],
        mqtt=MqttSnapshot(connected=False, reconnects=0, outbox_depth=0),
        version="0.1.0",
    )
    decoded = json.loads(to_json(payload))
    assert set(decoded["system"]) >= {
        "cpu_percent",
        "load_average",
        "mem_used_percent",
        "disk_free_bytes",
        "cpu_temp_c",
        "throttling",
        "uptime_s",
    }
    assert decoded["system"]["mem_total_bytes"] > 0
    assert decoded["system"]["disk_free_bytes"] > 0
    assert abs(decoded["ts"] - time.time()) < 60


def test_config_defaults_and_limits() -> None:
    config = TelemetryConfig()
    assert config.interval_s == 30
    assert config.prometheus is None
    assert TelemetryConfig(prometheus=PrometheusConfig()).prometheus == PrometheusConfig(
        host="127.0.0.1", port=9108
    )
    with pytest.raises(ValidationError):
        TelemetryConfig(interval_s=0)
    with pytest.raises(ValidationError):
        TelemetryConfig.model_validate({"interval": 5})


# --- Prometheus ------------------------------------------------------------------------

_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\\n]|\\[\\\"n])*\",?)*)\}"
    r" (?P<value>-?(?:[0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?|\.[0-9]+))"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_exposition(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Checks the text format 0.0.4 strictly enough for our output; the samples by
    (name, labels)."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"gauge", "counter"}
            assert name not in types, f"{name} declared twice"
            assert name in helps
            types[name] = kind
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name = match["name"]
            assert name in types, f"{name} has no TYPE before its samples"
            if types[name] == "counter":
                assert name.endswith("_total")
            labels = frozenset(_LABEL.findall(match["labels"]))
            key = (name, labels)
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = float(match["value"])
    return samples


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset({"device": DEVICE, **values}.items())


@pytest.fixture
def exporter(payload: dict[str, Any]) -> Iterator[PrometheusExporter]:
    exporter = PrometheusExporter(PrometheusConfig(port=0), lambda: payload)
    exporter.start()
    yield exporter
    exporter.stop()


def test_prometheus_endpoint_serves_every_figure(
    exporter: PrometheusExporter, payload: dict[str, Any]
) -> None:
    with urllib.request.urlopen(exporter.url, timeout=5) as response:  # noqa: S310 (loopback)
        content_type = response.headers["Content-Type"]
        text = response.read().decode()

    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse_exposition(text)
    invoke = payload["pipelines"]["shapes"]["latency_ms"]["invoke"]
    shapes = {"pipeline": "shapes"}
    assert samples[("edgeagent_cpu_percent", labels())] == 25.0
    assert samples[("edgeagent_load_average", labels(period="5m"))] == 0.4
    assert samples[("edgeagent_memory_available_bytes", labels())] == 256_000_000
    assert samples[("edgeagent_cpu_temperature_celsius", labels())] == pytest.approx(61.234)
    assert samples[("edgeagent_throttling_flags", labels())] == 0x50005
    assert samples[("edgeagent_uptime_seconds", labels())] == 12345.6
    assert samples[("edgeagent_pipeline_frames_in_total", labels(**shapes))] == 120
    assert samples[("edgeagent_pipeline_results_out_total", labels(**shapes))] == 100
    assert samples[("edgeagent_pipeline_frames_dropped_total", labels(**shapes))] == 20
    assert samples[("edgeagent_pipeline_fallbacks", labels(**shapes))] == 2
    assert samples[("edgeagent_pipeline_failovers_total", labels(**shapes))] == 1
    p95 = labels(**shapes, stage="invoke", quantile="0.95")
    assert samples[("edgeagent_pipeline_latency_seconds", p95)] == pytest.approx(
        invoke["p95"] / 1000
    )
    info = labels(
        **shapes, state="running", accelerator="cpu", model="shapes-detector", model_version="1.0.0"
    )
    assert samples[("edgeagent_pipeline_info", info)] == 1
    assert samples[("edgeagent_mqtt_connected", labels())] == 1
    assert samples[("edgeagent_mqtt_reconnects_total", labels())] == 2
    assert samples[("edgeagent_mqtt_outbox_depth", labels())] == 7
    assert samples[("edgeagent_mqtt_outbox_oldest_age_seconds", labels())] == 4.25

    with pytest.raises(urllib.error.HTTPError) as not_found:
        urllib.request.urlopen(exporter.url.replace("/metrics", "/"), timeout=5)  # noqa: S310
    assert not_found.value.code == 404
    not_found.value.close()


def test_unknown_figures_are_left_out_and_labels_are_escaped() -> None:
    text = render_prometheus(
        {
            "device": 'pi "quoted" \\ back\nslash',
            "system": {"cpu_percent": None, "cpu_temp_c": 40.5},
            "pipelines": {},
            "mqtt": {"connected": False},
        }
    )
    samples = parse_exposition(text)
    device = 'pi \\"quoted\\" \\\\ back\\nslash'
    assert samples == {
        ("edgeagent_cpu_temperature_celsius", frozenset({("device", device)})): 40.5,
        ("edgeagent_mqtt_connected", frozenset({("device", device)})): 0.0,
    }
    assert "# TYPE edgeagent_cpu_percent gauge" in text


def test_prometheus_stops_cleanly_and_reports_a_taken_port(
    exporter: PrometheusExporter,
) -> None:
    host, port = exporter.address
    other = PrometheusExporter(PrometheusConfig(host=host, port=port), dict)
    with pytest.raises(ConfigError, match=f"cannot serve Prometheus metrics on {host}:{port}"):
        other.start()
    url = exporter.url

    exporter.stop()

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)  # noqa: S310
    assert not any(t.name == "edgeagent-prometheus" for t in threading.enumerate())


def test_a_failing_snapshot_is_a_500_not_a_dead_server() -> None:
    calls = [0]

    def snapshot() -> dict[str, Any]:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("no figures yet")
        return {"device": DEVICE, "system": {"cpu_percent": 3.5}}

    exporter = PrometheusExporter(PrometheusConfig(port=0), snapshot)
    exporter.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(exporter.url, timeout=5)  # noqa: S310
        assert failed.value.code == 500
        failed.value.close()
        with urllib.request.urlopen(exporter.url, timeout=5) as response:  # noqa: S310
            assert b'edgeagent_cpu_percent{device="pi-tel-01"} 3.5' in response.read()
    finally:
        exporter.stop()


# --- the publisher ---------------------------------------------------------------------


def test_the_publisher_survives_a_failing_snapshot() -> None:
    published: list[bytes] = []
    cond = threading.Condition()
    calls = [0]

    def snapshot() -> dict[str, Any]:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("/proc went away")
        return {"n": calls[0]}

    def publish(data: bytes) -> None:
        with cond:
            published.append(data)
            cond.notify_all()

    publisher = TelemetryPublisher(0.01, snapshot, publish)
    publisher.start()
    try:
        with cond:
            assert cond.wait_for(lambda: len(published) >= 3, timeout=5)
    finally:
        publisher.stop()
    assert [json.loads(p)["n"] for p in published[:3]] == [1, 3, 4]
    assert publisher.latest is not None


def test_the_publisher_publishes_on_the_broker_every_interval(
    mosquitto: Mosquitto, mqtt_reader: Reader, payload: dict[str, Any]
) -> None:
    topics = Topics("edgeagent", DEVICE)
    reader = mqtt_reader(mosquitto, topics.telemetry)
    connected = threading.Event()
    link = MqttLink(mosquitto.mqtt_config(), DEVICE, will_payload=b"{}", on_connected=connected.set)
    link.start()
    publisher = TelemetryPublisher(
        0.05,
        lambda: {**payload, "mqtt": MqttSnapshot.of(link).to_json()},
        lambda data: link.publish(topics.telemetry, data, qos=0),
    )
    try:
        assert connected.wait(10)
        publisher.start()
        got = reader.wait_for_count(5, timeout=10)
    finally:
        publisher.stop()
        link.stop()
    stopped_at = publisher.published
    time.sleep(0.2)  # lets time pass to show that nothing is published after stop

    assert publisher.published == stopped_at  # nothing after stop
    for message in got:
        body = json.loads(message.payload)
        assert body["device"] == DEVICE
        assert body["mqtt"]["connected"] is True
        assert body["pipelines"]["shapes"]["latency_ms"]["invoke"]["p95"] > 0
