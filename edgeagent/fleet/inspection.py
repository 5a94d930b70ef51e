"""The `edgeagent model inspect` report: what a .tflite holds and where it can run (this
LiteRT, the Edge TPU), as the one JSON object `inspect --json` prints (cli/model.py)."""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgeagent.errors import EdgeAgentError
from edgeagent.fleet import compat
from edgeagent.modelfile.tflite import ModelFile, TensorDescription, read_model


def inspect_report(path: Path) -> dict[str, Any]:
    """The `inspect --json` object for `path`; ModelError when it is not a TFLite model."""
    model = read_model(path)
    data = path.read_bytes()
    runtime = compat.check_runtime(path)
    estimate = compat.edgetpu_estimate(data)
    kind = compat.quantisation(data)
    missing = {u.split(" (version")[0] for u in runtime.unsupported}
    operators = [
        {
            "name": name,
            "count": count,
            "supported": name not in missing,
            "on_edgetpu": estimate.on_edgetpu.get(name, 0),
            "on_cpu": estimate.on_cpu.get(name, 0),
        }
        for name, count in sorted(model.operators.items())
    ]
    return {
        "path": str(path),
        "size": model.size,
        "sha256": hashlib.sha256(data).hexdigest(),
        "inputs": [_tensor(t) for t in model.inputs],
        "outputs": [_tensor(t) for t in model.outputs],
        "operators": operators,
        "runtime": {
            "litert": _litert_version(),
            "runs": runtime.runs,
            "error": runtime.error,
            "unsupported": list(runtime.unsupported),
        },
        "edgetpu": {
            "compiled": estimate.compiled,
            "quantized": estimate.quantized,
            "first_cpu_op": estimate.first_cpu_op,
            "summary": estimate.summary,
        },
        "full_integer": kind.full_integer,
        "integer_io": kind.integer_io,
        "metadata_names": list(model.metadata_names),
        "associated_files": [f.name for f in model.associated_files],
        "labels": list(model.labels),
        "inferred": _inferred(path, model),
    }


def _inferred(path: Path, model: ModelFile) -> dict[str, Any]:
    from edgeagent.modelfile.catalog import describe_model

    try:
        description = describe_model(str(path), model_file=model)
    except EdgeAgentError as exc:
        return {"task": None, "explain": f"cannot describe: {exc}", "sources": {}, "about": ""}
    return {
        "task": description.task.model_dump(mode="json"),
        "explain": description.explain(),
        "sources": dict(description.sources),
        "about": description.about,
    }


def _tensor(t: TensorDescription) -> dict[str, Any]:
    return {
        "name": t.name,
        "shape": list(t.shape),
        "dtype": t.dtype,
        "scale": t.scale,
        "zero_point": t.zero_point,
    }


def _litert_version() -> str:
    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:
        return "unknown"
