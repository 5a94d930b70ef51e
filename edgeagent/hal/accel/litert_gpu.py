"""The GPU through the WebGPU accelerator that ships in the ai-edge-litert wheel.

ai-edge-litert 2.3 carries `libLiteRtWebGpuAccelerator.so` (Dawn, WebGPU over Vulkan) and
reaches it through its `CompiledModel` API, not through Interpreter delegates, so this
accelerator compiles the model itself (`compile_model`) and the engine runs the result.
It asks for GPU | CPU: operators the GPU cannot run stay on LiteRT's CPU kernels.

The probe runs in a child process, for two reasons seen on a machine without a GPU:
LiteRT raises a RuntimeError that names only its own source lines, while the reason
("No adapters found", "Couldn't load Vulkan: libvulkan.so.1 ...") goes to the process's
stderr, which only a parent can read cleanly; and a GPU driver that crashes takes the
process with it, which must not be the agent. So:

- PRESENT: the library is in the wheel and a model compiles with a Vulkan adapter.
- ABSENT: the library is not in the wheel, or Dawn finds no adapter (no GPU, no Vulkan
  driver, or only a CPU Vulkan driver: Dawn does not count those as adapters).
- BROKEN: anything else (the check failed for another reason, crashed, or hung).

The result is cached for an hour (`cache_s`): the check costs a Python start and a model
compile (about 0.5 s), and callers include the MQTT dispatcher (the status message) and
the inference thread (the presence check). An adapter does not come and go at run time;
one that appears with a newly installed driver is seen after a restart (or by `doctor`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.errors import AcceleratorError
from edgeagent.hal.accel.base import Probe, ProbeState
from edgeagent.hal.accel.external_delegate import ProbeCache

logger = logging.getLogger(__name__)

LIBRARY = "libLiteRtWebGpuAccelerator.so"
NO_ADAPTER = "No adapters found"  # what Dawn logs when it finds no usable Vulkan adapter
NO_ADAPTER_HINT = (
    "install the GPU's Vulkan driver (mesa-vulkan-drivers on a Pi 4/5: v3dv) and "
    "libvulkan1; Dawn does not count CPU Vulkan drivers (lavapipe) as adapters"
)
NO_LIBRARY_HINT = (
    "ai-edge-litert 2.3 and later ship it for x86_64 and aarch64 Linux: "
    "pip install -U 'ai-edge-litert>=2.3'"
)
# The bundled model the check compiles: small, and any model exercises the adapter.
CHECK_MODEL = "vibration-anomaly.tflite"
CHECK_TIMEOUT_S = 30.0
_NO_VULKAN_LOADER = "Couldn't load Vulkan"


@dataclass(frozen=True, slots=True)
class AdapterCheck:
    """What the child process that compiled a model on the GPU reported."""

    returncode: int  # negative: killed by that signal
    stdout: str  # one JSON line when the child got that far
    stderr: str  # LiteRT's and Dawn's log lines
    timed_out: bool = False


def litert_package_dir() -> Path | None:
    """The installed ai_edge_litert package's directory (None when it is not importable)."""
    import importlib.util

    spec = importlib.util.find_spec("ai_edge_litert")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def run_adapter_check(model: Path, timeout_s: float = CHECK_TIMEOUT_S) -> AdapterCheck:
    """Compiles `model` for GPU | CPU in a child Python and reports what it saw."""
    command = [sys.executable, "-m", "edgeagent.hal.accel.litert_gpu", str(model)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        return AdapterCheck(-1, _text(exc.stdout), _text(exc.stderr), timed_out=True)
    return AdapterCheck(done.returncode, done.stdout, done.stderr)


def compile_for_gpu(path: Path, threads: int) -> Any:
    """A LiteRT CompiledModel of `path` on GPU | CPU (CPU kernels for what the GPU lacks)."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import CpuOptions, Options

    options = Options(
        hardware_accelerators=HardwareAccelerator.GPU | HardwareAccelerator.CPU,
        cpu_options=CpuOptions(num_threads=threads),
    )
    return CompiledModel.from_file(str(path), options=options)


class LiteRtGpuAccelerator:
    """Runs models on the GPU through LiteRT's own WebGPU accelerator (CompiledModel).

    `check` runs the adapter check (a child process by default; tests inject what Dawn
    reports) and `compile` builds the CompiledModel; both are the only vendor calls."""

    name = "litert-gpu"

    def __init__(
        self,
        *,
        package_dir: Path | None = None,
        check: Callable[[Path], AdapterCheck] = run_adapter_check,
        compile: Callable[[Path, int], Any] = compile_for_gpu,
        check_model: Path | None = None,
        root: Path = Path("/"),
        cache_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._package_dir = package_dir
        self._check = check
        self._compile = compile
        self._check_model = check_model
        self._root = root
        self._cache = ProbeCache(self._inspect, cache_s, clock)
        self._last: Probe | None = None

    def probe(self, *, fresh: bool = False) -> Probe:
        result = self._cache.get(fresh=fresh)
        self._last = result
        logger.debug("%s probe: %s: %s", self.name, result.state, result.reason)
        return result

    def present(self) -> bool:
        """The last probe's word (probing once if none ran): a GPU is not unplugged, and a
        lost device shows as failing inferences, which the pipeline fails over on."""
        last = self._last or self.probe()
        return last.state is ProbeState.PRESENT

    def delegates(self) -> list[Any]:
        raise AcceleratorError(
            f"{self.name} runs through LiteRT's CompiledModel API, not Interpreter delegates"
        )

    def can_run(self, operator_names: frozenset[str]) -> str | None:
        # GPU | CPU: what the GPU cannot run stays on the CPU kernels.
        return None

    def compile_model(self, path: Path, threads: int) -> Any:
        """The model compiled for this GPU; AcceleratorError says why it could not be."""
        try:
            return self._compile(path, threads)
        except (RuntimeError, ValueError, OSError) as exc:
            raise AcceleratorError(
                f"LiteRT could not compile {path.name} for the GPU ({_one_line(str(exc))}); "
                "`edgeagent doctor` shows what the GPU check found"
            ) from exc

    def _inspect(self) -> Probe:
        directory = self._package_dir or litert_package_dir()
        library = directory / LIBRARY if directory else None
        if library is None or not library.is_file():
            where = str(directory) if directory else "no ai_edge_litert package"
            return Probe(
                self.name,
                ProbeState.ABSENT,
                f"{LIBRARY} is not in the ai-edge-litert wheel ({where}); {NO_LIBRARY_HINT}",
            )
        nodes = sorted((self._root / "dev/dri").glob("renderD*"))
        details = {
            "library": str(library),
            "render_nodes": ", ".join(f"/dev/dri/{n.name}" for n in nodes) or "none",
        }
        locked = [f"/dev/dri/{n.name}" for n in nodes if not os.access(n, os.R_OK | os.W_OK)]
        model = self._check_model or _bundled_check_model()
        return adapter_probe(self.name, self._check(model), details, locked)


def adapter_probe(
    name: str, check: AdapterCheck, details: dict[str, str], locked: Sequence[str] = ()
) -> Probe:
    """The probe that an adapter check's outcome amounts to; `locked` names the GPU
    render nodes that exist but that this process may not open."""
    details = dict(details)
    lines = [line.strip() for line in check.stderr.splitlines() if line.strip()]
    if check.timed_out:
        return Probe(
            name,
            ProbeState.BROKEN,
            f"the GPU check hung for {CHECK_TIMEOUT_S:g} s compiling a model (GPU driver?)",
            details,
        )
    if check.returncode < 0:
        signame = _signal_name(-check.returncode)
        return Probe(
            name,
            ProbeState.BROKEN,
            f"the GPU check crashed with {signame} while compiling a model: the GPU driver "
            f"fails; last log line: {lines[-1] if lines else 'none'}",
            details,
        )
    report = _report(check.stdout)
    if check.returncode == 0 and report.get("compiled") is True:
        fully = bool(report.get("fully_accelerated"))
        details["fully_accelerated"] = str(fully).lower()
        return Probe(
            name,
            ProbeState.PRESENT,
            "WebGPU (Vulkan) adapter found; LiteRT compiles models for it"
            + ("" if fully else " (operators it lacks run on the CPU)"),
            details,
        )
    if any(NO_ADAPTER in line for line in lines):
        loader = next((line for line in lines if _NO_VULKAN_LOADER in line), None)
        details["dawn"] = NO_ADAPTER
        why = f"no Vulkan adapter: Dawn reports '{NO_ADAPTER}'"
        if loader is not None:
            why += f" ({loader.removeprefix('Warning: ')})"
        hint = NO_ADAPTER_HINT
        if locked:
            # A driver that cannot open the GPU lists no adapter either.
            hint = (
                f"{', '.join(locked)} exists but this process cannot open it: add the "
                f"service user to the group that owns it (render); or {hint}"
            )
        return Probe(name, ProbeState.ABSENT, f"{why}; {hint}", details)
    error = report.get("error") or next(
        (line for line in reversed(lines) if "ERROR" in line or "Error" in line),
        f"exit status {check.returncode}",
    )
    return Probe(name, ProbeState.BROKEN, f"the GPU check failed: {_one_line(str(error))}", details)


def _bundled_check_model() -> Path:
    from edgeagent.modelfile.catalog import bundled_dir

    return bundled_dir() / CHECK_MODEL


def _report(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_main(argv: Sequence[str]) -> int:
    """The child process: compile argv[0] for GPU | CPU and print one JSON line."""
    model = Path(argv[0])
    try:
        compiled = compile_for_gpu(model, threads=1)
    except (RuntimeError, ValueError, OSError) as exc:
        sys.stdout.write(json.dumps({"compiled": False, "error": _one_line(str(exc))}) + "\n")
        return 1
    fully = bool(compiled.is_fully_accelerated())
    sys.stdout.write(json.dumps({"compiled": True, "fully_accelerated": fully}) + "\n")
    sys.stdout.flush()
    # The Dawn device's teardown is not what is being checked; skip it.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(_check_main(sys.argv[1:]))
