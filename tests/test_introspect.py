"""Published models with no manifest: task, labels and preprocess from their TFLite metadata
and their graph, run through the real LiteRT interpreter, against outputs known in advance.

Each model is built here (tests/modelfactory.py) so that its output for a given image is
known: a wrong colour order, a second sigmoid, letterboxing instead of stretching, or a
transposed head read the wrong way changes a number that a test checks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.config import ClassificationTask, DetectionTask, ImagePreprocess
from edgeagent.modelfile.catalog import bundled_dir, describe_model
from edgeagent.modelfile.metadata import TENSOR_AXIS_LABELS, TENSOR_VALUE_LABELS, parse_metadata
from edgeagent.modelfile.tflite import read_model
from tests import modelfactory as mf
from tests.modelfactory import run

COLOURS = ["red", "green", "blue", "red-top"]


def softmax(logits: list[float]) -> list[float]:
    e = np.exp(np.asarray(logits, np.float64) - max(logits))
    return [round(float(v), 4) for v in e / e.sum()]


def colour_weights(size: int = 8) -> np.ndarray:
    """Four linear reads of an 8x8 RGB input: the mean of R, of G, of B over the image, and
    the mean of R over the top two rows."""
    w = np.zeros((4, size, size, 3), np.float32)
    for channel in range(3):
        w[channel, :, :, channel] = 1 / (size * size)
    w[3, :2, :, 0] = 1 / (2 * size)
    return w


def red_image(width: int = 32, height: int = 16) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = 255
    return image


def scores(result: dict[str, Any]) -> dict[str, float]:
    return {c["label"]: c["score"] for c in result["classes"]}


# --- the metadata reader --------------------------------------------------------------------


def test_the_metadata_reader_reads_what_the_writers_put() -> None:
    blob = mf.metadata_buffer(
        [mf.TensorMeta(name="image", content="image", color_space=2, mean=[127.5], std=[127.5])],
        [
            mf.TensorMeta(
                name="location", content="bounding_box", box_index=[1, 0, 3, 2], box_pixels=True
            ),
            mf.TensorMeta(name="category", files=[("labelmap.txt", TENSOR_VALUE_LABELS)]),
            mf.TensorMeta(name="score", score_threshold=0.25),
        ],
        model_files=[("README.txt", 1)],
        name="SSD MobileNet",
        description="boxes of 90 COCO classes",
    )
    meta = parse_metadata(blob)
    assert (meta.name, meta.description) == ("SSD MobileNet", "boxes of 90 COCO classes")
    (image,) = meta.inputs
    assert (image.content, image.color_space, image.mean, image.std) == (
        "image",
        2,
        (127.5,),
        (127.5,),
    )
    location, category, score = meta.outputs
    assert location.box is not None
    assert (location.box.index, location.box.type, location.box.coordinates) == ((1, 0, 3, 2), 1, 1)
    assert [(f.name, f.type, f.owner) for f in category.files] == [
        ("labelmap.txt", TENSOR_VALUE_LABELS, "output:1")
    ]
    assert score.score_threshold == pytest.approx(0.25)
    assert [f.name for f in meta.files] == ["labelmap.txt", "README.txt"]


# --- classification -------------------------------------------------------------------------


def test_a_float_classifier_takes_mean_std_and_labels_from_its_metadata(tmp_path: Path) -> None:
    """Metadata mean/std 127.5 turn a red pixel into (1, -1, -1): the expected scores
    change if the metadata were ignored (std 255 gives (1, 0, 0)), if the frame were fed as
    BGR (blue would win), or if it were letterboxed (the top rows would be padding)."""
    meta = mf.metadata_buffer(
        [mf.TensorMeta(name="image", content="image", color_space=1, mean=[127.5], std=[127.5])],
        [mf.TensorMeta(name="probability", files=[("colours.txt", TENSOR_AXIS_LABELS)])],
        name="colours",
        description="which colour fills the frame",
    )
    model = mf.with_metadata(
        mf.image_fc(colour_weights()), meta, {"colours.txt": "\n".join(COLOURS) + "\n"}
    )
    path = mf.save(tmp_path / "colours.tflite", model)

    description, result = run(path, red_image())

    assert description.task == ClassificationTask()
    assert description.labels == tuple(COLOURS)
    assert description.preprocess == ImagePreprocess(
        resize="stretch", color="rgb", mean=(127.5,), std=(127.5,)
    )
    red, other = softmax([1, -1, -1, 1])[:2]
    assert scores(result) == {"red": red, "red-top": red, "green": other}  # top 3
    assert description.about == "colours: which colour fills the frame"
    explained = description.explain()
    assert explained.startswith("classification: one [1, 4] output")
    assert "4 labels from metadata file colours.txt (TENSOR_AXIS_LABELS of output 0)" in explained
    assert "mean 127.5, std 127.5" in explained
    assert "from metadata" in explained


def test_a_uint8_classifier_without_normalisation_gets_raw_pixels(tmp_path: Path) -> None:
    """No NormalizationOptions: the pixel is fed as the quantised value (scale 1/128, zero
    point 128 -> the model sees (pixel - 128) / 128), as the Task Library does."""
    model = mf.with_labels(mf.image_fc(colour_weights(), "uint8", input_q=(1 / 128, 128)), COLOURS)
    path = mf.save(tmp_path / "colours-uint8.tflite", model)
    description, result = run(path, red_image())
    assert description.preprocess == ImagePreprocess(mean=(128.0,), std=(128.0,))
    red, other = softmax([127 / 128, -1, -1, 127 / 128])[:2]
    assert scores(result) == pytest.approx({"red": red, "red-top": red, "green": other}, abs=1e-4)
    assert "pixels 0..255 mapped onto the uint8 input's range" in description.explain()


def test_labels_come_from_a_lone_label_file_without_metadata(tmp_path: Path) -> None:
    model = mf.with_labels(mf.image_fc(colour_weights()), COLOURS, in_metadata=False)
    path = mf.save(tmp_path / "lone.tflite", model)
    description = describe_model(str(path))
    assert description.labels == tuple(COLOURS)
    assert description.sources["labels"] == (
        "from metadata file labels.txt (the one label file packed in the model)"
    )


# --- TFLite_Detection_PostProcess ------------------------------------------------------------


def ssd_copy(tmp_path: Path, metadata: bytes | None, packed: dict[str, str]) -> Path:
    data = (bundled_dir() / "shapes-detector-ssd.tflite").read_bytes()
    return mf.save(tmp_path / "ssd.tflite", mf.with_metadata(data, metadata, packed))


def scene() -> np.ndarray:
    from edgeagent.hal.camera.synthetic import ShapeScene

    image, _ = ShapeScene(seed=123).render(8)
    return image


def test_a_postprocess_detector_with_metadata_runs_as_its_manifest_says(tmp_path: Path) -> None:
    """The bundled SSD without its manifest, with the metadata a published detector has:
    the same detections as with the manifest, labels from the category output's file."""
    meta = mf.metadata_buffer(
        [mf.TensorMeta(name="image", content="image", color_space=1, mean=[0.0], std=[255.0])],
        [
            mf.TensorMeta(name="location", content="bounding_box", box_index=[1, 0, 3, 2]),
            mf.TensorMeta(name="category", files=[("labelmap.txt", TENSOR_VALUE_LABELS)]),
            mf.TensorMeta(name="score", score_threshold=0.45),
            mf.TensorMeta(name="number of detections"),
        ],
    )
    path = ssd_copy(tmp_path, meta, {"labelmap.txt": "circle\nsquare\ntriangle\n"})
    description, result = run(path, scene())
    _, expected = run(bundled_dir() / "shapes-detector-ssd.tflite", scene())

    assert description.manifest is None
    assert isinstance(description.task, DetectionTask)
    assert (description.task.layout, description.task.box_index) == ("postprocess", (1, 0, 3, 2))
    assert description.task.threshold == 0.45
    assert result == expected
    assert result["detections"]
    assert {d["label"] for d in result["detections"]} <= {"circle", "square", "triangle"}
    assert description.explain().startswith(
        "detection: TFLite_Detection_PostProcess op; box order [1, 0, 3, 2] from metadata; "
        "threshold 0.45 from metadata; 3 labels from metadata file labelmap.txt "
        "(TENSOR_VALUE_LABELS of output 1)"
    )


