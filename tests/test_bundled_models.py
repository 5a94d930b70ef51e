"""The bundled models: real LiteRT, full int8, valid manifests, reference outputs, and
their quality re-measured on data generated or held out at test time."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from edgeagent.modelfile.manifest import load_manifest

MODELS = Path(__file__).resolve().parents[1] / "models"
BUNDLED = MODELS / "bundled"
ALL_MODELS = sorted([*BUNDLED.glob("*.tflite"), *(MODELS / "bench").glob("*.tflite")])
EXPECTED = {"digits-classifier", "shapes-detector", "vibration-anomaly", "sound-classifier"}


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    """models/quality.py, the measures build.py used, imported without TensorFlow."""
    sys.path.insert(0, str(MODELS))
    try:
        return importlib.import_module("quality")
    finally:
        sys.path.remove(str(MODELS))


def test_every_expected_model_is_bundled() -> None:
    assert {p.stem for p in BUNDLED.glob("*.tflite")} >= EXPECTED
    assert (MODELS / "bench" / "mobilenet-224-int8.tflite").exists()


@pytest.mark.parametrize("path", ALL_MODELS, ids=lambda p: p.stem)
def test_model_is_full_int8_with_a_valid_manifest(path: Path) -> None:
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    assert all(d["dtype"] == np.int8 for d in interpreter.get_input_details())
    outputs = interpreter.get_output_details()
    manifest = load_manifest(path)
    assert manifest is not None
    assert manifest.name == path.stem
    assert manifest.version == "1.0.0"
    if manifest.task.type == "detection" and manifest.task.layout == "postprocess":
        # TFLite_Detection_PostProcess emits float boxes, classes, scores and a count.
        assert len(outputs) == 4
    else:
        assert all(d["dtype"] == np.int8 for d in outputs)
    if path.parent == BUNDLED:
        assert path.stat().st_size < 1024 * 1024
        assert manifest.reference is not None
        assert manifest.quality
        assert manifest.preprocess is not None


@pytest.mark.parametrize("path", sorted(BUNDLED.glob("*.tflite")), ids=lambda p: p.stem)
def test_reference_input_gives_reference_output(path: Path) -> None:
    manifest = load_manifest(path)
    assert manifest is not None
    assert manifest.reference is not None
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    tensor = np.load(BUNDLED / manifest.reference.input)
    expected = np.load(BUNDLED / manifest.reference.output)
    detail = interpreter.get_input_details()[0]
    assert tensor.dtype == detail["dtype"]
    assert tuple(tensor.shape) == tuple(detail["shape"])
    interpreter.set_tensor(detail["index"], tensor)
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    got = interpreter.get_tensor(out["index"]).astype(np.float32)
    scale, zero_point = out["quantization"]
    if scale:
        got = (got - zero_point) * scale
    if manifest.task.type == "detection" and manifest.task.layout == "postprocess":
        # Rows past the detection count are unspecified by TFLite_Detection_PostProcess.
        count = int(interpreter.get_tensor(interpreter.get_output_details()[3]["index"])[0])
        got, expected = got[:, :count], expected[:, :count]
    np.testing.assert_allclose(got, expected, atol=manifest.reference.atol, rtol=0)
    # A reference that is all zeros would pass for a broken model too.
    assert np.abs(expected).max() > 0


def test_digits_accuracy_on_held_out_split(quality: ModuleType) -> None:
    runner = quality.TFLiteRunner(BUNDLED / "digits-classifier.tflite")
    split = quality.digits_split(seed=0)
    pictures = [quality.digit_picture(p) for p in split.test_images]
    x = np.stack([quality.digit_input(p) for p in pictures])
    assert quality.accuracy(runner.predict(x)[0], split.test_labels) >= 0.95


def test_digit_sample_pictures_are_classified(quality: ModuleType) -> None:
    from PIL import Image

    runner = quality.TFLiteRunner(BUNDLED / "digits-classifier.tflite")
    samples = sorted((MODELS / "samples").glob("digit-*.png"))
    assert len(samples) >= 3
    for path in samples:
        picture = np.asarray(Image.open(path).convert("L"))
        scores = runner.predict(quality.digit_input(picture)[None])[0]
        assert str(int(np.argmax(scores))) == path.stem.split("-")[1]


@pytest.fixture(scope="module")
def fresh_scenes(quality: ModuleType) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
    """100 frames from scene seeds the build used for neither training nor testing."""
    inputs, truths = [], []
    for frame, boxes in quality.shape_frames(range(900_000, 900_100), 1, shapes=3):
        inputs.append(quality.detector_input(frame))
        truths.append(boxes)
    assert sum(len(t) for t in truths) > 100
    return np.stack(inputs), truths


@pytest.fixture(scope="module")
def raw_detections(
    quality: ModuleType, fresh_scenes: tuple[np.ndarray, list[list[dict[str, Any]]]]
) -> list[list[Any]]:
    runner = quality.TFLiteRunner(BUNDLED / "shapes-detector.tflite")
    heads = runner.predict(fresh_scenes[0])[0]
    return [quality.decode_raw(h, threshold=0.05, iou_threshold=0.45) for h in heads]


def test_detector_map_on_fresh_scenes(
    quality: ModuleType,
    fresh_scenes: tuple[np.ndarray, list[list[dict[str, Any]]]],
    raw_detections: list[list[Any]],
) -> None:
    manifest = load_manifest(BUNDLED / "shapes-detector.tflite")
    assert manifest is not None
    assert manifest.labels == quality.SHAPE_LABELS
    assert quality.mean_average_precision(raw_detections, fresh_scenes[1]) >= 0.8
    assert manifest.task.type == "detection"
    f1 = quality.detection_f1(raw_detections, fresh_scenes[1], manifest.task.threshold)
    assert f1 >= 0.8


def test_ssd_detector_matches_raw_detector(
    quality: ModuleType,
    fresh_scenes: tuple[np.ndarray, list[list[dict[str, Any]]]],
    raw_detections: list[list[Any]],
) -> None:
    path = BUNDLED / "shapes-detector-ssd.tflite"
    if not path.exists():
        pytest.skip("shapes-detector-ssd was not built")
    manifest = load_manifest(path)
    assert manifest is not None
    assert manifest.task.type == "detection"
    assert manifest.task.layout == "postprocess"
    runner = quality.TFLiteRunner(path)
    names = [d["name"] for d in runner.outputs]
    assert len(names) == 4
    ssd = [quality.decode_postprocess(*runner.predict(x[None])) for x in fresh_scenes[0]]
    assert quality.mean_average_precision(ssd, fresh_scenes[1]) >= 0.8
    # Every confident raw detection reappears with the same label at nearly the same place.
    threshold = manifest.task.threshold
    confident = [(i, r) for i, rs in enumerate(raw_detections) for r in rs if r.score >= threshold]
    assert confident
    matched = sum(
        any(
            s.label == r.label and quality.box_iou(np.array(s.box), np.array(r.box))[0, 0] >= 0.8
            for s in ssd[i]
        )
        for i, r in confident
    )
    assert matched / len(confident) >= 0.95


def test_vibration_auc_on_fresh_machines(quality: ModuleType) -> None:
    manifest = load_manifest(BUNDLED / "vibration-anomaly.tflite")
    assert manifest is not None
    assert manifest.preprocess is not None
    assert manifest.task.type == "anomaly"
    mean = np.array(manifest.preprocess.mean, dtype=np.float32)
    std = np.array(manifest.preprocess.std, dtype=np.float32)
    runner = quality.TFLiteRunner(BUNDLED / "vibration-anomaly.tflite")
    windows, labels = quality.vibration_set(range(80_000, 80_040), 20)
    scores = runner.predict((windows - mean) / std)[0].ravel()
    assert quality.roc_auc(scores, labels > 0) >= 0.95
    flagged = scores >= manifest.task.threshold
    assert flagged[labels > 0].mean() > 0.8
    assert flagged[labels == 0].mean() < 0.2


def test_sound_accuracy_on_fresh_seeds(quality: ModuleType) -> None:
    """Clips from generator seeds used neither in training nor in the build's test set."""
    manifest = load_manifest(BUNDLED / "sound-classifier.tflite")
    assert manifest is not None
    assert manifest.task.type == "classification"
    assert manifest.labels == quality.SOUNDS
    runner = quality.TFLiteRunner(BUNDLED / "sound-classifier.tflite")
    clips, labels = quality.sound_set(range(90_000, 90_030), 2)
    predicted = runner.predict(clips)[0].argmax(axis=1)
    assert float(np.mean(predicted == labels)) >= 0.9
