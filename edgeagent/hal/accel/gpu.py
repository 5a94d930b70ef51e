"""The GPU through LiteRT's legacy GPU delegate library (OpenGL ES / OpenCL), when one is
installed. The wheel ships another way to the GPU, which needs no build: `litert-gpu`
(litert_gpu.py, WebGPU over Vulkan through LiteRT's CompiledModel API)."""

from __future__ import annotations

from edgeagent.hal.accel.base import Probe, ProbeState
from edgeagent.hal.accel.external_delegate import DelegateAccelerator, find_library

LIBRARY_ENV = "EDGEAGENT_GPU_DELEGATE_LIB"
LIBRARY = "libtensorflowlite_gpu_delegate.so"
INSTALL_HINT = (
    "the ai-edge-litert wheel does not ship this legacy GPU delegate but its own GPU "
    "accelerator, litert-gpu (WebGPU over Vulkan), which needs no build; for this delegate, "
    "build libtensorflowlite_gpu_delegate.so from the LiteRT sources and install it in "
    f"/usr/local/lib, or point {LIBRARY_ENV} at it"
)


class GpuAccelerator(DelegateAccelerator):
    """Runs models on the GPU via the LiteRT GPU delegate; unsupported ops fall back to CPU."""

    name = "gpu"
    what = "GPU delegate"

    def can_run(self, operator_names: frozenset[str]) -> str | None:
        # The GPU delegate takes the operators it supports and leaves the rest to the CPU.
        return None

    def render_nodes(self) -> list[str]:
        return [f"/dev/dri/{p.name}" for p in sorted((self._root / "dev/dri").glob("renderD*"))]

    def _inspect(self) -> Probe:
        nodes = self.render_nodes()
        details = {"render_nodes": ", ".join(nodes) or "none"}
        library, how = find_library(LIBRARY_ENV, LIBRARY, "tensorflowlite_gpu_delegate")
        if library is None:
            return Probe(
                self.name,
                ProbeState.ABSENT,
                f"GPU delegate library not installed: {how}; {INSTALL_HINT}",
                details,
            )
        details["library"] = library
        # The delegate touches the GPU only when a model is prepared, so loading proves the
        # library, not the GPU; say when there is no render node for it to use.
        gpu = nodes[0] if nodes else "no /dev/dri/renderD* node (it may fail on first model)"
        return Probe(
            self.name, ProbeState.PRESENT, f"GPU delegate {library} loads; GPU: {gpu}", details
        )
