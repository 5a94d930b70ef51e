"""`edgeagent run` as a real subprocess against a real mosquitto, read by an MQTT client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeagent.modelfile.catalog import samples_dir
from tests.agent_config import status_or_none
from tests.broker import Mosquitto, MqttReader, Received, free_port
from tests.waiting import wait_until

AGENT = [sys.executable, "-m", "edgeagent.cli.main"]


def write_config(tmp_path: Path, broker: Mosquitto, pipelines: str, protocol: str = "5") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"device: {{id: e2e}}\n"
        f"state_dir: {tmp_path}/state\n"
        f"control_socket: {tmp_path}/control.sock\n"
        f"mqtt: {{host: {broker.host}, port: {broker.port}, protocol: '{protocol}',"
        f" reconnect_min_s: 0.2, reconnect_max_s: 1}}\n"
        f"pipelines:\n{pipelines}",
        encoding="utf-8",
    )
    return path


ALL_PIPELINES = f"""\
  - name: shapes
    source: {{type: synthetic, width: 640, height: 480, fps: 20}}
    model: shapes-detector
    threads: 1
  - name: digits
    source: {{type: images, path: "{samples_dir()}/digit-*.png", fps: 10}}
    model: digits-classifier
    threads: 1
  - name: vibration
    source: {{type: synthetic-vibration, rate_hz: 4000, window: 256, fault_rate: 0.5}}
    model: vibration-anomaly
    threads: 1
"""


def payload(message: Received) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(message.payload)
    return data


def is_online(message: Received) -> bool:
    """An `online` status whose pipelines all finished starting (running or failed)."""
    if not message.topic.endswith("/status"):
        return False
    status = payload(message)
    return status["state"] == "online" and all(
        p["state"] != "starting" for p in status["pipelines"]
    )


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_run_publishes_results_of_every_pipeline_and_stops_cleanly(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[..., subprocess.Popen[str]],
    protocol: str,
) -> None:
    reader = mqtt_reader(mosquitto, "edgeagent/e2e/#", protocol=protocol)
    process = agent_process(write_config(tmp_path, mosquitto, ALL_PIPELINES, protocol))

    status = payload(reader.wait_for(is_online, timeout=30))
    assert {p["name"]: p["state"] for p in status["pipelines"]} == {
        "shapes": "running",
        "digits": "running",
        "vibration": "running",
    }
    assert {a["name"] for a in status["accelerators"]} == {"edgetpu", "litert-gpu", "gpu", "cpu"}

    for name in ("shapes", "digits", "vibration"):
        results = reader.wait_for_count(
            5, lambda m, n=name: m.topic == f"edgeagent/e2e/results/{n}", timeout=30
        )
        bodies = [payload(m) for m in results]
        assert [b["seq"] for b in bodies] == list(range(5)), "sequence numbers without gaps"
        for body in bodies:
            assert body["pipeline"] == name
            assert body["accelerator"] == "cpu"
            assert set(body["latency_ms"]) == {"capture", "preprocess", "invoke", "postprocess"}
            assert body["latency_ms"]["invoke"] > 0
            assert body["model"]["version"] == "1.0.0"
    shapes = [payload(m)["result"] for m in reader.messages if m.topic.endswith("/results/shapes")]
    labels = {d["label"] for r in shapes for d in r["detections"]}
    assert labels, "the detector found shapes in the synthetic scene"
    assert labels <= {"circle", "square", "triangle"}
    digits = [payload(m)["result"] for m in reader.messages if m.topic.endswith("/results/digits")]
    assert all(r["classes"][0]["label"] in "0123456789" for r in digits)
    vibration = [
        payload(m)["result"] for m in reader.messages if m.topic.endswith("/results/vibration")
    ]
    assert all({"score", "anomaly", "threshold"} <= set(r) for r in vibration)

    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    offline = reader.wait_for(
        lambda m: m.topic == "edgeagent/e2e/status" and payload(m)["state"] == "offline"
    )
    assert offline.retain is False or payload(offline)["device"] == "e2e"


def test_results_in_flight_are_published_before_exit(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[..., subprocess.Popen[str]],
) -> None:
    pipelines = """\
  - name: shapes
    source: {type: synthetic, fps: 0}
    model: shapes-detector
    threads: 1
