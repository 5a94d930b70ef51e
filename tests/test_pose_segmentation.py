"""Pose (MoveNet single and multi) and segmentation (argmax and sigmoid masks) from models
with no manifest, through the real interpreter, against outputs known in advance; and the
segmentation mask on the snapshot path of the real daemon."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from edgeagent.config import ImagePreprocess, PoseTask, SegmentationTask
from edgeagent.inference import TensorInfo, make_preprocessor
from edgeagent.inference.tasks import COCO_KEYPOINTS
from edgeagent.modelfile.metadata import TENSOR_AXIS_LABELS
from tests import modelfactory as mf
from tests.broker import Dashboard, Mosquitto
from tests.modelfactory import run


def wide(value: int = 60) -> np.ndarray:
    """A 32x16 frame: on a 16x16 input, letterboxing maps model y to 2y - 0.5."""
    return np.full((16, 32, 3), value, np.uint8)


# --- pose ------------------------------------------------------------------------------------


def single_pose() -> np.ndarray:
    keypoints = np.zeros((1, 1, 17, 3), np.float32)
    for k in range(17):
        keypoints[0, 0, k] = [0.3 + 0.02 * k, 0.2 + 0.03 * k, 0.5 + 0.02 * k]  # (y, x, s)
    return keypoints


def test_a_movenet_single_pose_is_named_and_un_letterboxed(tmp_path: Path) -> None:
    """(y, x) are swapped into x, y and mapped back through the letterbox: y = 2y - 0.5."""
    model = mf.constant_head(single_pose(), input_shape=(1, 16, 16, 3), input_dtype="uint8")
    path = mf.save(tmp_path / "movenet.tflite", model)
    description, result = run(path, wide())

    assert description.task == PoseTask()
    assert description.sources["task"] == (
        "pose: one [1, 1, 17, 3] output (MoveNet SinglePose keypoints)"
    )
    assert isinstance(description.preprocess, ImagePreprocess)
    assert description.preprocess.resize == "letterbox"
    (pose,) = result["poses"]
    assert pose["score"] == pytest.approx(np.mean([0.5 + 0.02 * k for k in range(17)]), abs=1e-4)
    assert [k["name"] for k in pose["keypoints"]] == list(COCO_KEYPOINTS)
    expected = [
        {
            "name": name,
            "x": round(0.2 + 0.03 * k, 4),
            "y": round(2 * (0.3 + 0.02 * k) - 0.5, 4),
            "score": round(0.5 + 0.02 * k, 4),
        }
        for k, name in enumerate(COCO_KEYPOINTS)
    ]
    for got, want in zip(pose["keypoints"], expected, strict=True):
        assert got["name"] == want["name"]
        assert got["x"] == pytest.approx(want["x"], abs=1e-4)
        assert got["y"] == pytest.approx(want["y"], abs=1e-4)
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)


def test_multipose_reports_the_poses_above_the_threshold_best_first(tmp_path: Path) -> None:
    rows = np.zeros((1, 6, 56), np.float32)
    for person, score in ((0, 0.1), (1, 0.6), (2, 0.9)):
        rows[0, person, :51] = np.tile([0.5, 0.25 * person, 0.7], 17)
        rows[0, person, 51:55] = [0.1, 0.1, 0.9, 0.9]
        rows[0, person, 55] = score
    model = mf.constant_head(rows, input_shape=(1, 16, 16, 3))
    path = mf.save(tmp_path / "multipose.tflite", model)
    description, result = run(path, np.zeros((16, 16, 3), np.uint8))
    assert description.task == PoseTask()
    assert [p["score"] for p in result["poses"]] == [0.9, 0.6]
    assert [p["keypoints"][0]["x"] for p in result["poses"]] == [0.5, 0.25]
    assert {k["y"] for p in result["poses"] for k in p["keypoints"]} == {0.5}


def test_an_int32_input_receives_the_pixels() -> None:
    tensor = TensorInfo("input", 0, (1, 2, 2, 3), "int32", 0.0, 0)
    prepare = make_preprocessor(ImagePreprocess(mean=(0.0,), std=(1.0,)), tensor, "image")
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 20
    prepared = prepare(image)
    assert prepared.tensor.dtype == np.int32
    assert prepared.tensor[0].tolist() == image.astype(np.int32).tolist()


# --- segmentation ----------------------------------------------------------------------------

SEG_LABELS = ["background", "dog", "sky"]


def class_scores() -> np.ndarray:
    """[1, 8, 8, 3]: sky over the top two rows (25 %), a dog in the bottom-left 4x4 (25 %),
    background elsewhere (50 %)."""
    scores = np.zeros((1, 8, 8, 3), np.float32)
    scores[0, :, :, 0] = 1.0
    scores[0, :2, :, 2] = 2.0
    scores[0, 4:, :4, 1] = 2.0
    return scores


def test_segmentation_reports_class_fractions_of_the_stretched_frame(tmp_path: Path) -> None:
    """Stretched, the whole mask shows the frame; letterboxed, the sky rows would be bars."""
    meta = mf.metadata_buffer([], [mf.TensorMeta(files=[("labels.txt", TENSOR_AXIS_LABELS)])])
    model = mf.with_metadata(
        mf.constant_head(class_scores(), input_shape=(1, 8, 8, 3)),
        meta,
        {"labels.txt": "\n".join(SEG_LABELS)},
    )
    path = mf.save(tmp_path / "deeplab.tflite", model)
    description, result = run(path, wide())
    assert description.task == SegmentationTask()
    assert description.sources["task"] == (
        "segmentation: one [1, 8, 8, 3] output tied to the [8, 8] input (3 class scores per pixel)"
    )
    assert result == {
        "classes": [
            {"index": 0, "label": "background", "fraction": 0.5},
            {"index": 1, "label": "dog", "fraction": 0.25},
            {"index": 2, "label": "sky", "fraction": 0.25},
        ]
    }


@pytest.mark.parametrize("logits", [False, True])
def test_a_single_channel_mask_gets_at_most_one_sigmoid(tmp_path: Path, logits: bool) -> None:
    """Probabilities 0.3 / 0.7 are used as they are (a second sigmoid would lift 0.3 over
    0.5); logits -2 / 2 get one."""
    low, high = (-2.0, 2.0) if logits else (0.3, 0.7)
    mask = np.full((1, 8, 8, 1), low, np.float32)
    mask[0, :2] = high
    model = mf.with_labels(mf.constant_head(mask, input_shape=(1, 8, 8, 3)), ["person"])
    path = mf.save(tmp_path / "selfie.tflite", model)
    _, result = run(path, np.zeros((8, 8, 3), np.uint8))
    assert result == {"classes": [{"index": 0, "label": "person", "fraction": 0.25}]}


# --- the mask on the snapshot path -------------------------------------------------------------


def test_the_daemon_publishes_fractions_and_gives_the_mask_on_request(
    tmp_path: Path, mosquitto: Mosquitto, mqtt_reader: Any, agent_process: Any
) -> None:
    model = mf.with_labels(mf.constant_head(class_scores(), input_shape=(1, 8, 8, 3)), SEG_LABELS)
    path = mf.save(tmp_path / "seg.tflite", model)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "frame.png")
    config = {
        "device": {"id": "cp"},
        "state_dir": str(tmp_path / "state"),
        "control_socket": str(tmp_path / "control.sock"),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "protocol": "5"},
        "pipelines": [
            {
                "name": "seg",
                "source": {"type": "images", "path": str(tmp_path / "frame.png"), "fps": 5},
                "model": str(path),
                "threads": 1,
            }
        ],
    }
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    reader = mqtt_reader(mosquitto, "edgeagent/cp/results/seg")
    agent = agent_process(config_path)
    board = Dashboard(mosquitto, "5")
    try:
        (message,) = reader.wait_for_count(1, lambda m: True, timeout=60)[:1]
        result = json.loads(message.payload)["result"]
        assert [c["fraction"] for c in result["classes"]] == [0.5, 0.25, 0.25]
        assert "mask" not in json.dumps(result)

        snap = board.call("snapshot", {"pipeline": "seg", "mask": True})
        assert snap["stage"] == "succeeded", snap
        (png,) = [m for m in board.replies if m.topic == snap["result"]["topic"]]
        mask = np.asarray(Image.open(io.BytesIO(png.payload)))
        assert mask.shape == (8, 8)
        assert np.bincount(mask.reshape(-1)).tolist() == [32, 16, 16]
        assert mask[0].tolist() == [2] * 8
        jpeg = board.call("snapshot", {"pipeline": "seg"})
        assert jpeg["stage"] == "succeeded", jpeg
    finally:
        board.close()
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
