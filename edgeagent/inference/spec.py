"""How a model wants its input prepared and its output decoded.

These models appear in a model's manifest and, as overrides, in a pipeline's config.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImagePreprocess(_Spec):
    """Camera frames -> input tensor: resize, colour order, then (pixel - mean) / std.

    The float result is quantised with the input tensor's own scale and zero point, so the
    same spec serves float, int8 and uint8 models.
    """

    type: Literal["image"] = "image"
    resize: Literal["stretch", "letterbox", "crop"] = "stretch"
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (255.0,)


class WindowPreprocess(_Spec):
    """Sensor windows -> input tensor: the last `length` samples (the model's length when
    omitted), then (value - mean) / std per channel."""

    type: Literal["window"] = "window"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


Preprocess = Annotated[ImagePreprocess | WindowPreprocess, Field(discriminator="type")]


class ClassificationTask(_Spec):
    type: Literal["classification"] = "classification"
    top_k: int = Field(default=3, ge=1)
    threshold: float = Field(default=0.0, ge=0.0, le=1.0)


class DetectionTask(_Spec):
    """`postprocess`: the four outputs of TFLite_Detection_PostProcess (boxes, classes,
    scores, count); `box_index` gives the positions of left, top, right and bottom in each
    box (the op's own order, ymin xmin ymax xmax, by default). `yolov8` (also called `raw`):
    one head of (cx, cy, w, h) then one score per class, as [1, N, 4 + C] or transposed
    [1, 4 + C, N] (YOLOv8/v11). `yolov5`: [1, N, 5 + C] with an objectness score after the
    box. Box coordinates are normalised to the model input or, with `coordinates: pixels`,
    in input pixels (`auto` tells them apart by their size); the agent runs class-wise
    non-maximum suppression on YOLO heads. `auto` picks postprocess for four outputs and
    a YOLO layout for one."""

    type: Literal["detection"] = "detection"
    layout: Literal["auto", "postprocess", "raw", "yolov8", "yolov5"] = "auto"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.45, gt=0.0, le=1.0)
    max_detections: int = Field(default=20, ge=1)
    coordinates: Literal["auto", "normalized", "pixels"] = "auto"
    box_index: tuple[int, int, int, int] = (1, 0, 3, 2)

    @field_validator("box_index")
    @classmethod
    def _permutation(cls, value: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        if sorted(value) != [0, 1, 2, 3]:
            raise ValueError("must hold the positions 0, 1, 2 and 3, each once")
        return value


class PoseTask(_Spec):
    """MoveNet: one [1, 1, 17, 3] pose (SinglePose) or [1, K, 56] poses (MultiPose), each
    keypoint (y, x, score) normalised to the model input, in COCO order. A pose is reported
    when its score (MultiPose's own, SinglePose's mean keypoint score) is >= `threshold`."""

    type: Literal["pose"] = "pose"
    threshold: float = Field(default=0.2, ge=0.0, le=1.0)
    max_poses: int = Field(default=6, ge=1)


class SegmentationTask(_Spec):
    """One [1, H, W, C] output: C class scores per pixel (argmax), or C = 1 foreground
    probability (or logit) compared with `threshold`. The result is each class's fraction
    of the source image; the mask itself is kept for the snapshot, never published."""

    type: Literal["segmentation"] = "segmentation"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    min_fraction: float = Field(default=0.0, ge=0.0, le=1.0)


class AnomalyTask(_Spec):
    """`output`: the model's first output is the anomaly score. `reconstruction`: the model
    is an autoencoder and the score is the mean squared error between its (normalised)
    input and its output."""

    type: Literal["anomaly"] = "anomaly"
    score: Literal["output", "reconstruction"] = "output"
    threshold: float


class RawTask(_Spec):
    type: Literal["raw"] = "raw"


AnyTask = ClassificationTask | DetectionTask | PoseTask | SegmentationTask | AnomalyTask | RawTask
Task = Annotated[AnyTask, Field(discriminator="type")]
