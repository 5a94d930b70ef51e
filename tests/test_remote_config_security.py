"""What someone holding the fleet's command credentials cannot do to a device, against the
real daemon (`edgeagent run`) and a real mosquitto: change local-only configuration
(trust, broker, paths), point a source or a model at a file outside
`commands.remote_paths`, slip loosely typed arguments past a command, or block the local
control socket with silent clients."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import wave
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeagent.control import ControlServer, ask
from edgeagent.errors import EdgeAgentError
from edgeagent.modelfile.catalog import bundled_dir, samples_dir
from tests.agent_config import write_agent_config
from tests.broker import Dashboard, Mosquitto, MqttReader, all_running, body

DEVICE = "sec"
ROOT = f"edgeagent/{DEVICE}"
VIBRATION = {
    "name": "vib",
    "source": {"type": "synthetic-vibration", "rate_hz": 1000, "window": 256},
    "model": "vibration-anomaly",
    "threads": 1,
}


running = all_running(ROOT)


@pytest.fixture
def fleet_agent(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[[Path], subprocess.Popen[str]],
    dashboard: Callable[..., Dashboard],
) -> Iterator[Callable[..., tuple[Dashboard, MqttReader, Path]]]:
    """Starts the daemon running VIBRATION, with `extra` top-level config keys;
    (fleet, reader of ROOT/#, config)."""
    started: list[subprocess.Popen[str]] = []

    def start(**extra: Any) -> tuple[Dashboard, MqttReader, Path]:
        config = write_agent_config(
            tmp_path, mosquitto, device=DEVICE, pipelines=[VIBRATION], **extra
        )
        reader = mqtt_reader(mosquitto, f"{ROOT}/#")
        started.append(agent_process(config))
        reader.wait_for(running, timeout=60)
        return dashboard(mosquitto, root=ROOT), reader, config

    yield start
    for process in started:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
        assert "Traceback" not in stderr, stderr


def test_config_set_cannot_change_local_only_keys(
    fleet_agent: Callable[..., tuple[Dashboard, MqttReader, Path]],
) -> None:
    fleet, reader, config_path = fleet_agent()
    on_disk = config_path.read_bytes()
    running_config = fleet.call("config.get")["result"]

    refused = {
        "trust": {"delivery": {"allow_unsigned": True, "trusted_keys": []}},
        # The old name of `delivery:` is refused the same way.
        "trust-old-name": {"models": {"allow_unsigned": True, "trusted_keys": []}},
        "broker": {"mqtt": {"port": 1, "username": "x", "password_file": "/etc/shadow"}},
        "listening socket": {"telemetry": {"prometheus": {"host": "0.0.0.0", "port": 9108}}},
        "paths": {"state_dir": "/tmp/elsewhere", "outbox": {"path": "/tmp/outbox.db"}},
        "identity and commands": {"device": {"id": "other"}, "commands": {"allow": ["restart"]}},
        # An allowed change does not carry a forbidden one through.
        "mixed": {"log_level": "debug", "mqtt": {"host": "192.0.2.1"}},
    }
    for what, patch in refused.items():
        reply = fleet.call("config.set", {"config": patch})
        assert reply["stage"] == "failed", (what, reply)
        assert reply["reason"].startswith("forbidden-key:"), (what, reply)
        assert config_path.read_bytes() == on_disk, f"{what}: the file was rewritten"
        assert not config_path.with_name("agent.yaml.bak").exists()
        assert fleet.call("config.get")["result"] == running_config, what
    assert (
        "delivery.allow_unsigned"
        in fleet.call("config.set", {"config": refused["trust"]})["reason"]
    )
    reason = fleet.call("config.set", {"config": refused["broker"]})["reason"]
    assert all(key in reason for key in ("mqtt.port", "mqtt.username", "mqtt.password_file"))

    # A pipeline's threshold is the fleet's to change, and applies at once.
    tuned = {**VIBRATION, "task": {"type": "anomaly", "score": "output", "threshold": 0.777}}
    reply = fleet.call("config.set", {"config": {"pipelines": [tuned]}})
    assert reply["stage"] == "succeeded", reply
    assert reply["result"]["changed"] == ["pipelines"]
    reader.wait_for(
        lambda m: m.topic == f"{ROOT}/results/vib" and body(m)["result"]["threshold"] == 0.777,
        timeout=30,
    )
    saved = yaml.safe_load(config_path.read_text())
    assert saved["pipelines"][0]["task"]["threshold"] == 0.777
    assert saved.get("delivery", {}).get("allow_unsigned", False) is False
    assert fleet.call("config.get")["result"]["delivery"]["allow_unsigned"] is False


def _paths_layout(tmp_path: Path) -> dict[str, Path]:
    """allowed/imgs (images), allowed/link -> secret, allowed/mixed (an image and a
    symlink to a secret one), secret/ (an image, a model and a WAV file), outside the root."""
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    samples = sorted(samples_dir().glob("digit-*.png"))
    for folder in (allowed / "imgs", allowed / "mixed", secret):
        folder.mkdir(parents=True)
    for sample in samples:
        shutil.copy(sample, allowed / "imgs" / sample.name)
    shutil.copy(samples[0], secret / "private.png")
    shutil.copy(samples[0], allowed / "mixed" / "own.png")
    (allowed / "mixed" / "leak.png").symlink_to(secret / "private.png")
    (allowed / "link").symlink_to(secret, target_is_directory=True)
    shutil.copy(bundled_dir() / "digits-classifier.tflite", secret / "model.tflite")
    with wave.open(str(secret / "private.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(2 * 8000))
    return {"allowed": allowed, "secret": secret}


def _door(path: str, model: str = "digits-classifier") -> dict[str, Any]:
    return {
        "name": "door",
        "source": {"type": "images", "path": path, "fps": 5},
        "model": model,
        "threads": 1,
    }


def _listener(path: str) -> dict[str, Any]:
    return {
        "name": "door",
        "source": {"type": "wav", "path": path},
        "model": "sound-classifier",
        "threads": 1,
    }


def test_remote_file_paths_must_resolve_under_remote_paths(
    tmp_path: Path,
    fleet_agent: Callable[..., tuple[Dashboard, MqttReader, Path]],
) -> None:
    layout = _paths_layout(tmp_path)
    allowed, secret = layout["allowed"], layout["secret"]
    fleet, reader, config_path = fleet_agent(commands={"remote_paths": [str(allowed)]})
    on_disk = config_path.read_bytes()

    refused = {
        "outside": _door(str(secret)),
        "dot-dot": _door(f"{allowed}/../secret"),
        "symlinked folder": _door(str(allowed / "link")),
        "symlinked file in a folder": _door(str(allowed / "mixed")),
        "glob through a symlink": _door(f"{allowed}/*/*.png"),
        "model outside": _door(str(allowed / "imgs"), model=str(secret / "model.tflite")),
        "model via dot-dot": _door(
            str(allowed / "imgs"), model=f"{allowed}/../secret/model.tflite"
        ),
        "wav outside": _listener(str(secret / "private.wav")),
        "wav via dot-dot": _listener(f"{allowed}/../secret/private.wav"),
    }
    for what, door in refused.items():
        reply = fleet.call("config.set", {"config": {"pipelines": [VIBRATION, door]}})
        assert reply["stage"] == "failed", (what, reply)
        assert reply["reason"].startswith("forbidden-path:"), (what, reply)
        assert config_path.read_bytes() == on_disk, f"{what}: the file was rewritten"
    status = fleet.call("status")["result"]
    assert [p["name"] for p in status["pipelines"]] == ["vib"]

    bench = fleet.call("bench", {"model": str(secret / "model.tflite"), "runs": 1})
    assert bench["stage"] == "failed"
    assert bench["reason"].startswith("forbidden-path:"), bench

    # Inside the root: accepted, and the pipeline runs on those files.
    reply = fleet.call(
        "config.set", {"config": {"pipelines": [VIBRATION, _door(str(allowed / "imgs"))]}}
    )
    assert reply["stage"] == "succeeded", reply
    reader.wait_for(lambda m: m.topic == f"{ROOT}/results/door", timeout=60)


def test_a_device_without_remote_paths_accepts_no_file_from_commands(
    tmp_path: Path,
    fleet_agent: Callable[..., tuple[Dashboard, MqttReader, Path]],
) -> None:
    layout = _paths_layout(tmp_path)
    fleet, _reader, config_path = fleet_agent()
    on_disk = config_path.read_bytes()
    door = _door(str(layout["allowed"] / "imgs"))
    reply = fleet.call("config.set", {"config": {"pipelines": [VIBRATION, door]}})
    assert reply["stage"] == "failed", reply
    assert reply["reason"].startswith("forbidden-path:"), reply
    assert "commands.remote_paths" in reply["reason"]
    assert config_path.read_bytes() == on_disk


def test_command_args_are_strictly_typed_over_mqtt_and_the_control_socket(
    tmp_path: Path,
    fleet_agent: Callable[..., tuple[Dashboard, MqttReader, Path]],
) -> None:
    fleet, _reader, _config = fleet_agent()
    control = tmp_path / "control.sock"
    for bad in ("100", True, 10.5, -1, 10_000):
        reply = fleet.call("logs", {"lines": bad})
        assert reply["stage"] == "failed", (bad, reply)
        assert "invalid args for 'logs'" in reply["reason"], reply
        with pytest.raises(EdgeAgentError, match="invalid args for 'logs'"):
            ask(control, "logs", {"lines": bad})
    for name, args in (
        ("snapshot", {"pipeline": "vib", "quality": "80"}),
        ("snapshot", {"pipeline": "vib", "mask": "true"}),
        ("snapshot", {"pipeline": "vib", "mask": 1}),
        ("pipeline.restart", {"pipeline": 7}),
        ("bench", {"pipeline": "vib", "runs": "5"}),
        ("status", {"verbose": True}),
    ):
        reply = fleet.call(name, args)
        assert reply["stage"] == "failed", (name, reply)
        assert "invalid args" in reply["reason"], reply
    with pytest.raises(EdgeAgentError, match=r"invalid args for 'pipeline\.restart'"):
        ask(control, "pipeline.restart", {"pipeline": ["vib"]})

    # The daemon keeps answering, both ways, and well-typed arguments still work.
    assert 0 < len(fleet.call("logs", {"lines": 5})["result"]["lines"]) <= 5
    assert 0 < len(ask(control, "logs", {"lines": 5})["lines"]) <= 5
    assert ask(control, "status")["device"] == DEVICE


def test_silent_local_clients_do_not_block_status(
    tmp_path: Path,
    fleet_agent: Callable[..., tuple[Dashboard, MqttReader, Path]],
) -> None:
    fleet_agent()
    control = tmp_path / "control.sock"
    with ExitStack() as stack:
        for _ in range(3):  # each held the old single-threaded server for 5 s
            silent = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            silent.connect(str(control))
        # Well under the 15 s the three would have cost, with all three still connected.
        for _ in range(3):
            assert ask(control, "status", timeout=4)["device"] == DEVICE


def test_control_server_bounds_its_clients_and_stops_with_silent_ones(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    server = ControlServer(path, {"status": lambda _args: {"ok": 1}}, max_clients=2)
    server.start()
    try:
        with ExitStack() as stack:
            for _ in range(2):
                silent = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                silent.connect(str(path))
            with pytest.raises(EdgeAgentError, match="busy"):
                ask(path, "status", timeout=4)
        # Once they hang up, status is served again (when the server has seen them go).
        deadline = time.monotonic() + 10
        while True:
            try:
                assert ask(path, "status", timeout=4) == {"ok": 1}
                break
            except EdgeAgentError:
                assert time.monotonic() < deadline, "status was never answered again"
                time.sleep(0.1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lingering:
            lingering.connect(str(path))
            server.stop()  # ends every client thread although this one never spoke
    finally:
        server.stop()
    assert not path.exists()
