"""Accelerators: one backend per file, listed by name here and imported only when chosen."""

from __future__ import annotations

import importlib
import threading

from edgeagent.errors import AcceleratorError
from edgeagent.hal.accel.base import Accelerator, CompiledModelAccelerator, Probe, ProbeState

# The order `accelerator: auto` tries them in: fastest first, the CPU always last.
AUTO_ORDER = ("edgetpu", "litert-gpu", "gpu", "cpu")

ACCELERATORS: dict[str, str] = {
    "edgetpu": "edgeagent.hal.accel.edgetpu:EdgeTpuAccelerator",
    "litert-gpu": "edgeagent.hal.accel.litert_gpu:LiteRtGpuAccelerator",
    "gpu": "edgeagent.hal.accel.gpu:GpuAccelerator",
    "cpu": "edgeagent.hal.accel.cpu:CpuAccelerator",
}

_instances: dict[str, Accelerator] = {}
_lock = threading.Lock()


def get_accelerator(name: str) -> Accelerator:
    """The accelerator called `name` (one shared instance, so its probe cache is shared)."""
    target = ACCELERATORS.get(name)
    if target is None:
        raise AcceleratorError(
            f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)} (or 'auto')"
        )
    with _lock:
        accelerator = _instances.get(name)
        if accelerator is None:
            module_name, _, class_name = target.partition(":")
            # No try/except: a backend that fails to import is a packaging bug to see.
            module = importlib.import_module(module_name)
            accelerator = getattr(module, class_name)()
            _instances[name] = accelerator
    return accelerator


def probe_accelerators() -> list[Probe]:
    """What each accelerator of AUTO_ORDER reports on this machine, in that order."""
    return [get_accelerator(name).probe() for name in AUTO_ORDER]


__all__ = [
    "ACCELERATORS",
    "AUTO_ORDER",
    "Accelerator",
    "CompiledModelAccelerator",
    "Probe",
    "ProbeState",
    "get_accelerator",
    "probe_accelerators",
]
