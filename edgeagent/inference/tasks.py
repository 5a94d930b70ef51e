"""Turns a model's raw outputs into the `result` of an MQTT inference message.

Outputs arrive in their raw dtype and are de-quantised with their TensorInfo first. Floats in
results are rounded (scores and boxes to 4 decimals, raw values to 5, anomaly scores to 5
significant digits). The result of each task:

- classification: {"classes": [{"index": int, "label": str | None, "score": float}, ...]}
  the `top_k` best classes whose score is >= `threshold`, best first. The first output is
  the score vector ([N], [1, N] or any shape with one dimension above 1). Scores are used as
  they are when every value is in [0, 1] and they sum to 1 (within 0.05 plus half a
  quantisation step per class); otherwise they are logits and get a softmax. A single score
  outside [0, 1] gets a sigmoid instead (a softmax of one value is always 1).
- detection: {"detections": [{"index": int, "label": str | None, "score": float,
  "box": [x0, y0, x1, y1]}, ...]}, best first, at most `max_detections`; boxes normalised
  to the source image (letterbox and crop undone) and clipped to [0, 1].
  `postprocess` takes the four outputs of TFLite_Detection_PostProcess, told apart by shape
  (boxes [1, M, 4], count [1]) and by name (scores / classes; the op's own ":1" classes,
  ":2" scores suffixes), in any order; `box_index` places left, top, right, bottom in each
  box. YOLO heads (`yolov8` alias `raw`, `yolov5`) take one [1, A, B] output: one row per
  candidate of (cx, cy, w, h), then (yolov5) an objectness score, then C class scores.
  Which axis holds the rows: the one the labels fit (4 + C or 5 + C values on the other
  axis), else the longer one ([1, 4 + C, N] is the transposed YOLOv8/v11 export). A
  sigmoid is applied once, only when some score lies outside [0, 1]; yolov5 scores are
  objectness x class score. Coordinates are normalised to the model input, or pixels of
  it (`coordinates: pixels`, or `auto` when a box centre lies beyond 1.5). Each row takes
  its best class and class-wise non-maximum suppression removes overlaps. `auto` picks
  postprocess for four outputs and a YOLO layout for one (yolov5 when the labels fit
  5 + C values, else yolov8).
- pose: {"poses": [{"score": float, "keypoints": [{"name": str, "x": float, "y": float,
  "score": float}, ...17, COCO order]}, ...]}, best first; MoveNet [1, 1, 17, 3] (pose
  score: the mean keypoint score) or [1, K, 56] (51 keypoint values, a box, the pose
  score); keypoints are (y, x, score) normalised to the model input, mapped to the source.
- segmentation: {"classes": [{"index": int, "label": str | None, "fraction": float}, ...]}
  largest first (ties by index), each class's share (>= `min_fraction`, > 0) of the
  pixels that show the source image (letterbox bars left out). [1, H, W, C >= 2]: the
  per-pixel argmax; [1, H, W, 1]: foreground where the probability (a sigmoid of it when
  some value lies outside [0, 1]) is >= `threshold`, reported as class 0. The last class
  map is kept (`last_mask`) for the snapshot and never published.
- anomaly: {"score": float, "anomaly": bool, "threshold": float}; `anomaly` is
  score > threshold. `output`: the mean of the first output. `reconstruction`: the mean
  squared error between the normalised input and the first output (equal sizes).
- raw: {"outputs": [{"name": str, "shape": [int, ...], "values": nested lists}, ...]}.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgeagent.config import (
    AnomalyTask,
    AnyTask,
    ClassificationTask,
    DetectionTask,
    PoseTask,
    SegmentationTask,
)
from edgeagent.errors import ModelError
from edgeagent.inference.engine import TensorInfo
from edgeagent.inference.layouts import read_yolo_head
from edgeagent.inference.preprocess import Prepared
from edgeagent.modelfile.tflite import count_output

_log = logging.getLogger(__name__)

# MoveNet's keypoints, in the COCO order every pose result uses.
COCO_KEYPOINTS = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
# A box centre beyond this is in input pixels, not normalised (auto coordinates).
_PIXEL_EVIDENCE = 1.5
Floats = npt.NDArray[np.float32]


class Decoder(Protocol):
    def __call__(self, outputs: list[npt.NDArray[Any]], prepared: Prepared) -> dict[str, Any]:
        """The JSON-able result for one inference's raw outputs."""
        ...


