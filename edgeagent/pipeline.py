"""One pipeline: a source, a model, and three threads that overlap.

    capture thread        inference thread          decode thread
    source.read()   -->   engine.invoke()     -->   decoder(outputs)
    preprocess()   newest  (releases the GIL)  FIFO  build result, publish()
                   slot                        queue

The slot between capture and inference keeps only the newest sample: a camera faster
than the model drops its oldest frames (counted), it never builds latency. The queue
between inference and decoding is bounded and blocks when full: results are never
dropped. Capture, pre-processing and decoding of neighbouring frames run while
`invoke()` runs, so the model is never idle waiting for Python.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeagent.config import PipelineConfig
from edgeagent.errors import EdgeAgentError, ModelError, SourceError
from edgeagent.hal.accel.base import Accelerator
from edgeagent.hal.source import Sample, SampleKind, Source
from edgeagent.hal.sources import open_source
from edgeagent.inference import Engine, Prepared, make_decoder, make_preprocessor
from edgeagent.models.catalog import ModelDescription, describe_model

log = logging.getLogger(__name__)

Publish = Callable[[str, dict[str, Any]], None]
SourceFactory = Callable[[Any], Source]

_RESULT_QUEUE_SIZE = 8
_SOURCE_BACKOFF_MAX_S = 30.0


@dataclass(slots=True)
class _Captured:
    sample: Sample
    prepared: Prepared
    preprocess_s: float


@dataclass(slots=True)
class _Inferred:
    captured: _Captured
    outputs: list[np.ndarray]
    invoke_s: float


class NewestSlot:
    """A one-item hand-over that keeps the newest item; `put` replaces what is unread."""

    def __init__(self) -> None:
        self._item: _Captured | None = None
        self._cond = threading.Condition()
        self.replaced = 0

    def put(self, item: _Captured) -> None:
        with self._cond:
            if self._item is not None:
                self.replaced += 1
            self._item = item
            self._cond.notify()

    def take(self, timeout: float) -> _Captured | None:
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def wait_taken(self, timeout: float) -> None:
        """Blocks until the consumer took the item (or `timeout`)."""
        with self._cond:
            if self._item is not None:
                self._cond.wait(timeout)


@dataclass
class PipelineStats:
    frames_in: int = 0
    frames_dropped: int = 0
    results_out: int = 0
    invoke_errors: int = 0
    source_errors: int = 0
    last_error: str | None = None
    started_at: float = field(default_factory=time.time)


class Pipeline:
    """Runs one configured pipeline until `stop()`; results go to `publish(name, result)`."""

    def __init__(
        self,
        config: PipelineConfig,
        publish: Publish,
        *,
        source_factory: SourceFactory = open_source,
        accelerators: dict[str, Accelerator] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._publish = publish
        self._source_factory = source_factory
        self._accelerators = accelerators
        self.stats = PipelineStats()
        self.model: ModelDescription | None = None
        self.engine: Engine | None = None
        self._source: Source | None = None
        self._slot = NewestSlot()
        self._results: queue.Queue[_Inferred | None] = queue.Queue(_RESULT_QUEUE_SIZE)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sequence = 0

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Loads the model and opens the source; raises EdgeAgentError with the reason."""
        cfg = self.config
        self.model = describe_model(
            cfg.model, task=cfg.task, labels=cfg.labels, preprocess=cfg.preprocess
        )
        self.engine = Engine.load(
            self.model.path,
            accelerator=cfg.accelerator,
            threads=cfg.threads,
            accelerators=self._accelerators,
        )
        kind: SampleKind = "window" if cfg.source.type in _WINDOW_SOURCES else "image"
        if len(self.engine.inputs) != 1:
            raise ModelError(
                f"pipeline {self.name}: model {self.model.path} has {len(self.engine.inputs)} "
                "inputs; a pipeline feeds exactly one (a frame or a sensor window)"
            )
        spec = self.model.preprocess
        if spec is not None and spec.type != kind:
            raise ModelError(
                f"pipeline {self.name}: model {self.model.name} takes {spec.type}s (input "
                f"{list(self.engine.inputs[0].shape)}) but source {cfg.source.type!r} delivers "
                f"{kind}s; choose a model made for this source"
            )
        self._preprocess = make_preprocessor(spec, self.engine.inputs[0], kind)
        self._decode = make_decoder(
            self.model.task, self.engine.outputs, self.model.labels, inputs=self.engine.inputs
        )
        self.engine.warm_up()
        self._source = self._source_factory(cfg.source)
        self._threads = [
            threading.Thread(target=self._capture_loop, name=f"{self.name}-capture", daemon=True),
            threading.Thread(target=self._infer_loop, name=f"{self.name}-infer", daemon=True),
            threading.Thread(target=self._decode_loop, name=f"{self.name}-decode", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info(
            "pipeline %s: running %s %s on %s with %d thread(s)",
            self.name,
            self.model.name,
            self.model.version,
            self.engine.accelerator,
            cfg.threads,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stops capture, finishes the frame in flight and publishes its result."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("pipeline %s: thread %s did not stop in time", self.name, thread.name)
        if self._source is not None:
            self._source.close()
        if self.engine is not None:
            self.engine.close()

    def describe(self) -> dict[str, Any]:
        """What the retained status message says about this pipeline."""
        info: dict[str, Any] = {"name": self.name, "source": self.config.source.type}
        if self.model is not None:
            info["model"] = {"name": self.model.name, "version": self.model.version}
            info["task"] = self.model.task.type
        if self.engine is not None:
            info["accelerator"] = self.engine.accelerator
            info["fallbacks"] = list(self.engine.fallbacks)
        return info

    # --- threads ---------------------------------------------------------------------

    def _capture_loop(self) -> None:
        assert self._source is not None
        source = self.config.source
        unpaced = getattr(source, "fps", None) == 0 or getattr(source, "realtime", True) is False
        backoff = 1.0
        while not self._stopping.is_set():
            try:
                sample = self._source.read()
            except SourceError as exc:
                self.stats.source_errors += 1
                self.stats.last_error = str(exc)
                log.error(
                    "pipeline %s: source failed: %s; retrying in %.0f s", self.name, exc, backoff
                )
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, _SOURCE_BACKOFF_MAX_S)
                self._reopen_source()
                continue
            backoff = 1.0
            started = time.perf_counter()
            prepared = self._preprocess(sample.data)
            self.stats.frames_in += 1
            self._slot.put(_Captured(sample, prepared, time.perf_counter() - started))
            if unpaced:
                # A source that does not pace itself would otherwise render frames only
                # to drop them, taking the GIL from the invoke thread: keep one ready.
                self._slot.wait_taken(timeout=0.2)

    def _reopen_source(self) -> None:
        try:
            if self._source is not None:
                self._source.close()
            self._source = self._source_factory(self.config.source)
        except EdgeAgentError as exc:
            self.stats.last_error = str(exc)
            log.error("pipeline %s: cannot reopen source: %s", self.name, exc)

    def _infer_loop(self) -> None:
        assert self.engine is not None
        interval = 1.0 / self.config.max_fps if self.config.max_fps else 0.0
        next_due = time.monotonic()
        try:
            while not self._stopping.is_set():
                if interval:
                    wait = next_due - time.monotonic()
                    if wait > 0 and self._stopping.wait(wait):
                        return
                    next_due = max(next_due + interval, time.monotonic() - interval)
                captured = self._slot.take(timeout=0.2)
                if captured is None:
                    continue
                started = time.perf_counter()
                try:
                    outputs = self.engine.invoke([captured.prepared.tensor])
                except (RuntimeError, ValueError) as exc:
                    self.stats.invoke_errors += 1
                    self.stats.last_error = f"invoke failed: {exc}"
                    log.error("pipeline %s: invoke failed: %s", self.name, exc)
                    continue
                self._results.put(_Inferred(captured, outputs, time.perf_counter() - started))
        finally:
            self.stats.frames_dropped = self._slot.replaced
            self._results.put(None)  # tells the decode thread that nothing more comes

    def _decode_loop(self) -> None:
        assert self.model is not None
        assert self.engine is not None
        model = {"name": self.model.name, "version": self.model.version}
        while True:
            inferred = self._results.get()
            if inferred is None:
                return
            captured = inferred.captured
            started = time.perf_counter()
            result = self._decode(inferred.outputs, captured.prepared)
            postprocess_s = time.perf_counter() - started
            sample = captured.sample
            latency = {
                "capture": sample.capture_s,
                "preprocess": captured.preprocess_s,
                "invoke": inferred.invoke_s,
                "postprocess": postprocess_s,
            }
            payload = {
                "ts": round(time.time(), 6),
                "captured_at": round(sample.captured_at, 6),
                "seq": self._sequence,
                "frame": sample.sequence,
                "pipeline": self.name,
                "model": model,
                "accelerator": self.engine.accelerator,
                "latency_ms": {k: round(v * 1000, 3) for k, v in latency.items()},
                "result": result,
            }
            if sample.truth is not None:
                payload["truth"] = sample.truth
            self._sequence += 1
            self.stats.results_out += 1
            self.stats.frames_dropped = self._slot.replaced
            self._publish(self.name, payload)


_WINDOW_SOURCES = frozenset({"synthetic-vibration", "csv", "mpu6050"})
