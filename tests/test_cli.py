"""Every bad input to the command line gets one clear message and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.modelfile.catalog import samples_dir

AGENT = [sys.executable, "-m", "edgeagent.cli.main"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=120, check=False)


def assert_clean_failure(
    result: subprocess.CompletedProcess[str], code: int, *needles: str
) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr


def test_help_lists_every_command() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("run", "demo", "infer", "bench"):
        assert command in result.stdout
    for command in ("run", "demo", "infer", "bench"):
        assert run(command, "--help").returncode == 0


def test_missing_config_file(tmp_path: Path) -> None:
    assert_clean_failure(
        run("run", "--config", str(tmp_path / "nope.yaml")), 2, "cannot read configuration"
    )


def test_invalid_config_names_the_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("mqtt:\n  host: x\n  prot: 5\n", encoding="utf-8")
    assert_clean_failure(
        run("run", "--config", str(config)), 2, f"{config}:3: mqtt.prot: unknown key"
    )


def test_unknown_source_type(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "pipelines:\n  - name: a\n    model: shapes-detector\n    source: {type: kinect}\n",
        encoding="utf-8",
    )
    assert_clean_failure(run("run", "--config", str(config)), 2, "unknown type 'kinect'")


def test_no_pipeline_can_start(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"state_dir: {tmp_path}/state\nmqtt: {{port: 1}}\npipelines:\n"
        f"  - {{name: a, model: {tmp_path}/none.tflite, source: {{type: synthetic}}}}\n",
        encoding="utf-8",
    )
    assert_clean_failure(run("run", "--config", str(config)), 1, "no pipeline could start")


def test_infer_classifies_a_sample_digit() -> None:
    sample = sorted(samples_dir().glob("digit-*.png"))[0]
    truth = sample.name.split("-")[1]
    result = run("infer", "digits-classifier", str(sample), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {
        "model",
        "input",
        "accelerator",
        "fallbacks",
        "latency_ms",
        "task",
        "inferred",
        "sources",
        "result",
    }
    assert report["inferred"].startswith("classification: from the manifest")
    assert report["result"]["classes"][0]["label"] == truth
    human = run("infer", "digits-classifier", str(sample))
    assert human.returncode == 0
    assert f"  {truth}" in human.stdout


def test_infer_on_a_sensor_csv(tmp_path: Path) -> None:
    csv = tmp_path / "window.csv"
    csv.write_text("x,y,z\n" + "\n".join(f"{i % 7 * 0.01},0.0,1.0" for i in range(256)))
    result = run("infer", "vibration-anomaly", str(csv), "--json")
    assert result.returncode == 0, result.stderr
    assert {"score", "anomaly", "threshold"} <= set(json.loads(result.stdout)["result"])


def test_infer_rejects_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    fake = tmp_path / "model.tflite"
    fake.write_bytes(b"this is not a flatbuffer" * 10)
    sample = sorted(samples_dir().glob("digit-*.png"))[0]
    assert_clean_failure(run("infer", str(fake), str(sample)), 1, "not a TFLite model")


def test_infer_names_the_bundled_models_when_one_is_missing(tmp_path: Path) -> None:
    assert_clean_failure(
        run("infer", "no-such-model", str(tmp_path / "x.png")), 1, "digits-classifier"
    )


def test_infer_rejects_an_unreadable_image(tmp_path: Path) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG broken")
    assert_clean_failure(run("infer", "digits-classifier", str(bad)), 1, "cannot read image")


@pytest.mark.parametrize("accelerator", ["edgetpu", "litert-gpu", "gpu"])
def test_infer_on_an_absent_accelerator_says_why(accelerator: str) -> None:
    sample = sorted(samples_dir().glob("digit-*.png"))[0]
    result = run("infer", "digits-classifier", str(sample), "--accelerator", accelerator)
    assert_clean_failure(result, 1, accelerator)


def test_bench_reports_latency_per_setting() -> None:
    result = run("bench", "digits-classifier", "--runs", "5", "--threads", "1,2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    settings = {(r["accelerator"], r["threads"]) for r in report["results"]}
    assert settings == {("cpu", 1), ("cpu", 2)}
    for row in report["results"]:
        assert 0 < row["invoke_ms"]["median"] <= row["invoke_ms"]["p95"]
    assert {s["accelerator"] for s in report["skipped"]} == {"edgetpu", "litert-gpu", "gpu"}


@pytest.mark.parametrize("model", ["shapes-detector", "shapes-detector-ssd"])
def test_infer_detects_the_shapes_of_a_synthetic_scene(tmp_path: Path, model: str) -> None:
    """Both detection layouts (raw head + agent NMS, TFLite_Detection_PostProcess) find
    what the scene generator drew, with boxes in source-image coordinates."""
    from PIL import Image

    from edgeagent.hal.camera.synthetic import ShapeScene

    found = 0
    expected = 0
    for t_index in range(0, 40, 8):
        image, truth = ShapeScene(seed=123).render(t_index)
        path = tmp_path / f"scene-{t_index}.png"
        Image.fromarray(image).save(path)
        result = run("infer", model, str(path), "--json")
        assert result.returncode == 0, result.stderr
        detections = json.loads(result.stdout)["result"]["detections"]
        for box in truth:
            expected += 1
            found += any(
                d["label"] == box["label"] and _iou(d["box"], box["box"]) >= 0.5 for d in detections
            )
    assert expected > 0
    assert found / expected >= 0.7, f"{found} of {expected} drawn shapes detected"


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
