"""How a model wants its input prepared and its output decoded.

These models appear in a model's manifest and, as overrides, in a pipeline's config.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    scores, count). `raw`: one [1, N, 4 + classes] head, boxes as (cx, cy, w, h)
    normalised to [0, 1], class scores after it; the agent runs non-maximum suppression."""

    type: Literal["detection"] = "detection"
    layout: Literal["auto", "postprocess", "raw"] = "auto"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.45, gt=0.0, le=1.0)
    max_detections: int = Field(default=20, ge=1)


class AnomalyTask(_Spec):
    """`output`: the model's first output is the anomaly score. `reconstruction`: the model
    is an autoencoder and the score is the mean squared error between its (normalised)
    input and its output."""

    type: Literal["anomaly"] = "anomaly"
    score: Literal["output", "reconstruction"] = "output"
    threshold: float


class RawTask(_Spec):
    type: Literal["raw"] = "raw"


Task = Annotated[
    ClassificationTask | DetectionTask | AnomalyTask | RawTask, Field(discriminator="type")
]