def test_box_order_from_metadata_is_applied(tmp_path: Path) -> None:
    """Metadata that says the boxes are (left, top, right, bottom) swaps x and y."""
    meta = mf.metadata_buffer(
        [], [mf.TensorMeta(name="location", content="bounding_box", box_index=[0, 1, 2, 3])]
    )
    path = ssd_copy(tmp_path, meta, {})
    _, swapped = run(path, scene())
    _, expected = run(bundled_dir() / "shapes-detector-ssd.tflite", scene())
    assert [d["box"] for d in swapped["detections"]] == [
        [y0, x0, y1, x1] for x0, y0, x1, y1 in (d["box"] for d in expected["detections"])
    ]


def test_a_config_threshold_keeps_the_inferred_layout(tmp_path: Path) -> None:
    path = ssd_copy(tmp_path, None, {})
    description, result = run(path, scene(), task=DetectionTask(threshold=0.999))
    assert isinstance(description.task, DetectionTask)
    assert (description.task.layout, description.task.threshold) == ("postprocess", 0.999)
    assert description.sources["task"].startswith(
        "threshold from the pipeline config, the rest detection: TFLite_Detection_PostProcess"
    )
    assert result == {"detections": []}


def test_the_manifest_wins_over_the_metadata(tmp_path: Path) -> None:
    path = ssd_copy(tmp_path, None, {"labels.txt": "a\nb\nc\n"})
    shutil.copy(bundled_dir() / "shapes-detector-ssd.yaml", tmp_path / "ssd.yaml")
    description = describe_model(str(path))
    assert description.labels == ("circle", "square", "triangle")
    assert description.sources == {
        "task": "from the manifest",
        "labels": "from the manifest",
        "preprocess": "from the manifest",
    }


