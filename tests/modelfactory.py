"""Builds tiny, real .tflite models with the schema object API (no TensorFlow needed).

Each builder returns the model's bytes; `save` writes them where a test wants them; `run`
puts one image through a saved model as a pipeline would.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as s

from edgeagent.inference import Engine, make_decoder, make_preprocessor
from edgeagent.modelfile.catalog import ModelDescription, describe_model

_TYPES = {
    "float32": s.TensorType.FLOAT32,
    "int8": s.TensorType.INT8,
    "uint8": s.TensorType.UINT8,
    "int32": s.TensorType.INT32,
}


@dataclass
class Graph:
    """A single-subgraph model under construction: tensors, constant data, operators."""

    tensors: list[Any] = field(default_factory=list)
    buffers: list[Any] = field(default_factory=lambda: [s.BufferT()])  # buffer 0 is empty
    opcodes: list[tuple[int, str | None]] = field(default_factory=list)
    operators: list[Any] = field(default_factory=list)
    metadata: list[tuple[str, bytes]] = field(default_factory=list)

    def tensor(
        self,
        name: str,
        shape: Sequence[int],
        dtype: str = "float32",
        *,
        scale: float = 0.0,
        zero_point: int = 0,
        data: np.ndarray | None = None,
    ) -> int:
        t = s.TensorT()
        t.name, t.shape, t.type = name, list(shape), _TYPES[dtype]
        if scale:
            t.quantization = s.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = [scale], [zero_point]
        if data is not None:
            t.buffer = self._buffer(np.asarray(data, dtype=dtype).tobytes())
        self.tensors.append(t)
        return len(self.tensors) - 1

    def _buffer(self, raw: bytes) -> int:
        b = s.BufferT()
        b.data = list(raw)
        self.buffers.append(b)
        return len(self.buffers) - 1

    def op(
        self,
        code: int | str,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options: tuple[int, Any] | None = None,
    ) -> None:
        """`code` is a BuiltinOperator value, or a custom op name."""
        key = (s.BuiltinOperator.CUSTOM, code) if isinstance(code, str) else (code, None)
        if key not in self.opcodes:
            self.opcodes.append(key)
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.opcodes.index(key), list(inputs), list(outputs)
        if options is not None:
            o.builtinOptionsType, o.builtinOptions = options
        self.operators.append(o)

    def build(self, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        graph = s.SubGraphT()
        graph.tensors, graph.operators = self.tensors, self.operators
        graph.inputs, graph.outputs, graph.name = list(inputs), list(outputs), "main"
        model = s.ModelT()
        model.version, model.description = 3, "edgeagent test model"
        model.subgraphs, model.buffers = [graph], self.buffers
        codes = []
        for builtin, custom in self.opcodes:
            c = s.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode = builtin, min(builtin, 127)
            c.customCode, c.version = custom, 1
            codes.append(c)
        model.operatorCodes = codes
        entries = []
        for name, raw in self.metadata:
            m = s.MetadataT()
            m.name, m.buffer = name, self._buffer(raw)
            entries.append(m)
        model.metadata = entries
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def save(path: Path, model: bytes) -> Path:
    path.write_bytes(model)
    return path


def float_fc(weights: np.ndarray, bias: np.ndarray) -> bytes:
    """y = x @ weights.T + bias, float32: input [1, in], output [1, out]."""
    g = Graph()
    n_out, n_in = weights.shape
    x = g.tensor("input", [1, n_in])
    w = g.tensor("weights", [n_out, n_in], data=weights)
    b = g.tensor("bias", [n_out], data=bias)
    y = g.tensor("output", [1, n_out])
    g.op(s.BuiltinOperator.FULLY_CONNECTED, [x, w, b], [y], _fc_options())
    return g.build([x], [y])


def int8_add(
    constant: np.ndarray, in_q: tuple[float, int], out_q: tuple[float, int], shape: Sequence[int]
) -> bytes:
    """y = x + constant on int8 tensors quantised with (scale, zero point) pairs."""
    g = Graph()
    c_scale = max(float(np.abs(constant).max()), 1e-3) / 127
    c_q = np.clip(np.round(constant / c_scale), -128, 127).astype(np.int8)
    x = g.tensor("input", shape, "int8", scale=in_q[0], zero_point=in_q[1])
    c = g.tensor("constant", shape, "int8", scale=c_scale, zero_point=0, data=c_q)
    y = g.tensor("output", shape, "int8", scale=out_q[0], zero_point=out_q[1])
    g.op(s.BuiltinOperator.ADD, [x, c], [y], _add_options())
    return g.build([x], [y])


def quantize(size: int, scale: float, zero_point: int, dtype: str = "int8") -> bytes:
    """LiteRT's own QUANTIZE: float32 [1, size] in, `dtype` [1, size] out."""
    g = Graph()
    x = g.tensor("input", [1, size])
    y = g.tensor("output", [1, size], dtype, scale=scale, zero_point=zero_point)
    g.op(s.BuiltinOperator.QUANTIZE, [x], [y])
    return g.build([x], [y])


