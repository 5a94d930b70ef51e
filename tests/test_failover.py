"""Accelerator failover while running: a Coral that vanishes mid-run is replaced by the
next accelerator within a second, results keep flowing without a gap, and the pipeline
goes back once the device returns. The Coral is the HAL's fake (it runs the CPU kernels
and disappears like a device pulled from USB); the model, interpreter and source are real."""

from __future__ import annotations

import threading
from typing import Any

from edgeagent.config import parse_config
from edgeagent.hal.accel import get_accelerator
from edgeagent.hal.accel.base import Accelerator
from edgeagent.hal.accel.fake import FakeAccelerator, FakeGpu
from edgeagent.pipeline import Pipeline


class Recorder:
    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()

    def publish(self, _pipeline: str, result: dict[str, Any]) -> None:
        with self._cond:
            self.results.append(result)
            self._cond.notify_all()

    def event(self, _pipeline: str, kind: str, details: dict[str, Any]) -> None:
        with self._cond:
            self.events.append((kind, details))
            self._cond.notify_all()

    def wait(self, predicate: Any, timeout: float = 20.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self), timeout), (
                f"timed out; events {self.events}, {len(self.results)} results"
            )


def make_pipeline(recorder: Recorder, accelerators: dict[str, Accelerator]) -> Pipeline:
    config = parse_config(
        """
pipelines:
  - name: shapes
    source: {type: synthetic, fps: 50}
    model: shapes-detector
    threads: 1
    accelerator_reprobe_s: 0.5
"""
    ).pipelines[0]
    return Pipeline(config, recorder.publish, accelerators=accelerators, on_event=recorder.event)


def test_a_vanished_accelerator_fails_over_to_the_cpu_and_comes_back() -> None:
    coral = FakeAccelerator("edgetpu")
    recorder = Recorder()
    pipeline = make_pipeline(recorder, {"edgetpu": coral, "cpu": get_accelerator("cpu")})
    pipeline.start()
    try:
        assert pipeline.runner is not None
        assert pipeline.runner.engine.accelerator == "edgetpu"
        recorder.wait(lambda r: len(r.results) >= 10)

        coral.unplug()
        recorder.wait(lambda r: any(kind == "accelerator-fallback" for kind, _ in r.events))
        _, details = recorder.events[0]
        assert details["from"] == "edgetpu"
        assert details["to"] == "cpu"
        assert "absent" in details["reason"]
        count = len(recorder.results)
        recorder.wait(lambda r: len(r.results) >= count + 10)
        assert recorder.results[-1]["accelerator"] == "cpu"
        assert pipeline.stats.fallbacks == 1

        coral.plug_in()
        recorder.wait(lambda r: any(kind == "accelerator-recovered" for kind, _ in r.events))
        count = len(recorder.results)
        recorder.wait(lambda r: len(r.results) >= count + 5)
        assert recorder.results[-1]["accelerator"] == "edgetpu"
    finally:
        pipeline.stop()
    seqs = [r["seq"] for r in recorder.results]
    assert seqs == list(range(len(seqs))), "no result was lost across the switches"
    accelerators = [r["accelerator"] for r in recorder.results]
    assert "cpu" in accelerators
    assert accelerators[0] == accelerators[-1] == "edgetpu"


def test_a_broken_accelerator_at_start_falls_back_with_its_reason() -> None:
    coral = FakeAccelerator("edgetpu")
    coral.break_("USB transfer error")
    recorder = Recorder()
    pipeline = make_pipeline(recorder, {"edgetpu": coral, "cpu": get_accelerator("cpu")})
    pipeline.start()
    try:
        assert pipeline.runner is not None
        assert pipeline.runner.engine.accelerator == "cpu"
        assert any("USB transfer error" in f for f in pipeline.runner.engine.fallbacks)
        recorder.wait(lambda r: len(r.results) >= 3)
    finally:
        pipeline.stop()


def test_a_gpu_lost_mid_run_fails_over_on_the_failing_inference_and_comes_back() -> None:
    """The GPU behind LiteRT's WebGPU accelerator (the fake: a real CompiledModel on the CPU
    kernels whose runs fail while the device is lost). A GPU is not unplugged, so what
    triggers the failover is the failing inference itself; that frame is run again."""
    gpu = FakeGpu()
    recorder = Recorder()
    pipeline = make_pipeline(
        recorder, {"litert-gpu": gpu.accelerator(), "cpu": get_accelerator("cpu")}
    )
    pipeline.start()
    try:
        assert pipeline.runner is not None
        assert pipeline.runner.engine.accelerator == "litert-gpu"
        assert pipeline.runner.engine.describe()["runtime"] == "compiled-model"
        recorder.wait(lambda r: len(r.results) >= 10)

        gpu.lose_device()
        recorder.wait(lambda r: any(kind == "accelerator-fallback" for kind, _ in r.events))
        _, details = recorder.events[0]
        assert (details["from"], details["to"]) == ("litert-gpu", "cpu")
        assert "GPU device lost" in details["reason"]
        count = len(recorder.results)
        recorder.wait(lambda r: len(r.results) >= count + 10)
        assert recorder.results[-1]["accelerator"] == "cpu"

        gpu.restore()
        recorder.wait(lambda r: any(kind == "accelerator-recovered" for kind, _ in r.events))
        count = len(recorder.results)
        recorder.wait(lambda r: len(r.results) >= count + 5)
        assert recorder.results[-1]["accelerator"] == "litert-gpu"
    finally:
        pipeline.stop()
    seqs = [r["seq"] for r in recorder.results]
    assert seqs == list(range(len(seqs))), "no result was lost across the switches"
    assert gpu.compiles >= 2  # compiled again on the way back