# --- YOLO heads --------------------------------------------------------------------------------

WIDE = (32, 16)  # a 2:1 source frame for a square model input: letterboxing shows


def yolo_rows() -> np.ndarray:
    """Eight candidates of (cx, cy, w, h, cat, dog) normalised to the model input: one dog
    at the centre, a weaker overlapping dog, and six that score nothing."""
    rows = np.zeros((8, 6), np.float32)
    rows[:, :4] = [0.1, 0.1, 0.05, 0.05]
    rows[0] = [0.5, 0.5, 0.2, 0.4, 0.1, 0.9]
    rows[1] = [0.52, 0.5, 0.2, 0.4, 0.05, 0.6]  # suppressed by NMS
    return rows


def wide_frame() -> np.ndarray:
    return np.full((WIDE[1], WIDE[0], 3), 90, np.uint8)


def ultralytics(names: dict[int, str]) -> dict[str, str]:
    meta = {"task": "detect", "names": {str(k): v for k, v in names.items()}, "imgsz": [16, 16]}
    return {"metadata.json": json.dumps(meta)}


def test_a_yolov8_export_is_read_transposed_and_un_letterboxed(tmp_path: Path) -> None:
    """[1, 4 + C, N] with Ultralytics' metadata.json: letterbox in, boxes mapped back to
    the wide frame (y doubles about the centre); read untransposed, or stretched, the box
    would differ."""
    head = yolo_rows().T[np.newaxis]  # [1, 6, 8]
    model = mf.with_metadata(
        mf.constant_head(head, input_shape=(1, 16, 16, 3)), None, ultralytics({0: "cat", 1: "dog"})
    )
    path = mf.save(tmp_path / "yolov8n.tflite", model)
    description, result = run(path, wide_frame())

    assert description.labels == ("cat", "dog")
    assert description.sources["labels"] == "from class names in metadata.json (Ultralytics export)"
    assert isinstance(description.task, DetectionTask)
    assert description.task.layout == "yolov8"
    assert description.preprocess == ImagePreprocess(resize="letterbox", mean=(0.0,), std=(255.0,))
    assert result == {
        "detections": [{"index": 1, "label": "dog", "score": 0.9, "box": [0.4, 0.1, 0.6, 0.9]}]
    }
    assert "[1, 6, N] = 4 box values + 2 classes" in description.explain()


