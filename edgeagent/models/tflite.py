"""Reads a .tflite file without TensorFlow: operators, tensors, metadata and packed labels.

The model flatbuffer is parsed with the schema module that ships with ai-edge-litert. Label
files follow the TFLite Metadata convention: the `TFLITE_METADATA` buffer holds a
`ModelMetadata` flatbuffer (tensorflow/tflite-support,
tensorflow_lite_support/metadata/metadata_schema.fbs) that names the associated files, and
the files themselves are a ZIP archive appended to the model.
"""

from __future__ import annotations

import io
import logging
import struct
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flatbuffers  # type: ignore[import-untyped]
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from edgeagent.errors import ModelError

_log = logging.getLogger(__name__)

_TFLITE_IDENTIFIER = b"TFL3"
_METADATA_IDENTIFIER = b"M001"
METADATA_BUFFER_NAME = "TFLITE_METADATA"

# Field slots of the metadata schema tables we read (metadata_schema.fbs, schema 1.1.0;
# a field's slot is its declaration order, and none of these tables declares a union
# before the fields used here, which would take two slots).
_MODEL_METADATA_SUBGRAPHS = 3  # ModelMetadata.subgraph_metadata: [SubGraphMetadata]
_MODEL_METADATA_FILES = 6  # ModelMetadata.associated_files: [AssociatedFile]
_SUBGRAPH_OUTPUTS = 3  # SubGraphMetadata.output_tensor_metadata: [TensorMetadata]
_SUBGRAPH_FILES = 4  # SubGraphMetadata.associated_files: [AssociatedFile]
_TENSOR_FILES = 6  # TensorMetadata.associated_files: [AssociatedFile]
_FILE_NAME = 0  # AssociatedFile.name: string
_FILE_TYPE = 2  # AssociatedFile.type: AssociatedFileType (byte)
TENSOR_AXIS_LABELS = 2  # AssociatedFileType.TENSOR_AXIS_LABELS

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


@dataclass(frozen=True, slots=True)
class TensorDescription:
    """An input or output tensor as the file declares it (before the runtime allocates)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name ("int8", "float32"), or the TensorType name in lower case
    scale: float  # 0.0 when the tensor is not quantised
    zero_point: int


@dataclass(frozen=True, slots=True)
class AssociatedFile:
    """A file the TFLite metadata attaches to the model, tensor or subgraph."""

    name: str
    type: int  # AssociatedFileType: 2 = TENSOR_AXIS_LABELS
    owner: str  # "model", "subgraph" or "output:<n>"


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
    files: tuple[AssociatedFile, ...] = ()
    if METADATA_BUFFER_NAME in metadata:
        blob = _buffer_bytes(model, metadata[METADATA_BUFFER_NAME], data)
        try:
            files = _associated_files(blob)
        except _PARSE_ERRORS as exc:
            _log.warning(
                "model %s: its %s is unreadable, ignoring it: %s", path, METADATA_BUFFER_NAME, exc
            )
    packed, labels = _packed_files(data, files, path)
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


class _Table:
    """Just enough of a flatbuffers table reader for the few metadata fields we need."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self._tab = flatbuffers.table.Table(buf, pos)

    def _offset(self, slot: int) -> int:
        return int(self._tab.Offset(4 + 2 * slot))

    def string(self, slot: int) -> str:
        o = self._offset(slot)
        return _text(self._tab.String(o + self._tab.Pos)) if o else ""

    def byte(self, slot: int) -> int:
        o = self._offset(slot)
        if not o:
            return 0
        return int(self._tab.Get(flatbuffers.number_types.Int8Flags, o + self._tab.Pos))

    def tables(self, slot: int) -> list[_Table]:
        o = self._offset(slot)
        if not o:
            return []
        start = self._tab.Vector(o)
        return [
            _Table(self._tab.Bytes, self._tab.Indirect(start + 4 * i))
            for i in range(self._tab.VectorLen(o))
        ]


def _associated_files(blob: bytes) -> tuple[AssociatedFile, ...]:
    if len(blob) < 8 or blob[4:8] != _METADATA_IDENTIFIER:
        raise ValueError("the metadata buffer has no 'M001' identifier")
    root = _Table(blob, int(flatbuffers.encode.Get(flatbuffers.packer.uoffset, blob, 0)))
    found: list[AssociatedFile] = []
    for subgraph in root.tables(_MODEL_METADATA_SUBGRAPHS)[:1]:
        for n, tensor in enumerate(subgraph.tables(_SUBGRAPH_OUTPUTS)):
            found += _files(tensor.tables(_TENSOR_FILES), f"output:{n}")
        found += _files(subgraph.tables(_SUBGRAPH_FILES), "subgraph")
    found += _files(root.tables(_MODEL_METADATA_FILES), "model")
    return tuple(found)


def _files(tables: list[_Table], owner: str) -> list[AssociatedFile]:
    return [AssociatedFile(t.string(_FILE_NAME), t.byte(_FILE_TYPE), owner) for t in tables]


def _packed_files(
    data: bytes, files: tuple[AssociatedFile, ...], path: Path
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names in the ZIP appended to the model, labels read from it)."""
    if b"PK\x05\x06" not in data[-65_600:]:  # no end-of-central-directory record
        return (), ()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = tuple(archive.namelist())
            label_file = _label_file(names, files)
            if label_file is None:
                return names, ()
            text = archive.read(label_file).decode("utf-8", "replace")
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, ValueError) as exc:
        # RuntimeError is zipfile's "encrypted, password required".
        _log.warning("model %s: its packed files are unreadable, ignoring them: %s", path, exc)
        return (), ()
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()  # a trailing newline is not a class; blank lines inside keep indices
    return names, tuple(lines)


def _label_file(names: tuple[str, ...], files: tuple[AssociatedFile, ...]) -> str | None:
    """The TENSOR_AXIS_LABELS file of the first output, else the one obvious label file."""
    for f in files:
        if f.owner == "output:0" and f.type == TENSOR_AXIS_LABELS and f.name in names:
            return f.name
    candidates = {f.name for f in files if f.name in names} or set(names)
    texts = [n for n in candidates if n.lower().endswith(".txt") and "label" in n.lower()]
    return texts[0] if len(texts) == 1 else None
