"""Inference: load a model on an accelerator, prepare its input, decode its output."""

from edgeagent.inference.engine import Engine, TensorInfo
from edgeagent.inference.preprocess import ImageTransform, Prepared, make_preprocessor
from edgeagent.inference.tasks import Decoder, make_decoder

__all__ = [
    "Decoder",
    "Engine",
    "ImageTransform",
    "Prepared",
    "TensorInfo",
    "make_decoder",
    "make_preprocessor",
]
