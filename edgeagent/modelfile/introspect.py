"""What a model says about itself: its task, labels and input preparation, inferred from
its TFLite metadata and its graph when no manifest and no pipeline config says them.

Each inference carries its reason, for people ("detection: TFLite_Detection_PostProcess
op"). The task, first rule that applies:

1. An Ultralytics export's own metadata (`task` in its packed `metadata.json`): `detect`
   with one YOLO head is detection, `classify` with a score vector is classification;
   other Ultralytics tasks (segment, pose, obb) run raw, saying so.
2. A `TFLite_Detection_PostProcess` operator with four outputs: detection (postprocess),
   with the box order and coordinate type of the metadata's BoundingBoxProperties and
   the score threshold of its ScoreThresholdingOptions.
3. One output, by shape: [1, 1, 17, 3] pose (MoveNet SinglePose); [1, K <= 10, 56] pose
   (MultiPose); [1, H, W, C] on an image input whose size is an integer multiple of H, W:
   segmentation; one dimension above 1 ([1, N]): classification, unless the input is not
   an image and has as many values (an autoencoder cannot be told from a classifier:
   raw); [1, A, B] on an image input: YOLO detection (`tasks.read_yolo_head`).
4. Otherwise raw, with the reason.

Image input preparation: the metadata's NormalizationOptions (mean, std) and colour space
when it has them; an Ultralytics export is letterboxed RGB pixel / 255; else the mean and
std that map 0..255 onto the input's quantised range, so that a uint8 input receives the
raw pixel (as the TFLite Task Library feeds quantised models), and float inputs get
[0, 1]. YOLO and pose models are letterboxed (they are trained on padded images), others
stretched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgeagent.config import (
    AnyTask,
    ClassificationTask,
    DetectionTask,
    ImagePreprocess,
    PoseTask,
    RawTask,
    SegmentationTask,
)
from edgeagent.errors import ModelError
from edgeagent.inference.layouts import read_yolo_head
from edgeagent.modelfile.metadata import (
    BOX_BOUNDARIES,
    COLOR_GRAYSCALE,
    COORDINATES_PIXEL,
    TensorMetadata,
)
from edgeagent.modelfile.tflite import POSTPROCESS_OP, ModelFile, TensorDescription

_MAX_MULTIPOSE = 10


@dataclass(frozen=True, slots=True)
class Inferred:
    """What the model's metadata and graph say; every field has its reason."""

    task: AnyTask
    task_reason: str
    labels: tuple[str, ...]
    labels_reason: str
    preprocess: ImagePreprocess | None  # None: not an image model (windows as they are)
    preprocess_reason: str
    about: str  # the metadata's model name and description ("" when none)


def infer_description(model: ModelFile) -> Inferred:
    """The task, labels and preprocess of `model` by the rules of the module docstring."""
    task, task_reason = _task(model)
    preprocess, preprocess_reason = _preprocess(model, task)
    meta = model.metadata
    about = ""
    if meta is not None and (meta.name or meta.description):
        about = ": ".join(part for part in (meta.name, meta.description) if part)
    labels_reason = f"from {model.labels_source}" if model.labels else "none in the model"
    return Inferred(
        task, task_reason, model.labels, labels_reason, preprocess, preprocess_reason, about
    )


def _image_input(model: ModelFile) -> TensorDescription | None:
    if len(model.inputs) != 1:
        return None
    shape = model.inputs[0].shape
    if len(shape) == 4 and shape[0] == 1 and shape[3] in (1, 3):
        return model.inputs[0]
    return None


def _shapes(outputs: tuple[TensorDescription, ...]) -> str:
    return ", ".join(str(list(o.shape)) for o in outputs) or "none"