def custom_op(name: str) -> bytes:
    """A model whose only operator is the custom op `name` (no runtime has it)."""
    g = Graph()
    x = g.tensor("input", [1, 4])
    y = g.tensor("output", [1, 4])
    g.op(name, [x], [y])
    return g.build([x], [y])


def constant_head(
    values: np.ndarray,
    input_shape: Sequence[int] = (1, 8, 8, 3),
    input_dtype: str = "float32",
    names: Sequence[str] | None = None,
) -> bytes:
    """A model whose outputs are the constants `values` (any input gives them): each output
    is a zero-weight FULLY_CONNECTED over the flattened input, whose bias is the constant,
    then a RESHAPE to the constant's shape. A uint8 input is de-quantised first."""
    g = Graph()
    arrays = [np.asarray(values, np.float32)] if isinstance(values, np.ndarray) else values
    n_in = int(np.prod(input_shape))
    if input_dtype == "uint8":
        x = g.tensor("image", input_shape, "uint8", scale=1 / 255, zero_point=0)
        xf = g.tensor("image_float", input_shape)
        g.op(s.BuiltinOperator.DEQUANTIZE, [x], [xf])
    else:
        x = xf = g.tensor("image", input_shape)
    outputs = []
    for n, arr in enumerate(arrays):
        flat = np.asarray(arr, np.float32).reshape(-1)
        name = names[n] if names else f"output_{n}"
        w = g.tensor(f"w{n}", [flat.size, n_in], data=np.zeros((flat.size, n_in), np.float32))
        b = g.tensor(f"b{n}", [flat.size], data=flat)
        fc = g.tensor(f"fc{n}", [1, flat.size])
        g.op(s.BuiltinOperator.FULLY_CONNECTED, [xf, w, b], [fc], _fc_options())
        shape = np.asarray(arr.shape, np.int32)
        new_shape = g.tensor(f"shape{n}", [len(arr.shape)], "int32", data=shape)
        y = g.tensor(name, list(arr.shape))
        g.op(s.BuiltinOperator.RESHAPE, [fc, new_shape], [y])
        outputs.append(y)
    return g.build([x], outputs)


def with_labels(
    model: bytes, labels: Sequence[str], *, name: str = "labels.txt", in_metadata: bool = True
) -> bytes:
    """Adds labels the way the TFLite Metadata writer does: a TFLITE_METADATA buffer that
    names the file as the first output's TENSOR_AXIS_LABELS, and a ZIP appended to the model
    holding the file. With `in_metadata=False` only the ZIP is appended."""
    metadata = metadata_flatbuffer(name) if in_metadata else None
    packed = {name: "\n".join(labels) + "\n", "README.txt": "not the labels"}
    return with_metadata(model, metadata, packed)


