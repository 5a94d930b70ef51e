"""Honest fake accelerators for tests: a Coral that loads, breaks and disappears as one
does, and a GPU behind LiteRT's WebGPU accelerator that has or lacks an adapter as Dawn
reports it.

While present, models really run (on the CPU kernels) and results are real. They are not
in the registry; tests construct them directly.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from edgeagent.errors import AcceleratorError
from edgeagent.hal.accel.base import Probe, ProbeState

logger = logging.getLogger(__name__)


class FakeAccelerator:
    """A fake in one of the three probe states, changeable at run time.

    `fail_on_load` keeps the probe PRESENT but makes `delegates()` fail, as a delegate that
    probed fine and then cannot be created (device busy, stale probe cache) does.
    `required_op` makes `can_run` refuse models without that custom operator.
    """

    def __init__(
        self,
        name: str = "fake-tpu",
        state: ProbeState = ProbeState.PRESENT,
        *,
        fail_on_load: bool = False,
        reason: str | None = None,
        required_op: str | None = None,
    ) -> None:
        self.name = name
        self.fail_on_load = fail_on_load
        self.required_op = required_op
        self.loads = 0  # successful delegates() calls
        self._lock = threading.Lock()
        self._state = state
        self._reason = reason or _default_reason(state)

    def probe(self) -> Probe:
        with self._lock:
            return Probe(self.name, self._state, self._reason, {"fake": "true"})

    def present(self) -> bool:
        with self._lock:
            return self._state is ProbeState.PRESENT

    def delegates(self) -> list[Any]:
        with self._lock:
            if self._state is ProbeState.ABSENT:
                raise AcceleratorError(f"{self.name} is absent: {self._reason}")
            if self._state is ProbeState.BROKEN or self.fail_on_load:
                raise AcceleratorError(
                    f"{self.name} is present but broken: Failed to load delegate from "
                    f"lib{self.name}.so ({self._reason})"
                )
            self.loads += 1
        return []

    def can_run(self, operator_names: frozenset[str]) -> str | None:
        if self.required_op is None or self.required_op in operator_names:
            return None
        return f"model is not compiled for {self.name} (no {self.required_op})"

    def unplug(self) -> None:
        """From now on probe() is ABSENT and delegates() raises, like a Coral pulled out."""
        self._set(ProbeState.ABSENT, "device was unplugged; no device on USB or PCIe")

    def plug_in(self) -> None:
        """Present and loading again."""
        self.fail_on_load = False
        self._set(ProbeState.PRESENT, _default_reason(ProbeState.PRESENT))

    def break_(self, reason: str = "device stopped responding") -> None:
        """From now on probe() is BROKEN with `reason` and delegates() raises."""
        self._set(ProbeState.BROKEN, reason)

    def _set(self, state: ProbeState, reason: str) -> None:
        with self._lock:
            self._state = state
            self._reason = reason
        logger.info("%s is now %s: %s", self.name, state, reason)


def _default_reason(state: ProbeState) -> str:
    return {
        ProbeState.PRESENT: "fake accelerator (runs on the CPU kernels)",
        ProbeState.ABSENT: "fake accelerator not plugged in",
        ProbeState.BROKEN: "fake accelerator fails to load",
    }[state]


# What LiteRT 2.3 and Dawn print on a machine without a GPU when a model is compiled for
# GPU | CPU (observed on x86_64 without libvulkan; the RuntimeError names only source lines).
DAWN_NO_ADAPTER_STDERR = (
    "INFO: [delegate_webgpu.cc:342] Create WebGPU environment "
    "(use_low_power=0, enable_host_mapped_pointer=1)\n"
    "Warning: Couldn't load Vulkan: libvulkan.so.1: cannot open shared object file: "
    "No such file or directory\n"
    "    at operator() (third_party/dawn/src/dawn/native/vulkan/BackendVk.cpp:368)\n"
    "\n"
    "ERROR: [delegate_webgpu.cc:359] Failed to initialize WebGPU environment: "
    "INTERNAL: No adapters found\n"
)
LITERT_COMPILE_ERROR = (
    "ERROR: [./litert/cc/litert_compiled_model.h:1961]\n"
    "└ ERROR: [litert/runtime/compiled_model.cc:1036]"
)


class FakeGpu:
    """A GPU behind LiteRT's WebGPU accelerator, for tests: `accelerator()` is the real
    LiteRtGpuAccelerator with this fake's adapter check and compiler.

    With an adapter, models compile for real on LiteRT's CPU kernels (so results are
    real); without one, the check and the compile fail as LiteRT and Dawn do on a machine
    with no GPU. `lose_device()` makes every run of a compiled model raise RuntimeError
    (what the LiteRT wrapper raises for any failure) and the check fail, until `restore()`.
    """

    def __init__(self, *, adapter: bool = True) -> None:
        self.adapter = adapter
        self.lost = False
        self.compiles = 0  # models compiled successfully
        self._lock = threading.Lock()

    def accelerator(self) -> Any:
        from edgeagent.hal.accel.litert_gpu import LiteRtGpuAccelerator, litert_package_dir

        return LiteRtGpuAccelerator(
            package_dir=litert_package_dir(), check=self.check, compile=self.compile, cache_s=0
        )

    def check(self, model: Any) -> Any:
        from edgeagent.hal.accel.litert_gpu import AdapterCheck

        del model
        with self._lock:
            adapter, lost = self.adapter, self.lost
        if not adapter:
            failure = {"compiled": False, "error": " ".join(LITERT_COMPILE_ERROR.split())}
            return AdapterCheck(1, json.dumps(failure) + "\n", DAWN_NO_ADAPTER_STDERR)
        if lost:
            lost_log = "ERROR: [delegate_webgpu.cc:359] Failed to initialize WebGPU environment"
            failure = {"compiled": False, "error": "device lost"}
            return AdapterCheck(1, json.dumps(failure) + "\n", lost_log)
        return AdapterCheck(0, json.dumps({"compiled": True, "fully_accelerated": True}), "")

    def compile(self, path: Any, threads: int) -> Any:
        with self._lock:
            if not self.adapter or self.lost:
                raise RuntimeError(LITERT_COMPILE_ERROR)
            self.compiles += 1
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, Options

        options = Options(
            hardware_accelerators=HardwareAccelerator.CPU,
            cpu_options=CpuOptions(num_threads=threads),
        )
        return _LosableModel(CompiledModel.from_file(str(path), options=options), self)

    def lose_device(self) -> None:
        with self._lock:
            self.lost = True
        logger.info("fake GPU: device lost")

    def restore(self) -> None:
        with self._lock:
            self.lost = False
        logger.info("fake GPU: device back")


class _LosableModel:
    """A real CompiledModel whose runs fail while its fake GPU is lost."""

    def __init__(self, compiled: Any, gpu: FakeGpu) -> None:
        self._compiled = compiled
        self._gpu = gpu

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)

    def run_by_index(self, signature: int, inputs: Any, outputs: Any) -> None:
        if self._gpu.lost:
            raise RuntimeError("ERROR: [litert/runtime/compiled_model.cc] GPU device lost")
        self._compiled.run_by_index(signature, inputs, outputs)
