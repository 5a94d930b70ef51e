"""What the model-delivery end-to-end tests share: the fleet tools run as subprocesses
(keygen, publish, deploy, watch), the device as `edgeagent run`, and readers of what the
fleet can see (results, events, `reported`). Used by test_delivery_e2e.py and
test_delivery_security.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ai_edge_litert import schema_py_generated as s

from tests import modelfactory
from tests.agent_config import shapes_pipeline, write_agent_config
from tests.broker import Mosquitto, MqttReader, Received, body, publish_once
from tests.waiting import wait_until

CLI = [sys.executable, "-m", "edgeagent.cli.main"]
REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "bundled"
DETECTOR = BUNDLED / "shapes-detector.tflite"
SSD = BUNDLED / "shapes-detector-ssd.tflite"
VIBRATION = BUNDLED / "vibration-anomaly.tflite"
PREFIX = "edgeagent"
DEVICE = "pi-e2e"
MODEL = "shapes-detector"  # the pipeline's configured model: deliveries use this name
TOPIC = f"{PREFIX}/{DEVICE}"
DELIVERY_STEPS = ("downloaded", "validated", "activated", "probation-passed")
FAILURES = ("rejected", "rolled-back")


# --- the fleet side: the real CLI ------------------------------------------------------


def tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def on(broker: Mosquitto) -> list[str]:
    return ["--host", broker.host, "--port", str(broker.port)]


def keygen(folder: Path) -> tuple[Path, Path]:
    """A new signing key pair; (private key, public key)."""
    made = tool("model", "keygen", "-o", str(folder))
    assert made.returncode == 0, made.stderr
    assert "key id" in made.stdout
    return folder / "edgeagent-signing.key", folder / "edgeagent-signing.pub"


def publish(
    broker: Mosquitto, key: Path, model: Path, version: str, manifest: Path, chunk_size: int
) -> None:
    done = tool(
        "model",
        "publish",
        str(model),
        "--name",
        MODEL,
        "--version",
        version,
        "--manifest",
        str(manifest),
        "--key",
        str(key),
        "--chunk-size",
        str(chunk_size),
        *on(broker),
    )
    assert done.returncode == 0, done.stderr
    assert f"published {MODEL} {version}" in done.stdout


def deploy(broker: Mosquitto, version: str, *, allow_downgrade: bool = False) -> None:
    done = tool(
        "fleet",
        "deploy",
        "--device",
        DEVICE,
        "--pipeline",
        "shapes",
        "--model",
        MODEL,
        "--version",
        version,
        *(["--allow-downgrade"] if allow_downgrade else []),
        *on(broker),
    )
    assert done.returncode == 0, done.stderr
    assert f"{MODEL} {version}" in done.stdout


def watch_until_converged(broker: Mosquitto, timeout: float) -> subprocess.CompletedProcess[str]:
    return tool(
        "fleet",
        "watch",
        "--device",
        DEVICE,
        "--until-converged",
        "--timeout",
        str(timeout),
        *on(broker),
        timeout=timeout + 30,
    )


# --- the device: `edgeagent run` --------------------------------------------------------


def write_config(
    tmp_path: Path,
    broker: Mosquitto,
    public_key: Path,
    *,
    log_level: str | None = None,
    **models: Any,
) -> Path:
    """The device's config: the `shapes` pipeline on MODEL, trusting `public_key`, with
    `models` settings (and `log_level` when given)."""
    return write_agent_config(
        tmp_path,
        broker,
        device=DEVICE,
        pipelines=[shapes_pipeline(MODEL, fps=20)],
        mqtt={"prefix": PREFIX, "reconnect_max_s": 1},
        delivery={"trusted_keys": [str(public_key)], **models},
        **({} if log_level is None else {"log_level": log_level}),
    )


class Agent:
    """One `edgeagent run` process; its log goes to a file (a pipe nobody reads could fill
    up and stall the agent)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with log.open("w", encoding="utf-8") as err:
            self.process = subprocess.Popen(
                [*CLI, "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
            )

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout)


# --- reading what the fleet sees ---------------------------------------------------------


def results(reader: MqttReader, since: int = 0) -> list[dict[str, Any]]:
    return [body(m) for m in reader.messages[since:] if m.topic == f"{TOPIC}/results/shapes"]