def metadata_flatbuffer(label_file: str) -> bytes:
    """A ModelMetadata (metadata_schema.fbs) with one subgraph whose first output tensor has
    `label_file` as TENSOR_AXIS_LABELS, plus a model-level DESCRIPTIONS file."""
    b = flatbuffers.Builder(256)

    def associated(name: str, kind: int) -> int:
        n = b.CreateString(name)
        b.StartObject(4)  # AssociatedFile: name, description, type, locale
        b.PrependUOffsetTRelativeSlot(0, n, 0)
        b.PrependInt8Slot(2, kind, 0)
        return int(b.EndObject())

    def vector(items: list[int]) -> int:
        b.StartVector(4, len(items), 4)
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return int(b.EndVector())

    labels = vector([associated(label_file, 2)])
    tensor_name = b.CreateString("probabilities")
    b.StartObject(7)  # TensorMetadata: ..., associated_files is slot 6
    b.PrependUOffsetTRelativeSlot(0, tensor_name, 0)
    b.PrependUOffsetTRelativeSlot(6, labels, 0)
    tensor = b.EndObject()
    outputs = vector([tensor])
    b.StartObject(7)  # SubGraphMetadata: output_tensor_metadata is slot 3
    b.PrependUOffsetTRelativeSlot(3, outputs, 0)
    subgraph = b.EndObject()
    subgraphs = vector([subgraph])
    readme = vector([associated("README.txt", 1)])
    model_name = b.CreateString("test model")
    b.StartObject(8)  # ModelMetadata: subgraph_metadata slot 3, associated_files slot 6
    b.PrependUOffsetTRelativeSlot(0, model_name, 0)
    b.PrependUOffsetTRelativeSlot(3, subgraphs, 0)
    b.PrependUOffsetTRelativeSlot(6, readme, 0)
    b.Finish(b.EndObject(), file_identifier=b"M001")
    return bytes(b.Output())


def sqrt_of_fc(g: Graph, x: int, weights: np.ndarray, bias: float) -> int:
    """Adds root = sqrt(x . weights + bias) to `g`, x flattened and `weights` of shape
    [1, n]: one output, NaN wherever the weighted sum falls below -bias. Returns root."""
    w = g.tensor("w", list(weights.shape), data=weights)
    b = g.tensor("b", [1], data=np.array([bias], np.float32))
    fc = g.tensor("fc", [1, 1])
    g.op(s.BuiltinOperator.FULLY_CONNECTED, [x, w, b], [fc], _fc_options())
    root = g.tensor("root", [1, 1])
    g.op(s.BuiltinOperator.SQRT, [fc], [root])
    return root


def _fc_options() -> tuple[int, Any]:
    return s.BuiltinOptions.FullyConnectedOptions, s.FullyConnectedOptionsT()


def _add_options() -> tuple[int, Any]:
    return s.BuiltinOptions.AddOptions, s.AddOptionsT()


# --- TFLite Metadata and packed files -------------------------------------------------------
# Written by field slot from the published metadata_schema.fbs (a union takes two slots).


@dataclass
class TensorMeta:
    """One TensorMetadata: what the metadata writers of tflite-support put on a tensor."""

    name: str = ""
    content: str = ""  # "", "feature", "image", "bounding_box"
    color_space: int = 0  # ImageProperties: 1 RGB, 2 GRAYSCALE
    box_index: Sequence[int] = ()
    box_type: int = 1  # BOUNDARIES
    box_pixels: bool = False
    mean: Sequence[float] = ()
    std: Sequence[float] = ()
    score_threshold: float | None = None
    files: Sequence[tuple[str, int]] = ()  # (name, AssociatedFileType)


