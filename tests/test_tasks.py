"""make_decoder: classification, detection (both layouts, NMS), anomaly and raw results."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.config import (
    AnomalyTask,
    ClassificationTask,
    DetectionTask,
    ImagePreprocess,
    RawTask,
)
from edgeagent.errors import ModelError
from edgeagent.inference import (
    Engine,
    ImageTransform,
    Prepared,
    TensorInfo,
    make_decoder,
    make_preprocessor,
)
from edgeagent.inference.tasks import non_max_suppression
from tests import modelfactory as mf

NO_IMAGE = Prepared(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), None)


def info(
    name: str,
    shape: tuple[int, ...],
    dtype: str = "float32",
    scale: float = 0.0,
    zero_point: int = 0,
) -> TensorInfo:
    return TensorInfo(name, 0, shape, dtype, scale, zero_point)


# Classification


def classify(
    values: list[float], task: ClassificationTask, labels: list[str] | None = None
) -> list[dict[str, object]]:
    out = info("scores", (1, len(values)))
    decode = make_decoder(task, [out], labels or [])
    return decode([np.array([values], np.float32)], NO_IMAGE)["classes"]


def test_top_k_above_threshold_best_first_with_labels() -> None:
    classes = classify(
        [0.1, 0.5, 0.05, 0.35], ClassificationTask(top_k=3, threshold=0.2), ["a", "b", "c"]
    )
    assert classes == [
        {"index": 1, "label": "b", "score": 0.5},
        {"index": 3, "label": None, "score": 0.35},
    ]


def test_logits_get_a_softmax() -> None:
    classes = classify([2.0, 1.0, -1.0], ClassificationTask(top_k=3))
    expected = np.exp([2.0, 1.0, -1.0]) / np.exp([2.0, 1.0, -1.0]).sum()
    assert [c["score"] for c in classes] == [round(float(v), 4) for v in expected]


def test_values_in_0_1_that_do_not_sum_to_one_get_a_softmax() -> None:
    classes = classify([0.9, 0.8, 0.1], ClassificationTask(top_k=3))
    assert sum(c["score"] for c in classes) == pytest.approx(1.0, abs=1e-3)
    assert classes[0]["score"] < 0.5


def test_probabilities_are_kept_even_when_quantised() -> None:
    # A uint8 softmax output (scale 1/256) sums to 1 only within its quantisation error.
    out = info("probs", (1, 4), "uint8", 1 / 256, 0)
    decode = make_decoder(ClassificationTask(top_k=4), [out], [])
    raw = np.array([[200, 40, 10, 3]], np.uint8)  # sums to 253/256
    classes = decode([raw], NO_IMAGE)["classes"]
    assert [c["score"] for c in classes] == [round(v / 256, 4) for v in (200, 40, 10, 3)]


def test_a_single_logit_gets_a_sigmoid() -> None:
    classes = classify([2.0], ClassificationTask(top_k=1))
    assert classes[0]["score"] == round(1 / (1 + np.exp(-2.0)), 4)
    assert classify([0.3], ClassificationTask(top_k=1))[0]["score"] == 0.3


def test_classification_needs_a_score_vector() -> None:
    with pytest.raises(ModelError, match=r"vector of class scores.*\[1, 10, 4\]"):
        make_decoder(ClassificationTask(), [info("boxes", (1, 10, 4))], [])


# Non-maximum suppression


def reference_nms(
    boxes: list[list[float]],
    scores: list[float],
    classes: list[int],
    iou_threshold: float,
    limit: int,
) -> list[int]:
    def iou(a: list[float], b: list[float]) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        inter = max(w, 0.0) * max(h, 0.0)
        area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
        area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
        union = area_a + area_b - inter
        return inter / union if union > 0 else 0.0

    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if len(kept) == limit:
            break
        if all(classes[k] != classes[i] or iou(boxes[k], boxes[i]) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


@st.composite
def box_sets(draw: st.DrawFn) -> tuple[list[list[float]], list[float], list[int]]:
    n = draw(st.integers(0, 30))
    coordinate = st.floats(0.0, 1.0, allow_nan=False, width=32)
    boxes = []
    for _ in range(n):
        x0, x1 = sorted((draw(coordinate), draw(coordinate)))
        y0, y1 = sorted((draw(coordinate), draw(coordinate)))
        boxes.append([x0, y0, x1, y1])
    scores = [
        draw(st.sampled_from([0.1, 0.5, 0.9]) | st.floats(0.0, 1.0, width=32)) for _ in range(n)
    ]
    classes = [draw(st.integers(0, 2)) for _ in range(n)]
    return boxes, scores, classes


def kept_by_nms(
    data: tuple[list[list[float]], list[float], list[int]], iou_threshold: float, limit: int
) -> list[int]:
    boxes, scores, classes = data
    kept = non_max_suppression(
        np.array(boxes, np.float64).reshape(-1, 4),
        np.array(scores),
        np.array(classes),
        iou_threshold,
        limit,
    )
    result: list[int] = kept.tolist()
    return result


@settings(max_examples=200, deadline=None)
@given(data=box_sets(), iou_threshold=st.floats(0.05, 1.0), limit=st.integers(1, 40))
def test_nms_matches_a_simple_reference_loop(
    data: tuple[list[list[float]], list[float], list[int]], iou_threshold: float, limit: int
) -> None:
    kept = kept_by_nms(data, iou_threshold, limit)
    assert kept == reference_nms(*data, iou_threshold, limit)


@settings(max_examples=100, deadline=None)
@given(data=box_sets(), iou_threshold=st.floats(0.05, 1.0), limit=st.integers(1, 40))
def test_nms_on_many_candidates_matches_the_reference_too(
    data: tuple[list[list[float]], list[float], list[int]], iou_threshold: float, limit: int
) -> None:
    """Above `_NMS_MATRIX_MAX` candidates NMS compares one kept box at a time instead of
    every pair at once (memory); both ways keep the same boxes."""
    from unittest import mock

    from edgeagent.inference import tasks

    with mock.patch.object(tasks, "_NMS_MATRIX_MAX", 0):
        kept = kept_by_nms(data, iou_threshold, limit)
    assert kept == reference_nms(*data, iou_threshold, limit)


# Raw detection heads


def head(rows: list[list[float]]) -> np.ndarray:
    return np.array([rows], np.float32)


def test_raw_head_drops_overlaps_of_a_class_but_keeps_other_classes() -> None:
    rows = [
        [0.5, 0.5, 0.4, 0.4, 0.9, 0.0],  # class 0, best
        [0.52, 0.5, 0.4, 0.4, 0.8, 0.1],  # class 0, overlaps the first: dropped
        [0.5, 0.5, 0.4, 0.4, 0.1, 0.7],  # class 1, same place: kept
        [0.1, 0.1, 0.1, 0.1, 0.3, 0.2],  # below threshold
    ]
    decode = make_decoder(DetectionTask(threshold=0.5), [info("head", (1, 4, 6))], ["cat", "dog"])
    detections = decode([head(rows)], NO_IMAGE)["detections"]
    assert detections == [
        {"index": 0, "label": "cat", "score": 0.9, "box": [0.3, 0.3, 0.7, 0.7]},
        {"index": 1, "label": "dog", "score": 0.7, "box": [0.3, 0.3, 0.7, 0.7]},
    ]


def test_raw_head_logits_get_a_sigmoid_and_boxes_are_clipped() -> None:
    decode = make_decoder(DetectionTask(layout="raw", threshold=0.5), [info("head", (1, 1, 5))], [])
    (detection,) = decode([head([[0.95, 0.5, 0.2, 0.2, 3.0]])], NO_IMAGE)["detections"]
    assert detection["score"] == round(1 / (1 + np.exp(-3.0)), 4)
    assert detection["box"] == [0.85, 0.4, 1.0, 0.6]


def test_raw_head_is_dequantised_and_limited_to_max_detections() -> None:
    out = info("head", (1, 3, 5), "int8", 0.01, -100)
    rows = np.array(
        [[[0.2, 0.2, 0.1, 0.1, 0.9], [0.5, 0.5, 0.1, 0.1, 0.8], [0.8, 0.8, 0.1, 0.1, 0.7]]]
    )
    quantised = out.quantize(rows)
    decode = make_decoder(DetectionTask(max_detections=2), [out], [])
    detections = decode([quantised], NO_IMAGE)["detections"]
    assert [d["score"] for d in detections] == [0.9, 0.8]
    assert detections[0]["box"] == [0.15, 0.15, 0.25, 0.25]


def test_a_transposed_head_is_read_when_the_labels_say_how_many_classes() -> None:
    rows = np.array([[0.5, 0.5, 0.2, 0.2, 0.1, 0.9], [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]], np.float32)
    transposed = rows.T[np.newaxis]  # [1, 4 + 2, 2]
    decode = make_decoder(DetectionTask(), [info("head", (1, 6, 2))], ["a", "b"])
    (detection,) = decode([transposed], NO_IMAGE)["detections"]
    assert (detection["label"], detection["box"]) == ("b", [0.4, 0.4, 0.6, 0.6])


def test_raw_layout_rejects_outputs_that_are_not_a_head() -> None:
    with pytest.raises(ModelError, match="one \\[1, N, 4 \\+ classes\\] output"):
        make_decoder(DetectionTask(layout="raw"), [info("x", (1, 10))], [])
    with pytest.raises(ModelError, match="at least one class score"):
        make_decoder(DetectionTask(layout="raw"), [info("x", (1, 10, 4))], [])


# TFLite_Detection_PostProcess outputs


def postprocess_outputs(
    names: dict[str, str],
) -> tuple[dict[str, TensorInfo], dict[str, np.ndarray]]:
    infos = {
        "boxes": info(names["boxes"], (1, 3, 4)),
        "classes": info(names["classes"], (1, 3)),
        "scores": info(names["scores"], (1, 3)),
        "count": info(names["count"], (1,)),
    }
    values = {
        "boxes": np.array(
            [[[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.7], [0.0, 0.0, 1.0, 1.0]]], np.float32
        ),
        "classes": np.array([[2.0, 0.0, 1.0]], np.float32),
        "scores": np.array([[0.6, 0.95, 0.9]], np.float32),
        "count": np.array([2.0], np.float32),
    }
    return infos, values


EXPECTED_POSTPROCESS = [
    {"index": 0, "label": "person", "score": 0.95, "box": [0.5, 0.5, 0.7, 0.9]},
    {"index": 2, "label": "car", "score": 0.6, "box": [0.2, 0.1, 0.4, 0.3]},
]


@pytest.mark.parametrize(
    "names",
    [
        {
            "boxes": "detection_boxes",
            "classes": "detection_classes",
            "scores": "detection_scores",
            "count": "num_detections",
        },
        {
            "boxes": "TFLite_Detection_PostProcess",
            "classes": "TFLite_Detection_PostProcess:1",
            "scores": "TFLite_Detection_PostProcess:2",
            "count": "TFLite_Detection_PostProcess:3",
        },
    ],
)
@pytest.mark.parametrize("seed", range(4))
def test_postprocess_outputs_are_found_in_any_order(names: dict[str, str], seed: int) -> None:
    infos, values = postprocess_outputs(names)
    order = list(infos)
    random.Random(seed).shuffle(order)
    decode = make_decoder(
        DetectionTask(threshold=0.5), [infos[k] for k in order], ["person", "bike", "car"]
    )
    result = decode([values[k] for k in order], NO_IMAGE)
    # The third box scores 0.9 but lies beyond the count of 2.
    assert result["detections"] == EXPECTED_POSTPROCESS


def test_postprocess_outputs_without_telling_names_fall_back_to_values() -> None:
    names = {
        "boxes": "Identity",
        "classes": "Identity_1",
        "scores": "Identity_2",
        "count": "Identity_3",
    }
    infos, values = postprocess_outputs(names)
    # Scores listed before classes, names do not say which is which: the integral values
    # give the classes away.
    order = ["count", "scores", "boxes", "classes"]
    infos = {
        k: TensorInfo(f"StatefulPartitionedCall:{n}", n, v.shape, v.dtype, 0.0, 0)
        for n, (k, v) in enumerate(infos.items())
    }
    decode = make_decoder(
        DetectionTask(threshold=0.5), [infos[k] for k in order], ["person", "bike", "car"]
    )
    assert decode([values[k] for k in order], NO_IMAGE)["detections"] == EXPECTED_POSTPROCESS


def test_postprocess_layout_needs_four_outputs() -> None:
    with pytest.raises(ModelError, match="4 outputs of TFLite_Detection_PostProcess"):
        make_decoder(DetectionTask(layout="postprocess"), [info("head", (1, 10, 6))], [])


# Boxes back on the source image


def test_boxes_are_un_letterboxed_to_the_source_image() -> None:
    prepare = make_preprocessor(
        ImagePreprocess(resize="letterbox"), info("image", (1, 64, 64, 3)), "image"
    )
    prepared = prepare(np.zeros((480, 640, 3), np.uint8))
    # In the model's 64x64 input the picture spans rows 8..56: y 0.125..0.875.
    decode = make_decoder(DetectionTask(threshold=0.5), [info("head", (1, 2, 5))], [])
    rows = [[0.625, 0.5625, 0.25, 0.125, 0.9], [0.5, 0.05, 0.2, 0.1, 0.8]]
    first, second = decode([head(rows)], prepared)["detections"]
    assert first["box"] == pytest.approx([0.5, 0.5, 0.75, 0.6667], abs=1e-4)
    # A box that reaches into the bar is clipped at the picture's edge.
    assert second["box"] == pytest.approx([0.4, 0.0, 0.6, 0.0], abs=1e-4)


def test_a_crop_transform_moves_boxes_into_the_centre() -> None:
    prepared = Prepared(NO_IMAGE.tensor, NO_IMAGE.normalised, ImageTransform(0.5, 1.0, 0.25, 0.0))
    decode = make_decoder(DetectionTask(), [info("head", (1, 1, 5))], [])
    (detection,) = decode([head([[0.5, 0.5, 1.0, 1.0, 0.9]])], prepared)["detections"]
    assert detection["box"] == [0.25, 0.0, 0.75, 1.0]


def test_detection_end_to_end_with_a_real_model(tmp_path: Path) -> None:
    rows = np.array(
        [[[0.5, 0.5, 0.5, 0.25, 0.2, 0.95], [0.5, 0.5, 0.5, 0.25, 0.9, 0.1]]], np.float32
    )
    path = mf.save(tmp_path / "det.tflite", mf.constant_head(rows, (1, 32, 32, 3), "uint8"))
    engine = Engine.load(path, accelerator="cpu")
    prepare = make_preprocessor(ImagePreprocess(resize="letterbox"), engine.inputs[0], "image")
    decode = make_decoder(DetectionTask(), engine.outputs, ["cat", "dog"])
    prepared = prepare(np.full((240, 480, 3), 90, np.uint8))  # 2:1, so bars above and below
    result = decode(engine.invoke([prepared.tensor]), prepared)
    # Model box y 0.375..0.625 over a picture at y 0.25..0.75 -> source y 0.25..0.75.
    assert result == {
        "detections": [
            {"index": 1, "label": "dog", "score": 0.95, "box": [0.25, 0.25, 0.75, 0.75]},
            {"index": 0, "label": "cat", "score": 0.9, "box": [0.25, 0.25, 0.75, 0.75]},
        ]
    }


# Anomaly


def test_anomaly_output_score_is_the_mean_of_the_first_output() -> None:
    out = info("score", (1, 2), "int8", 0.05, 0)
    decode = make_decoder(AnomalyTask(threshold=1.0), [out], [])
    assert decode([np.array([[20, 30]], np.int8)], NO_IMAGE) == {
        "score": 1.25,
        "anomaly": True,
        "threshold": 1.0,
    }
    assert decode([np.array([[10, 10]], np.int8)], NO_IMAGE)["anomaly"] is False


def test_anomaly_reconstruction_is_the_mean_squared_error() -> None:
    window = info("window", (1, 4, 1))
    out = info("reconstruction", (1, 4))
    decode = make_decoder(
        AnomalyTask(score="reconstruction", threshold=0.1), [out], [], inputs=[window]
    )
    original = np.array([[[0.0], [1.0], [2.0], [3.0]]], np.float32)
    prepared = Prepared(original, original, None)
    result = decode([np.array([[0.0, 1.0, 2.0, 2.0]], np.float32)], prepared)
    assert result == {"score": 0.25, "anomaly": True, "threshold": 0.1}


def test_anomaly_reconstruction_needs_matching_sizes() -> None:
    task = AnomalyTask(score="reconstruction", threshold=0.1)
    with pytest.raises(
        ModelError, match=r"input 'window' \[1, 4, 1\] and the output 'code' \[1, 2\]"
    ):
        make_decoder(task, [info("code", (1, 2))], [], inputs=[info("window", (1, 4, 1))])
    decode = make_decoder(task, [info("code", (1, 2))], [])
    with pytest.raises(ModelError, match="the input has 4 values"):
        decode(
            [np.zeros((1, 2), np.float32)],
            Prepared(np.zeros((1, 4)), np.zeros((1, 4), np.float32), None),
        )


# Raw


def test_raw_outputs_are_dequantised_nested_lists() -> None:
    outputs = [info("a", (1, 2), "uint8", 0.5, 10), info("b", (2, 2))]
    decode = make_decoder(RawTask(), outputs, [])
    result = decode(
        [np.array([[10, 13]], np.uint8), np.array([[0.1, 0.2], [0.3, 1 / 3]], np.float32)], NO_IMAGE
    )
    assert result == {
        "outputs": [
            {"name": "a", "shape": [1, 2], "values": [[0.0, 1.5]]},
            {"name": "b", "shape": [2, 2], "values": [[0.1, 0.2], [0.3, 0.33333]]},
        ]
    }
    json.dumps(result)
