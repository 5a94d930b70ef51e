"""`publish:` modes on the wire: the real daemon, real models, a real mosquitto."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from edgeagent.modelfile.catalog import samples_dir
from tests.broker import Mosquitto, MqttReader, body


def test_each_publish_mode_on_the_wire(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[..., subprocess.Popen[str]],
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"""\
device: {{id: ev}}
state_dir: {tmp_path}/state
control_socket: {tmp_path}/control.sock
mqtt: {{host: {mosquitto.host}, port: {mosquitto.port}, reconnect_min_s: 0.2}}
pipelines:
  - name: shapes
    source: {{type: synthetic, width: 320, height: 240, fps: 15}}
    model: shapes-detector
    threads: 1
    publish:
      mode: events
      tracking: {{min_hits: 2, max_misses: 10}}
      summary_s: 0.5
      zones:
        - name: all
          polygon: [[0, 0], [1, 0], [1, 1], [0, 1]]
  - name: vibration
    source: {{type: synthetic-vibration, rate_hz: 4000, window: 256, fault_rate: 0.5}}
    model: vibration-anomaly
    threads: 1
    publish: {{mode: interval, interval_s: 1}}
  - name: digits
    source: {{type: images, path: "{samples_dir()}/digit-*.png", fps: 10}}
    model: digits-classifier
    threads: 1
    publish: {{mode: change, dwell_s: 0}}
""",
        encoding="utf-8",
    )
    reader = mqtt_reader(mosquitto, "edgeagent/ev/#")
    process = agent_process(config)

    new = reader.wait_for(
        lambda m: m.topic == "edgeagent/ev/tracks/shapes" and body(m)["type"] == "new",
        timeout=60,
    )
    assert set(body(new)) == {
        "type",
        "id",
        "label",
        "score",
        "box",
        "zones",
        "entered_zones",
        "start",
        "stationary",
    }
    assert body(new)["zones"] == ["all"]
    state = reader.wait_for(
        lambda m: m.topic == "edgeagent/ev/state/shapes" and bool(body(m)["counts"]), timeout=30
    )
    assert sum(body(state)["zones"]["all"].values()) >= 1
    aggregate = reader.wait_for(lambda m: m.topic == "edgeagent/ev/results/vibration", timeout=30)
    assert body(aggregate)["type"] == "interval"
    assert body(aggregate)["frames"] >= 1
    assert 0.0 <= body(aggregate)["anomaly_rate"] <= 1.0
    change = reader.wait_for(lambda m: m.topic == "edgeagent/ev/results/digits", timeout=30)
    assert "change" in body(change)

    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    reader.wait_for(lambda m: m.topic == "edgeagent/ev/status" and body(m)["state"] == "offline")
    tracks = [body(m) for m in reader.messages if m.topic == "edgeagent/ev/tracks/shapes"]
    news = [e["id"] for e in tracks if e["type"] == "new"]
    ends = [e["id"] for e in tracks if e["type"] == "end"]
    assert sorted(news) == sorted(ends), "every object announced was ended, once"
    assert len(news) == len(set(news))
    assert not [m for m in reader.messages if m.topic == "edgeagent/ev/results/shapes"]
    frames = [m for m in reader.messages if m.topic == "edgeagent/ev/snapshots/shapes/" + ends[0]]
    assert frames
    assert frames[-1].payload[:2] == b"\xff\xd8", "the best snapshot is a JPEG"

    late = mqtt_reader(mosquitto, "edgeagent/ev/state/#")
    retained = late.wait_for(lambda m: m.topic == "edgeagent/ev/state/shapes", timeout=10)
    assert retained.retain