def metadata_buffer(
    inputs: Sequence[TensorMeta] = (),
    outputs: Sequence[TensorMeta] = (),
    *,
    model_files: Sequence[tuple[str, int]] = (),
    name: str = "",
    description: str = "",
) -> bytes:
    """A ModelMetadata flatbuffer ("M001") with one subgraph."""
    b = flatbuffers.Builder(1024)

    def vector(items: list[int]) -> int:
        b.StartVector(4, len(items), 4)
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return int(b.EndVector())

    def numbers(values: Sequence[float], prepend: Any) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(list(values)):
            prepend(v)
        return int(b.EndVector())

    def files(entries: Sequence[tuple[str, int]]) -> int:
        made = []
        for file_name, kind in entries:
            n = b.CreateString(file_name)
            b.StartObject(5)  # AssociatedFile: name, description, type, locale, version
            b.PrependUOffsetTRelativeSlot(0, n, 0)
            b.PrependInt8Slot(2, kind, 0)
            made.append(int(b.EndObject()))
        return vector(made)

    def tensor(meta: TensorMeta) -> int:
        name_off = b.CreateString(meta.name) if meta.name else 0
        content = 0
        if meta.content:
            kind = {"feature": 1, "image": 2, "bounding_box": 3}[meta.content]
            if meta.content == "image":
                b.StartObject(2)  # ImageProperties: color_space, default_size
                b.PrependInt8Slot(0, meta.color_space, 0)
                props = b.EndObject()
            elif meta.content == "bounding_box":
                index = numbers(meta.box_index, b.PrependUint32) if meta.box_index else 0
                b.StartObject(3)  # BoundingBoxProperties: index, type, coordinate_type
                if index:
                    b.PrependUOffsetTRelativeSlot(0, index, 0)
                b.PrependInt8Slot(1, meta.box_type, 0)
                b.PrependInt8Slot(2, 1 if meta.box_pixels else 0, 0)
                props = b.EndObject()
            else:
                b.StartObject(0)
                props = b.EndObject()
            b.StartObject(3)  # Content: content_properties_type, content_properties, range
            b.PrependUint8Slot(0, kind, 0)
            b.PrependUOffsetTRelativeSlot(1, props, 0)
            content = b.EndObject()
        units = []
        if meta.mean:
            mean = numbers(meta.mean, b.PrependFloat32)
            std = numbers(meta.std, b.PrependFloat32)
            b.StartObject(2)  # NormalizationOptions: mean, std
            b.PrependUOffsetTRelativeSlot(0, mean, 0)
            b.PrependUOffsetTRelativeSlot(1, std, 0)
            options = b.EndObject()
            b.StartObject(2)  # ProcessUnit: options_type, options
            b.PrependUint8Slot(0, 1, 0)
            b.PrependUOffsetTRelativeSlot(1, options, 0)
            units.append(b.EndObject())
        if meta.score_threshold is not None:
            b.StartObject(1)  # ScoreThresholdingOptions: global_score_threshold
            b.PrependFloat32Slot(0, meta.score_threshold, 0.0)
            options = b.EndObject()
            b.StartObject(2)
            b.PrependUint8Slot(0, 3, 0)
            b.PrependUOffsetTRelativeSlot(1, options, 0)
            units.append(b.EndObject())
        unit_vector = vector(units) if units else 0
        file_vector = files(meta.files) if meta.files else 0
        b.StartObject(7)  # TensorMetadata
        if name_off:
            b.PrependUOffsetTRelativeSlot(0, name_off, 0)
        if content:
            b.PrependUOffsetTRelativeSlot(3, content, 0)
        if unit_vector:
            b.PrependUOffsetTRelativeSlot(4, unit_vector, 0)
        if file_vector:
            b.PrependUOffsetTRelativeSlot(6, file_vector, 0)
        return int(b.EndObject())

    ins = vector([tensor(m) for m in inputs])
    outs = vector([tensor(m) for m in outputs])
    b.StartObject(10)  # SubGraphMetadata: input_tensor_metadata 2, output_tensor_metadata 3
    b.PrependUOffsetTRelativeSlot(2, ins, 0)
    b.PrependUOffsetTRelativeSlot(3, outs, 0)
    subgraph = b.EndObject()
    subgraphs = vector([subgraph])
    model_file_vector = files(model_files) if model_files else 0
    name_off = b.CreateString(name)
    description_off = b.CreateString(description)
    b.StartObject(8)  # ModelMetadata
    b.PrependUOffsetTRelativeSlot(0, name_off, 0)
    b.PrependUOffsetTRelativeSlot(1, description_off, 0)
    b.PrependUOffsetTRelativeSlot(3, subgraphs, 0)
    if model_file_vector:
        b.PrependUOffsetTRelativeSlot(6, model_file_vector, 0)
    b.Finish(b.EndObject(), file_identifier=b"M001")
    return bytes(b.Output())


