"""Reads the TFLite Metadata flatbuffer (`TFLITE_METADATA`) with the flatbuffers package.

The layout is the published schema, tensorflow/tflite-support
tensorflow_lite_support/metadata/metadata_schema.fbs (file identifier "M001"; fields up to
schema 1.5). No package we can depend on ships its generated reader: tflite-support pins
protobuf < 4 and carries the Task Library's native code, mediapipe is far larger than the
agent. So this module reads the few tables the agent uses, by field slot: a field's slot is
its declaration order in the schema, and a union field takes two slots (its type byte, then
the value), as flatc lays them out.

What is read (everything else is ignored; a metadata buffer that does not parse is
reported by the caller and ignored as a whole):

- ModelMetadata: name, description, associated_files, and the first subgraph's
  input/output TensorMetadata and associated_files.
- TensorMetadata: name, description, content (its kind, ImageProperties colour space,
  BoundingBoxProperties index / type / coordinate type), process units
  (NormalizationOptions mean/std, ScoreThresholdingOptions global threshold), associated
  files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import flatbuffers  # type: ignore[import-untyped]

IDENTIFIER: Final = b"M001"

# AssociatedFileType
TENSOR_AXIS_LABELS: Final = 2
TENSOR_VALUE_LABELS: Final = 3
# ColorSpaceType
COLOR_GRAYSCALE: Final = 2
# BoundingBoxType
BOX_BOUNDARIES: Final = 1
# CoordinateType
COORDINATES_PIXEL: Final = 1

# union ContentProperties { FeatureProperties, ImageProperties, BoundingBoxProperties,
# AudioProperties } (NONE = 0)
_CONTENT_KINDS: Final = {1: "feature", 2: "image", 3: "bounding_box", 4: "audio"}
# union ProcessUnitOptions { NormalizationOptions, ScoreCalibrationOptions,
# ScoreThresholdingOptions, ... }
_NORMALIZATION: Final = 1
_SCORE_THRESHOLDING: Final = 3

# Field slots, per table, in declaration order.
_MODEL_NAME, _MODEL_DESCRIPTION, _MODEL_SUBGRAPHS, _MODEL_FILES = 0, 1, 3, 6
_SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS, _SUBGRAPH_FILES = 2, 3, 4
_TENSOR_NAME, _TENSOR_DESCRIPTION, _TENSOR_CONTENT = 0, 1, 3
_TENSOR_PROCESS_UNITS, _TENSOR_FILES = 4, 6
_CONTENT_TYPE, _CONTENT_VALUE = 0, 1  # a union takes two slots
_IMAGE_COLOR_SPACE = 0
_BOX_INDEX, _BOX_TYPE, _BOX_COORDINATES = 0, 1, 2
_UNIT_TYPE, _UNIT_VALUE = 0, 1
_NORM_MEAN, _NORM_STD = 0, 1
_THRESHOLD_VALUE = 0
_FILE_NAME, _FILE_TYPE = 0, 2


@dataclass(frozen=True, slots=True)
class AssociatedFile:
    """A file the metadata attaches to the model, the subgraph or one tensor."""

    name: str
    type: int  # AssociatedFileType: 2 = TENSOR_AXIS_LABELS, 3 = TENSOR_VALUE_LABELS
    owner: str  # "model", "subgraph", "input:<n>" or "output:<n>"


@dataclass(frozen=True, slots=True)
class BoxProperties:
    """BoundingBoxProperties: `index` gives the positions of (left, top, right, bottom) (or
    of the type's own four elements) in each box; () is the type's default order."""

    index: tuple[int, ...]
    type: int  # BoundingBoxType
    coordinates: int  # CoordinateType: 0 ratio, 1 pixel


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    description: str
    content: str  # "image", "bounding_box", "feature", "audio", or "" when not declared
    color_space: int  # ColorSpaceType, images only (0 when unknown)
    box: BoxProperties | None
    mean: tuple[float, ...]  # NormalizationOptions; () when there is none
    std: tuple[float, ...]
    score_threshold: float | None  # ScoreThresholdingOptions.global_score_threshold
    files: tuple[AssociatedFile, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    description: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    files: tuple[AssociatedFile, ...]  # every file, tensors' first, then subgraph, model


def parse_metadata(blob: bytes) -> ModelMetadata:
    """Parses a ModelMetadata flatbuffer. Raises ValueError (or the flatbuffers reader's
    struct.error / IndexError / TypeError) when the buffer is not one."""
    if len(blob) < 8 or blob[4:8] != IDENTIFIER:
        raise ValueError("the metadata buffer has no 'M001' identifier")
    root = _Table(blob, int(flatbuffers.encode.Get(flatbuffers.packer.uoffset, blob, 0)))
    inputs: tuple[TensorMetadata, ...] = ()
    outputs: tuple[TensorMetadata, ...] = ()
    files: list[AssociatedFile] = []
    for subgraph in root.tables(_MODEL_SUBGRAPHS)[:1]:
        inputs = tuple(
            _tensor(t, f"input:{n}") for n, t in enumerate(subgraph.tables(_SUBGRAPH_INPUTS))
        )
        outputs = tuple(
            _tensor(t, f"output:{n}") for n, t in enumerate(subgraph.tables(_SUBGRAPH_OUTPUTS))
        )
        for tensor in (*inputs, *outputs):
            files += tensor.files
        files += _files(subgraph.tables(_SUBGRAPH_FILES), "subgraph")
    files += _files(root.tables(_MODEL_FILES), "model")
    return ModelMetadata(
        name=root.string(_MODEL_NAME),
        description=root.string(_MODEL_DESCRIPTION),
        inputs=inputs,
        outputs=outputs,
        files=tuple(files),
    )


def _tensor(table: _Table, owner: str) -> TensorMetadata:
    content, color, box = "", 0, None
    block = table.table(_TENSOR_CONTENT)
    if block is not None:
        kind = block.uint8(_CONTENT_TYPE)
        content = _CONTENT_KINDS.get(kind, "")
        value = block.table(_CONTENT_VALUE)
        if value is not None and content == "image":
            color = value.uint8(_IMAGE_COLOR_SPACE)
        elif value is not None and content == "bounding_box":
            box = BoxProperties(
                tuple(value.uint32s(_BOX_INDEX)),
                value.uint8(_BOX_TYPE),
                value.uint8(_BOX_COORDINATES),
            )
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    threshold: float | None = None
    for unit in table.tables(_TENSOR_PROCESS_UNITS):
        kind = unit.uint8(_UNIT_TYPE)
        options = unit.table(_UNIT_VALUE)
        if options is None:
            continue
        if kind == _NORMALIZATION and not mean:
            mean, std = tuple(options.floats(_NORM_MEAN)), tuple(options.floats(_NORM_STD))
        elif kind == _SCORE_THRESHOLDING and threshold is None:
            threshold = options.float32(_THRESHOLD_VALUE)
    return TensorMetadata(
        name=table.string(_TENSOR_NAME),
        description=table.string(_TENSOR_DESCRIPTION),
        content=content,
        color_space=color,
        box=box,
        mean=mean,
        std=std,
        score_threshold=threshold,
        files=tuple(_files(table.tables(_TENSOR_FILES), owner)),
    )


def _files(tables: list[_Table], owner: str) -> list[AssociatedFile]:
    return [AssociatedFile(t.string(_FILE_NAME), t.uint8(_FILE_TYPE), owner) for t in tables]


class _Table:
    """Just enough of a flatbuffers table reader for the metadata fields above."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self._tab = flatbuffers.table.Table(buf, pos)

    def _offset(self, slot: int) -> int:
        return int(self._tab.Offset(4 + 2 * slot))

    def _scalar(self, slot: int, flags: object, default: float | int) -> float | int:
        o = self._offset(slot)
        if not o:
            return default
        value: float | int = self._tab.Get(flags, o + self._tab.Pos)
        return value

    def string(self, slot: int) -> str:
        o = self._offset(slot)
        if not o:
            return ""
        raw: bytes = self._tab.String(o + self._tab.Pos)
        return raw.decode("utf-8", "replace")

    def uint8(self, slot: int) -> int:
        return int(self._scalar(slot, flatbuffers.number_types.Uint8Flags, 0))

    def float32(self, slot: int) -> float:
        return float(self._scalar(slot, flatbuffers.number_types.Float32Flags, 0.0))

    def table(self, slot: int) -> _Table | None:
        o = self._offset(slot)
        if not o:
            return None
        return _Table(self._tab.Bytes, self._tab.Indirect(o + self._tab.Pos))

    def tables(self, slot: int) -> list[_Table]:
        o = self._offset(slot)
        if not o:
            return []
        start = self._tab.Vector(o)
        return [
            _Table(self._tab.Bytes, self._tab.Indirect(start + 4 * i))
            for i in range(self._tab.VectorLen(o))
        ]

    def _numbers(self, slot: int, flags: object, width: int) -> list[float | int]:
        o = self._offset(slot)
        if not o:
            return []
        start = self._tab.Vector(o)
        return [self._tab.Get(flags, start + width * i) for i in range(self._tab.VectorLen(o))]

    def floats(self, slot: int) -> list[float]:
        return [float(v) for v in self._numbers(slot, flatbuffers.number_types.Float32Flags, 4)]

    def uint32s(self, slot: int) -> list[int]:
        return [int(v) for v in self._numbers(slot, flatbuffers.number_types.Uint32Flags, 4)]