def make_decoder(
    task: AnyTask,
    outputs: Sequence[TensorInfo],
    labels: Sequence[str],
    *,
    inputs: Sequence[TensorInfo] | None = None,
) -> Decoder:
    """The decoder of `task` for a model with these outputs. Raises ModelError when the
    outputs do not fit the task. `inputs`, when given, lets a reconstruction anomaly task
    check the input and output sizes now rather than at the first sample, and gives the
    input size that pixel coordinates are divided by."""
    if not outputs:
        raise ModelError("the model has no outputs to decode")
    if isinstance(task, ClassificationTask):
        return _Classification(task, outputs[0], labels)
    if isinstance(task, DetectionTask):
        if task.layout == "postprocess" or (task.layout == "auto" and len(outputs) == 4):
            return _PostprocessDetection(task, outputs, labels, _input_size(inputs))
        return _YoloDetection(task, outputs, labels, _input_size(inputs))
    if isinstance(task, PoseTask):
        return _Pose(task, outputs)
    if isinstance(task, SegmentationTask):
        return _Segmentation(task, outputs, labels)
    if isinstance(task, AnomalyTask):
        return _Anomaly(task, outputs[0], inputs)
    return _Raw(outputs)


def _input_size(inputs: Sequence[TensorInfo] | None) -> tuple[int, int] | None:
    """(width, height) of an image input [1, H, W, C], else None."""
    if not inputs or len(inputs[0].shape) != 4:
        return None
    return inputs[0].shape[2], inputs[0].shape[1]


def _label(labels: Sequence[str], index: int) -> str | None:
    return labels[index] if 0 <= index < len(labels) else None


def _shape(outputs: Sequence[TensorInfo]) -> str:
    return ", ".join(f"{o.name!r} {list(o.shape)}" for o in outputs)


class _Classification:
    def __init__(self, task: ClassificationTask, output: TensorInfo, labels: Sequence[str]):
        if sum(1 for d in output.shape if d > 1) > 1:
            raise ModelError(
                f"classification needs a vector of class scores, but the model's first output "
                f"{output.name!r} has shape {list(output.shape)}; use task type raw or "
                "detection for this model"
            )
        self._classes = math.prod(output.shape)
        if labels and len(labels) != self._classes:
            _log.warning(
                "the model has %d classes but %d labels; classes without a label get none",
                self._classes,
                len(labels),
            )
        self._task, self._output, self._labels = task, output, labels

    def __call__(self, outputs: list[npt.NDArray[Any]], prepared: Prepared) -> dict[str, Any]:
        scores = self._probabilities(self._output.dequantize(outputs[0]).reshape(-1))
        order = np.argsort(-scores, kind="stable")[: self._task.top_k]
        classes = [
            {"index": int(i), "label": _label(self._labels, int(i)), "score": round(float(s), 4)}
            for i, s in zip(order, scores[order], strict=True)
            if s >= self._task.threshold
        ]
        return {"classes": classes}

    def _probabilities(self, values: Floats) -> Floats:
        outside = bool(np.any(values < 0.0) or np.any(values > 1.0))
        if values.size == 1:
            return _sigmoid(values) if outside else values
        tolerance = 0.05 + 0.5 * self._output.scale * values.size
        if outside or abs(float(values.sum()) - 1.0) > tolerance:
            shifted = np.exp(values - values.max())
            softmax: Floats = (shifted / shifted.sum()).astype(np.float32)
            return softmax
        return values


def _sigmoid(values: Floats) -> Floats:
    return (1.0 / (1.0 + np.exp(-values))).astype(np.float32)


def _to_source(boxes: Floats, prepared: Prepared) -> Floats:
    if prepared.transform is not None:
        boxes = prepared.transform.boxes_to_source(boxes)
    return np.clip(boxes, 0.0, 1.0)