def with_metadata(model: bytes, metadata: bytes | None, packed: dict[str, str]) -> bytes:
    """`model` with `metadata` as its TFLITE_METADATA buffer (when given) and `packed` files
    in a ZIP appended to it, as the metadata writer (or an Ultralytics export) leaves it."""
    if metadata is not None:
        parsed = s.ModelT.InitFromPackedBuf(model, 0)
        buf = s.BufferT()
        buf.data = list(metadata)
        parsed.buffers.append(buf)
        entry = s.MetadataT()
        entry.name, entry.buffer = "TFLITE_METADATA", len(parsed.buffers) - 1
        parsed.metadata = [*(parsed.metadata or []), entry]
        builder = flatbuffers.Builder(1024)
        builder.Finish(parsed.Pack(builder), file_identifier=b"TFL3")
        model = bytes(builder.Output())
    if not packed:
        return model
    out = io.BytesIO(model)
    # Mode "a" on a file that is not a ZIP appends a new archive, as the metadata writer does.
    with zipfile.ZipFile(out, "a") as archive:
        for name, text in packed.items():
            archive.writestr(name, text)
    return out.getvalue()


def image_fc(
    weights: np.ndarray,
    input_dtype: str = "float32",
    *,
    input_q: tuple[float, int] = (1 / 255, 0),
) -> bytes:
    """Outputs [1, K] = weights (K, H, W, C) . image: a linear read of the pixels, so that
    a test knows the output of any input. A uint8 or int8 input is quantised with
    `input_q` (scale, zero point) and de-quantised first."""
    g = Graph()
    k = weights.shape[0]
    shape = [1, *weights.shape[1:]]
    n_in = int(np.prod(shape))
    if input_dtype in ("uint8", "int8"):
        x = g.tensor("image", shape, input_dtype, scale=input_q[0], zero_point=input_q[1])
        xf = g.tensor("image_float", shape)
        g.op(s.BuiltinOperator.DEQUANTIZE, [x], [xf])
    else:
        x = xf = g.tensor("image", shape)
    w = g.tensor("w", [k, n_in], data=np.asarray(weights, np.float32).reshape(k, n_in))
    bias = g.tensor("b", [k], data=np.zeros(k, np.float32))
    y = g.tensor("scores", [1, k])
    g.op(s.BuiltinOperator.FULLY_CONNECTED, [xf, w, bias], [y], _fc_options())
    return g.build([x], [y])


def quantized_head(
    values: np.ndarray, scale: float, zero_point: int, input_shape: Sequence[int]
) -> bytes:
    """Like `constant_head` with one output, but the output is int8, quantised by LiteRT's
    own QUANTIZE with (scale, zero point)."""
    g = Graph()
    arr = np.asarray(values, np.float32)
    n_in = int(np.prod(input_shape))
    x = g.tensor("image", input_shape)
    w = g.tensor("w", [arr.size, n_in], data=np.zeros((arr.size, n_in), np.float32))
    b = g.tensor("b", [arr.size], data=arr.reshape(-1))
    fc = g.tensor("fc", [1, arr.size])
    g.op(s.BuiltinOperator.FULLY_CONNECTED, [x, w, b], [fc], _fc_options())
    new_shape = g.tensor("shape", [arr.ndim], "int32", data=np.asarray(arr.shape, np.int32))
    shaped = g.tensor("shaped", list(arr.shape))
    g.op(s.BuiltinOperator.RESHAPE, [fc, new_shape], [shaped])
    y = g.tensor("head", list(arr.shape), "int8", scale=scale, zero_point=zero_point)
    g.op(s.BuiltinOperator.QUANTIZE, [shaped], [y])
    return g.build([x], [y])


# --- running a built model --------------------------------------------------------------


def run(path: Path, image: np.ndarray, **overrides: Any) -> tuple[ModelDescription, dict[str, Any]]:
    """What a pipeline does with `path` and one frame: describe, load, prepare, decode."""
    description = describe_model(str(path), **overrides)
    engine = Engine.load(description.path, accelerator="cpu")
    try:
        prepare = make_preprocessor(description.preprocess, engine.inputs[0], "image")
        decode = make_decoder(
            description.task, engine.outputs, description.labels, inputs=engine.inputs
        )
        prepared = prepare(image)
        return description, decode(engine.invoke([prepared.tensor]), prepared)
    finally:
        engine.close()