"""
    reader = mqtt_reader(mosquitto, "edgeagent/e2e/#")
    process = agent_process(write_config(tmp_path, mosquitto, pipelines))
    reader.wait_for_count(20, lambda m: "/results/" in m.topic, timeout=30)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    reader.wait_for(lambda m: m.topic.endswith("/status") and payload(m)["state"] == "offline")
    seqs = [payload(m)["seq"] for m in reader.messages if "/results/" in m.topic]
    assert seqs == list(range(len(seqs))), "every result up to the stop arrived, in order"


def test_kill_leaves_the_last_will(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[..., subprocess.Popen[str]],
) -> None:
    reader = mqtt_reader(mosquitto, "edgeagent/e2e/status")
    process = agent_process(write_config(tmp_path, mosquitto, ALL_PIPELINES))
    reader.wait_for(is_online, timeout=30)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    # The broker publishes the will after the keep-alive expires or at once on a reset.
    offline = reader.wait_for(lambda m: payload(m)["state"] == "offline", timeout=60)
    assert payload(offline)["device"] == "e2e"


def test_unreachable_broker_at_start_keeps_running_and_connects_later(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[..., subprocess.Popen[str]],
) -> None:
    broker = mosquitto_factory(started=False, port=free_port())
    process = agent_process(write_config(tmp_path, broker, ALL_PIPELINES))
    # Running without the broker: its pipelines produce into the outbox while it retries.
    wait_until(
        lambda: process.poll() is not None or away_with_a_backlog(tmp_path),
        60,
        lambda: f"results queued while the broker is away: {status_or_none(tmp_path)}",
    )
    assert process.poll() is None, "the agent must not exit when the broker is away"
    broker.start()
    reader = mqtt_reader(broker, "edgeagent/e2e/#")
    reader.wait_for(is_online, timeout=30)
    reader.wait_for_count(3, lambda m: "/results/" in m.topic, timeout=30)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert f"{broker.host}:{broker.port}" in stderr, "the outage was logged with the address"


def away_with_a_backlog(tmp_path: Path) -> bool:
    status = status_or_none(tmp_path)
    return status is not None and not status["mqtt"]["connected"] and status["outbox"]["depth"] > 0


def test_a_pipeline_that_cannot_start_is_skipped_with_its_reason(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[..., subprocess.Popen[str]],
) -> None:
    pipelines = f"""\
  - name: good
    source: {{type: synthetic, fps: 10}}
    model: shapes-detector
    threads: 1
  - name: nomodel
    source: {{type: synthetic, fps: 10}}
    model: {tmp_path}/missing.tflite
  - name: mismatch
    source: {{type: synthetic, fps: 10}}
    model: vibration-anomaly
  - name: nocamera
    source: {{type: picamera2}}
    model: shapes-detector
"""
    reader = mqtt_reader(mosquitto, "edgeagent/e2e/#")
    process = agent_process(write_config(tmp_path, mosquitto, pipelines))
    status = payload(reader.wait_for(is_online, timeout=30))
    states = {p["name"]: p for p in status["pipelines"]}
    assert states["good"]["state"] == "running"
    assert states["nomodel"]["state"] == "failed"
    assert "not found" in states["nomodel"]["error"]
    assert states["mismatch"]["state"] == "failed"
    assert "input" in states["mismatch"]["error"]
    assert states["nocamera"]["state"] == "failed"
    assert "picamera2" in states["nocamera"]["error"]
    reader.wait_for_count(3, lambda m: m.topic.endswith("/results/good"), timeout=30)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "Traceback" not in stderr


def test_demo_shows_all_three_pipelines_live() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [*AGENT, "demo", "--duration", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    final = result.stdout.rsplit("edgeagent demo - device", 1)[-1]
    assert "detections:" in final
    assert "classes:" in final
    assert "anomaly score" in final
    assert "is offline" in final, "the view saw the agent's clean stop"
    assert "Traceback" not in result.stderr
