"""Reads a .tflite file without TensorFlow: operators, tensors, metadata and packed labels.

The model flatbuffer is parsed with the schema module that ships with ai-edge-litert. Label
files follow the TFLite Metadata convention: the `TFLITE_METADATA` buffer holds a
`ModelMetadata` flatbuffer (read by `edgeagent.modelfile.metadata`) that names the associated
files, and the files themselves are a ZIP archive appended to the model.

Which packed file gives the labels, first match wins: the first output's
TENSOR_AXIS_LABELS file; a TENSOR_VALUE_LABELS file of any output (the category output of
a detector); any output's TENSOR_AXIS_LABELS file; the one `*label*.txt` in the archive;
the class names of an Ultralytics export. Ultralytics packs its export metadata (task,
class names, image size) as `metadata.json`, or, in older exports, as a Python dict literal
in a text file that the metadata calls the output's labels; either is read as
`ExportMetadata`, never as a list of labels.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from edgeagent.errors import ModelError
from edgeagent.modelfile.metadata import (
    TENSOR_AXIS_LABELS,
    TENSOR_VALUE_LABELS,
    AssociatedFile,
    ModelMetadata,
    parse_metadata,
)

_log = logging.getLogger(__name__)

_TFLITE_IDENTIFIER = b"TFL3"
METADATA_BUFFER_NAME = "TFLITE_METADATA"
ULTRALYTICS_FILE = "metadata.json"
_EXPORT_TEXT_LIMIT = 1 << 20  # an export metadata file larger than this is not one

__all__ = [
    "TENSOR_AXIS_LABELS",
    "TENSOR_VALUE_LABELS",
    "AssociatedFile",
    "ExportMetadata",
    "ModelFile",
    "TensorDescription",
    "label_lines",
    "parse_model",
    "read_model",
]

# Builtin operator codes -> names ("FULLY_CONNECTED"), from the generated enum class.
_BUILTIN_NAMES: dict[int, str] = {
    value: name
    for name, value in vars(schema.BuiltinOperator).items()
    if not name.startswith("_") and isinstance(value, int)
}
_TENSOR_TYPE_NAMES: dict[int, str] = {
    value: name
    for name, value in vars(schema.TensorType).items()
    if not name.startswith("_") and isinstance(value, int)
}
# Errors the flatbuffers reader raises on a truncated or corrupt buffer.
_PARSE_ERRORS = (struct.error, IndexError, ValueError, TypeError, UnicodeDecodeError)

POSTPROCESS_OP = "TFLite_Detection_PostProcess"
"""SSD post-processing: boxes, classes, scores and a count; it writes only the rows it counts."""


def count_output(shapes: Sequence[Sequence[int]]) -> int | None:
    """Which of SSD post-processing's four outputs is the count: the only one holding a
    single value. None when there are not four outputs or no single one stands out."""
    if len(shapes) != 4:
        return None
    counts = [i for i, shape in enumerate(shapes) if int(np.prod(shape)) == 1]
    return counts[0] if len(counts) == 1 else None


@dataclass(frozen=True, slots=True)
class TensorDescription:
    """An input or output tensor as the file declares it (before the runtime allocates)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name ("int8", "float32"), or the TensorType name in lower case
    scale: float  # 0.0 when the tensor is not quantised
    zero_point: int


@dataclass(frozen=True, slots=True)
class ExportMetadata:
    """What an Ultralytics export packs about itself (`metadata.json` or a dict literal)."""

    file: str  # the packed file it came from
    task: str  # "detect", "segment", "pose", "classify", "obb", or "" when not given
    names: tuple[str, ...]  # class names by index; () when not given
    imgsz: tuple[int, int] | None  # (height, width) the model was exported for


@dataclass(frozen=True)
class ModelFile:
    """What a .tflite file says about itself."""

    path: Path
    size: int  # bytes on disk
    operators: Counter[str]  # builtin names ("CONV_2D") and custom codes ("edgetpu-custom-op")
    inputs: tuple[TensorDescription, ...]
    outputs: tuple[TensorDescription, ...]
    metadata_names: tuple[str, ...]  # names of the model's metadata entries
    associated_files: tuple[AssociatedFile, ...]
    packed_files: tuple[str, ...]  # names in the ZIP archive appended to the model
    labels: tuple[str, ...]  # from the packed label file; () when there is none
    labels_source: str = ""  # where the labels came from, for people ("" when none)
    metadata: ModelMetadata | None = None  # the TFLITE_METADATA, when it parses
    export: ExportMetadata | None = None  # an Ultralytics export's own metadata

    @property
    def operator_names(self) -> frozenset[str]:
        return frozenset(self.operators)