def _detections(
    boxes: Floats, scores: Floats, classes: npt.NDArray[np.int64], labels: Sequence[str]
) -> dict[str, Any]:
    return {
        "detections": [
            {
                "index": int(c),
                "label": _label(labels, int(c)),
                "score": round(float(s), 4),
                "box": [round(float(v), 4) for v in box],
            }
            for box, s, c in zip(boxes, scores, classes, strict=True)
        ]
    }


class _Detection:
    """A detection decoder: it reads its layout's outputs (raising ModelError when they do
    not fit), then refuses pixel coordinates when the model input's size is not known."""

    def __init__(
        self,
        task: DetectionTask,
        outputs: Sequence[TensorInfo],
        labels: Sequence[str],
        size: tuple[int, int] | None,
    ) -> None:
        self._task, self._labels, self._size = task, labels, size
        self._read_outputs(outputs)
        if task.coordinates == "pixels" and size is None:
            raise self._size_unknown(outputs)

    def _read_outputs(self, outputs: Sequence[TensorInfo]) -> None:
        raise NotImplementedError

    def _size_unknown(self, outputs: Sequence[TensorInfo]) -> ModelError:
        raise NotImplementedError


def _postprocess_error(why: str, outputs: Sequence[TensorInfo]) -> ModelError:
    return ModelError(
        f"detection layout postprocess needs the 4 outputs of "
        f"TFLite_Detection_PostProcess (boxes [1, M, 4], classes [1, M], scores "
        f"[1, M], count [1]) but {why}; the model has {_shape(outputs)}"
    )


class _PostprocessDetection(_Detection):
    def _read_outputs(self, outputs: Sequence[TensorInfo]) -> None:
        if len(outputs) != 4:
            raise _postprocess_error(f"there are {len(outputs)}", outputs)
        positions = list(range(4))
        count = count_output([info.shape for info in outputs])
        boxes = [i for i in positions if len(outputs[i].shape) == 3 and outputs[i].shape[2] == 4]
        if count is None or len(boxes) != 1:
            why = "no single count and boxes output stands out by shape"
            raise _postprocess_error(why, outputs)
        pair = [i for i in positions if i not in (count, boxes[0])]
        detections = outputs[boxes[0]].shape[1]
        if any(math.prod(outputs[i].shape) != detections for i in pair):
            why = f"classes and scores do not both hold {detections} values"
            raise _postprocess_error(why, outputs)
        scores, classes, self._by_name = _scores_and_classes(outputs, pair)
        self._count, self._boxes, self._scores, self._classes = count, boxes[0], scores, classes
        self._outputs = outputs

    def _size_unknown(self, outputs: Sequence[TensorInfo]) -> ModelError:
        why = "coordinates are pixels and the model input's size is not known"
        return _postprocess_error(why, outputs)

    def __call__(self, outputs: list[npt.NDArray[Any]], prepared: Prepared) -> dict[str, Any]:
        def value(i: int) -> Floats:
            return self._outputs[i].dequantize(outputs[i])

        boxes = value(self._boxes).reshape(-1, 4)
        scores, classes = value(self._scores).reshape(-1), value(self._classes).reshape(-1)
        if not self._by_name and _integral(scores) and not _integral(classes):
            scores, classes = classes, scores  # told apart by order only, and it was wrong
        count = min(round(float(value(self._count).reshape(-1)[0])), len(scores))
        keep = np.flatnonzero(scores[:count] >= self._task.threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: self._task.max_detections]
        # The op gives (ymin, xmin, ymax, xmax), unless box_index says otherwise; results
        # are (x0, y0, x1, y1).
        xyxy = boxes[keep][:, list(self._task.box_index)]
        if _in_pixels(self._task.coordinates, boxes[:count], self._size):
            xyxy = _normalise(xyxy, self._size)
        return _detections(
            _to_source(xyxy, prepared),
            scores[keep],
            np.rint(classes[keep]).astype(np.int64),
            self._labels,
        )