def _task(model: ModelFile) -> tuple[AnyTask, str]:
    outputs = model.outputs
    image = _image_input(model)
    classes = len(model.labels) or None
    export = model.export
    if export is not None and export.task:
        where = f"Ultralytics export (task {export.task!r} in {export.file})"
        if export.task == "detect" and len(outputs) == 1:
            try:
                layout, why = _yolo_layout(outputs[0].shape, classes)
            except ModelError as exc:
                return RawTask(), f"raw: {where}, but {exc}"
            return DetectionTask(layout=layout), f"detection: {where}; YOLO head {why}"
        if export.task == "classify" and _score_vector(outputs[0].shape):
            return ClassificationTask(), f"classification: {where}"
        return RawTask(), (
            f"raw: {where}; the agent decodes Ultralytics detect and classify models only "
            f"(outputs {_shapes(outputs)}); set the task in the pipeline if another fits"
        )
    if POSTPROCESS_OP in model.operators and len(outputs) == 4:
        return _postprocess_task(model)
    if len(outputs) != 1:
        return RawTask(), (
            f"raw: {len(outputs)} outputs ({_shapes(outputs)}) and no "
            f"{POSTPROCESS_OP} op: no rule tells the task; set it in the pipeline"
        )
    shape = tuple(outputs[0].shape)
    if shape == (1, 1, 17, 3):
        return PoseTask(), "pose: one [1, 1, 17, 3] output (MoveNet SinglePose keypoints)"
    if len(shape) == 3 and shape[0] == 1 and shape[2] == 56 and 1 <= shape[1] <= _MAX_MULTIPOSE:
        return PoseTask(), f"pose: one {list(shape)} output (MoveNet MultiPose)"
    if image is not None and len(shape) == 4 and _tied(image.shape, shape):
        kind = "a sigmoid mask" if shape[3] == 1 else f"{shape[3]} class scores per pixel"
        return SegmentationTask(), (
            f"segmentation: one {list(shape)} output tied to the {list(image.shape[1:3])} "
            f"input ({kind})"
        )
    if _score_vector(shape):
        size = int(np.prod(shape))
        if size == 1:
            return RawTask(), (
                f"raw: one {list(shape)} output holds a single value (an anomaly score or a "
                "binary class): set the task in the pipeline"
            )
        inputs = model.inputs
        if image is None and len(inputs) == 1 and int(np.prod(inputs[0].shape)) == size:
            return RawTask(), (
                f"raw: the {list(shape)} output is as large as the input (an autoencoder or a "
                "classifier: the graph cannot tell); set the task in the pipeline"
            )
        return ClassificationTask(), f"classification: one {list(shape)} output"
    if image is not None and len(shape) == 3 and shape[0] == 1:
        try:
            layout, why = _yolo_layout(shape, classes)
        except ModelError as exc:
            return RawTask(), f"raw: one {list(shape)} output is not a YOLO head ({exc})"
        return DetectionTask(layout=layout), (
            f"detection: one {list(shape)} output read as a {layout} head ({why})"
        )
    return RawTask(), f"raw: no rule fits the output {list(shape)}; set the task in the pipeline"


def _yolo_layout(
    shape: tuple[int, ...], classes: int | None
) -> tuple[Literal["yolov5", "yolov8"], str]:
    """The detection layout of a YOLO head of `shape`, and why; ModelError when `shape`
    is not one."""
    head = read_yolo_head(shape, "auto", classes)
    return ("yolov5" if head.objectness else "yolov8"), head.reason


def _score_vector(shape: tuple[int, ...]) -> bool:
    return len(shape) in (1, 2) and sum(1 for d in shape if d > 1) <= 1


def _tied(image: tuple[int, ...], output: tuple[int, ...]) -> bool:
    """Whether an [1, H, W, C] output is the input image at an integer scale."""
    height, width = image[1], image[2]
    out_h, out_w = output[1], output[2]
    if output[0] != 1 or out_h < 2 or out_w < 2 or height % out_h or width % out_w:
        return False
    return height // out_h == width // out_w