def test_a_yolov5_int8_head_multiplies_objectness(tmp_path: Path) -> None:
    """[1, N, 5 + C], int8, with the names of an older export (a dict literal that the
    metadata calls the output's labels): score = objectness x class score, no sigmoid on
    values already in [0, 1]."""
    rows = np.zeros((8, 7), np.float32)
    rows[:, :4] = [0.1, 0.1, 0.05, 0.05]
    rows[0] = [0.5, 0.5, 0.25, 0.5, 0.8, 0.1, 0.9]  # dog 0.72
    rows[2] = [0.2, 0.2, 0.1, 0.1, 0.3, 0.95, 0.0]  # cat 0.285: below 0.5
    meta = mf.metadata_buffer([], [mf.TensorMeta(files=[("meta.txt", TENSOR_AXIS_LABELS)])])
    packed = {"meta.txt": "{'stride': 32, 'names': {0: 'cat', 1: 'dog'}}"}
    model = mf.with_metadata(
        mf.quantized_head(rows[np.newaxis], 1 / 255, -128, (1, 16, 16, 3)), meta, packed
    )
    path = mf.save(tmp_path / "yolov5s.tflite", model)
    description, result = run(path, np.full((16, 16, 3), 7, np.uint8))

    assert description.labels == ("cat", "dog")
    assert isinstance(description.task, DetectionTask)
    assert description.task.layout == "yolov5"
    (dog,) = result["detections"]
    assert dog["label"] == "dog"
    assert dog["score"] == pytest.approx(0.8 * 0.9, abs=2 / 255)
    assert dog["box"] == pytest.approx([0.375, 0.25, 0.625, 0.75], abs=2 / 255)


def test_a_head_in_input_pixels_is_normalised(tmp_path: Path) -> None:
    """[1, N, 4 + C] without labels, boxes in pixels of the 16x16 input."""
    rows = yolo_rows()
    rows[:, :4] *= 16
    model = mf.constant_head(rows[np.newaxis], input_shape=(1, 16, 16, 3))
    path = mf.save(tmp_path / "pixels.tflite", model)
    description, result = run(path, np.zeros((16, 16, 3), np.uint8))
    assert isinstance(description.task, DetectionTask)
    assert description.task.layout == "yolov8"
    assert "no objectness column assumed" in description.sources["task"]
    assert result == {
        "detections": [{"index": 1, "label": None, "score": 0.9, "box": [0.4, 0.3, 0.6, 0.7]}]
    }


def test_logits_get_one_sigmoid(tmp_path: Path) -> None:
    rows = yolo_rows()
    rows[:, 4:] = np.log(rows[:, 4:] + 1e-6) - np.log(1 - rows[:, 4:] + 1e-6)  # logits
    model = mf.constant_head(rows[np.newaxis], input_shape=(1, 16, 16, 3))
    path = mf.save(tmp_path / "logits.tflite", model)
    _, result = run(path, np.zeros((16, 16, 3), np.uint8))
    assert [d["score"] for d in result["detections"]] == [0.9]


# --- when nothing fits ---------------------------------------------------------------------