def _scores_and_classes(outputs: Sequence[TensorInfo], pair: list[int]) -> tuple[int, int, bool]:
    """(scores position, classes position, whether names told them apart)."""
    first, second = pair
    names = [outputs[i].name.lower() for i in pair]
    for keyword, is_scores in (("score", True), ("class", False)):
        hits = [keyword in name for name in names]
        if hits.count(True) == 1:
            hit = pair[hits.index(True)]
            other = second if hit == first else first
            return (hit, other, True) if is_scores else (other, hit, True)
    suffixes = [name.rpartition(":")[2] for name in names]
    if "postprocess" in names[0] and sorted(suffixes) == ["1", "2"]:
        return (pair[suffixes.index("2")], pair[suffixes.index("1")], True)
    # The op's own order: classes before scores.
    return second, first, False


def _integral(values: Floats) -> bool:
    return bool(values.size) and bool(np.all(values == np.rint(values)))


def _in_pixels(coordinates: str, boxes: Floats, size: tuple[int, int] | None) -> bool:
    if coordinates != "auto":
        return coordinates == "pixels"
    return size is not None and boxes.size > 0 and float(np.abs(boxes).max()) > _PIXEL_EVIDENCE


def _normalise(xyxy: Floats, size: tuple[int, int] | None) -> Floats:
    if size is None:
        raise ModelError(
            "the detections are in pixels but the model input's size is not known: "
            "set coordinates: normalized, or give the decoder the model's inputs"
        )
    width, height = size
    scale = np.array([width, height, width, height], np.float32)
    normalised: Floats = (xyxy / scale).astype(np.float32)
    return normalised


class _YoloDetection(_Detection):
    def _read_outputs(self, outputs: Sequence[TensorInfo]) -> None:
        if len(outputs) != 1:
            raise ModelError(
                f"detection layout {self._task.layout} needs one [1, N, 4 + classes] output, "
                f"but the model has {_shape(outputs)}; use layout postprocess for "
                "TFLite_Detection_PostProcess"
            )
        classes = len(self._labels) or None
        self._head = read_yolo_head(outputs[0].shape, self._task.layout, classes)
        self._output = outputs[0]

    def _size_unknown(self, outputs: Sequence[TensorInfo]) -> ModelError:
        del outputs
        return ModelError(
            "detection coordinates are pixels but the model input's size is not known"
        )

    def __call__(self, outputs: list[npt.NDArray[Any]], prepared: Prepared) -> dict[str, Any]:
        head = self._output.dequantize(outputs[0])[0]
        if self._head.transposed:
            head = head.T
        first = 5 if self._head.objectness else 4
        scores = head[:, first:]
        if self._head.objectness:
            both = head[:, 4:]
            if np.any(both < 0.0) or np.any(both > 1.0):
                both = _sigmoid(both)
            scores = both[:, 1:] * both[:, :1]
        elif np.any(scores < 0.0) or np.any(scores > 1.0):
            scores = _sigmoid(scores)
        classes = np.argmax(scores, axis=1)
        best = scores[np.arange(len(scores)), classes]
        candidates = np.flatnonzero(best >= self._task.threshold)
        cx, cy, w, h = (head[candidates, k] for k in range(4))
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        if _in_pixels(self._task.coordinates, head[:, :2], self._size):
            boxes = _normalise(boxes, self._size)
        keep = non_max_suppression(
            boxes,
            best[candidates],
            classes[candidates],
            self._task.iou_threshold,
            self._task.max_detections,
        )
        return _detections(
            _to_source(boxes[keep].astype(np.float32), prepared),
            best[candidates][keep],
            classes[candidates][keep].astype(np.int64),
            self._labels,
        )


_NMS_MATRIX_MAX = 256  # candidates up to which NMS computes every pairwise IoU at once