def read_model(path: Path) -> ModelFile:
    """Parses `path`; raises ModelError when it is missing, empty or not a TFLite model."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelError(
            f"model file {path} does not exist: check the path, or deploy the model first"
        ) from exc
    except OSError as exc:
        raise ModelError(f"model file {path} cannot be read: {exc}") from exc
    return parse_model(data, path)


def parse_model(data: bytes, path: Path) -> ModelFile:
    """Parses model bytes; `path` only names the model in messages and in the result."""
    if not data:
        raise ModelError(f"model file {path} is empty: the transfer was cut short; deploy again")
    if len(data) < 8 or data[4:8] != _TFLITE_IDENTIFIER:
        raise ModelError(
            f"{path} is not a TFLite model (no 'TFL3' file identifier): "
            "convert it with the LiteRT converter, or check that the right file was deployed"
        )
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
    except _PARSE_ERRORS as exc:
        raise ModelError(
            f"{path} has a TFLite identifier but does not parse ({exc}): "
            "the file is truncated or corrupt; deploy it again"
        ) from exc
    if not model.subgraphs:
        raise ModelError(f"model {path} has no subgraph: it is empty; rebuild it")
    graph = model.subgraphs[0]
    tensors = graph.tensors or []
    try:
        operators = _operator_counts(model, graph)
        inputs = tuple(_describe(tensors[i]) for i in _indices(graph.inputs))
        outputs = tuple(_describe(tensors[i]) for i in _indices(graph.outputs))
    except IndexError as exc:
        raise ModelError(
            f"model {path} refers to a tensor or operator code that it does not define: "
            "the file is corrupt; rebuild it"
        ) from exc
    metadata = {_text(m.name): m.buffer for m in model.metadata or []}
    described: ModelMetadata | None = None
    if METADATA_BUFFER_NAME in metadata:
        blob = _buffer_bytes(model, metadata[METADATA_BUFFER_NAME], data)
        try:
            described = parse_metadata(blob)
        except _PARSE_ERRORS as exc:
            _log.warning(
                "model %s: its %s is unreadable, ignoring it: %s", path, METADATA_BUFFER_NAME, exc
            )
    files = described.files if described is not None else ()
    packed, labels, source, export = _packed_files(data, files, path)
    return ModelFile(
        path=path,
        size=len(data),
        operators=operators,
        inputs=inputs,
        outputs=outputs,
        metadata_names=tuple(metadata),
        associated_files=files,
        packed_files=packed,
        labels=labels,
        labels_source=source,
        metadata=described,
        export=export,
    )


def _operator_counts(model: Any, graph: Any) -> Counter[str]:
    codes = model.operatorCodes or []
    names: list[str] = []
    for code in codes:
        # Codes above 127 live only in builtinCode; older files fill only the deprecated
        # byte field, so the larger of the two is the real one.
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        if builtin == schema.BuiltinOperator.CUSTOM:
            names.append(_text(code.customCode) or "CUSTOM")
        else:
            names.append(_BUILTIN_NAMES.get(builtin, f"BUILTIN_{builtin}"))
    return Counter(names[op.opcodeIndex] for op in graph.operators or [])


def _indices(values: Any) -> list[int]:
    return [] if values is None else [int(v) for v in values]


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _describe(tensor: Any) -> TensorDescription:
    type_name = _TENSOR_TYPE_NAMES.get(int(tensor.type), f"TYPE_{tensor.type}").lower()
    try:
        dtype = np.dtype(type_name).name
    except TypeError:
        dtype = type_name  # int4, resource, variant...: no numpy dtype of that name
    scale, zero_point = 0.0, 0
    quant = tensor.quantization
    if quant is not None and quant.scale is not None and len(quant.scale) > 0:
        scale = float(quant.scale[0])
        zero_point = int(quant.zeroPoint[0]) if quant.zeroPoint is not None else 0
    shape = tuple(int(d) for d in tensor.shape) if tensor.shape is not None else ()
    return TensorDescription(_text(tensor.name), shape, dtype, scale, zero_point)


def _buffer_bytes(model: Any, index: int, data: bytes) -> bytes:
    if not 0 <= index < len(model.buffers or []):
        return b""
    buffer = model.buffers[index]
    if buffer.data is not None and len(buffer.data) > 0:
        return bytes(np.asarray(buffer.data, dtype=np.uint8).tobytes())
    # Models over 2 GB keep buffers outside the flatbuffer, addressed from the file start.
    if buffer.offset > 1 and buffer.size > 0:
        return data[buffer.offset : buffer.offset + buffer.size]
    return b""


def _packed_files(
    data: bytes, files: tuple[AssociatedFile, ...], path: Path
) -> tuple[tuple[str, ...], tuple[str, ...], str, ExportMetadata | None]:
    """(names in the ZIP appended to the model, labels, where they came from, the export
    metadata of an Ultralytics model)."""
    if b"PK\x05\x06" not in data[-65_600:]:  # no end-of-central-directory record
        return (), (), "", None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = tuple(archive.namelist())
            export = None
            if ULTRALYTICS_FILE in names:
                export = _export_metadata(ULTRALYTICS_FILE, archive.read(ULTRALYTICS_FILE))
            for name, why in _label_candidates(names, files):
                raw = archive.read(name)
                found = _export_metadata(name, raw)
                if found is not None:
                    export = export or found
                    continue
                labels = label_lines(raw.decode("utf-8", "replace"))
                if labels:
                    return names, labels, f"metadata file {name} ({why})", export
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, ValueError) as exc:
        # RuntimeError is zipfile's "encrypted, password required".
        _log.warning("model %s: its packed files are unreadable, ignoring them: %s", path, exc)
        return (), (), "", None
    if export is not None and export.names:
        return names, export.names, f"class names in {export.file} (Ultralytics export)", export
    return names, (), "", export


def label_lines(text: str) -> tuple[str, ...]:
    """One label per line, stripped; blank lines keep their index, trailing ones go."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()  # a trailing newline is not a class; blank lines inside keep indices
    return tuple(lines)


