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

The model, its engine and its pre/post-processing form one `Runner`. Only the inference
thread replaces it, between two frames: for a new model version (`swap`) and when the
accelerator fails (failover to the next one, down to the CPU, and back when it returns).
A frame prepared for the previous runner is prepared again, so no frame is lost.

Every result carries `run` (the agent process's id) and `seq`, drawn from a
`ResultSequence` the agent keeps per pipeline name for the life of its process: a
pipeline that is restarted, reconfigured or rolled back continues the numbers of the one
it replaces, so `(run, pipeline, seq)` never names two results (docs/protocol.md).

With a `policy` (the agent's, from the pipeline's `publish:` section), each result goes to
its `feed` instead of `publish`, and its `close` runs once the last result is decoded
(edgeagent/events/policy.py decides what is published: results, aggregates, changes or
tracked-object events).

Why one module of about 600 lines: the three threads, the slot, the queue and the runner
swap share one stop and hand-off protocol; split apart, no part could be read alone.
Statistics live in `pipeline_stats.py`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeagent.config import ImagePreprocess, PipelineConfig
from edgeagent.errors import EdgeAgentError, ModelError, SourceError
from edgeagent.hal.accel import AUTO_ORDER, get_accelerator
from edgeagent.hal.accel.base import Accelerator, ProbeState
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample, Source
from edgeagent.hal.sources import open_source
from edgeagent.inference import Decoder, Engine, Prepared, make_decoder, make_preprocessor
from edgeagent.modelfile.catalog import ModelDescription, describe_model
from edgeagent.mqtt.protocol import ResultEnvelope
from edgeagent.pipeline_stats import PipelineStats

__all__ = [  # PipelineStats lives in pipeline_stats.py and is re-exported here
    "STAGES",
    "NewestSlot",
    "Pipeline",
    "PipelineStats",
    "ResultSequence",
    "Runner",
    "SourceFactory",
    "build_runner",
]

log = logging.getLogger(__name__)

Publish = Callable[[str, dict[str, Any]], None]
Event = Callable[[str, str, dict[str, Any]], None]  # (pipeline, event type, details)
SourceFactory = Callable[[Any], Source]


class ResultSink(Protocol):
    """Where a pipeline's results go instead of `publish` (edgeagent/events/policy.py)."""

    def feed(self, payload: dict[str, Any], image: np.ndarray | None = None) -> None: ...

    def close(self) -> None: ...


PolicyFactory = Callable[[str], ResultSink]  # the model's task type -> the sink

STAGES = ("capture", "preprocess", "invoke", "postprocess")
_RESULT_QUEUE_SIZE = 8
# Below half the unit's WatchdogSec (30 s): every retry counts as progress, so a camera
# that is being retried is alive to the watchdog, not hung.
_SOURCE_BACKOFF_MAX_S = 10.0
_HEALTH_CHECK_S = 0.5  # how often the active accelerator's probe is consulted


@dataclass(frozen=True, slots=True)
class Runner:
    """A loaded model with what turns samples into its input and its output into results."""

    model: ModelDescription
    engine: Engine
    preprocess: Callable[[np.ndarray], Prepared]
    decode: Decoder


def build_runner(
    model: ModelDescription,
    config: PipelineConfig,
    *,
    accelerator: str | None = None,
    accelerators: Mapping[str, Accelerator] | None = None,
) -> Runner:
    """Loads `model` for `config`'s source and warms it up; EdgeAgentError says why not."""
    engine = Engine.load(
        model.path,
        accelerator=accelerator or config.accelerator,
        threads=config.threads,
        accelerators=accelerators,
        model=model.model_file,
    )
    try:
        kind = _check_fits(model, engine, config)
        preprocess = make_preprocessor(model.preprocess, engine.inputs[0], kind)
        decode = make_decoder(model.task, engine.outputs, model.labels, inputs=engine.inputs)
        engine.warm_up()
    except BaseException:
        engine.close()
        raise
    return Runner(model, engine, preprocess, decode)


def _source_for(config: PipelineConfig, runner: Runner | None) -> Any:
    """The source's settings fitted to the running model's image input: a Pi camera then
    has its ISP deliver frames at the size the pre-processing wants (the capture thread
    opens the source again when a swapped-in model wants other settings)."""
    source = config.source
    if runner is None or source.kind != "image" or len(runner.engine.inputs) != 1:
        return source
    shape = runner.engine.inputs[0].shape
    spec = runner.model.preprocess
    resize = spec.resize if isinstance(spec, ImagePreprocess) else ImagePreprocess().resize
    return source.fitted_to_input(shape[1], shape[2], resize) if len(shape) == 4 else source


def _finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _check_fits(model: ModelDescription, engine: Engine, config: PipelineConfig) -> SampleKind:
    """The source's sample kind, once the model is known to take one input of that kind."""
    kind = config.source.kind
    if len(engine.inputs) != 1:
        raise ModelError(
            f"pipeline {config.name}: model {model.path} has {len(engine.inputs)} inputs; "
            "a pipeline feeds exactly one (a frame or a sensor window)"
        )
    spec = model.preprocess
    if spec is not None and spec.type != kind:
        raise ModelError(
            f"pipeline {config.name}: model {model.name} takes {spec.type}s (input "
            f"{list(engine.inputs[0].shape)}) but source {config.source.type!r} delivers "
            f"{kind}s; choose a model made for this source"
        )
    return kind


@dataclass(slots=True)
class _Captured:
    sample: Sample
    prepared: Prepared
    preprocess_s: float
    runner: Runner


@dataclass(slots=True)
class _Inferred:
    captured: _Captured
    outputs: list[np.ndarray]
    invoke_s: float
    runner: Runner


class ResultSequence:
    """The `seq` numbers of one pipeline name within one agent process: 0, 1, 2, ...,
    each handed out once. Thread-safe: a pipeline being stopped may still number its last
    result while its replacement numbers its first."""

    def __init__(self, start: int = 0) -> None:
        if start < 0:
            raise ValueError(f"a sequence starts at 0 or above, not {start!r}")
        self._next = start
        self._lock = threading.Lock()

    def take(self) -> int:
        """The next number; never the same one twice."""
        with self._lock:
            value = self._next
            self._next += 1
            return value


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
            self._cond.notify_all()

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


class Pipeline:
    """Runs one configured pipeline until `stop()`; results go to `publish(name, result)`."""

    def __init__(
        self,
        config: PipelineConfig,
        publish: Publish,
        *,
        source_factory: SourceFactory = open_source,
        accelerators: dict[str, Accelerator] | None = None,
        on_event: Event | None = None,
        run_id: str = "",
        sequence: ResultSequence | None = None,
        policy: PolicyFactory | None = None,
    ) -> None:
        """`sequence` numbers the results; pass the agent's one for this name so that a
        replacement pipeline continues where the previous one stopped (default: from 0).
        `policy(task)` builds where results go instead of `publish` (at start)."""
        self.config = config
        self.name = config.name
        self._publish = publish
        self._on_event = on_event
        self._source_factory = source_factory
        self._accelerators = accelerators
        self._reprobe_s = config.accelerator_reprobe_s
        self._run_id = run_id
        self.stats = PipelineStats()
        self.runner: Runner | None = None
        self._pending: tuple[Runner, threading.Event] | None = None
        self._pending_lock = threading.Lock()
        self._source: Source | None = None
        self._source_fitted_to: Runner | None = None  # the runner `_source` was opened for
        self._slot = NewestSlot()
        self._results: queue.Queue[_Inferred | None] = queue.Queue(_RESULT_QUEUE_SIZE)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sequence = sequence if sequence is not None else ResultSequence()
        self._policy_factory = policy
        self._policy: ResultSink | None = None
        self.last: tuple[Sample, dict[str, Any]] | None = None  # for snapshots
        # A segmentation model's class map of that sample (the `snapshot` mask), else None.
        self.last_mask: np.ndarray | None = None

    @property
    def model(self) -> ModelDescription | None:
        return self.runner.model if self.runner else None

    @property
    def engine(self) -> Engine | None:
        return self.runner.engine if self.runner else None

    # --- lifecycle -------------------------------------------------------------------

    def start(self, model: ModelDescription | None = None) -> None:
        """Loads the model (the configured one, or `model`) and opens the source; raises
        EdgeAgentError with the reason."""
        cfg = self.config
        if model is None:
            model = describe_model(
                cfg.model, task=cfg.task, labels=cfg.labels, preprocess=cfg.preprocess
            )
        self.runner = build_runner(model, cfg, accelerators=self._accelerators)
        try:
            if self._policy_factory is not None:
                self._policy = self._policy_factory(model.task.type)
            self._source = self._source_factory(_source_for(cfg, self.runner))
            self._source_fitted_to = self.runner
        except BaseException:
            self.runner.engine.close()
            raise
        prefix = f"edgeagent-{self.name}"
        self._threads = [
            threading.Thread(target=self._capture_loop, name=f"{prefix}-capture", daemon=True),
            threading.Thread(target=self._infer_loop, name=f"{prefix}-infer", daemon=True),
            threading.Thread(target=self._decode_loop, name=f"{prefix}-decode", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info(
            "pipeline %s: running %s %s on %s with %d thread(s)",
            self.name,
            model.name,
            model.version,
            self.runner.engine.accelerator,
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
        if self.runner is not None and not any(t.is_alive() for t in self._threads):
            self.runner.engine.close()

    def swap(self, model: ModelDescription, timeout: float = 30.0) -> None:
        """Loads `model` (in this thread) and has the inference thread switch to it between
        two frames; returns once it did. EdgeAgentError when the model cannot run here."""
        runner = build_runner(model, self.config, accelerators=self._accelerators)
        taken = threading.Event()
        with self._pending_lock:
            self._pending = (runner, taken)
        if taken.wait(timeout):
            return
        with self._pending_lock:
            still_pending = self._pending is not None and self._pending[0] is runner
            if still_pending:
                self._pending = None
        if not still_pending:
            taken.wait()  # the inference thread took it just now: the switch happened
            return
        runner.engine.close()
        raise EdgeAgentError(f"pipeline {self.name}: the switch to {model.version} timed out")

    def describe(self) -> dict[str, Any]:
        """What the retained status message says about this pipeline."""
        info: dict[str, Any] = {"name": self.name, "source": self.config.source.type}
        runner = self.runner
        if runner is not None:
            info["model"] = {"name": runner.model.name, "version": runner.model.version}
            info["task"] = runner.model.task.type
            info["accelerator"] = runner.engine.accelerator
            info["fallbacks"] = list(runner.engine.fallbacks)
        return info

    # --- threads ---------------------------------------------------------------------

    def _capture_loop(self) -> None:
        assert self._source is not None
        unpaced = not self.config.source.paced()
        backoff = 1.0
        while not self._stopping.is_set():
            if self.runner is not self._source_fitted_to:
                self._refit_source()
            try:
                sample = self._source.read()
            except SourceError as exc:
                self.stats.source_errors += 1
                self.stats.last_error = str(exc)
                log.error(
                    "pipeline %s: source failed: %s; retrying in %.0f s", self.name, exc, backoff
                )
                self._event("source-error", {"reason": str(exc), "retry_in_s": backoff})
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, _SOURCE_BACKOFF_MAX_S)
                self._reopen_source()
                continue
            backoff = 1.0
            runner = self.runner
            assert runner is not None
            started = time.perf_counter()
            try:
                prepared = runner.preprocess(sample.data)
            except (ValueError, TypeError) as exc:  # a frame of the wrong shape or type
                self.stats.source_errors += 1
                self.stats.last_error = f"sample {sample.sequence} not usable: {exc}"
                log.error("pipeline %s: %s", self.name, self.stats.last_error)
                continue
            self.stats.frames_in += 1
            self._slot.put(_Captured(sample, prepared, time.perf_counter() - started, runner))
            if unpaced:
                # A source that does not pace itself would otherwise render frames only
                # to drop them, taking the GIL from the invoke thread: keep one ready.
                self._slot.wait_taken(timeout=0.2)

    def _refit_source(self) -> None:
        """The runner changed (a swap or a failover): opens the source again when the new
        model wants other settings (a Pi camera's lores stream of another size)."""
        runner = self.runner
        before = _source_for(self.config, self._source_fitted_to)
        self._source_fitted_to = runner
        if _source_for(self.config, runner) != before:
            log.info("pipeline %s: opening the source again for the new model", self.name)
            self._reopen_source()

    def _reopen_source(self) -> None:
        try:
            if self._source is not None:
                self._source.close()
            self._source = self._source_factory(_source_for(self.config, self.runner))
            self._source_fitted_to = self.runner
        except EdgeAgentError as exc:
            self.stats.source_errors += 1
            self.stats.last_error = str(exc)
            log.error("pipeline %s: cannot reopen source: %s", self.name, exc)

    def _infer_loop(self) -> None:
        interval = 1.0 / self.config.max_fps if self.config.max_fps else 0.0
        next_due = time.monotonic()
        next_health = time.monotonic() + _HEALTH_CHECK_S
        next_reprobe = time.monotonic() + self._reprobe_s
        try:
            while not self._stopping.is_set():
                self._take_pending()
                now = time.monotonic()
                if now >= next_health:
                    next_health = now + _HEALTH_CHECK_S
                    self._guarded(self._check_accelerator)
                if now >= next_reprobe:
                    next_reprobe = now + self._reprobe_s
                    self._guarded(self._try_preferred_accelerator)
                if interval:
                    wait = next_due - time.monotonic()
                    if wait > 0 and self._stopping.wait(wait):
                        return
                    next_due = max(next_due + interval, time.monotonic() - interval)
                captured = self._slot.take(timeout=0.2)
                if captured is None:
                    continue
                try:
                    self._infer(captured)
                except Exception as exc:  # one failed frame must not end the thread
                    self.stats.invoke_errors += 1
                    self.stats.last_error = f"inference failed: {exc!r}"
                    log.exception("pipeline %s: inference failed", self.name)
        finally:
            self.stats.frames_dropped = self._slot.replaced
            self._results.put(None)  # tells the decode thread that nothing more comes

    def _infer(self, captured: _Captured) -> None:
        """Invokes the current runner on `captured`; on an accelerator failure, fails over
        and tries the same frame again, so the frame is not lost."""
        for _attempt in range(len(AUTO_ORDER) + 1):
            runner = self.runner
            assert runner is not None
            if captured.runner is not runner:  # prepared for a model or engine since replaced
                started = time.perf_counter()
                captured.prepared = runner.preprocess(captured.sample.data)
                captured.preprocess_s += time.perf_counter() - started
                captured.runner = runner
            started = time.perf_counter()
            try:
                outputs = runner.engine.invoke([captured.prepared.tensor])
            except (ModelError, RuntimeError, ValueError) as exc:
                self.stats.invoke_errors += 1
                self.stats.last_error = f"invoke failed: {exc}"
                log.error("pipeline %s: invoke failed: %s", self.name, exc)
                if runner.engine.accelerator == "cpu" or not self._fail_over(str(exc)):
                    return
                continue
            self._results.put(_Inferred(captured, outputs, time.perf_counter() - started, runner))
            return

    def _take_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        runner, taken = pending
        old = self.runner
        self.runner = runner
        self.stats.model_swaps += 1
        taken.set()
        if old is not None and old.engine is not runner.engine:
            old.engine.close()  # only this thread invokes, so nothing uses it any more
        log.info(
            "pipeline %s: now running %s %s", self.name, runner.model.name, runner.model.version
        )

    def _accelerator(self, name: str) -> Accelerator:
        if self._accelerators is not None and name in self._accelerators:
            return self._accelerators[name]
        return get_accelerator(name)

    def _check_accelerator(self) -> None:
        """A device that vanished (a Coral pulled from USB) fails over before the next
        invoke can hang on it."""
        runner = self.runner
        if runner is None or runner.engine.accelerator == "cpu":
            return
        accelerator = self._accelerator(runner.engine.accelerator)
        if not accelerator.present():
            probe = accelerator.probe()
            self._fail_over(f"{probe.name} is {probe.state}: {probe.reason}")

    def _guarded(self, check: Callable[[], None]) -> None:
        """Runs an accelerator check; whatever it raises must not end the inference thread."""
        try:
            check()
        except Exception:  # a failing probe or driver must not stop inference
            log.exception("pipeline %s: accelerator check failed", self.name)

    def _fail_over(self, reason: str) -> bool:
        """Replaces the runner with one on the next accelerator in order; False when no
        other accelerator can run the model."""
        runner = self.runner
        assert runner is not None
        failed = runner.engine.accelerator
        order = list(self._accelerators or AUTO_ORDER)
        later = order[order.index(failed) + 1 :] if failed in order else ["cpu"]
        candidates = {name: self._accelerator(name) for name in later}
        try:
            replacement = build_runner(
                runner.model, self.config, accelerator="auto", accelerators=candidates
            )
        except EdgeAgentError as exc:
            log.error(
                "pipeline %s: no accelerator left after %s failed: %s", self.name, failed, exc
            )
            return False
        self.runner = replacement
        runner.engine.close()
        self.stats.fallbacks += 1
        self.stats.fallback_reasons.append(f"{failed}: {reason}")
        log.warning(
            "pipeline %s: %s failed (%s); switched to %s",
            self.name,
            failed,
            reason,
            replacement.engine.accelerator,
        )
        self._event(
            "accelerator-fallback",
            {"from": failed, "to": replacement.engine.accelerator, "reason": reason},
        )
        return True

    def _try_preferred_accelerator(self) -> None:
        """After a failover, periodically checks whether a faster accelerator is back."""
        runner = self.runner
        if runner is None or self.stats.fallbacks == 0:
            return
        order = list(self._accelerators or AUTO_ORDER)
        current = runner.engine.accelerator
        better = order[: order.index(current)] if current in order else []
        if self.config.accelerator != "auto":
            better = [n for n in better if n == self.config.accelerator]
        present = [n for n in better if self._accelerator(n).probe().state is ProbeState.PRESENT]
        if not present:
            return
        try:
            replacement = build_runner(
                runner.model,
                self.config,
                accelerator="auto",
                accelerators={n: self._accelerator(n) for n in present},
            )
        except EdgeAgentError as exc:
            log.info("pipeline %s: %s is back but not usable yet: %s", self.name, present[0], exc)
            return
        self.runner = replacement
        runner.engine.close()
        log.info("pipeline %s: back on %s", self.name, replacement.engine.accelerator)
        self._event(
            "accelerator-recovered", {"from": current, "to": replacement.engine.accelerator}
        )

    def _decode_loop(self) -> None:
        while True:
            inferred = self._results.get()
            if inferred is None:
                self._close_policy()
                return
            try:
                self._decode_and_publish(inferred)
            except Exception as exc:  # one bad result must not end the thread
                self.stats.last_error = f"decoding a result failed: {exc!r}"
                log.exception("pipeline %s: decoding a result failed", self.name)

    def _close_policy(self) -> None:
        if self._policy is None:
            return
        try:
            self._policy.close()
        except Exception:  # the pipeline is stopping anyway; say what was not sent
            log.exception("pipeline %s: publishing what was pending at stop failed", self.name)

    def _decode_and_publish(self, inferred: _Inferred) -> None:
        captured = inferred.captured
        runner = inferred.runner
        finite = all(np.isfinite(o).all() for o in inferred.outputs if o.dtype.kind == "f")
        if not finite:
            self.stats.non_finite += 1
        started = time.perf_counter()
        result = runner.decode(inferred.outputs, captured.prepared)
        postprocess_s = time.perf_counter() - started
        sample = captured.sample
        latency = {
            "capture": round(sample.capture_s * 1000, 3),
            "preprocess": round(captured.preprocess_s * 1000, 3),
            "invoke": round(inferred.invoke_s * 1000, 3),
            "postprocess": round(postprocess_s * 1000, 3),
        }
        extra: dict[str, Any] = {}
        if not finite:
            extra["non_finite"] = True
        if sample.truth is not None:
            extra["truth"] = sample.truth
        # JSON has no NaN or infinity: such values become null and the result says so.
        published = result if finite else _finite_or_none(result)
        self.last = (sample, result)
        self.last_mask = getattr(runner.decode, "last_mask", None)
        self.stats.frames_dropped = self._slot.replaced
        self._publish_decoded(
            runner,
            published,
            captured_at=sample.captured_at,
            frame=sample.sequence,
            latency=latency,
            image=sample.data if sample.data.ndim == 3 else None,
            extra=extra,
        )

    def _publish_decoded(
        self,
        runner: Runner,
        result: Any,
        *,
        captured_at: float,
        frame: int,
        latency: dict[str, float],
        image: np.ndarray[Any, Any] | None,
        extra: dict[str, Any],
    ) -> None:
        """A decoded result into its envelope (the next `seq`), the stats and then the
        publish policy, or straight to MQTT without one. The simulated device's results
        take this path too."""
        self.stats.window.add(latency)
        envelope = ResultEnvelope(
            captured_at=captured_at,
            run=self._run_id,
            seq=self._sequence.take(),
            frame=frame,
            pipeline=self.name,
            model=runner.model.name,
            version=runner.model.version,
            accelerator=runner.engine.accelerator,
            latency_ms=latency,
        )
        payload = envelope.to_json(result, **extra)
        self.stats.results_out += 1
        self.stats.last_result_at = time.time()
        if self._policy is not None:
            self._policy.feed(payload, image)
        else:
            self._publish(self.name, payload)

    def _event(self, kind: str, details: dict[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(self.name, kind, details)