def non_max_suppression(
    boxes: npt.NDArray[Any],
    scores: npt.NDArray[Any],
    classes: npt.NDArray[Any],
    iou_threshold: float,
    max_detections: int,
) -> npt.NDArray[np.intp]:
    """Greedy class-wise NMS: positions of the kept boxes, best score first. A box is dropped
    when its IoU with a kept box of the same class is above `iou_threshold`. Boxes are
    (x0, y0, x1, y1); equal scores keep their input order."""
    boxes = np.asarray(boxes, dtype=np.float64)
    classes = np.asarray(classes)
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0.0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0.0)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if len(boxes) <= _NMS_MATRIX_MAX:
        # The usual case (candidates are thresholded first): every IoU in a few array
        # operations, then the greedy pass over plain Python values.
        suppresses = _iou(boxes, areas, boxes) > iou_threshold
        suppresses &= classes[:, None] == classes[None, :]
        dropped = [False] * len(boxes)
        kept: list[int] = []
        for index in order.tolist():
            if dropped[index]:
                continue
            kept.append(index)
            if len(kept) >= max_detections:
                break
            for other in np.flatnonzero(suppresses[index]).tolist():
                dropped[other] = True
        return np.asarray(kept, dtype=np.intp)
    keep: list[int] = []
    while order.size and len(keep) < max_detections:
        best, rest = int(order[0]), order[1:]
        keep.append(best)
        iou = _iou(boxes[best : best + 1], areas[best : best + 1], boxes[rest], areas[rest])[0]
        order = rest[(iou <= iou_threshold) | (classes[rest] != classes[best])]
    return np.asarray(keep, dtype=np.intp)