def version_of(result: dict[str, Any]) -> str:
    return str(result["model"]["version"])


def is_delivery_event(message: Received) -> bool:
    return message.topic == f"{TOPIC}/events" and body(message).get("model") == MODEL


def delivery_events(reader: MqttReader, since: int = 0) -> list[dict[str, Any]]:
    return [body(m) for m in reader.messages[since:] if is_delivery_event(m)]


def steps_of(reader: MqttReader, version: str, since: int = 0) -> list[str]:
    """The delivery steps of `version` in arrival order, download progress left out."""
    return [
        e["type"]
        for e in delivery_events(reader, since)
        if e["version"] == version and e["type"] != "download-progress"
    ]


def event(
    reader: MqttReader, kind: str, version: str, since: int = 0, timeout: float = 60
) -> dict[str, Any]:
    """The first delivery event `kind` of `version` after message `since`."""
    return dict(
        wait_until(
            lambda: next(
                (
                    e
                    for e in delivery_events(reader, since)
                    if (e["type"], e["version"]) == (kind, version)
                ),
                None,
            ),
            timeout,
            f"a {kind} event for {version}",
        )
    )


def fresh_results(reader: MqttReader, count: int) -> list[dict[str, Any]]:
    """The next `count` results, published from now on."""
    since = len(reader.messages)
    wait_until(lambda: len(results(reader, since)) >= count, 30, f"{count} more results")
    return results(reader, since)[:count]


def retained_report(broker: Mosquitto, mqtt_reader: Callable[..., MqttReader]) -> dict[str, Any]:
    """The `shapes` entry of the retained `reported` state, as a newcomer reads it."""
    message = mqtt_reader(broker, f"{TOPIC}/reported").wait_for(lambda m: m.retain)
    entry: dict[str, Any] = body(message)["pipelines"]["shapes"]
    return entry


def command(broker: Mosquitto, reader: MqttReader, name: str, args: dict[str, Any]) -> Any:
    """Sends a fleet command (MQTT 5, no response topic: the reply comes on `.../reply`)
    and returns its terminal reply."""
    request_id = f"{name}-{time.monotonic_ns()}"
    payload = json.dumps({"id": request_id, "args": args}).encode()
    publish_once(broker, f"{TOPIC}/cmd/{name}", payload)
    reply = reader.wait_for(
        lambda m: (
            m.topic == f"{TOPIC}/reply"
            and body(m).get("id") == request_id
            and body(m).get("stage") in ("succeeded", "failed")
        ),
        timeout=60,
    )
    return body(reply)


# --- models ------------------------------------------------------------------------------


def nan_on_the_synthetic_scene() -> bytes:
    """y = sqrt(0.1 - (mean red - mean blue)) on an int8 [1, 160, 160, 3] input (pixel / 255,
    as the detector takes it). Finite on the gate's zeros and its uniform random sample
    (red and blue means equal), NaN on the synthetic scene, whose background is ~0.28 redder
    than blue on every frame (seed 0)."""
    g = modelfactory.Graph()
    pixels = 160 * 160
    image = g.tensor("image", [1, 160, 160, 3], "int8", scale=1 / 255, zero_point=-128)
    real = g.tensor("image_float", [1, 160, 160, 3])
    g.op(s.BuiltinOperator.DEQUANTIZE, [image], [real])
    weights = np.zeros((pixels, 3), np.float32)
    weights[:, 0], weights[:, 2] = -1.0 / pixels, 1.0 / pixels
    root = modelfactory.sqrt_of_fc(g, real, weights.reshape(1, -1), 0.1)
    return g.build([image], [root])


def nan_model(folder: Path) -> tuple[Path, Path]:
    """The NaN model and its YAML manifest (a raw task, the detector's preprocessing)."""
    model = modelfactory.save(folder / "nan-on-the-scene.tflite", nan_on_the_synthetic_scene())
    manifest = folder / "nan-on-the-scene.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "name": "nan-on-the-scene",
                "task": {"type": "raw"},
                "preprocess": {
                    "type": "image",
                    "resize": "stretch",
                    "color": "rgb",
                    "std": [255.0, 255.0, 255.0],
                },
            }
        ),
        encoding="utf-8",
    )
    return model, manifest
