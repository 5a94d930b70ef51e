"""Where a .tflite model can run: on this LiteRT runtime, and how much of it on an Edge TPU.

`check_runtime` answers by loading the model in the real `Interpreter` and parsing the
failure ("Didn't find op for builtin opcode 'X'", "Encountered unresolved custom op: X").
LiteRT stops at the first operator it lacks, so when the model does not load, every
distinct operator code is then loaded alone in a one-operator probe model to list all of
the missing ones. Custom operators the runtime registers (TFLite_Detection_PostProcess)
resolve in the probe and count as supported.

`edgetpu_estimate` predicts which operators the Edge TPU compiler would map, following
Coral's page "TensorFlow models on the Edge TPU" (coral.ai/docs/edgetpu/models-intro):
only int8/uint8-quantised operators from its supported list are mapped, and the compiler
partitions the graph once, so the first operator it cannot map and every operator after
it stay on the CPU. It is an estimate; the log of `edgetpu_compiler` is the authority.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flatbuffers  # type: ignore[import-untyped]
import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from edgeagent.errors import ModelError
from edgeagent.inference.engine import missing_operator

_log = logging.getLogger(__name__)

EDGETPU_CUSTOM_OP = "edgetpu-custom-op"

# The operators of Coral's supported-operations table ("TensorFlow models on the Edge TPU"),
# for int8/uint8-quantised tensors. DEQUANTIZE is mapped only at the end of the graph.
EDGETPU_OPS: frozenset[str] = frozenset(
    {
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "EXP",
        "FULLY_CONNECTED",
        "L2_NORMALIZATION",
        "LOGISTIC",
        "LSTM",
        "MAX_POOL_2D",
        "MEAN",
        "MINIMUM",
        "MAXIMUM",
        "MUL",
        "PACK",
        "PAD",
        "PRELU",
        "QUANTIZE",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "RESHAPE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT",
        "SLICE",
        "SOFTMAX",
        "SPACE_TO_DEPTH",
        "SPLIT",
        "SQUARED_DIFFERENCE",
        "SQUEEZE",
        "STRIDED_SLICE",
        "SUB",
        "SUM",
        "TANH",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
        "DEQUANTIZE",
        "HARD_SWISH",
        "GATHER",
    }
)

_LOAD_ERRORS = (ValueError, RuntimeError, OSError)
_BUILTIN_NAMES: dict[int, str] = {
    value: name
    for name, value in vars(schema.BuiltinOperator).items()
    if not name.startswith("_") and isinstance(value, int)
}
_FLOAT_TYPES = frozenset({schema.TensorType.FLOAT32, schema.TensorType.FLOAT16})
_FLOAT_TYPES_ALL = _FLOAT_TYPES | {schema.TensorType.FLOAT64}
_QUANTISED_TYPES = frozenset({schema.TensorType.INT8, schema.TensorType.UINT8})


@dataclass(frozen=True, slots=True)
class RuntimeCheck:
    """Whether this LiteRT loads the model on the CPU and runs it once (on zeros), and the
    operators it lacks."""

    runs: bool
    error: str | None  # the interpreter's own message when it does not load
    unsupported: tuple[str, ...]  # operator names (builtins as "NAME (version N)")


@dataclass(frozen=True, slots=True)
class EdgeTpuEstimate:
    """Which operators an Edge TPU would run (by the Coral rules in the module doc)."""

    compiled: bool  # already holds an edgetpu-custom-op
    quantized: bool  # any operator computes on int8/uint8 tensors
    on_edgetpu: Counter[str] = field(default_factory=Counter)
    on_cpu: Counter[str] = field(default_factory=Counter)
    first_cpu_op: str | None = None  # where the compiler would stop mapping
    summary: str = ""


@dataclass(frozen=True, slots=True)
class Quantisation:
    """How integer the model is."""

    full_integer: bool  # every operator computes on integer tensors (float I/O boundaries aside)
    integer_io: bool  # inputs and outputs are integer tensors too


@dataclass(frozen=True, slots=True)
class _Op:
    name: str  # "CONV_2D", or a custom op's code
    builtin: int
    version: int
    custom: str | None
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


class _Graph:
    """The first subgraph of a parsed model: operators in execution order and tensor types."""

    def __init__(self, data: bytes) -> None:
        try:
            model = schema.ModelT.InitFromPackedBuf(data, 0)
            graph = model.subgraphs[0]
        except (IndexError, TypeError, ValueError) as exc:
            raise ModelError(f"the model does not parse ({exc}): it is corrupt") from exc
        self.types: list[int] = [int(t.type) for t in graph.tensors or []]
        self.buffers: list[bool] = [
            t.buffer > 0 and _has_data(model, t.buffer) for t in graph.tensors or []
        ]
        self.inputs = frozenset(_ints(graph.inputs))
        self.outputs = frozenset(_ints(graph.outputs))
        self.ops: list[_Op] = []
        codes = model.operatorCodes or []
        for op in graph.operators or []:
            code = codes[op.opcodeIndex]
            builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
            custom = _text(code.customCode) if builtin == schema.BuiltinOperator.CUSTOM else None
            name = custom or _BUILTIN_NAMES.get(builtin, f"BUILTIN_{builtin}")
            ins = tuple(i for i in _ints(op.inputs) if i >= 0)
            self.ops.append(
                _Op(name, builtin, int(code.version), custom, ins, tuple(_ints(op.outputs)))
            )

    def activation_types(self, op: _Op) -> set[int]:
        """Types of the op's non-constant tensors (weights and biases left out)."""
        return {self.types[i] for i in (*op.inputs, *op.outputs) if not self.buffers[i]}

    def all_types(self, op: _Op) -> set[int]:
        return {self.types[i] for i in (*op.inputs, *op.outputs)}


