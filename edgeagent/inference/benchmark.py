"""How fast a model runs here: load time and invoke latency on random inputs. Serves
`edgeagent bench` and the fleet's `bench` command alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeagent.inference.engine import Engine, TensorInfo
from edgeagent.modelfile.catalog import resolve_model


def random_input(tensor: TensorInfo, rng: np.random.Generator) -> np.ndarray:
    """A random tensor over the input's whole range, in its dtype and shape."""
    dtype = np.dtype(tensor.dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=tensor.shape, endpoint=True, dtype=dtype)
    return rng.random(size=tensor.shape, dtype=np.float32).astype(dtype)


def measure(
    model: str,
    accelerator: str,
    threads: int,
    runs: int,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Loads `model` and times `runs` invokes after a warm-up; `on_progress(done)` after
    each. Percentiles are numpy's (linear), as in telemetry."""
    path = resolve_model(model)
    started = time.perf_counter()
    engine = Engine.load(path, accelerator=accelerator, threads=threads)
    load_ms = (time.perf_counter() - started) * 1000
    try:
        rng = np.random.default_rng(0)
        inputs = [random_input(t, rng) for t in engine.inputs]
        engine.warm_up()
        latencies = []
        for i in range(runs):
            t0 = time.perf_counter()
            engine.invoke(inputs)
            latencies.append((time.perf_counter() - t0) * 1000)
            if on_progress is not None:
                on_progress(i + 1)
        used = engine.accelerator
    finally:
        engine.close()
    median, p95 = np.percentile(latencies, (50, 95))
    return {
        "accelerator": used,
        "threads": threads,
        "load_ms": round(load_ms, 3),
        "invoke_ms": {
            "median": round(float(median), 3),
            "p95": round(float(p95), 3),
            "min": round(min(latencies), 3),
        },
        "runs": runs,
    }
