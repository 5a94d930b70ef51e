"""Data sets and quality measures shared by `models/build.py` and the model tests.

Pure numpy and scikit-learn (plus the LiteRT interpreter to run a model) so the tests can
re-measure the bundled models without TensorFlow. Every data set here is generated or
loaded deterministically from a seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from ai_edge_litert.interpreter import Interpreter
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from edgeagent.hal.audio.sounds import SOUNDS, SoundGenerator
from edgeagent.hal.camera.synthetic import LABELS as SHAPE_LABELS
from edgeagent.hal.camera.synthetic import ShapeScene
from edgeagent.hal.sensor.synthetic_vibration import FAULTS, VibrationGenerator

FloatArray = npt.NDArray[np.float32]

DIGIT_SIZE = 32  # the digits classifier's input side, pixels
DETECTOR_SIZE = 160  # the shapes detector's input side, pixels
DETECTOR_GRID = 10  # cells per side of the detector's output grid (stride 16)
VIBRATION_WINDOW = 256

# --- images ----------------------------------------------------------------------------


def resize_bilinear(image: npt.NDArray[Any], height: int, width: int) -> FloatArray:
    """Stretches an (H, W[, C]) image to (height, width[, C]) with bilinear interpolation
    on pixel centres (what PIL and OpenCV do when shrinking without antialiasing)."""
    src_h, src_w = image.shape[:2]
    ys = np.clip((np.arange(height) + 0.5) * src_h / height - 0.5, 0, src_h - 1)
    xs = np.clip((np.arange(width) + 0.5) * src_w / width - 0.5, 0, src_w - 1)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, src_h - 1)
    x1 = np.minimum(x0 + 1, src_w - 1)
    fy = (ys - y0).astype(np.float32)
    fx = (xs - x0).astype(np.float32)
    img = image.astype(np.float32)
    if img.ndim == 3:
        fy = fy[:, None, None]
        fx = fx[None, :, None]
    else:
        fy = fy[:, None]
        fx = fx[None, :]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def resize_area(image: npt.NDArray[Any], height: int, width: int) -> FloatArray:
    """Stretches by averaging whole source blocks (sizes must divide), like INTER_AREA."""
    src_h, src_w = image.shape[:2]
    if src_h % height or src_w % width:
        raise ValueError(f"{src_h}x{src_w} is not a whole multiple of {height}x{width}")
    fy, fx = src_h // height, src_w // width
    blocks = image.astype(np.float32).reshape(height, fy, width, fx, *image.shape[2:])
    return blocks.mean(axis=(1, 3)).astype(np.float32)


def quantize(values: npt.NDArray[Any], scale: float, zero_point: int) -> npt.NDArray[np.int8]:
    q = np.round(values / scale) + zero_point
    return np.clip(q, -128, 127).astype(np.int8)


# --- running a model ---------------------------------------------------------------------


class TFLiteRunner:
    """Runs a .tflite model one sample at a time through the LiteRT interpreter, taking
    float inputs (quantised here) and returning de-quantised float outputs."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = self.interpreter.get_output_details()

    def quantize_input(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        scale, zero_point = self.input["quantization"]
        if self.input["dtype"] == np.int8:
            return quantize(x, scale, zero_point)
        return x.astype(self.input["dtype"])

    def invoke_raw(self, tensor: npt.NDArray[Any]) -> list[FloatArray]:
        """Runs one already-quantised input (with batch dim) and de-quantises outputs."""
        self.interpreter.set_tensor(self.input["index"], tensor)
        self.interpreter.invoke()
        results = []
        for detail in self.outputs:
            out = self.interpreter.get_tensor(detail["index"])
            scale, zero_point = detail["quantization"]
            if scale:
                out = (out.astype(np.float32) - zero_point) * scale
            results.append(out.astype(np.float32))
        return results

    def predict(self, batch: npt.NDArray[Any]) -> list[FloatArray]:
        """Each output stacked over the samples of `batch` (float, not yet quantised)."""
        per_sample = [self.invoke_raw(self.quantize_input(x[None])) for x in batch]
        return [np.concatenate([s[i] for s in per_sample]) for i in range(len(self.outputs))]


# --- digits --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DigitsSplit:
    train_images: npt.NDArray[np.uint8]  # (n, 8, 8) pixels 0..255, bright strokes on dark
    train_labels: npt.NDArray[np.int64]
    test_images: npt.NDArray[np.uint8]
    test_labels: npt.NDArray[np.int64]


def digits_split(seed: int = 0, test_size: float = 0.25) -> DigitsSplit:
    """scikit-learn's 8x8 digits as 0..255 grayscale, split stratified and seeded."""
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, digits.target, test_size=test_size, stratify=digits.target, random_state=seed
    )
    return DigitsSplit(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


def digit_picture(pixels8: npt.NDArray[np.uint8], size: int = 64) -> npt.NDArray[np.uint8]:
    """An 8x8 digit drawn as a smooth size x size grayscale picture (as a PNG would be)."""
    return np.clip(np.round(resize_bilinear(pixels8, size, size)), 0, 255).astype(np.uint8)


def digit_input(picture: npt.NDArray[Any]) -> FloatArray:
    """The classifier's input for a grayscale picture: stretch to 32x32, then / 255."""
    return (resize_bilinear(picture, DIGIT_SIZE, DIGIT_SIZE) / 255.0)[..., None]


def accuracy(scores: npt.NDArray[Any], labels: npt.NDArray[Any]) -> float:
    return float(np.mean(np.argmax(scores, axis=-1) == labels))


# --- shapes detection ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detection:
    label: int
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 normalised


def shape_frames(
    seeds: Iterable[int], frames_per_scene: int, shapes: int = 4
) -> Iterator[tuple[npt.NDArray[np.uint8], list[dict[str, Any]]]]:
    """640x480 frames and their truth boxes from fresh scenes, frames far apart in time
    (a generator: callers shrink each frame before keeping it)."""
    for seed in seeds:
        scene = ShapeScene(640, 480, shapes=shapes, seed=seed, backgrounds=2)
        for k in range(frames_per_scene):
            yield scene.render(k * 97 + seed % 13)


def detector_input(frame: npt.NDArray[np.uint8]) -> FloatArray:
    """The detector's input: the frame stretched to 160x160, pixels / 255 (mean 0, std 255)."""
    return resize_bilinear(frame, DETECTOR_SIZE, DETECTOR_SIZE) / 255.0


def box_iou(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """IoU between each box of a (n, 4) and each of b (m, 4), boxes as x0, y0, x1, y1."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.asarray(inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12))


def decode_raw(
    head: npt.NDArray[Any], threshold: float = 0.05, iou_threshold: float = 0.45
) -> list[Detection]:
    """Decodes one [N, 4 + classes] raw head (cx, cy, w, h, scores) with per-class NMS."""
    head = np.asarray(head, dtype=np.float64).reshape(-1, head.shape[-1])
    cx, cy, w, h = head[:, 0], head[:, 1], head[:, 2], head[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    detections = []
    for label in range(head.shape[1] - 4):
        scores = head[:, 4 + label]
        keep = np.flatnonzero(scores >= threshold)
        detections += [
            Detection(label, float(scores[i]), tuple(boxes[i]))  # type: ignore[arg-type]
            for i in _nms(boxes[keep], scores[keep], iou_threshold, keep)
        ]
    return detections


def decode_postprocess(
    boxes: npt.NDArray[Any],
    classes: npt.NDArray[Any],
    scores: npt.NDArray[Any],
    count: npt.NDArray[Any],
    threshold: float = 0.0,
) -> list[Detection]:
    """Detections of one TFLite_Detection_PostProcess result (batch 1): boxes arrive as
    ymin, xmin, ymax, xmax and are returned as x0, y0, x1, y1."""
    n = int(np.asarray(count).ravel()[0])
    out = []
    for (y0, x0, y1, x1), label, score in zip(
        boxes.reshape(-1, 4)[:n], classes.ravel()[:n], scores.ravel()[:n], strict=True
    ):
        if score >= threshold:
            out.append(
                Detection(int(label), float(score), (float(x0), float(y0), float(x1), float(y1)))
            )
    return out


def detection_f1(
    detections: Sequence[Sequence[Detection]],
    truths: Sequence[Sequence[dict[str, Any]]],
    threshold: float,
    labels: Sequence[str] = SHAPE_LABELS,
    iou_threshold: float = 0.5,
) -> float:
    """F1 of the detections scoring >= `threshold` (a right label and IoU >= 0.5 is a hit)."""
    hits = found = 0
    total = sum(len(t) for t in truths)
    for ds, ts in zip(detections, truths, strict=True):
        kept = sorted((d for d in ds if d.score >= threshold), key=lambda d: -d.score)
        used = np.zeros(len(ts), dtype=bool)
        found += len(kept)
        for d in kept:
            for i, truth in enumerate(ts):
                same = truth["label"] == labels[d.label]
                iou = box_iou(np.array(d.box), np.array(truth["box"]))[0, 0]
                if same and not used[i] and iou >= iou_threshold:
                    used[i] = True
                    hits += 1
                    break
    return 2.0 * hits / max(found + total, 1)


def _nms(
    boxes: npt.NDArray[Any], scores: npt.NDArray[Any], iou: float, ids: npt.NDArray[Any]
) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while order.size:
        best = order[0]
        kept.append(int(ids[best]))
        overlaps = box_iou(boxes[best], boxes[order[1:]])[0]
        order = order[1:][overlaps <= iou]
    return kept


def mean_average_precision(
    detections: Sequence[Sequence[Detection]],
    truths: Sequence[Sequence[dict[str, Any]]],
    labels: Sequence[str] = SHAPE_LABELS,
    iou_threshold: float = 0.5,
) -> float:
    """VOC-style mAP: per class, all-point interpolated AP at IoU >= `iou_threshold`
    (each truth box matched at most once, highest score first), averaged over classes."""
    aps = []
    for label_id, label in enumerate(labels):
        gt = [np.array([t["box"] for t in ts if t["label"] == label]) for ts in truths]
        total = sum(len(g) for g in gt)
        found = [
            (d.score, image, d.box)
            for image, ds in enumerate(detections)
            for d in ds
            if d.label == label_id
        ]
        found.sort(key=lambda item: -item[0])
        used = [np.zeros(len(g), dtype=bool) for g in gt]
        hits = np.zeros(len(found))
        for rank, (_, image, box) in enumerate(found):
            if not len(gt[image]):
                continue
            overlaps = box_iou(np.array(box), gt[image])[0]
            best = int(np.argmax(overlaps))
            if overlaps[best] >= iou_threshold and not used[image][best]:
                used[image][best] = True
                hits[rank] = 1
        if total == 0:
            continue
        aps.append(_average_precision(hits, total))
    return float(np.mean(aps)) if aps else 0.0


def _average_precision(hits: npt.NDArray[Any], total: int) -> float:
    tp = np.cumsum(hits)
    recall = tp / total
    precision = tp / np.arange(1, len(hits) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


# --- vibration -----------------------------------------------------------------------


def vibration_set(
    seeds: Iterable[int], windows_per_machine: int, fault_fraction: float = 0.5
) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """Windows from one simulated machine per seed; label 0 normal, 1 + fault index."""
    data, labels = [], []
    for seed in seeds:
        generator = VibrationGenerator(1000.0, seed)
        rng = np.random.default_rng(seed + 10_000)
        for _ in range(windows_per_machine):
            fault = int(rng.integers(len(FAULTS))) if rng.random() < fault_fraction else -1
            data.append(generator.window(VIBRATION_WINDOW, FAULTS[fault] if fault >= 0 else None))
            labels.append(fault + 1)
    return np.stack(data), np.array(labels, dtype=np.int64)


def roc_auc(scores: npt.NDArray[Any], is_fault: npt.NDArray[Any]) -> float:
    return float(roc_auc_score(is_fault, scores))


SOUND_RATE = 8000
SOUND_WINDOW = 8000  # one second


def sound_set(
    seeds: Iterable[int], clips_per_class: int
) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """Clips [n, SOUND_WINDOW, 1] of every class in SOUNDS from one generator per seed, and
    their class indices."""
    data, labels = [], []
    for seed in seeds:
        generator = SoundGenerator(SOUND_RATE, seed)
        for _ in range(clips_per_class):
            for index, label in enumerate(SOUNDS):
                data.append(generator.clip(label, SOUND_WINDOW)[:, None])
                labels.append(index)
    return np.stack(data), np.array(labels, dtype=np.int64)
