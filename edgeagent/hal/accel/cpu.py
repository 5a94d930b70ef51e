"""The CPU: LiteRT's built-in kernels with XNNPACK. Always present; the fallback of last resort."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

from edgeagent.hal.accel.base import Probe, ProbeState

logger = logging.getLogger(__name__)

# ISA extensions XNNPACK dispatches on; anything else in /proc/cpuinfo is noise here.
_ARM_FEATURES = ("asimd", "asimdhp", "asimddp", "i8mm", "sve", "bf16")
_X86_FLAGS = ("sse4_1", "avx", "fma", "avx2", "avx512f", "avx512_vnni", "avx_vnni")
_ARM_FEATURE_NAMES = {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16"}

# ARM "CPU part" numbers of the cores found on Raspberry Pi boards and their kin.
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd0b": "Cortex-A76",
}


class CpuAccelerator:
    """Runs models on the CPU; `delegates()` is empty, which means LiteRT's XNNPACK."""

    name = "cpu"

    def __init__(self, cpuinfo_path: Path = Path("/proc/cpuinfo")) -> None:
        self._cpuinfo_path = cpuinfo_path

    def probe(self) -> Probe:
        details = {"machine": platform.machine() or "unknown", "cores": str(os.cpu_count() or 1)}
        details.update(_describe_cpu(self._cpuinfo_path))
        isa = details.get("isa") or "no SIMD extensions listed"
        reason = f"{details.get('cpu', 'CPU')} with {details['cores']} cores ({isa}), via XNNPACK"
        return Probe(self.name, ProbeState.PRESENT, reason, details)

    def present(self) -> bool:
        return True

    def delegates(self) -> list[Any]:
        return []

    def can_run(self, operator_names: frozenset[str]) -> str | None:
        # Custom operators the CPU cannot run make the Interpreter fail with the operator's
        # name, which says more than anything we could guess here.
        return None


def _describe_cpu(path: Path) -> dict[str, str]:
    """The CPU model and the XNNPACK-relevant ISA flags from /proc/cpuinfo (empty if unreadable)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        logger.debug("cannot read %s: %s", path, exc)
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key not in fields:  # the first processor block describes them all
            fields[key] = value.strip()
    details: dict[str, str] = {}
    if "flags" in fields:  # x86
        flags = set(fields["flags"].split())
        details["isa"] = " ".join(f for f in _X86_FLAGS if f in flags)
        if "model name" in fields:
            details["cpu"] = fields["model name"]
    elif "Features" in fields:  # ARM
        features = set(fields["Features"].split())
        details["isa"] = " ".join(
            _ARM_FEATURE_NAMES.get(f, f) for f in _ARM_FEATURES if f in features
        )
        part = fields.get("CPU part", "").lower()
        details["cpu"] = _ARM_PARTS.get(part, f"ARM core {part}" if part else "ARM CPU")
    if "Model" in fields:  # Raspberry Pi kernels name the board here
        details["board"] = fields["Model"]
    return details
