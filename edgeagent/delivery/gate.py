"""The validation gate: a delivered model must load and run here before it is activated.

`validate_model` runs the checks in a child process (`python -m edgeagent.delivery.gate`), so a
model that crashes LiteRT (a segfault in a kernel) or hangs in `invoke()` costs a child,
never the agent: the child is killed after `timeout_s` (smoke-hang), and a child that dies
by a signal or exits without a verdict is smoke-crash.

In the child, in order: the file parses as TFLite (not-tflite); it loads with the real
LiteRT interpreter on the CPU (unsupported-op naming the operator, or load-failed); its
first input fits the source, through the same `make_preprocessor` the pipeline uses, with
a synthetic sample of the source's shape (input-mismatch); inference on a zero input and
on a deterministic random sample succeeds (smoke-failed) with finite outputs (non-finite);
and when the manifest carries a reference, the first output for its input is within atol
(reference-mismatch). The report carries the load and invoke times, the baseline for
later probation.

Testing note: no .tflite file is known that reliably segfaults or hangs this LiteRT, so
the tests prove the supervision (kill on time-out, report a signal death) by pointing
`_GATE_ENTRY`, the command the child runs, at tiny scripts that SIGSEGV themselves or sleep.
The checks the real child runs are tested with real models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from edgeagent.delivery.signing import DeliveryError, DeliveryManifest, ReasonCode
from edgeagent.errors import EdgeAgentError, ModelError
from edgeagent.inference.engine import missing_operator

_log = logging.getLogger(__name__)

SourceKind = Literal["image", "window"]

# The command the supervisor starts; the request goes to its stdin as JSON and the verdict
# comes back as JSON on its stdout. Tests replace it (see the module doc).
_GATE_ENTRY: tuple[str, ...] = (sys.executable, "-m", "edgeagent.delivery.gate")

# What LiteRT says when an operator is missing (the same texts inference/engine.py reads).
_SMOKE_RUNS = 3  # timed invokes on the random sample, after the one on zeros
_STDERR_TAIL = 800  # characters of the child's stderr quoted in a crash report
_ARTICLE = {"image": "an image", "window": "a window"}


@dataclass(frozen=True, slots=True)
class GateReport:
    """What the gate measured on a model that passed."""

    load_ms: float  # read + interpreter creation + tensor allocation
    invoke_ms: float  # median of the timed smoke inferences
    invoke_max_ms: float
    operators: tuple[str, ...]
    input_shape: tuple[int, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    reference_max_error: float | None  # None when the manifest has no reference

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GateReport:
        return cls(
            load_ms=float(data["load_ms"]),
            invoke_ms=float(data["invoke_ms"]),
            invoke_max_ms=float(data["invoke_max_ms"]),
            operators=tuple(str(o) for o in data["operators"]),
            input_shape=tuple(int(d) for d in data["input_shape"]),
            output_shapes=tuple(tuple(int(d) for d in s) for s in data["output_shapes"]),
            reference_max_error=(
                None if data["reference_max_error"] is None else float(data["reference_max_error"])
            ),
        )


class ModelValidator(Protocol):
    """What delivery calls to validate a staged model before installing it: `validate_model`
    on a device; `edgeagent fleet simulate` passes a stand-in that skips only LiteRT."""

    def __call__(
        self,
        path: Path,
        manifest: DeliveryManifest,
        *,
        source_kind: SourceKind,
        source_shape: tuple[int, ...],
        timeout_s: float = ...,
    ) -> GateReport: ...


def validate_model(
    path: Path,
    manifest: DeliveryManifest,
    *,
    source_kind: SourceKind,
    source_shape: tuple[int, ...],
    timeout_s: float = 30.0,
) -> GateReport:
    """Runs the gate on `path` in a child process; the report, or DeliveryError with the
    reason (see the module doc). `source_shape` is one sample: (H, W, 3) frames or
    (samples, channels) windows."""
    request = {
        "model": str(path),
        "manifest": json.loads(manifest.to_json_bytes()),
        "source_kind": source_kind,
        "source_shape": list(source_shape),
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        list(_GATE_ENTRY),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so a kill reaches any children
    )
    try:
        out, err = proc.communicate(json.dumps(request).encode("utf-8"), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise DeliveryError(
            "smoke-hang",
            f"model {manifest.name} {manifest.version} did not finish its smoke test in "
            f"{timeout_s:g} s and was killed: it hangs or is far too slow for this device",
            details={"stderr": _tail(err)},
        ) from None
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    elapsed = time.monotonic() - started
    if proc.returncode < 0:
        name = _signal_name(-proc.returncode)
        raise DeliveryError(
            "smoke-crash",
            f"model {manifest.name} {manifest.version} crashed the runtime during its smoke "
            f"test (killed by {name}): it cannot run safely here. stderr: {_tail(err) or '-'}",
            details={"signal": name, "stderr": _tail(err)},
        )
    verdict = _parse_verdict(out)
    if verdict is None:
        raise DeliveryError(
            "smoke-crash",
            f"the smoke test of {manifest.name} {manifest.version} ended (exit status "
            f"{proc.returncode}) without a verdict. stderr: {_tail(err) or '-'}",
            details={"exit_status": proc.returncode, "stderr": _tail(err)},
        )
    if not verdict.get("ok"):
        code = str(verdict.get("code", "smoke-failed"))
        raise DeliveryError(
            _as_code(code), str(verdict.get("message", "the model failed its smoke test"))
        )
    report = GateReport.from_json(verdict["report"])
    _log.info(
        "model %s %s passed the gate in %.1f s (load %.1f ms, invoke %.2f ms)",
        manifest.name,
        manifest.version,
        elapsed,
        report.load_ms,
        report.invoke_ms,
    )
    return report


# --- the child ---------------------------------------------------------------------------------


class _Reject(Exception):  # noqa: N818 - a verdict, not a failure of the gate itself
    def __init__(self, code: ReasonCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _run_checks(
    path: Path,
    manifest: DeliveryManifest,
    source_kind: SourceKind,
    source_shape: tuple[int, ...],
) -> GateReport:
    """The gate's checks, in this process. Only the child calls this: a crash or hang in
    here takes the calling process with it. Raises _Reject with the reason."""
    from edgeagent.inference.engine import Engine
    from edgeagent.inference.preprocess import make_preprocessor
    from edgeagent.modelfile.tflite import read_model

    try:
        model_file = read_model(path)
    except ModelError as exc:
        raise _Reject("not-tflite", str(exc)) from exc
    started = time.perf_counter()
    try:
        engine = Engine.load(path, accelerator="cpu", threads=1, model=model_file)
    except ModelError as exc:
        op = missing_operator(f"{exc.__cause__ or ''}\n{exc}")
        if op is not None:
            raise _Reject(
                "unsupported-op",
                f"model {manifest.name} {manifest.version} uses the operator {op}, which this "
                f"runtime lacks: {exc}",
            ) from exc
        raise _Reject("load-failed", str(exc)) from exc
    except EdgeAgentError as exc:
        raise _Reject("load-failed", str(exc)) from exc
    load_ms = (time.perf_counter() - started) * 1000
    if len(engine.inputs) != 1:
        raise _Reject(
            "input-mismatch",
            f"model {manifest.name} {manifest.version} has {len(engine.inputs)} inputs; a "
            "pipeline feeds exactly one",
        )
    tensor = engine.inputs[0]
    sample = _synthetic_sample(source_kind, source_shape)
    try:
        prepare = make_preprocessor(manifest.preprocess, tensor, source_kind)
        prepared = prepare(sample).tensor
    except (ModelError, ValueError) as exc:
        raise _Reject(
            "input-mismatch",
            f"model {manifest.name} {manifest.version} cannot take samples of "
            f"{_ARTICLE[source_kind]} source of shape {list(source_shape)}: {exc}",
        ) from exc
    zeros = np.zeros(tensor.shape, dtype=tensor.dtype)
    times: list[float] = []
    for what, value in [("zeros", zeros)] + [("a random sample", prepared)] * _SMOKE_RUNS:
        started = time.perf_counter()
        try:
            outputs = engine.invoke([value])
        except (ModelError, ValueError, RuntimeError) as exc:
            raise _Reject("smoke-failed", f"inference on {what} failed: {exc}") from exc
        times.append((time.perf_counter() - started) * 1000)
        for info, out in zip(engine.outputs, outputs, strict=True):
            values = info.dequantize(out)
            if not np.all(np.isfinite(values)):
                bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
                raise _Reject(
                    "non-finite",
                    f"model {manifest.name} {manifest.version} gives {bad} NaN/infinite "
                    f"value(s) in output {info.name!r} on {what}: it is broken; rebuild it",
                )
    reference_error = _check_reference(engine, manifest)
    engine.close()
    timed = sorted(times[1:])
    return GateReport(
        load_ms=round(load_ms, 3),
        invoke_ms=round(timed[len(timed) // 2], 3),
        invoke_max_ms=round(max(times), 3),
        operators=tuple(sorted(model_file.operators)),
        input_shape=tensor.shape,
        output_shapes=tuple(info.shape for info in engine.outputs),
        reference_max_error=reference_error,
    )


def _check_reference(engine: Any, manifest: DeliveryManifest) -> float | None:
    ref = manifest.reference
    if ref is None:
        return None
    tensor = engine.inputs[0]
    given = ref.input.array()
    if given.shape != tensor.shape or given.dtype.name != tensor.dtype:
        raise _Reject(
            "reference-mismatch",
            f"the reference input is {given.dtype.name} {list(given.shape)} but the model "
            f"takes {tensor.dtype} {list(tensor.shape)}: the manifest belongs to another model",
        )
    try:
        outputs = engine.invoke([given])
        output = engine.outputs[0].dequantize(outputs[0])
    except (ModelError, ValueError, RuntimeError) as exc:
        raise _Reject("smoke-failed", f"inference on the reference input failed: {exc}") from exc
    expected = ref.output.array().astype(np.float32)
    if expected.shape != output.shape:
        raise _Reject(
            "reference-mismatch",
            f"the reference output is {list(expected.shape)} but the model gives "
            f"{list(output.shape)}: the manifest belongs to another model",
        )
    count = _detection_count(engine, manifest, outputs)
    if count is not None:
        # TFLite_Detection_PostProcess leaves the rows past its count unspecified (stale
        # memory): only the detections it reports can be compared.
        output, expected = output[:, :count], expected[:, :count]
    error = float(np.max(np.abs(output - expected))) if output.size else 0.0
    if not error <= ref.atol:
        raise _Reject(
            "reference-mismatch",
            f"model {manifest.name} {manifest.version} gives the reference input an output "
            f"off by up to {error:.6g} (allowed {ref.atol:g}): the model or its manifest is "
            "wrong, or this runtime computes differently",
        )
    return round(error, 9)


def _detection_count(engine: Any, manifest: DeliveryManifest, outputs: list[Any]) -> int | None:
    """The detection count of a TFLite_Detection_PostProcess model (the decoder's rule: the
    postprocess layout, or auto with four outputs) whose first output holds one row per
    detection, else None."""
    from edgeagent.config import DetectionTask
    from edgeagent.modelfile.tflite import count_output

    task = manifest.task
    infos = engine.outputs
    if not isinstance(task, DetectionTask) or len(infos) != 4:
        return None
    if task.layout not in ("auto", "postprocess") or len(infos[0].shape) < 2:
        return None
    count = count_output([info.shape for info in infos])
    if count is None:
        return None
    value = infos[count].dequantize(outputs[count]).reshape(-1)[0]
    if not np.isfinite(value):
        return None
    return max(0, min(round(float(value)), int(infos[0].shape[1])))


def _synthetic_sample(kind: SourceKind, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(0)  # deterministic: the same sample on every device
    if kind == "image":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.normal(0.0, 1.0, size=shape).astype(np.float32)


def main() -> int:
    """The child: request JSON on stdin, verdict JSON on stdout. Everything else the
    process (or native code) prints goes to stderr, so stdout carries only the verdict."""
    verdict_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        request = json.loads(sys.stdin.buffer.read())
        manifest = DeliveryManifest.model_validate(request["manifest"])
        report = _run_checks(
            Path(request["model"]),
            manifest,
            request["source_kind"],
            tuple(int(d) for d in request["source_shape"]),
        )
        verdict: dict[str, Any] = {"ok": True, "report": report.to_json()}
    except _Reject as reject:
        verdict = {"ok": False, "code": reject.code, "message": reject.message}
    except Exception as exc:  # noqa: BLE001 - any other failure is still a verdict to report
        verdict = {
            "ok": False,
            "code": "smoke-failed",
            "message": f"the smoke test failed unexpectedly: {type(exc).__name__}: {exc}",
        }
    with os.fdopen(verdict_fd, "w", encoding="utf-8") as out:
        json.dump(verdict, out)
    return 0


def _parse_verdict(out: bytes) -> dict[str, Any] | None:
    try:
        verdict = json.loads(out.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(verdict, dict) or ("report" not in verdict and "code" not in verdict):
        return None
    return verdict


def _as_code(code: str) -> ReasonCode:
    from edgeagent.delivery.signing import REASON_CODES

    return code if code in REASON_CODES else "smoke-failed"  # type: ignore[return-value]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(err: bytes | None) -> str:
    text = (err or b"").decode("utf-8", "replace").strip()
    return text[-_STDERR_TAIL:]


__all__ = ["GateReport", "SourceKind", "validate_model"]

if __name__ == "__main__":
    sys.exit(main())