def _postprocess_task(model: ModelFile) -> tuple[DetectionTask, str]:
    notes: list[str] = []
    update: dict[str, object] = {"layout": "postprocess"}
    meta = model.metadata
    outputs_meta: tuple[TensorMetadata, ...] = meta.outputs if meta is not None else ()
    for tensor in outputs_meta:
        if tensor.box is not None:
            box = tensor.box
            if len(box.index) == 4 and sorted(box.index) == [0, 1, 2, 3]:
                update["box_index"] = tuple(box.index)
                notes.append(f"box order {list(box.index)} from metadata")
            elif not box.index and box.type == BOX_BOUNDARIES:
                update["box_index"] = (0, 1, 2, 3)
                notes.append("box order left, top, right, bottom from metadata")
            if box.coordinates == COORDINATES_PIXEL:
                update["coordinates"] = "pixels"
                notes.append("pixel coordinates from metadata")
            else:
                update["coordinates"] = "normalized"
        if tensor.score_threshold is not None and 0.0 <= tensor.score_threshold <= 1.0:
            update["threshold"] = round(tensor.score_threshold, 4)
            notes.append(f"threshold {update['threshold']} from metadata")
    task = DetectionTask.model_validate(update)
    return task, "; ".join([f"detection: {POSTPROCESS_OP} op", *notes])


def _preprocess(model: ModelFile, task: AnyTask) -> tuple[ImagePreprocess | None, str]:
    image = _image_input(model)
    if image is None:
        return None, "not an image input: sensor windows as they are"
    channels = image.shape[3]
    yolo = isinstance(task, DetectionTask) and task.layout in ("yolov5", "yolov8")
    resize = "letterbox" if yolo or isinstance(task, PoseTask) else "stretch"
    why_resize = (
        "letterbox, as YOLO and pose models are trained" if resize == "letterbox" else "stretched"
    )
    if model.export is not None:
        spec = ImagePreprocess(resize="letterbox", color="rgb", mean=(0.0,), std=(255.0,))
        return spec, f"Ultralytics export ({model.export.file}): letterbox, RGB, pixel / 255"
    meta = model.metadata
    tensor = meta.inputs[0] if meta is not None and meta.inputs else None
    color = "gray" if channels == 1 else "rgb"
    color_note = ""
    if tensor is not None and tensor.color_space == COLOR_GRAYSCALE:
        color, color_note = "gray", ", grayscale from metadata"
    if tensor is not None and tensor.mean and tensor.std:
        spec = ImagePreprocess(resize=resize, color=color, mean=tensor.mean, std=tensor.std)
        return spec, f"mean and std from metadata{color_note}; {why_resize}"
    mean, std, why = _from_quantisation(image)
    spec = ImagePreprocess(resize=resize, color=color, mean=(mean,), std=(std,))
    return spec, f"{why}{color_note}; {why_resize}"


def _from_quantisation(tensor: TensorDescription) -> tuple[float, float, str]:
    """(mean, std, why) that map pixels 0..255 onto the input's representable range."""
    if tensor.dtype == "float32" or tensor.dtype not in ("uint8", "int8", "int32"):
        return 0.0, 255.0, "no normalisation in the metadata, [0, 1] assumed for a float input"
    if tensor.scale == 0.0:
        return 0.0, 1.0, f"raw pixels for an unquantised {tensor.dtype} input"
    info = np.iinfo(np.dtype(tensor.dtype))
    low = (float(info.min) - tensor.zero_point) * tensor.scale
    high = (float(min(info.max, info.min + 255)) - tensor.zero_point) * tensor.scale
    std = 255.0 / (high - low)
    mean = -low * std
    return (
        round(mean, 4) + 0.0,  # + 0.0: no "-0" in messages
        round(std, 4),
        f"no normalisation in the metadata: pixels 0..255 mapped onto the {tensor.dtype} "
        f"input's range {low:.4g}..{high:.4g} (scale {tensor.scale:.6g}, zero point "
        f"{tensor.zero_point})",
    )