def test_a_model_no_rule_fits_runs_raw_and_says_why(tmp_path: Path) -> None:
    model = mf.constant_head(
        [np.zeros((1, 3, 3), np.float32), np.zeros((1, 2), np.float32)],
        input_shape=(1, 8, 8, 3),
    )
    path = mf.save(tmp_path / "two.tflite", model)
    description = describe_model(str(path))
    assert description.task.type == "raw"
    assert description.sources["task"] == (
        "raw: 2 outputs ([1, 3, 3], [1, 2]) and no TFLite_Detection_PostProcess op: no rule "
        "tells the task; set it in the pipeline"
    )


def test_an_output_as_large_as_a_window_input_is_not_called_a_classifier(tmp_path: Path) -> None:
    path = mf.save(tmp_path / "ae.tflite", mf.float_fc(np.eye(6), np.zeros(6)))
    description = describe_model(str(path))
    assert description.task.type == "raw"
    assert "autoencoder or a classifier" in description.sources["task"]
    assert description.preprocess is None


def test_the_metadata_and_export_files_are_read_once(tmp_path: Path) -> None:
    model = mf.with_metadata(
        mf.constant_head(yolo_rows()[np.newaxis], input_shape=(1, 16, 16, 3)),
        None,
        ultralytics({0: "cat", 1: "dog"}),
    )
    parsed = read_model(mf.save(tmp_path / "m.tflite", model))
    assert parsed.export is not None
    assert (parsed.export.task, parsed.export.names, parsed.export.imgsz) == (
        "detect",
        ("cat", "dog"),
        (16, 16),
    )


# --- the command line ----------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def yolo_model(tmp_path: Path) -> Path:
    head = yolo_rows().T[np.newaxis]
    model = mf.with_metadata(
        mf.constant_head(head, input_shape=(1, 16, 16, 3)), None, ultralytics({0: "cat", 1: "dog"})
    )
    return mf.save(tmp_path / "yolov8n.tflite", model)


def test_infer_says_what_it_inferred_and_takes_pipeline_overrides(tmp_path: Path) -> None:
    from PIL import Image

    path = yolo_model(tmp_path)
    image = tmp_path / "wide.png"
    Image.fromarray(wide_frame()).save(image)

    plain = cli("infer", str(path), str(image), "--json")
    assert plain.returncode == 0, plain.stderr
    report = json.loads(plain.stdout)
    assert report["task"] == "detection"
    assert report["inferred"].startswith("detection: Ultralytics export (task 'detect' in ")
    assert report["result"]["detections"][0]["box"] == [0.4, 0.1, 0.6, 0.9]

    stretched = cli("infer", str(path), str(image), "--json", "--resize", "stretch")
    assert json.loads(stretched.stdout)["result"]["detections"][0]["box"] == [0.4, 0.3, 0.6, 0.7]
    strict = cli("infer", str(path), str(image), "--json", "--threshold", "0.95")
    assert json.loads(strict.stdout)["result"] == {"detections": []}
    raw = cli("infer", str(path), str(image), "--json", "--task", "raw")
    assert json.loads(raw.stdout)["result"]["outputs"][0]["shape"] == [1, 6, 8]

    text = cli("infer", str(path), str(image))
    assert "dog" in text.stdout
    assert "detection: Ultralytics export" in text.stdout
    wrong = cli("infer", str(path), str(image), "--top-k", "2")
    assert wrong.returncode != 0
    assert "Traceback" not in wrong.stderr
    assert "top_k" in wrong.stderr


def test_model_inspect_reports_the_inference(tmp_path: Path) -> None:
    path = yolo_model(tmp_path)
    result = cli("model", "inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    inferred = json.loads(result.stdout)["inferred"]
    assert inferred["task"]["type"] == "detection"
    assert inferred["task"]["layout"] == "yolov8"
    assert inferred["sources"]["labels"] == "from class names in metadata.json (Ultralytics export)"
    text = cli("model", "inspect", str(path))
    assert "inferred: detection: Ultralytics export" in text.stdout
