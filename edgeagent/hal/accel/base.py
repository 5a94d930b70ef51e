"""The accelerator protocol: what the inference engine asks of the Edge TPU, GPU and CPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class ProbeState(StrEnum):
    PRESENT = "present"  # found and loads
    ABSENT = "absent"  # not installed or not plugged in: nothing is wrong
    BROKEN = "broken"  # found but fails to load: something is wrong, see reason


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    state: ProbeState
    reason: str  # one sentence: why absent/broken, or what was found
    details: dict[str, str] = field(default_factory=dict)  # library path, version, USB speed


class Accelerator(Protocol):
    """One way to run a model. `delegates()` returns what the LiteRT Interpreter takes as
    `experimental_delegates` (an empty list means the built-in CPU/XNNPACK kernels)."""

    name: str

    def probe(self) -> Probe: ...

    def present(self) -> bool:
        """A cheap check, without loading a delegate, that the device is still there (a
        running pipeline asks every half second; a USB Coral pulled out says False)."""
        ...

    def delegates(self) -> list[Any]:
        """Raises AcceleratorError (with the reason) when the delegate cannot be loaded."""
        ...

    def can_run(self, operator_names: frozenset[str]) -> str | None:
        """None when this accelerator can run a model with these operators, otherwise the
        reason it cannot (e.g. the Edge TPU needs a model compiled by edgetpu_compiler)."""
        ...


@runtime_checkable
class CompiledModelAccelerator(Protocol):
    """An accelerator that LiteRT reaches through its CompiledModel API (the WebGPU
    accelerator in the wheel) rather than Interpreter delegates: the engine has it compile
    the model and runs what it returns. Its `delegates()` raises; nothing calls it."""

    def compile_model(self, path: Path, threads: int) -> Any:
        """A LiteRT CompiledModel of `path`; AcceleratorError says why it cannot be."""
        ...
