"""Full-integer post-training quantisation of a float .tflite, and how well it agrees.

The work is done by Google's ai-edge-quantizer (the `quantize` extra): the recipe
`static_wi8_ai8` (int8 weights and activations, min/max calibration), calibrated on a
representative data set run through the model's default signature. The result has int8
inputs and outputs as well. `compare` then runs both models on the same samples and says
how close the int8 outputs (de-quantised) are to the float ones.

Calibration samples come from a folder of image files (decoded, resized and normalised as
the model's preprocess spec says: by default stretched, RGB or gray, pixel / 255) or of
`.npy` arrays holding one input ([1, ...] or without the batch dimension) or a stack of
them ([N, ...]).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from ai_edge_litert.interpreter import Interpreter
from PIL import Image, UnidentifiedImageError

from edgeagent.config import ImagePreprocess
from edgeagent.errors import MissingDependencyError, ModelError
from edgeagent.fleet.compat import quantisation
from edgeagent.inference.engine import TensorInfo
from edgeagent.inference.preprocess import make_preprocessor

_log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm"})
INSTALL_HINT = "pip install 'edgeagent[quantize]'"
Sample = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Agreement:
    """Float vs int8 outputs (first output, de-quantised) over the same samples."""

    samples: int
    top1: float | None  # fraction of samples with the same arg-max; None unless [1, N>1]
    mean_abs_error: float
    max_abs_error: float
    cosine: float  # mean over samples of the cosine similarity of the flattened outputs


@dataclass(frozen=True, slots=True)
class QuantizeResult:
    source: Path
    output: Path
    float_size: int
    int8_size: int
    samples: int
    full_integer: bool
    integer_io: bool
    agreement: Agreement


def float_input(path: Path) -> tuple[TensorInfo, str, str]:
    """(the single float32 input, signature key, signature input name) of a float model;
    ModelError when the model is not one that can be quantised here."""
    try:
        interpreter = Interpreter(model_path=str(path))
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"model {path} does not load in LiteRT: {exc}") from exc
    details = interpreter.get_input_details()
    if len(details) != 1:
        raise ModelError(
            f"model {path} has {len(details)} inputs; quantize handles single-input models only"
        )
    tensor = TensorInfo.from_details(details[0])
    if tensor.dtype != "float32":
        raise ModelError(
            f"model {path} takes a {tensor.dtype} input: it is already quantised (quantize "
            "starts from a float32 model)"
        )
    signatures = interpreter.get_signature_list()
    if not signatures:
        raise ModelError(
            f"model {path} has no signature, which ai-edge-quantizer needs to calibrate it: "
            "convert it with TFLiteConverter from a Keras model or SavedModel (they add "
            "'serving_default')"
        )
    key = next(iter(signatures))
    inputs = list(signatures[key]["inputs"])
    if len(inputs) != 1:
        raise ModelError(f"model {path}'s signature {key!r} has {len(inputs)} inputs, not 1")
    return tensor, key, inputs[0]


def load_calibration(
    directory: Path, tensor: TensorInfo, preprocess: ImagePreprocess | None = None
) -> list[Sample]:
    """The samples in `directory` (see the module doc), as float32 arrays of the input's
    shape, in file name order; ModelError naming the file that does not fit."""
    if not directory.is_dir():
        raise ModelError(f"calibration folder {directory} does not exist or is not a folder")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | {".npy"})
    if not files:
        raise ModelError(
            f"calibration folder {directory} holds no image (.png, .jpg...) or .npy files: "
            "put a few hundred representative inputs there"
        )
    prepare = None
    samples: list[Sample] = []
    for file in files:
        if file.suffix.lower() == ".npy":
            samples += _npy_samples(file, tensor.shape)
            continue
        if prepare is None:
            prepare = make_preprocessor(preprocess, tensor, "image")
        samples.append(np.asarray(prepare(_read_rgb(file)).tensor, dtype=np.float32))
    return samples


def _read_rgb(path: Path) -> npt.NDArray[np.uint8]:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ModelError(f"calibration image {path} cannot be read: {exc}") from exc


def _npy_samples(path: Path, shape: tuple[int, ...]) -> list[Sample]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"calibration array {path} cannot be read: {exc}") from exc
    if array.dtype.kind not in "fiu":
        raise ModelError(f"calibration array {path} holds {array.dtype}, not numbers")
    values = np.asarray(array, dtype=np.float32)
    if values.shape == shape:
        return [values]
    if values.shape == shape[1:]:
        return [values[None, ...]]
    if values.ndim == len(shape) and values.shape[1:] == shape[1:]:
        return [values[i : i + 1] for i in range(values.shape[0])]
    raise ModelError(
        f"calibration array {path} has shape {list(values.shape)}; the model's input is "
        f"{list(shape)}: save one input ({list(shape)} or {list(shape[1:])}) or a stack "
        f"[N, {', '.join(str(d) for d in shape[1:])}] per file"
    )


def _quantizer_modules() -> tuple[Any, Any]:
    try:
        quantizer = importlib.import_module("ai_edge_quantizer.quantizer")
        recipe = importlib.import_module("ai_edge_quantizer.recipe")
    except ImportError as exc:
        raise MissingDependencyError("ai-edge-quantizer", INSTALL_HINT) from exc
    return quantizer, recipe


def quantize_model(
    source: Path, samples: Sequence[Sample], output: Path, *, signature: tuple[str, str]
) -> QuantizeResult:
    """Quantises `source` to full int8, calibrated on `samples`, writes it to `output`
    (atomically) and measures the agreement on the same samples."""
    quantizer_module, recipe = _quantizer_modules()
    if not samples:
        raise ModelError("no calibration samples: quantisation needs a representative set")
    key, input_name = signature
    float_data = source.read_bytes()
    quiet = io.StringIO()
    # The library prints a progress bar and a size report, and warns about the debug
    # interpreter it calibrates with; the CLI reports the outcome itself.
    with (
        contextlib.redirect_stderr(quiet),
        contextlib.redirect_stdout(quiet),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        logging.disable(logging.INFO)  # its INFO lines go to the root logger
        try:
            quantizer = quantizer_module.Quantizer(bytearray(float_data), recipe.static_wi8_ai8())
            calibration = quantizer.calibrate(
                {key: [{input_name: s} for s in samples]},
                num_threads=os.cpu_count() or 1,
            )
            result = quantizer.quantize(
                calibration, enable_progress_bar=False, enable_progress_report=False
            )
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            _log.debug("ai-edge-quantizer output: %s", quiet.getvalue())
            raise ModelError(
                f"ai-edge-quantizer could not quantise {source}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            logging.disable(logging.NOTSET)
    int8_data = bytes(result.quantized_model)
    agreement = compare(float_data, int8_data, samples)
    _write_atomically(output, int8_data)
    kind = quantisation(int8_data)
    return QuantizeResult(
        source=source,
        output=output,
        float_size=len(float_data),
        int8_size=len(int8_data),
        samples=len(samples),
        full_integer=kind.full_integer,
        integer_io=kind.integer_io,
        agreement=agreement,
    )


def compare(float_model: bytes, int8_model: bytes, samples: Sequence[Sample]) -> Agreement:
    """Runs both models on every sample and compares their first outputs."""
    reference = _Runner(float_model)
    candidate = _Runner(int8_model)
    same, errors, worst, cosines = 0, [], 0.0, []
    top1 = reference.output.shape[:1] == (1,) and len(reference.output.shape) == 2
    top1 = top1 and reference.output.shape[1] > 1
    for sample in samples:
        want = reference.run(sample).reshape(-1)
        got = candidate.run(sample).reshape(-1)
        diff = np.abs(want - got)
        errors.append(float(diff.mean()))
        worst = max(worst, float(diff.max()))
        norm = float(np.linalg.norm(want) * np.linalg.norm(got))
        cosines.append(float(np.dot(want, got)) / norm if norm > 0 else float(diff.max() == 0))
        same += int(np.argmax(want) == np.argmax(got))
    count = len(samples)
    return Agreement(
        samples=count,
        top1=same / count if top1 and count else None,
        mean_abs_error=float(np.mean(errors)) if errors else 0.0,
        max_abs_error=worst,
        cosine=float(np.mean(cosines)) if cosines else 1.0,
    )


class _Runner:
    """One model on the CPU: float sample in, de-quantised first output out."""

    def __init__(self, data: bytes) -> None:
        try:
            self._interpreter = Interpreter(model_content=data, num_threads=os.cpu_count())
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"the quantised model does not load in LiteRT: {exc}") from exc
        self.input = TensorInfo.from_details(self._interpreter.get_input_details()[0])
        self.output = TensorInfo.from_details(self._interpreter.get_output_details()[0])

    def run(self, sample: Sample) -> npt.NDArray[np.float32]:
        self._interpreter.set_tensor(self.input.index, self.input.quantize(sample))
        self._interpreter.invoke()
        return self.output.dequantize(self._interpreter.get_tensor(self.output.index))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot write the quantised model to {path}: {exc}") from exc


__all__ = [
    "INSTALL_HINT",
    "Agreement",
    "QuantizeResult",
    "compare",
    "float_input",
    "load_calibration",
    "quantize_model",
]
