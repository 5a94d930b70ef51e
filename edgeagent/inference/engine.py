"""Loads a .tflite model into LiteRT on the best accelerator that can run it.

`Engine.load(path)` with `accelerator="auto"` tries the accelerators of AUTO_ORDER in turn
and records, for each one it skips, one sentence saying why. Naming an accelerator makes it
that one or an AcceleratorError: a device someone asked for never silently becomes the CPU.

Two LiteRT runtimes sit behind the one Engine interface (`invoke`, `inputs`, `outputs`,
`describe`, `close`): the Interpreter with an accelerator's delegates (Edge TPU, GPU
delegate, CPU), and a CompiledModel that an accelerator compiles itself (`litert-gpu`,
LiteRT's WebGPU accelerator; hal/accel/base.py `CompiledModelAccelerator`). Both return
the same raw outputs in the model's subgraph order, so the rest of the agent cannot tell.

An Engine is used by one inference thread at a time; `invoke()` holds a lock only so that
`close()` from another thread cannot pull the runtime from under a running inference.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from ai_edge_litert.interpreter import Interpreter

from edgeagent.errors import AcceleratorError, EdgeAgentError, ModelError
from edgeagent.hal import accel as registry
from edgeagent.hal.accel.base import Accelerator, CompiledModelAccelerator, ProbeState
from edgeagent.modelfile.tflite import (
    POSTPROCESS_OP,
    ModelFile,
    TensorDescription,
    count_output,
    read_model,
)

_log = logging.getLogger(__name__)

# What LiteRT says when a model needs an operator this build lacks.
_UNRESOLVED_CUSTOM = re.compile(r"unresolved custom op: ([^\s.]+)")
_MISSING_BUILTIN = re.compile(r"Didn't find op for builtin opcode '(\w+)' version '(\d+)'")
# What the Interpreter raises while reading a model or applying a delegate.
_LOAD_ERRORS = (ValueError, RuntimeError, OSError)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """An allocated input or output tensor and its quantisation (scale 0.0: not quantised)."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    scale: float
    zero_point: int

    @classmethod
    def from_details(cls, details: Mapping[str, Any]) -> TensorInfo:
        """From one entry of Interpreter.get_input_details() / get_output_details()."""
        scale, zero_point = details.get("quantization", (0.0, 0))
        return cls(
            name=str(details["name"]),
            index=int(details["index"]),
            shape=tuple(int(d) for d in details["shape"]),
            dtype=np.dtype(details["dtype"]).name,
            scale=float(scale),
            zero_point=int(zero_point),
        )

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0

    def quantize(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Float values -> this tensor's dtype: round(x / scale) + zero point, clipped to the
        dtype's range (halves round to even). Float tensors get a plain cast;
        unquantised integer tensors get the values rounded and clipped."""
        dtype = np.dtype(self.dtype)
        if dtype.kind == "f":
            return np.asarray(x, dtype=dtype)
        # In place on one float32 buffer: this runs on every camera frame.
        values = np.array(x, dtype=np.float32)
        if self.quantized:
            values /= np.float32(self.scale)
        # Halves to even, and the zero point added after rounding: what LiteRT's own
        # QUANTIZE kernel gives (checked against it in tests/test_engine.py).
        np.rint(values, out=values)
        if self.quantized:
            values += np.float32(self.zero_point)
        info = np.iinfo(dtype)
        np.clip(values, info.min, info.max, out=values)
        result: npt.NDArray[Any] = values.astype(dtype)
        return result

    def dequantize(self, q: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """This tensor's raw values -> float32 ((q - zero point) * scale when quantised)."""
        values = np.asarray(q, dtype=np.float32)
        if not self.quantized:
            return values
        return (values - np.float32(self.zero_point)) * np.float32(self.scale)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": self.index,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }


class _Runtime(Protocol):
    """One way LiteRT runs a loaded model; the Engine holds exactly one."""

    inputs: tuple[TensorInfo, ...]  # in the model's subgraph order
    outputs: tuple[TensorInfo, ...]

    def run(self, inputs: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """Raw outputs (copies); ValueError for an input that does not fit, RuntimeError
        when LiteRT fails."""
        ...

    def close(self) -> None: ...


class _InterpreterRuntime:
    """The Interpreter, with whatever delegates it was built with."""

    def __init__(self, interpreter: Interpreter) -> None:
        self._interpreter = interpreter
        self.inputs = tuple(TensorInfo.from_details(d) for d in interpreter.get_input_details())
        self.outputs = tuple(TensorInfo.from_details(d) for d in interpreter.get_output_details())

    def run(self, inputs: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        for info, value in zip(self.inputs, inputs, strict=True):
            try:
                self._interpreter.set_tensor(info.index, value)
            except ValueError as exc:
                raise _MisfitError(info, value, str(exc)) from exc
        self._interpreter.invoke()
        # get_tensor copies, so the results survive the next invoke().
        return [self._interpreter.get_tensor(info.index) for info in self.outputs]

    def close(self) -> None:
        """Nothing to do: the Interpreter and its delegate go with the Engine's reference."""


class _CompiledRuntime:
    """A LiteRT CompiledModel run through its first signature with one set of buffers.

    The signature lists tensors in its own order and without quantisation, so each is
    matched by name with the file's subgraph inputs and outputs: `inputs` and `outputs`
    are in the Interpreter's order, with the file's scale and zero point."""

    def __init__(self, compiled: Any, model: ModelFile) -> None:
        signature = compiled.get_signature_by_index(0)
        key = signature["key"]
        self.inputs, self._input_slots = _signature_tensors(
            signature["inputs"], compiled.get_input_tensor_details(key), model.inputs
        )
        self.outputs, self._output_slots = _signature_tensors(
            signature["outputs"], compiled.get_output_tensor_details(key), model.outputs
        )
        self._compiled = compiled
        self._input_buffers = compiled.create_input_buffers(0)
        self._output_buffers = compiled.create_output_buffers(0)

    def run(self, inputs: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        for info, slot, value in zip(self.inputs, self._input_slots, inputs, strict=True):
            # A TensorBuffer takes any bytes of the right kind; check what set_tensor would.
            shape, dtype = tuple(np.shape(value)), getattr(value, "dtype", None)
            if shape != info.shape or dtype != np.dtype(info.dtype):
                raise _MisfitError(info, value, "shape or dtype differs")
            self._input_buffers[slot].write(np.asarray(value))
        self._compiled.run_by_index(0, self._input_buffers, self._output_buffers)
        outputs = []
        for info, slot in zip(self.outputs, self._output_slots, strict=True):
            count = int(np.prod(info.shape, dtype=np.int64))
            data = self._output_buffers[slot].read(count, np.dtype(info.dtype))
            outputs.append(data.reshape(info.shape))
        return outputs

    def close(self) -> None:
        # Buffers go before the model that made them; LiteRT frees each with its owner.
        self._input_buffers = []
        self._output_buffers = []
        self._compiled.close()


def _clear_past_count(outputs: list[npt.NDArray[Any]], count_index: int) -> None:
    """Zeros the rows past the count in the other outputs. The operator writes only the
    rows it counts and leaves the rest as the memory was: stale values, NaN or 1e18 that
    would read as broken output (the gate's finiteness check, `non_finite` results)."""
    value = float(outputs[count_index].reshape(-1)[0])
    count = int(value) if np.isfinite(value) and value > 0 else 0
    for index, output in enumerate(outputs):
        if index != count_index and output.ndim >= 2:
            output[:, count:] = 0


def _signature_tensors(
    names: Sequence[str],
    details: Mapping[str, Mapping[str, Any]],
    described: Sequence[TensorDescription],
) -> tuple[tuple[TensorInfo, ...], tuple[int, ...]]:
    """The signature's tensors as TensorInfo in the file's order, and where each sits in
    the signature (its buffer's position). ValueError when they are not the file's
    subgraph tensors (another signature first): without the file's quantisation the
    outputs could not be read right, so the model is left to the Interpreter."""
    by_tensor = {str(details[n]["name"]): position for position, n in enumerate(names)}
    slots = [by_tensor.get(d.name) for d in described]
    order = [slot for slot in slots if slot is not None]
    if len(described) != len(names) or len(order) != len(described):
        raise ValueError(
            f"its first signature's tensors {sorted(by_tensor)} are not the model's "
            f"{[d.name for d in described]}"
        )
    infos = []
    for position, tensor in zip(order, described, strict=True):
        entry = details[names[position]]
        infos.append(
            TensorInfo(
                name=str(entry["name"]),
                index=int(entry["index"]),
                shape=tuple(int(d) for d in entry["shape"]),
                dtype=np.dtype(entry["dtype"]).name,
                scale=tensor.scale,
                zero_point=tensor.zero_point,
            )
        )
    return tuple(infos), tuple(order)


class _MisfitError(ValueError):
    """An input array that does not fit its tensor; the Engine names the model."""

    def __init__(self, info: TensorInfo, value: Any, why: str) -> None:
        super().__init__(why)
        self.info = info
        self.got = f"{list(np.shape(value))} {getattr(value, 'dtype', type(value).__name__)}"
        self.why = why


class Engine:
    """A loaded model, ready to invoke. Build it with `Engine.load`."""

    def __init__(
        self,
        *,
        path: Path,
        runtime: _Runtime,
        model: ModelFile,
        accelerator: str,
        fallbacks: tuple[str, ...],
        threads: int,
        load_s: float,
    ) -> None:
        self.path = path
        self.model = model
        self.accelerator = accelerator
        self.fallbacks = fallbacks
        self.threads = threads
        self.load_s = load_s
        self.operators = model.operator_names
        self.inputs = runtime.inputs
        self.outputs = runtime.outputs
        self.runtime = "compiled-model" if isinstance(runtime, _CompiledRuntime) else "interpreter"
        self._runtime: _Runtime | None = runtime
        self._lock = threading.Lock()
        # SSD post-processing writes only the rows it counts (see _clear_past_count).
        self._count_output = (
            count_output([info.shape for info in self.outputs])
            if POSTPROCESS_OP in self.operators
            else None
        )

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        accelerator: str = "auto",
        threads: int = 1,
        accelerators: Mapping[str, Accelerator] | None = None,
        model: ModelFile | None = None,
    ) -> Engine:
        """Loads `path` on `accelerator` ("auto" or a name). `accelerators` replaces the
        registry (tests, or a service that already holds probed instances); `model` is
        `path` already parsed (`read_model`), so that the file is not parsed again.

        Raises ModelError when the file is not a model this runtime can run, and
        AcceleratorError when the named accelerator (or, for auto, every one) cannot."""
        if threads < 1:
            raise ValueError(f"threads must be 1 or more, got {threads}")
        started = time.perf_counter()
        if model is None:
            model = read_model(path)
        names = _candidates(accelerator, accelerators)
        explicit = accelerator != "auto"
        skipped: list[str] = []  # one sentence per accelerator passed over
        for name in names:
            try:
                acc = _lookup(name, accelerators)
                runtime = _open_on(acc, model, path, threads)
            except _Skip as skip:
                if explicit:
                    raise AcceleratorError(
                        f"cannot run {path.name} on the {name} accelerator, as configured: "
                        f"{skip.reason}. Fix the accelerator, or set accelerator to 'auto' "
                        "(or 'cpu') to run it elsewhere"
                    ) from skip.__cause__
                skipped.append(f"{name}: {skip.reason}")
                _log.log(skip.level, "not using %s for %s: %s", name, path.name, skip.reason)
                continue
            engine = cls(
                path=path,
                runtime=runtime,
                model=model,
                accelerator=name,
                fallbacks=tuple(skipped),
                threads=threads,
                load_s=time.perf_counter() - started,
            )
            _log.info(
                "loaded %s on %s (%s) with %d thread(s) in %.3f s%s",
                path.name,
                name,
                engine.runtime,
                threads,
                engine.load_s,
                f" after {len(skipped)} fallback(s)" if skipped else "",
            )
            return engine
        raise AcceleratorError(
            f"no accelerator can run {path.name}: {'; '.join(skipped)}. "
            "Include 'cpu' among the accelerators, or fix one of those above"
        )

    def invoke(self, inputs: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """Runs the model on `inputs` (one array per input tensor, in its dtype and shape) and
        returns copies of the outputs in their raw dtype (the rows SSD post-processing
        leaves unwritten are zeros)."""
        if len(inputs) != len(self.inputs):
            raise ValueError(
                f"{self.path.name} takes {len(self.inputs)} input(s), got {len(inputs)}"
            )
        with self._lock:
            runtime = self._require_open()
            try:
                outputs = runtime.run(inputs)
            except _MisfitError as exc:
                info = exc.info
                raise ValueError(
                    f"input {info.name!r} of {self.path.name} takes {list(info.shape)} "
                    f"{info.dtype}, got {exc.got}: {exc.why}"
                ) from exc
            except RuntimeError as exc:
                raise ModelError(
                    f"inference with {self.path.name} on {self.accelerator} failed: {exc}"
                ) from exc
        if self._count_output is not None:
            _clear_past_count(outputs, self._count_output)
        return outputs

    def warm_up(self, runs: int = 2) -> None:
        """Invokes on zero inputs so that first-inference costs (allocation, delegate
        compilation, caches) are not paid by the first real sample."""
        zeros = [np.zeros(info.shape, dtype=info.dtype) for info in self.inputs]
        for _ in range(runs):
            self.invoke(zeros)

    def describe(self) -> dict[str, Any]:
        """What was loaded, where and how, as JSON-able values."""
        return {
            "path": str(self.path),
            "size": self.model.size,
            "accelerator": self.accelerator,
            "runtime": self.runtime,
            "fallbacks": list(self.fallbacks),
            "threads": self.threads,
            "load_s": round(self.load_s, 4),
            "inputs": [info.to_json() for info in self.inputs],
            "outputs": [info.to_json() for info in self.outputs],
            "operators": dict(sorted(self.model.operators.items())),
            "labels": len(self.model.labels),
        }

    def close(self) -> None:
        """Releases the runtime (and its delegate or device); invoke() afterwards is an error."""
        with self._lock:
            runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.close()

    def _require_open(self) -> _Runtime:
        if self._runtime is None:
            raise ModelError(f"the engine for {self.path.name} is closed; load the model again")
        return self._runtime


class _Skip(Exception):  # noqa: N818 - control flow, not an error shown to anyone
    """This accelerator will not run the model; `reason` is the sentence to record."""

    def __init__(self, reason: str, level: int = logging.INFO) -> None:
        super().__init__(reason)
        self.reason = reason
        self.level = level


def _candidates(accelerator: str, accelerators: Mapping[str, Accelerator] | None) -> list[str]:
    if accelerator != "auto":
        return [accelerator]
    if accelerators is None:
        return list(registry.AUTO_ORDER)
    # Injected accelerators run in AUTO_ORDER; names the registry does not know go last.
    known = [name for name in registry.AUTO_ORDER if name in accelerators]
    return known + [name for name in accelerators if name not in registry.AUTO_ORDER]


def _lookup(name: str, accelerators: Mapping[str, Accelerator] | None) -> Accelerator:
    if accelerators is None:
        try:
            return registry.get_accelerator(name)
        except EdgeAgentError as exc:
            raise _Skip(str(exc), logging.WARNING) from exc
    if name not in accelerators:
        raise _Skip(
            f"unknown accelerator {name!r}; known: {', '.join(accelerators)}", logging.WARNING
        )
    return accelerators[name]


def _open_on(acc: Accelerator, model: ModelFile, path: Path, threads: int) -> _Runtime:
    """`model` ready to run on `acc` (an allocated Interpreter, or what the accelerator
    compiled), or _Skip saying why not. ModelError when the model itself cannot load
    (which no other accelerator would change)."""
    probe = acc.probe()
    if probe.state is ProbeState.ABSENT:
        raise _Skip(f"absent ({probe.reason})")
    if probe.state is ProbeState.BROKEN:
        raise _Skip(f"present but broken ({probe.reason})", logging.WARNING)
    why_not = acc.can_run(model.operator_names)
    if why_not is not None:
        raise _Skip(why_not)
    if isinstance(acc, CompiledModelAccelerator):
        return _compile_on(acc, model, path, threads)
    try:
        delegates = acc.delegates()
    except AcceleratorError as exc:
        raise _Skip(f"present but its delegate failed to load ({exc})", logging.WARNING) from exc
    try:
        interpreter = Interpreter(
            model_path=str(path), num_threads=threads, experimental_delegates=delegates or None
        )
        interpreter.allocate_tensors()
    except (*_LOAD_ERRORS, AcceleratorError) as exc:
        if not delegates:
            # The built-in kernels failed: the model is the problem, not the device.
            raise _model_error(path, model, exc) from exc
        raise _Skip(
            f"present but the model did not load with its delegate ({_one_line(exc)})",
            logging.WARNING,
        ) from exc
    return _InterpreterRuntime(interpreter)


def _compile_on(
    acc: CompiledModelAccelerator, model: ModelFile, path: Path, threads: int
) -> _Runtime:
    """What `acc` compiled, or _Skip: a model that will not compile for the GPU still
    runs on the CPU accelerator, so nothing here is the model's fault."""
    try:
        compiled = acc.compile_model(path, threads)
    except AcceleratorError as exc:
        raise _Skip(f"present but the model did not compile ({exc})", logging.WARNING) from exc
    try:
        return _CompiledRuntime(compiled, model)
    except (*_LOAD_ERRORS, KeyError) as exc:
        compiled.close()
        raise _Skip(
            f"present but the compiled model cannot be run ({_one_line(exc)})", logging.WARNING
        ) from exc


def missing_operator(text: str) -> str | None:
    """The operator a LiteRT load error says this runtime lacks: a custom operator's
    name, or a builtin's "NAME (version N)"; None when the error says no such thing."""
    custom = _UNRESOLVED_CUSTOM.search(text)
    if custom is not None:
        return custom.group(1)
    builtin = _MISSING_BUILTIN.search(text)
    if builtin is not None:
        return f"{builtin.group(1)} (version {builtin.group(2)})"
    return None


def _model_error(path: Path, model: ModelFile, exc: Exception) -> ModelError:
    text = str(exc)
    custom = _UNRESOLVED_CUSTOM.search(text)
    builtin = _MISSING_BUILTIN.search(text)
    if custom is not None:
        op = custom.group(1)
        hint = (
            "it was compiled for the Edge TPU and runs only there: connect a Coral, or deploy "
            "the model before edgetpu_compiler"
            if op == "edgetpu-custom-op"
            else "rebuild the model with builtin operators, or run a LiteRT build that has it"
        )
        return ModelError(
            f"model {path} uses the custom operator {op}, which is not in this runtime: {hint}"
        )
    if builtin is not None:
        return ModelError(
            f"model {path} uses the operator {builtin.group(1)} (version {builtin.group(2)}), "
            "which is not in this runtime: upgrade ai-edge-litert, or convert the model with "
            "an older converter"
        )
    return ModelError(
        f"LiteRT cannot load model {path} ({_one_line(exc)}); operators: "
        f"{', '.join(sorted(model.operators)) or 'none'}. Rebuild or redeploy the model"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
