"""Engine: accelerator choice and fallback, model errors, and real LiteRT inference."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.errors import AcceleratorError, ModelError
from edgeagent.hal.accel import get_accelerator
from edgeagent.hal.accel.base import Probe, ProbeState
from edgeagent.hal.accel.fake import FakeGpu
from edgeagent.hal.accel.litert_gpu import AdapterCheck, LiteRtGpuAccelerator, litert_package_dir
from edgeagent.inference import Engine, TensorInfo
from tests import modelfactory as mf

WEIGHTS = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]], np.float32)
BIAS = np.array([0.5, -1.0], np.float32)


class NullDelegate:
    """What LiteRT takes as a delegate, but with no native delegate behind it: the
    Interpreter refuses it as it refuses a delegate that fails to apply."""

    def _get_native_delegate_pointer(self) -> int:
        return 0


class FakeAccelerator:
    """An accelerator that is absent, broken, picky or fine, on demand. While fine its
    delegates() is [] so the model really runs (on the built-in kernels)."""

    def __init__(
        self,
        name: str,
        state: ProbeState = ProbeState.PRESENT,
        *,
        reason: str = "",
        refuses: str | None = None,
        delegate_error: str | None = None,
        delegates: list[Any] | None = None,
    ) -> None:
        self.name = name
        self.state = state
        self.reason = reason or f"{name} test double"
        self.refuses = refuses
        self.delegate_error = delegate_error
        self._delegates = delegates or []
        self.probes = 0

    def probe(self) -> Probe:
        self.probes += 1
        return Probe(self.name, self.state, self.reason)

    def delegates(self) -> list[Any]:
        if self.delegate_error is not None:
            raise AcceleratorError(self.delegate_error)
        return list(self._delegates)

    def can_run(self, operator_names: frozenset[str]) -> str | None:
        return self.refuses


def cpu() -> FakeAccelerator:
    return FakeAccelerator("cpu")


@pytest.fixture
def fc_model(tmp_path: Path) -> Path:
    return mf.save(tmp_path / "fc.tflite", mf.float_fc(WEIGHTS, BIAS))


def test_float_model_computes_the_right_numbers(fc_model: Path) -> None:
    engine = Engine.load(fc_model, accelerators={"cpu": cpu()})
    x = np.array([[1.0, 2.0, -1.0]], np.float32)
    (y,) = engine.invoke([x])
    np.testing.assert_allclose(y, x @ WEIGHTS.T + BIAS, rtol=1e-6)
    assert engine.inputs[0] == TensorInfo("input", 0, (1, 3), "float32", 0.0, 0)
    assert engine.outputs[0].shape == (1, 2)
    assert engine.operators == frozenset({"FULLY_CONNECTED"})


def test_int8_model_returns_raw_int8_that_dequantises_to_the_sum(tmp_path: Path) -> None:
    constant = np.array([[0.5, -0.25, 1.0, 0.0]], np.float32)
    path = mf.save(tmp_path / "add.tflite", mf.int8_add(constant, (0.02, -10), (0.03, 5), [1, 4]))
    engine = Engine.load(path, accelerators={"cpu": cpu()})
    (inp,), (out,) = engine.inputs, engine.outputs
    x = np.array([[0.3, 0.0, -2.0, 2.5]], np.float32)
    (y,) = engine.invoke([inp.quantize(x)])
    assert y.dtype == np.int8
    # One quantisation step of the input, the constant and the output, at most.
    np.testing.assert_allclose(out.dequantize(y), x + constant, atol=0.02 + 0.01 + 0.03)


def test_invoke_returns_copies_that_survive_the_next_invoke(fc_model: Path) -> None:
    engine = Engine.load(fc_model, accelerators={"cpu": cpu()})
    (first,) = engine.invoke([np.ones((1, 3), np.float32)])
    kept = first.copy()
    engine.invoke([np.full((1, 3), 7.0, np.float32)])
    np.testing.assert_array_equal(first, kept)


def test_invoke_names_the_input_when_the_array_does_not_fit(fc_model: Path) -> None:
    engine = Engine.load(fc_model, accelerators={"cpu": cpu()})
    with pytest.raises(ValueError, match=r"input 'input' of fc.tflite takes \[1, 3\] float32"):
        engine.invoke([np.ones((1, 3), np.int8)])
    with pytest.raises(ValueError, match="takes 1 input"):
        engine.invoke([])


def test_auto_skips_absent_broken_and_unwilling_accelerators(
    fc_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    accelerators = {
        "cpu": cpu(),
        "edgetpu": FakeAccelerator(
            "edgetpu", ProbeState.ABSENT, reason="libedgetpu.so.1 not found"
        ),
        "gpu": FakeAccelerator("gpu", delegate_error="Failed to load delegate from libgpu.so"),
    }
    with caplog.at_level(logging.INFO, logger="edgeagent.inference.engine"):
        engine = Engine.load(fc_model, accelerators=accelerators)
    assert engine.accelerator == "cpu"
    assert engine.fallbacks == (
        "edgetpu: absent (libedgetpu.so.1 not found)",
        "gpu: present but its delegate failed to load (Failed to load delegate from libgpu.so)",
    )
    levels = {r.getMessage().split(":")[0]: r.levelno for r in caplog.records}
    assert levels["not using edgetpu for fc.tflite"] == logging.INFO
    assert levels["not using gpu for fc.tflite"] == logging.WARNING
    assert any(r.getMessage().startswith("loaded fc.tflite on cpu") for r in caplog.records)


def test_auto_skips_a_broken_probe_and_a_model_it_cannot_run(fc_model: Path) -> None:
    accelerators = {
        "edgetpu": FakeAccelerator("edgetpu", refuses="model not compiled for the Edge TPU"),
        "gpu": FakeAccelerator("gpu", ProbeState.BROKEN, reason="/dev/dri/renderD128: EACCES"),
        "cpu": cpu(),
    }
    engine = Engine.load(fc_model, accelerators=accelerators)
    assert engine.fallbacks == (
        "edgetpu: model not compiled for the Edge TPU",
        "gpu: present but broken (/dev/dri/renderD128: EACCES)",
    )


def test_auto_falls_back_when_the_delegate_fails_to_apply(fc_model: Path) -> None:
    accelerators = {"gpu": FakeAccelerator("gpu", delegates=[NullDelegate()]), "cpu": cpu()}
    engine = Engine.load(fc_model, accelerators=accelerators)
    assert engine.accelerator == "cpu"
    assert engine.fallbacks == (
        "gpu: present but the model did not load with its delegate (Null delegate.)",
    )


def test_auto_uses_the_first_accelerator_that_works(fc_model: Path) -> None:
    tpu = FakeAccelerator("edgetpu")
    engine = Engine.load(fc_model, accelerators={"cpu": cpu(), "edgetpu": tpu})
    assert (engine.accelerator, engine.fallbacks) == ("edgetpu", ())


def test_naming_an_absent_accelerator_fails_instead_of_falling_back(fc_model: Path) -> None:
    accelerators = {
        "edgetpu": FakeAccelerator("edgetpu", ProbeState.ABSENT, reason="no Coral on USB or PCIe"),
        "cpu": cpu(),
    }
    with pytest.raises(AcceleratorError) as caught:
        Engine.load(fc_model, accelerator="edgetpu", accelerators=accelerators)
    message = str(caught.value)
    assert "edgetpu" in message
    assert "absent (no Coral on USB or PCIe)" in message
    assert "set accelerator to 'auto'" in message


def test_naming_an_accelerator_that_refuses_the_model_fails(fc_model: Path) -> None:
    tpu = FakeAccelerator("edgetpu", refuses="model not compiled for the Edge TPU")
    with pytest.raises(AcceleratorError, match="model not compiled for the Edge TPU"):
        Engine.load(fc_model, accelerator="edgetpu", accelerators={"edgetpu": tpu})


def test_naming_an_unknown_accelerator_fails(fc_model: Path) -> None:
    with pytest.raises(AcceleratorError, match="unknown accelerator 'tpu'"):
        Engine.load(fc_model, accelerator="tpu")


def test_the_registry_cpu_runs_the_model(fc_model: Path) -> None:
    engine = Engine.load(fc_model, accelerator="cpu")
    assert engine.accelerator == "cpu"
    (y,) = engine.invoke([np.zeros((1, 3), np.float32)])
    np.testing.assert_allclose(y, BIAS[np.newaxis])


def test_an_unknown_custom_op_is_a_model_error_naming_it(tmp_path: Path) -> None:
    path = mf.save(tmp_path / "mystery.tflite", mf.custom_op("MyMysteryOp"))
    with pytest.raises(
        ModelError, match="custom operator MyMysteryOp, which is not in this runtime"
    ):
        Engine.load(path, accelerators={"cpu": cpu()})


def test_an_edgetpu_model_without_an_edge_tpu_says_so(tmp_path: Path) -> None:
    path = mf.save(tmp_path / "tpu.tflite", mf.custom_op("edgetpu-custom-op"))
    accelerators = {
        "edgetpu": FakeAccelerator(
            "edgetpu", ProbeState.ABSENT, reason="libedgetpu.so.1 not found"
        ),
        "cpu": cpu(),
    }
    with pytest.raises(ModelError, match=r"edgetpu-custom-op.*compiled for the Edge TPU"):
        Engine.load(path, accelerators=accelerators)


def test_a_file_that_is_not_a_model_fails_before_any_accelerator_is_probed(tmp_path: Path) -> None:
    path = tmp_path / "photo.tflite"
    path.write_bytes(b"\xff\xd8\xff\xe0 a jpeg, not a model")
    accelerator = cpu()
    with pytest.raises(ModelError, match="not a TFLite model"):
        Engine.load(path, accelerators={"cpu": accelerator})
    assert accelerator.probes == 0


def _threads() -> int:
    return sum(1 for _ in Path("/proc/self/task").iterdir())


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_threads_are_honoured(tmp_path: Path) -> None:
    # XNNPACK runs `threads` - 1 worker threads beside the caller's.
    weights = np.random.default_rng(0).random((64, 128), np.float32)
    path = mf.save(tmp_path / "wide.tflite", mf.float_fc(weights, np.zeros(64, np.float32)))
    before = _threads()
    single = Engine.load(path, threads=1, accelerators={"cpu": cpu()})
    assert _threads() == before
    triple = Engine.load(path, threads=3, accelerators={"cpu": cpu()})
    assert _threads() == before + 2
    assert (single.threads, triple.describe()["threads"]) == (1, 3)
    single.close()
    triple.close()
    with pytest.raises(ValueError, match="threads must be 1 or more"):
        Engine.load(path, threads=0, accelerators={"cpu": cpu()})


def test_describe_is_json_and_close_stops_invoke(fc_model: Path) -> None:
    engine = Engine.load(
        fc_model, accelerators={"gpu": FakeAccelerator("gpu", ProbeState.ABSENT), "cpu": cpu()}
    )
    engine.warm_up()
    described = json.loads(json.dumps(engine.describe()))
    assert described["accelerator"] == "cpu"
    assert described["fallbacks"] == ["gpu: absent (gpu test double)"]
    assert described["inputs"][0]["shape"] == [1, 3]
    assert described["operators"] == {"FULLY_CONNECTED": 1}
    engine.close()
    with pytest.raises(ModelError, match="closed"):
        engine.invoke([np.zeros((1, 3), np.float32)])


def test_a_model_with_packed_labels_still_loads(tmp_path: Path) -> None:
    data = mf.with_labels(mf.float_fc(WEIGHTS, BIAS), ["a", "b"])
    engine = Engine.load(mf.save(tmp_path / "labelled.tflite", data), accelerators={"cpu": cpu()})
    assert engine.model.labels == ("a", "b")


def test_tensor_info_quantises_with_rounding_and_clipping() -> None:
    info = TensorInfo("x", 0, (4,), "int8", 0.5, 10)
    q = info.quantize(np.array([0.0, 1.24, 100.0, -100.0], np.float32))
    np.testing.assert_array_equal(q, np.array([10, 12, 127, -128], np.int8))
    np.testing.assert_allclose(info.dequantize(q), [0.0, 1.0, 58.5, -69.0])
    u8 = TensorInfo("x", 0, (2,), "uint8", 1 / 255, 0)
    np.testing.assert_array_equal(u8.quantize(np.array([0.6, 2.0])), np.array([153, 255], np.uint8))
    # Halves round to even before the zero point is added, as LiteRT's QUANTIZE does.
    halves = TensorInfo("x", 0, (3,), "int8", 0.5, 3).quantize(np.array([1.25, -1.25, -0.75]))
    np.testing.assert_array_equal(halves, np.array([5, 1, 1], np.int8))
    f32 = TensorInfo("x", 0, (2,), "float32", 0.0, 0)
    assert f32.dequantize(np.array([1, 2], np.int32)).dtype == np.float32
    assert f32.to_json()["scale"] == 0.0


@pytest.mark.parametrize(
    ("dtype", "scale", "zero_point"), [("int8", 0.5, 3), ("int8", 1 / 255, -128), ("uint8", 0.1, 7)]
)
def test_tensor_info_quantises_exactly_as_litert_does(
    tmp_path: Path, dtype: str, scale: float, zero_point: int
) -> None:
    halves = np.arange(-80, 81, dtype=np.float32) * np.float32(scale / 2)
    noise = np.random.default_rng(1).uniform(-200 * scale, 200 * scale, 339).astype(np.float32)
    x = np.concatenate([halves, noise])[np.newaxis]
    path = mf.save(tmp_path / "q.tflite", mf.quantize(x.shape[1], scale, zero_point, dtype))
    engine = Engine.load(path, accelerators={"cpu": cpu()})
    (litert,) = engine.invoke([x])
    np.testing.assert_array_equal(engine.outputs[0].quantize(x), litert)


# --- the CompiledModel path (litert-gpu) -----------------------------------------------
# No GPU here: the CompiledModel path runs for real on LiteRT's CPU kernels behind the fake
# GPU, and the real litert-gpu accelerator shows what happens without a Vulkan adapter.

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "bundled"


@pytest.mark.parametrize(
    "name", ["shapes-detector", "shapes-detector-ssd", "digits-classifier", "vibration-anomaly"]
)
def test_the_compiled_model_path_gives_the_interpreters_outputs(name: str) -> None:
    path = BUNDLED / f"{name}.tflite"
    gpu = FakeGpu()
    compiled = Engine.load(path, accelerator="litert-gpu", accelerators=gpu_and_cpu(gpu))
    interpreted = Engine.load(path, accelerator="cpu")
    assert gpu.compiles == 1
    assert (compiled.accelerator, compiled.describe()["runtime"]) == (
        "litert-gpu",
        "compiled-model",
    )
    assert interpreted.describe()["runtime"] == "interpreter"
    # Same tensors, in the same (subgraph) order, with the file's quantisation.
    assert compiled.inputs == interpreted.inputs
    assert compiled.outputs == interpreted.outputs
    sample = np.load(BUNDLED / f"{name}.ref-input.npy")
    for engine in (compiled, interpreted):
        engine.warm_up()
    got = compiled.invoke([sample])
    want = interpreted.invoke([sample])
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        np.testing.assert_array_equal(a, b)  # same kernels: exact
    compiled.close()
    interpreted.close()
    with pytest.raises(ModelError, match="closed"):
        compiled.invoke([sample])


def gpu_and_cpu(gpu: FakeGpu) -> dict[str, Any]:
    return {"litert-gpu": gpu.accelerator(), "cpu": get_accelerator("cpu")}


def test_the_compiled_model_path_names_an_input_that_does_not_fit(fc_model: Path) -> None:
    engine = Engine.load(fc_model, accelerators=gpu_and_cpu(FakeGpu()))
    assert engine.accelerator == "litert-gpu"
    (y,) = engine.invoke([np.ones((1, 3), np.float32)])
    np.testing.assert_allclose(y, (WEIGHTS @ np.ones(3) + BIAS)[np.newaxis], rtol=1e-6)
    with pytest.raises(ValueError, match=r"input 'input' of fc.tflite takes \[1, 3\] float32"):
        engine.invoke([np.ones((1, 3), np.int8)])
    with pytest.raises(ValueError, match=r"got \[1, 4\] float32"):
        engine.invoke([np.ones((1, 4), np.float32)])


def test_auto_passes_over_a_gpu_without_an_adapter_with_dawns_reason(fc_model: Path) -> None:
    engine = Engine.load(fc_model, accelerators=gpu_and_cpu(FakeGpu(adapter=False)))
    assert engine.accelerator == "cpu"
    (reason,) = engine.fallbacks
    assert reason.startswith("litert-gpu: absent (no Vulkan adapter: Dawn reports")


def test_naming_litert_gpu_without_an_adapter_fails_with_the_fix(fc_model: Path) -> None:
    with pytest.raises(AcceleratorError) as caught:
        Engine.load(
            fc_model,
            accelerator="litert-gpu",
            accelerators=gpu_and_cpu(FakeGpu(adapter=False)),
        )
    assert "'No adapters found'" in str(caught.value)
    assert "mesa-vulkan-drivers" in str(caught.value)


def test_a_gpu_that_probed_present_but_cannot_compile_falls_back(fc_model: Path) -> None:
    """A stale probe says PRESENT; the real LiteRT compile for GPU | CPU then fails as it
    does on a machine without an adapter (this one), and the CPU takes the model."""
    present = AdapterCheck(0, '{"compiled": true, "fully_accelerated": true}', "")
    real_compile = LiteRtGpuAccelerator(package_dir=litert_package_dir(), check=lambda _m: present)
    if get_accelerator("litert-gpu").probe().state is ProbeState.PRESENT:
        pytest.skip("this machine has a Vulkan adapter, so the compile would not fail")
    engine = Engine.load(
        fc_model, accelerators={"litert-gpu": real_compile, "cpu": get_accelerator("cpu")}
    )
    assert engine.accelerator == "cpu"
    (reason,) = engine.fallbacks
    assert reason.startswith(
        "litert-gpu: present but the model did not compile (LiteRT could not compile fc.tflite "
        "for the GPU"
    )


def test_auto_from_the_registry_here_notes_the_absent_gpu(fc_model: Path) -> None:
    if get_accelerator("litert-gpu").probe().state is ProbeState.PRESENT:
        pytest.skip("this machine has a Vulkan adapter")
    engine = Engine.load(fc_model)
    assert engine.accelerator == "cpu"
    assert any(f.startswith("litert-gpu: absent (no Vulkan adapter") for f in engine.fallbacks)


def test_a_compiled_model_whose_signature_is_not_the_models_is_left_to_the_cpu(
    fc_model: Path,
) -> None:
    """Without the file's own tensors (and their quantisation) the outputs could not be
    read right: the engine passes over such a compiled model instead of guessing."""
    gpu = FakeGpu()
    other = BUNDLED / "digits-classifier.tflite"
    accelerator = LiteRtGpuAccelerator(
        package_dir=litert_package_dir(),
        check=gpu.check,
        compile=lambda _path, threads: gpu.compile(other, threads),
    )
    engine = Engine.load(fc_model, accelerators={"litert-gpu": accelerator, "cpu": cpu()})
    assert engine.accelerator == "cpu"
    (reason,) = engine.fallbacks
    assert "compiled model cannot be run (its first signature's tensors" in reason


@pytest.mark.parametrize("accelerator", ["cpu", "litert-gpu"])
def test_ssd_rows_past_the_count_are_zeros_not_what_the_memory_held(accelerator: str) -> None:
    """TFLite_Detection_PostProcess writes only the rows it counts; the rest used to keep
    whatever the memory held (the previous frame's boxes, or NaN that the gate took for a
    broken model)."""
    path = BUNDLED / "shapes-detector-ssd.tflite"
    engine = Engine.load(path, accelerator=accelerator, accelerators=gpu_and_cpu(FakeGpu()))
    names = [info.name for info in engine.outputs]
    count = names.index("num_detections")
    shapes = engine.invoke([np.load(BUNDLED / "shapes-detector-ssd.ref-input.npy")])
    found = int(shapes[count][0])
    assert found > 0
    for output in shapes:
        if output.ndim > 1:
            assert np.all(output[:, found:] == 0)
            assert np.any(output[:, :found] != 0)
    blank = engine.invoke([np.zeros(engine.inputs[0].shape, engine.inputs[0].dtype)])
    assert int(blank[count][0]) == 0
    for output in blank:
        assert np.all(output == 0), names  # nothing detected: nothing left over
    engine.close()