def _label_candidates(
    names: tuple[str, ...], files: tuple[AssociatedFile, ...]
) -> list[tuple[str, str]]:
    """Packed files that may hold the labels, best first, each with why it was chosen."""
    present = [f for f in files if f.name in names]
    found: list[tuple[str, str]] = []

    def add(name: str, why: str) -> None:
        if name not in (n for n, _ in found):
            found.append((name, why))

    for f in present:
        if f.owner == "output:0" and f.type == TENSOR_AXIS_LABELS:
            add(f.name, "TENSOR_AXIS_LABELS of output 0")
    for f in present:
        if f.owner.startswith("output:") and f.type == TENSOR_VALUE_LABELS:
            add(f.name, f"TENSOR_VALUE_LABELS of output {f.owner.partition(':')[2]}")
    for f in present:
        if f.owner.startswith("output:") and f.type == TENSOR_AXIS_LABELS:
            add(f.name, f"TENSOR_AXIS_LABELS of output {f.owner.partition(':')[2]}")
    pool = {f.name for f in present} or set(names)
    texts = [n for n in pool if n.lower().endswith(".txt") and "label" in n.lower()]
    if len(texts) == 1:
        add(texts[0], "the one label file packed in the model")
    return found


def _export_metadata(name: str, raw: bytes) -> ExportMetadata | None:
    """The Ultralytics export metadata in `raw` (JSON, or a Python dict literal as older
    exports write it), or None when it is not that."""
    text = raw.decode("utf-8", "replace").strip()
    if not text.startswith("{") or len(text) > _EXPORT_TEXT_LIMIT:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)  # literals only: no code runs
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    if not isinstance(value, dict) or not ({"names", "task", "imgsz"} & set(value)):
        return None
    names: tuple[str, ...] = ()
    raw_names = value.get("names")
    if isinstance(raw_names, dict):
        try:
            by_index = {int(k): str(v) for k, v in raw_names.items()}
        except (TypeError, ValueError):
            by_index = {}
        if by_index and min(by_index) >= 0:
            names = tuple(by_index.get(i, "") for i in range(max(by_index) + 1))
    elif isinstance(raw_names, list):
        names = tuple(str(v) for v in raw_names)
    size = value.get("imgsz")
    imgsz: tuple[int, int] | None = None
    if isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) for v in size):
        imgsz = (int(size[0]), int(size[1]))
    elif isinstance(size, int):
        imgsz = (size, size)
    task = value.get("task")
    return ExportMetadata(name, task if isinstance(task, str) else "", names, imgsz)
