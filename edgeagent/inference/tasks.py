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
  ":2" scores suffixes), in any order. `raw` takes one [1, N, 4 + C] head ([1, 4 + C, N] is
  accepted when the labels say C): (cx, cy, w, h) normalised to the model input, then C
  class scores (a sigmoid is applied when any value lies outside [0, 1]); each box takes
  its best class and class-wise non-maximum suppression removes overlaps.
  `auto` picks postprocess for four outputs and raw for one.
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

from edgeagent.config import AnomalyTask, ClassificationTask, DetectionTask, RawTask
from edgeagent.errors import ModelError
from edgeagent.inference.engine import TensorInfo
from edgeagent.inference.preprocess import Prepared

_log = logging.getLogger(__name__)

AnyTask = ClassificationTask | DetectionTask | AnomalyTask | RawTask
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
    check the input and output sizes now rather than at the first sample."""
    if not outputs:
        raise ModelError("the model has no outputs to decode")
    if isinstance(task, ClassificationTask):
        return _Classification(task, outputs[0], labels)
    if isinstance(task, DetectionTask):
        layout = task.layout
        if layout == "auto":
            layout = "postprocess" if len(outputs) == 4 else "raw"
        if layout == "postprocess":
            return _PostprocessDetection(task, outputs, labels)
        return _RawDetection(task, outputs, labels)
    if isinstance(task, AnomalyTask):
        return _Anomaly(task, outputs[0], inputs)
    return _Raw(outputs)


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


class _PostprocessDetection:
    def __init__(
        self, task: DetectionTask, outputs: Sequence[TensorInfo], labels: Sequence[str]
    ) -> None:
        def fail(why: str) -> ModelError:
            return ModelError(
                f"detection layout postprocess needs the 4 outputs of "
                f"TFLite_Detection_PostProcess (boxes [1, M, 4], classes [1, M], scores "
                f"[1, M], count [1]) but {why}; the model has {_shape(outputs)}"
            )

        if len(outputs) != 4:
            raise fail(f"there are {len(outputs)}")
        positions = list(range(4))
        count = [i for i in positions if math.prod(outputs[i].shape) == 1]
        boxes = [i for i in positions if len(outputs[i].shape) == 3 and outputs[i].shape[2] == 4]
        if len(count) != 1 or len(boxes) != 1:
            raise fail("no single count and boxes output stands out by shape")
        pair = [i for i in positions if i not in (count[0], boxes[0])]
        detections = outputs[boxes[0]].shape[1]
        if any(math.prod(outputs[i].shape) != detections for i in pair):
            raise fail(f"classes and scores do not both hold {detections} values")
        scores, classes, self._by_name = _scores_and_classes(outputs, pair)
        self._count, self._boxes, self._scores, self._classes = count[0], boxes[0], scores, classes
        self._outputs, self._task, self._labels = outputs, task, labels

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
        # The op gives (ymin, xmin, ymax, xmax); results are (x0, y0, x1, y1).
        xyxy = boxes[keep][:, [1, 0, 3, 2]]
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


class _RawDetection:
    def __init__(
        self, task: DetectionTask, outputs: Sequence[TensorInfo], labels: Sequence[str]
    ) -> None:
        shape = outputs[0].shape
        if len(outputs) != 1 or len(shape) != 3 or shape[0] != 1:
            raise ModelError(
                f"detection layout raw needs one [1, N, 4 + classes] output, but the model has "
                f"{_shape(outputs)}; use layout postprocess for TFLite_Detection_PostProcess"
            )
        # [1, 4 + C, N] (YOLOv8-style exports) only when the labels pin C down.
        self._transposed = bool(labels) and shape[1] == 4 + len(labels) != shape[2]
        if (shape[1] if self._transposed else shape[2]) < 5:
            raise ModelError(
                f"detection layout raw needs 4 box values and at least one class score per "
                f"row, but the output {outputs[0].name!r} has shape {list(shape)}"
            )
        self._output, self._task, self._labels = outputs[0], task, labels

    def __call__(self, outputs: list[npt.NDArray[Any]], prepared: Prepared) -> dict[str, Any]:
        head = self._output.dequantize(outputs[0])[0]
        if self._transposed:
            head = head.T
        scores = head[:, 4:]
        if np.any(scores < 0.0) or np.any(scores > 1.0):
            scores = _sigmoid(scores)
        classes = np.argmax(scores, axis=1)
        best = scores[np.arange(len(scores)), classes]
        candidates = np.flatnonzero(best >= self._task.threshold)
        cx, cy, w, h = (head[candidates, k] for k in range(4))
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
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
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0.0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0.0)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_detections:
        best, rest = int(order[0]), order[1:]
        keep.append(best)
        width = np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(
            boxes[best, 0], boxes[rest, 0]
        )
        height = np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(
            boxes[best, 1], boxes[rest, 1]
        )
        inter = np.maximum(width, 0.0) * np.maximum(height, 0.0)
        union = areas[best] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[(iou <= iou_threshold) | (classes[rest] != classes[best])]
    return np.asarray(keep, dtype=np.intp)


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