def _iou(
    a: npt.NDArray[np.float64],
    areas_a: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    areas_b: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """IoU of every box of `a` (rows) with every box of `b` (columns); 0 where the union
    is empty. `areas_b` defaults to `areas_a` (b is a)."""
    if areas_b is None:
        areas_b = areas_a
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(width, 0.0) * np.maximum(height, 0.0)
    union = areas_a[:, None] + areas_b[None, :] - inter
    iou: npt.NDArray[np.float64] = np.divide(
        inter, union, out=np.zeros_like(inter), where=union > 0
    )
    return iou


class _Pose:
    def __init__(self, task: PoseTask, outputs: Sequence[TensorInfo]) -> None:
        shape = outputs[0].shape
        self._single = tuple(shape) == (1, 1, 17, 3)
        multi = len(shape) == 3 and shape[0] == 1 and shape[2] == 56
        if not (self._single or multi):
            raise ModelError(
                f"pose needs MoveNet's [1, 1, 17, 3] (SinglePose) or [1, K, 56] (MultiPose) "
                f"output, but the first output {outputs[0].name!r} has shape {list(shape)}"
            )
        self._task, self._output = task, outputs[0]

    def __call__(self, outputs: list[npt.NDArray[Any]], prepared: Prepared) -> dict[str, Any]:
        values = self._output.dequantize(outputs[0])
        if self._single:
            people = values.reshape(1, 17, 3)
            pose_scores = people[:, :, 2].mean(axis=1)
        else:
            rows = values.reshape(-1, 56)
            people = rows[:, :51].reshape(-1, 17, 3)
            pose_scores = rows[:, 55]
        order = np.argsort(-pose_scores, kind="stable")
        poses = []
        for i in order[: self._task.max_poses]:
            if pose_scores[i] < self._task.threshold:
                continue
            xy = people[i][:, [1, 0]]  # (y, x) -> (x, y)
            if prepared.transform is not None:
                xy = prepared.transform.points_to_source(xy)
            xy = np.clip(xy, 0.0, 1.0)
            poses.append(
                {
                    "score": round(float(pose_scores[i]), 4),
                    "keypoints": [
                        {
                            "name": name,
                            "x": round(float(x), 4),
                            "y": round(float(y), 4),
                            "score": round(float(score), 4),
                        }
                        for name, (x, y), score in zip(
                            COCO_KEYPOINTS, xy, people[i][:, 2], strict=True
                        )
                    ],
                }
            )
        return {"poses": poses}


class _Segmentation:
    def __init__(
        self, task: SegmentationTask, outputs: Sequence[TensorInfo], labels: Sequence[str]
    ) -> None:
        shape = outputs[0].shape
        if len(shape) != 4 or shape[0] != 1 or min(shape[1:]) < 1:
            raise ModelError(
                f"segmentation needs one [1, height, width, classes] output, but the first "
                f"output {outputs[0].name!r} has shape {list(shape)}"
            )
        self._task, self._output, self._labels = task, outputs[0], labels
        self.last_mask: npt.NDArray[np.uint8] | None = None  # class per pixel, source area

    def __call__(self, outputs: list[npt.NDArray[Any]], prepared: Prepared) -> dict[str, Any]:
        scores = self._output.dequantize(outputs[0])[0]
        if scores.shape[2] == 1:
            values = scores[:, :, 0]
            if np.any(values < 0.0) or np.any(values > 1.0):
                values = _sigmoid(values)
            mask = (values >= self._task.threshold).astype(np.uint8)
        else:
            mask = np.argmax(scores, axis=2).astype(np.uint8)
        mask = _source_area(mask, prepared)
        self.last_mask = mask
        counts = np.bincount(mask.reshape(-1), minlength=1)
        total = max(int(mask.size), 1)
        present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
        if scores.shape[2] == 1:
            present = [c for c in present if c == 1]
        classes = []
        for c in present:
            fraction = counts[c] / total
            if fraction < self._task.min_fraction:
                continue
            index = 0 if scores.shape[2] == 1 else c
            classes.append(
                {
                    "index": index,
                    "label": _label(self._labels, index),
                    "fraction": round(float(fraction), 4),
                }
            )
        return {"classes": classes}


def _source_area(mask: npt.NDArray[np.uint8], prepared: Prepared) -> npt.NDArray[np.uint8]:
    """The part of `mask` (model coordinates) whose pixel centres show the source image."""
    t = prepared.transform
    if t is None:
        return mask
    height, width = mask.shape
    xs = ((np.arange(width) + 0.5) / width) * t.scale_x + t.offset_x
    ys = ((np.arange(height) + 0.5) / height) * t.scale_y + t.offset_y
    cols = np.flatnonzero((xs >= 0.0) & (xs <= 1.0))
    rows = np.flatnonzero((ys >= 0.0) & (ys <= 1.0))
    if cols.size == 0 or rows.size == 0:
        return mask
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


class _Anomaly:
    def __init__(
        self, task: AnomalyTask, output: TensorInfo, inputs: Sequence[TensorInfo] | None
    ) -> None:
        reconstruction = task.score == "reconstruction"
        if reconstruction and inputs and math.prod(inputs[0].shape) != math.prod(output.shape):
            raise ModelError(
                f"anomaly score reconstruction compares the input with the output, but the "
                f"input {inputs[0].name!r} {list(inputs[0].shape)} and the output "
                f"{output.name!r} {list(output.shape)} differ in size; use score: output"
            )
        self._task, self._output = task, output

    def __call__(self, outputs: list[npt.NDArray[Any]], prepared: Prepared) -> dict[str, Any]:
        values = self._output.dequantize(outputs[0]).reshape(-1)
        if self._task.score == "output":
            score = float(values.mean())
        else:
            original = prepared.normalised.reshape(-1)
            if original.size != values.size:
                raise ModelError(
                    f"anomaly score reconstruction: the input has {original.size} values but "
                    f"the output {self._output.name!r} has {values.size}; use score: output"
                )
            score = float(np.mean(np.square(values - original, dtype=np.float64)))
        score = float(f"{score:.5g}")
        return {
            "score": score,
            "anomaly": score > self._task.threshold,
            "threshold": self._task.threshold,
        }


class _Raw:
    def __init__(self, outputs: Sequence[TensorInfo]) -> None:
        self._outputs = outputs

    def __call__(self, outputs: list[npt.NDArray[Any]], prepared: Prepared) -> dict[str, Any]:
        return {
            "outputs": [
                {
                    "name": info.name,
                    "shape": list(np.shape(raw)),
                    "values": np.round(info.dequantize(raw).astype(np.float64), 5).tolist(),
                }
                for info, raw in zip(self._outputs, outputs, strict=True)
            ]
        }
