"""Turns a camera frame or a sensor window into a model's input tensor.

Which model inputs fit which source (checked once, when the preprocessor is made):

- image sources need an input of shape [1, H, W, C] with C = 3 (colour) or C = 1 (gray).
  A 1-channel input always receives luminance (a spec that explicitly asks for rgb or bgr is
  an error); `color: gray` on a 3-channel input repeats the luminance in all three channels.
- window sources need [1, L, C], [1, L, C, 1] (convolutional sensor models) or [1, N]
  (flattened, sample-major: s0c0, s0c1, ..., s1c0...). For [1, N] the channel count is the
  window's own, so that check, and the [1, L, C] channel check, happen per window.
- the input dtype is float32, int8, uint8 or int32 (MoveNet takes int32 pixels); integer
  inputs are quantised with the tensor's scale and zero point, rounded and clipped to the
  dtype's range.
- mean and std hold 1 value (used for every channel) or one per channel.

Without a spec, images are stretched, kept in RGB order and divided by 255 (mean 0, std 255),
so the float value is in [0, 1]. That matches int8/uint8 image models whose input scale is
about 1/255 (the usual output of post-training quantisation of [0, 1] inputs) and float
models trained on [0, 1] pixels; models trained on [-1, 1] need mean 127.5 and std 127.5.
Windows without a spec are used as they are (mean 0, std 1).

Images are shrunk in two steps (Pillow's `reducing_gap`): first by whole factors with a
box filter (`Image.reduce`, each output pixel the mean of a block), then the rest of the
way with bilinear filtering. A 640x480 frame to 160x160 costs a quarter of a one-step
bilinear resize and the bundled models score the same on it
(docs/benchmarks.md, "CPU per result"); `reducing_gap=None` gives the one-step resize.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from edgeagent.config import ImagePreprocess, WindowPreprocess
from edgeagent.errors import ModelError
from edgeagent.inference.engine import TensorInfo

_DTYPES = ("float32", "int8", "uint8", "int32")
# ITU-R BT.601 luma weights, what Pillow's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
REDUCING_GAP = 1.0
"""Pillow's `reducing_gap` for shrinking frames: reduce by whole factors first (box filter),
then resample the rest (< 2x) bilinearly. None: one bilinear resample of the whole way."""


@dataclass(frozen=True, slots=True)
class ImageTransform:
    """Maps normalised coordinates in the model's input image back to normalised coordinates
    in the source image: source = model * scale + offset, per axis."""

    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0

    def boxes_to_source(self, boxes: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(..., 4) boxes as x0, y0, x1, y1 in model coordinates -> source coordinates."""
        scale = np.array([self.scale_x, self.scale_y] * 2, dtype=np.float32)
        offset = np.array([self.offset_x, self.offset_y] * 2, dtype=np.float32)
        return np.asarray(boxes, dtype=np.float32) * scale + offset

    def points_to_source(self, points: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(..., 2) points as x, y in model coordinates -> source coordinates."""
        scale = np.array([self.scale_x, self.scale_y], dtype=np.float32)
        offset = np.array([self.offset_x, self.offset_y], dtype=np.float32)
        return np.asarray(points, dtype=np.float32) * scale + offset


@dataclass(frozen=True, slots=True)
class Prepared:
    """One sample, ready for the model."""

    tensor: npt.NDArray[Any]  # the input tensor: batch dimension included, the input's dtype
    normalised: npt.NDArray[np.float32]  # same shape, float, before quantisation
    transform: ImageTransform | None  # images only: model coordinates -> source coordinates


Preprocessor = Callable[[npt.NDArray[Any]], Prepared]


def make_preprocessor(
    spec: ImagePreprocess | WindowPreprocess | None,
    tensor: TensorInfo,
    kind: Literal["image", "window"],
    *,
    reducing_gap: float | None = REDUCING_GAP,
) -> Preprocessor:
    """A function from one source sample to a Prepared input for `tensor`. Raises ModelError
    when the model's input cannot take this kind of sample (see the module docstring).
    `reducing_gap` is how images are shrunk (REDUCING_GAP)."""
    if tensor.dtype not in _DTYPES:
        raise ModelError(
            f"model input {tensor.name!r} is {tensor.dtype}; the agent prepares float32, int8, "
            "uint8 and int32 inputs only: convert the model with one of those input types"
        )
    if kind == "image":
        if isinstance(spec, WindowPreprocess):
            raise ModelError(
                "a window preprocess spec was given for an image source: use type: image"
            )
        return _ImagePreprocessor(spec or ImagePreprocess(), tensor, reducing_gap)
    if isinstance(spec, ImagePreprocess):
        raise ModelError("an image preprocess spec was given for a sensor source: use type: window")
    return _WindowPreprocessor(spec or WindowPreprocess(), tensor)


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> npt.NDArray[np.float32]:
    if len(values) not in (1, channels):
        raise ModelError(
            f"preprocess {what} has {len(values)} values but the model input has {channels} "
            f"channel(s): give 1 value or {channels}"
        )
    array = np.asarray(values, dtype=np.float32)
    if what == "std" and np.any(array == 0):
        raise ModelError("preprocess std contains 0: every std must be non-zero")
    return array


class _ImagePreprocessor:
    def __init__(
        self, spec: ImagePreprocess, tensor: TensorInfo, reducing_gap: float | None
    ) -> None:
        shape = tensor.shape
        if len(shape) != 4 or shape[0] != 1 or shape[3] not in (1, 3):
            raise ModelError(
                f"an image source gives (height, width, 3) frames but the model input "
                f"{tensor.name!r} has shape {list(shape)}; an image model needs "
                "[1, height, width, 1 or 3]"
            )
        self._height, self._width, self._channels = shape[1], shape[2], shape[3]
        color = spec.color
        if self._channels == 1:
            if color != "gray" and "color" in spec.model_fields_set:
                raise ModelError(
                    f"preprocess color is {color} but the model input {tensor.name!r} "
                    f"{list(shape)} has one channel: use color: gray"
                )
            color = "gray"
        self._color = color
        self._mean = _per_channel(spec.mean, self._channels, "mean")
        self._std = _per_channel(spec.std, self._channels, "std")
        self._resize = spec.resize
        self._gap = reducing_gap
        self._tensor = tensor

    def __call__(self, image: npt.NDArray[Any]) -> Prepared:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape}")
        resized, transform, placed = self._geometry(image)
        pixels = self._colour(resized)
        values = (pixels - self._mean) / self._std
        if placed is not None:
            # Letterbox bars are the mean colour, which normalises to exactly 0.
            canvas = np.zeros((self._height, self._width, self._channels), np.float32)
            x, y = placed
            canvas[y : y + values.shape[0], x : x + values.shape[1]] = values
            values = canvas
        normalised = values[np.newaxis].astype(np.float32, copy=False)
        return Prepared(self._tensor.quantize(normalised), normalised, transform)

    def _geometry(
        self, image: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.uint8], ImageTransform, tuple[int, int] | None]:
        """The resized pixels, the transform back to the source, and where a letterboxed
        image sits on the model's canvas (None when it fills it)."""
        src_h, src_w = image.shape[:2]
        width, height = self._width, self._height
        if (src_h, src_w) == (height, width):
            # Already the model's size (a Pi camera's lores stream): every resize mode is
            # the identity, so no copy through Pillow.
            return image, ImageTransform(), None
        picture = Image.fromarray(image)
        if self._resize == "letterbox":
            ratio = min(width / src_w, height / src_h)
            new_w = max(1, min(width, round(src_w * ratio)))
            new_h = max(1, min(height, round(src_h * ratio)))
            x, y = (width - new_w) // 2, (height - new_h) // 2
            resized = picture.resize(
                (new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=self._gap
            )
            transform = ImageTransform(width / new_w, height / new_h, -x / new_w, -y / new_h)
            return np.asarray(resized), transform, (x, y)
        if self._resize == "crop":
            ratio = min(src_w / width, src_h / height)
            crop_w, crop_h = width * ratio, height * ratio
            left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
            box = (left, top, left + crop_w, top + crop_h)
            resized = picture.resize(
                (width, height), Image.Resampling.BILINEAR, box=box, reducing_gap=self._gap
            )
            transform = ImageTransform(crop_w / src_w, crop_h / src_h, left / src_w, top / src_h)
            return np.asarray(resized), transform, None
        resized = picture.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=self._gap)
        return np.asarray(resized), ImageTransform(), None

    def _colour(self, rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        pixels = rgb.astype(np.float32)
        if self._color == "bgr":
            return pixels[..., ::-1]
        if self._color == "gray":
            luma = pixels @ _LUMA
            return np.repeat(luma[..., np.newaxis], self._channels, axis=2)
        return pixels


class _WindowPreprocessor:
    def __init__(self, spec: WindowPreprocess, tensor: TensorInfo) -> None:
        shape = tensor.shape
        fits = shape[:1] == (1,) and (
            len(shape) == 2 or len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)
        )
        if not fits:
            raise ModelError(
                f"a sensor source gives (samples, channels) windows but the model input "
                f"{tensor.name!r} has shape {list(shape)}; a window model needs "
                "[1, samples, channels], [1, samples, channels, 1] or [1, samples * channels]"
            )
        self._flat = len(shape) == 2
        self._length = None if self._flat else shape[1]
        self._channels = None if self._flat else shape[2]
        if self._channels is not None:
            self._mean = _per_channel(spec.mean, self._channels, "mean")
            self._std = _per_channel(spec.std, self._channels, "std")
        else:
            self._mean = np.asarray(spec.mean, np.float32)
            self._std = np.asarray(spec.std, np.float32)
            if np.any(self._std == 0):
                raise ModelError("preprocess std contains 0: every std must be non-zero")
            if len(spec.mean) > 1 and shape[1] % len(spec.mean):
                raise ModelError(
                    f"model input {tensor.name!r} {list(shape)} does not split into "
                    f"{len(spec.mean)} channels (the length of preprocess mean)"
                )
        self._tensor = tensor

    def __call__(self, window: npt.NDArray[Any]) -> Prepared:
        if window.ndim != 2:
            raise ValueError(f"expected a (samples, channels) window, got shape {window.shape}")
        channels = window.shape[1]
        shape = self._tensor.shape
        if self._flat:
            if shape[1] % channels:
                raise ModelError(
                    f"the model input {self._tensor.name!r} {list(shape)} does not split into "
                    f"the {channels} channel(s) of the sensor's {list(window.shape)} windows"
                )
            length = shape[1] // channels
        else:
            length = shape[1]
            if channels != self._channels:
                raise ModelError(
                    f"the sensor gives {channels} channel(s) per sample ({list(window.shape)}) "
                    f"but the model input {self._tensor.name!r} {list(shape)} takes "
                    f"{self._channels}: configure the sensor's channels to match the model"
                )
        if len(self._mean) not in (1, channels) or len(self._std) not in (1, channels):
            raise ModelError(
                f"preprocess mean/std must have 1 or {channels} values for this sensor"
            )
        values = np.asarray(window[-length:], dtype=np.float32)
        if values.shape[0] < length:
            # A short window (the sensor has just started) is padded at the front with zeros.
            pad = np.zeros((length - values.shape[0], channels), np.float32)
            values = np.concatenate([pad, values])
        normalised = ((values - self._mean) / self._std).reshape(shape).astype(np.float32)
        return Prepared(self._tensor.quantize(normalised), normalised, None)