def _has_data(model: Any, index: int) -> bool:
    buffers = model.buffers or []
    if not 0 <= index < len(buffers):
        return False
    buffer = buffers[index]
    return (buffer.data is not None and len(buffer.data) > 0) or buffer.size > 0


def _ints(values: Any) -> list[int]:
    return [] if values is None else [int(v) for v in values]


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def check_runtime(path: Path, *, timeout_s: float = 60.0) -> RuntimeCheck:
    """Loads the model on the CPU with this LiteRT, in a child process so that a model
    that crashes the runtime costs the child, not the caller (see the module doc)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeagent.fleet.compat", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so a kill reaches all of it
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return RuntimeCheck(
            runs=False,
            error=f"loading the model did not finish in {timeout_s:g} s; it was stopped",
            unsupported=(),
        )
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    lines = _json_lines(out)
    full = next((line for line in lines if "load" in line), None)
    if full is None:
        return RuntimeCheck(
            runs=False,
            error=f"LiteRT crashed while loading the model ({_how_it_ended(proc.returncode)}); "
            f"it cannot run safely here. stderr: {_tail(err) or '-'}",
            unsupported=(),
        )
    if full["load"] is None:
        return RuntimeCheck(runs=True, error=None, unsupported=())
    error = " ".join(str(full["load"]).split())
    missing = [str(line["missing"]) for line in lines if line.get("missing")]
    probed = {line["probed"] for line in lines if "probed" in line}
    crashed = [line["probe"] for line in lines if "probe" in line and line["probe"] not in probed]
    if crashed:
        error += (
            f" (probing operator {crashed[0]} alone crashed LiteRT, "
            f"{_how_it_ended(proc.returncode)}; operators after it were not probed)"
        )
    reported = missing_operator(error)
    if reported is not None and reported not in missing:
        missing.insert(0, reported)  # the probe did not reproduce it; trust the full load
    return RuntimeCheck(runs=False, error=error, unsupported=tuple(dict.fromkeys(missing)))


def _json_lines(out: bytes) -> list[dict[str, Any]]:
    found = []
    for raw in out.decode("utf-8", "replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            found.append(line)
    return found


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _tail(err: bytes) -> str:
    return err.decode("utf-8", "replace").strip()[-400:]


def _load_error(data: bytes) -> str | None:
    """None when the model loads and runs once on zeros; else the interpreter's message.
    The invoke matters: nodes after a dynamically shaped tensor are only prepared then, so
    an unresolved custom op there passes allocate_tensors()."""
    try:
        interpreter = Interpreter(model_content=data, num_threads=1)
        interpreter.allocate_tensors()
        for detail in interpreter.get_input_details():
            interpreter.set_tensor(
                detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"])
            )
        interpreter.invoke()
    except _LOAD_ERRORS as exc:
        return str(exc)
    return None


def _probe_model(data: bytes, index: int) -> bytes:
    """The model cut down to its operator `index` alone, with that operator's own tensors,
    constants and options: a builtin is resolved when the interpreter is built, a custom op
    when its node is prepared, so a missing one fails as it does in the whole model."""
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    graph = model.subgraphs[0]
    node = graph.operators[index]
    inputs, outputs = _ints(node.inputs), _ints(node.outputs)
    used = [i for i in dict.fromkeys([*inputs, *outputs]) if i >= 0]
    remap = {old: new for new, old in enumerate(used)}
    buffers = [schema.BufferT()]
    tensors = []
    for old in used:
        tensor = graph.tensors[old]
        if tensor.buffer > 0 and _has_data(model, tensor.buffer):
            buffers.append(model.buffers[tensor.buffer])
            tensor.buffer = len(buffers) - 1
        else:
            tensor.buffer = 0
        tensors.append(tensor)
    node.inputs = [remap.get(i, -1) for i in inputs]
    node.outputs = [remap[i] for i in outputs]
    code = model.operatorCodes[node.opcodeIndex]
    node.opcodeIndex = 0
    sub = schema.SubGraphT()
    sub.tensors, sub.operators, sub.name = tensors, [node], "probe"
    sub.inputs = [
        remap[i] for i in dict.fromkeys(inputs) if i >= 0 and tensors[remap[i]].buffer == 0
    ]
    sub.outputs = list(node.outputs)
    probe = schema.ModelT()
    probe.version, probe.subgraphs, probe.buffers = 3, [sub], buffers
    probe.operatorCodes = [code]
    builder = flatbuffers.Builder(1024)
    builder.Finish(probe.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def main() -> int:
    """The child of `check_runtime`: one JSON line for the whole model, then, when it
    does not load, one per probed operator code, flushed as they come so that a probe that
    crashes LiteRT still leaves the earlier lines. Everything else goes to stderr."""
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    path = Path(sys.argv[1])
    data = path.read_bytes()
    with os.fdopen(out_fd, "w", encoding="utf-8") as out:
        error = _load_error(data)
        out.write(json.dumps({"load": error}) + "\n")
        out.flush()
        if error is None:
            return 0
        seen: set[tuple[int, int, str | None]] = set()
        for index, op in enumerate(_Graph(data).ops):
            key = (op.builtin, op.version, op.custom)
            if key in seen:
                continue
            seen.add(key)
            out.write(json.dumps({"probe": op.name}) + "\n")
            out.flush()
            found = missing_operator(_load_error(_probe_model(data, index)) or "")
            out.write(json.dumps({"probed": op.name, "missing": found}) + "\n")
            out.flush()
    return 0


def quantisation(data: bytes) -> Quantisation:
    """Full-integer when no operator computes on float tensors, except a QUANTIZE that
    takes a float model input and a DEQUANTIZE that gives a float model output."""
    graph = _Graph(data)
    full = True
    for op in graph.ops:
        if not graph.all_types(op) & _FLOAT_TYPES_ALL:
            continue
        if _boundary(graph, op):
            continue
        full = False
    io = [graph.types[i] for i in (*graph.inputs, *graph.outputs)]
    integer_io = bool(io) and not any(t in _FLOAT_TYPES_ALL for t in io)
    return Quantisation(full_integer=full and bool(graph.ops), integer_io=integer_io)


def _boundary(graph: _Graph, op: _Op) -> bool:
    if op.name == "QUANTIZE":
        return all(i in graph.inputs for i in op.inputs)
    if op.name == "DEQUANTIZE":
        return all(o in graph.outputs for o in op.outputs)
    return False


def edgetpu_estimate(data: bytes) -> EdgeTpuEstimate:
    """Which operators the Edge TPU compiler would map (see the module doc)."""
    graph = _Graph(data)
    ops = graph.ops
    names = Counter(op.name for op in ops)
    quantized = any(graph.activation_types(op) & _QUANTISED_TYPES for op in ops)
    if EDGETPU_CUSTOM_OP in names:
        cpu = Counter({n: c for n, c in names.items() if n != EDGETPU_CUSTOM_OP})
        summary = (
            f"already compiled for the Edge TPU: {names[EDGETPU_CUSTOM_OP]} "
            f"{EDGETPU_CUSTOM_OP} node(s) run there"
        )
        if cpu:
            summary += f"; {sum(cpu.values())} other operator(s) stay on the CPU"
        return EdgeTpuEstimate(
            compiled=True,
            quantized=quantized,
            on_edgetpu=Counter({EDGETPU_CUSTOM_OP: names[EDGETPU_CUSTOM_OP]}),
            on_cpu=cpu,
            summary=summary,
        )
    if not quantized:
        return EdgeTpuEstimate(
            compiled=False,
            quantized=False,
            on_cpu=names,
            first_cpu_op=ops[0].name if ops else None,
            summary=(
                "float model: stays on the CPU under the Edge TPU (it runs only int8/uint8 "
                "quantised operators); quantise it with `edgeagent model quantize`, then "
                "compile it with edgetpu_compiler"
            ),
        )
    on_tpu: Counter[str] = Counter()
    on_cpu: Counter[str] = Counter()
    first_cpu: str | None = None
    why = ""
    for op in ops:
        if (
            first_cpu is None
            and _boundary(graph, op)
            and (graph.activation_types(op) & _FLOAT_TYPES)
        ):
            on_cpu[op.name] += 1  # float I/O conversions at the edges run on the CPU
            continue
        if first_cpu is None:
            reason = _not_mappable(graph, op)
            if reason is None:
                on_tpu[op.name] += 1
                continue
            first_cpu, why = op.name, reason
        on_cpu[op.name] += 1
    if first_cpu is None:
        summary = f"all {sum(on_tpu.values())} mappable operator(s) would run on the Edge TPU"
        if on_cpu:
            summary += f" ({sum(on_cpu.values())} float input/output conversion(s) on the CPU)"
    else:
        summary = (
            f"{sum(on_tpu.values())} operator(s) would run on the Edge TPU; from {first_cpu} "
            f"({why}) on, {sum(on_cpu.values())} stay on the CPU (the compiler partitions once)"
        )
    return EdgeTpuEstimate(
        compiled=False,
        quantized=True,
        on_edgetpu=on_tpu,
        on_cpu=on_cpu,
        first_cpu_op=first_cpu,
        summary=summary,
    )


def _not_mappable(graph: _Graph, op: _Op) -> str | None:
    if op.name not in EDGETPU_OPS:
        return "not in the Edge TPU's supported operations"
    if op.name == "DEQUANTIZE" and not all(o in graph.outputs for o in op.outputs):
        return "DEQUANTIZE is mapped only at the end of the graph"
    if graph.activation_types(op) & _FLOAT_TYPES:
        return "works on float tensors"
    return None


__all__ = [
    "EDGETPU_CUSTOM_OP",
    "EDGETPU_OPS",
    "EdgeTpuEstimate",
    "Quantisation",
    "RuntimeCheck",
    "check_runtime",
    "edgetpu_estimate",
    "quantisation",
]

if __name__ == "__main__":
    sys.exit(main())
