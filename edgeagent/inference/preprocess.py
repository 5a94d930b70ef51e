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

Images are shrunk in two steps: first by whole factors with a box filter (each output pixel
the mean of a block), then the rest of the way (less than 2x) bilinearly. With OpenCV (the
`opencv` extra) the first step halves with INTER_AREA's 2x2 fast path as often as both
sides allow and the second is INTER_LINEAR; without it, Pillow's `reducing_gap` does both
(`Image.reduce`, then its bilinear filter), about 4x the CPU. See RESIZERS; the bundled
models score the same on each as on a one-step bilinear resize (docs/benchmarks.md, "CPU
per result").

When quantising a pixel is only adding a whole number (an int8 or uint8 input whose scale
undoes `std` exactly, the common 1/255 case), the tensor is made from the pixels with one
integer addition, bit for bit what the float arithmetic gives, and the float input
(`Prepared.normalised`) is derived from the tensor only if a decoder asks for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
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
Resizer = Literal["opencv", "pillow", "one-step"]
RESIZERS: tuple[Resizer, ...] = ("opencv", "pillow", "one-step")
"""How frames are shrunk: `opencv` (2x2 box halvings, then INTER_LINEAR), `pillow` (its
`reducing_gap` 1.0: `Image.reduce` by whole factors, then bilinear) and `one-step` (one
Pillow bilinear resample of the whole way, what tutorials do; the accuracy reference)."""


@functools.cache
def _cv2() -> ModuleType | None:
    try:
        import cv2
    except ImportError:  # the `opencv` extra is not installed (or its libraries are not)
        return None
    return cv2


def default_resizer() -> Resizer:
    """`opencv` when OpenCV imports, else `pillow`."""
    return "opencv" if _cv2() is not None else "pillow"


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
    # Same shape, float, before quantisation; None when the tensor was made from the pixels
    # with integer arithmetic alone (then `normalised` derives it from the tensor).
    exact: npt.NDArray[np.float32] | None
    transform: ImageTransform | None  # images only: model coordinates -> source coordinates
    input: TensorInfo | None = None  # the tensor's quantisation, when `exact` is None

    @property
    def normalised(self) -> npt.NDArray[np.float32]:
        """The float input before quantisation (for a decoder that compares with it)."""
        if self.exact is not None:
            return self.exact
        assert self.input is not None, "a Prepared without `exact` needs its input tensor"
        return self.input.dequantize(self.tensor)


Preprocessor = Callable[[npt.NDArray[Any]], Prepared]


def make_preprocessor(
    spec: ImagePreprocess | WindowPreprocess | None,
    tensor: TensorInfo,
    kind: Literal["image", "window"],
    *,
    resizer: Resizer | None = None,
) -> Preprocessor:
    """A function from one source sample to a Prepared input for `tensor`. Raises ModelError
    when the model's input cannot take this kind of sample (see the module docstring).
    `resizer` is how images are shrunk (RESIZERS; default: `default_resizer()`)."""
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
        return _ImagePreprocessor(spec or ImagePreprocess(), tensor, resizer or default_resizer())
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
    def __init__(self, spec: ImagePreprocess, tensor: TensorInfo, resizer: Resizer) -> None:
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
        # One value per channel (a single value repeated).
        self._mean = np.resize(_per_channel(spec.mean, self._channels, "mean"), self._channels)
        self._std = np.resize(_per_channel(spec.std, self._channels, "std"), self._channels)
        self._resize = spec.resize
        self._resizer = resizer
        if resizer == "opencv" and _cv2() is None:
            raise ModelError("the opencv resizer needs OpenCV: pip install 'edgeagent[opencv]'")
        self._tensor = tensor
        self._offset = None if color == "gray" else _integer_offset(tensor, self._mean, self._std)

    def __call__(self, image: npt.NDArray[Any]) -> Prepared:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape}")
        resized, transform, placed = self._geometry(image)
        if self._offset is not None:
            return Prepared(self._quantised(resized, placed), None, transform, self._tensor)
        values = self._normalised(self._colour(resized))
        if placed is not None:
            # Letterbox bars are the mean colour, which normalises to exactly 0.
            canvas = np.zeros((self._height, self._width, self._channels), np.float32)
            x, y = placed
            canvas[y : y + values.shape[0], x : x + values.shape[1]] = values
            values = canvas
        normalised = values[np.newaxis].astype(np.float32, copy=False)
        return Prepared(self._tensor.quantize(normalised), normalised, transform)

    def _quantised(
        self, rgb: npt.NDArray[np.uint8], placed: tuple[int, int] | None
    ) -> npt.NDArray[Any]:
        """The integer path: each pixel plus `_offset`, in the input's dtype."""
        assert self._offset is not None
        dtype = np.dtype(self._tensor.dtype)
        pixels = rgb[..., ::-1] if self._color == "bgr" else rgb
        # In the input's dtype, wrapping: every pixel + offset is in its range (checked),
        # so arithmetic modulo 256 lands on it.
        values = np.add(pixels, self._offset, dtype=dtype, casting="unsafe")
        if placed is not None:
            # The bars are the mean colour, quantised: the zero point.
            canvas = np.full((self._height, self._width, 3), self._tensor.zero_point, dtype)
            x, y = placed
            canvas[y : y + values.shape[0], x : x + values.shape[1]] = values
            values = canvas
        return values[np.newaxis]

    def _geometry(
        self, image: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.uint8], ImageTransform, tuple[int, int] | None]:
        """The resized pixels, the transform back to the source, and where a letterboxed
        image sits on the model's canvas (None when it fills it)."""
        src_h, src_w = image.shape[:2]
        width, height = self._width, self._height
        if (src_h, src_w) == (height, width):
            # Already the model's size (a Pi camera's lores stream): every resize mode is
            # the identity, so no copy.
            return image, ImageTransform(), None
        if self._resize == "letterbox":
            ratio = min(width / src_w, height / src_h)
            new_w = max(1, min(width, round(src_w * ratio)))
            new_h = max(1, min(height, round(src_h * ratio)))
            x, y = (width - new_w) // 2, (height - new_h) // 2
            transform = ImageTransform(width / new_w, height / new_h, -x / new_w, -y / new_h)
            return self._shrink(image, new_w, new_h), transform, (x, y)
        if self._resize == "crop":
            # The centre at the model's aspect, in whole source pixels.
            ratio = min(src_w / width, src_h / height)
            crop_w = max(1, min(src_w, round(width * ratio)))
            crop_h = max(1, min(src_h, round(height * ratio)))
            left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
            transform = ImageTransform(crop_w / src_w, crop_h / src_h, left / src_w, top / src_h)
            centre = image[top : top + crop_h, left : left + crop_w]
            return self._shrink(centre, width, height), transform, None
        return self._shrink(image, width, height), ImageTransform(), None

    def _shrink(self, image: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[Any]:
        cv2 = _cv2() if self._resizer == "opencv" else None
        if cv2 is None:
            gap = None if self._resizer == "one-step" else 1.0
            picture = Image.fromarray(np.ascontiguousarray(image))
            return np.asarray(
                picture.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=gap)
            )
        # Halve (a 2x2 box: INTER_AREA's fast path) while both sides stay at least twice
        # the target's, then resample the rest bilinearly; INTER_AREA (exact but slower)
        # when one side is still more than twice its target (a frame of another aspect).
        src_h, src_w = image.shape[:2]
        while src_w >= 2 * width and src_h >= 2 * height:
            src_w, src_h = src_w // 2, src_h // 2
            image = cv2.resize(image, (src_w, src_h), interpolation=cv2.INTER_AREA)
        if (src_h, src_w) == (height, width):
            return image
        steep = src_w > 2 * width or src_h > 2 * height
        interpolation = cv2.INTER_AREA if steep else cv2.INTER_LINEAR
        resized: npt.NDArray[np.uint8] = cv2.resize(
            image, (width, height), interpolation=interpolation
        )
        return resized

    def _normalised(self, pixels: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(pixels - mean) / std, row by row against mean and std repeated along a row: the
        same arithmetic as broadcasting over the channel axis, at a tenth of its cost
        (numpy's inner loop runs a whole row instead of 3 values)."""
        height, width, channels = pixels.shape
        values = pixels.reshape(height, width * channels) - np.tile(self._mean, width)
        values /= np.tile(self._std, width)
        return values.reshape(height, width, channels)

    def _colour(self, rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        pixels = rgb.astype(np.float32)
        if self._color == "bgr":
            return pixels[..., ::-1]
        if self._color == "gray":
            luma = pixels @ _LUMA
            return np.repeat(luma[..., np.newaxis], self._channels, axis=2)
        return pixels


def _integer_offset(
    tensor: TensorInfo, mean: npt.NDArray[np.float32], std: npt.NDArray[np.float32]
) -> int | None:
    """k when quantising (pixel - mean) / std into `tensor` gives pixel + k for every pixel
    value 0..255 in every channel (no rounding, no clipping), else None. Checked with the
    float arithmetic itself, so the integer path gives the same bytes."""
    if tensor.dtype not in ("int8", "uint8"):
        return None
    pixels = np.arange(256, dtype=np.float32)[:, np.newaxis]
    quantised = tensor.quantize((pixels - mean) / std).astype(np.int32)
    offsets = quantised - np.arange(256, dtype=np.int32)[:, np.newaxis]
    offset = int(offsets[0, 0])
    return offset if np.all(offsets == offset) else None


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
