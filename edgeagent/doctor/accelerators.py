"""The accelerator checks: each probe's present / absent / broken verdict (critical for the
pipelines that name it), and whether the Edge TPU runtime is a tested pairing with LiteRT."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeagent.doctor.base import CheckContext, CheckResult, Environment, Verdict
from edgeagent.doctor.runtime import litert_version
from edgeagent.hal.accel import Probe, ProbeState

_EDGETPU_PACKAGES = ("libedgetpu1-std", "libedgetpu1-max")
# libedgetpu 16.0 (2021, the last Coral release) was built against TensorFlow 2.5-era
# TFLite; LiteRT keeps the external-delegate C API, but nobody publishes which LiteRT
# releases run compiled models correctly with it.
_EDGETPU_TESTED: frozenset[tuple[str, str]] = frozenset()


def _required_accelerators(context: CheckContext) -> dict[str, list[str]]:
    """Accelerator name -> pipelines that name it (no fallback for those)."""
    needed: dict[str, list[str]] = {}
    for p in context.pipelines():
        if p.accelerator != "auto":
            needed.setdefault(p.accelerator, []).append(p.name)
    return needed


def check_accelerators(context: CheckContext) -> list[CheckResult]:
    needed = _required_accelerators(context)
    results = []
    for probe in context.probes():
        users = needed.get(probe.name, [])
        results.append(accelerator_result(probe, users))
    return results


def accelerator_result(probe: Probe, required_by: Sequence[str] = ()) -> CheckResult:
    """The verdict on one accelerator probe; critical when pipelines name it explicitly."""
    name = f"accelerator.{probe.name}"
    critical = bool(required_by)
    details: dict[str, Any] = {"state": str(probe.state), **probe.details}
    if required_by:
        details["required_by"] = list(required_by)
    users = f" (pipelines {', '.join(required_by)} name it, so they cannot fall back)"
    fallback = "" if required_by else " (`accelerator: auto` falls back to the next one)"
    if probe.state is ProbeState.PRESENT:
        speed = probe.details.get("usb_speed", "")
        if speed and not speed.startswith("USB3"):
            return CheckResult(
                name,
                Verdict.WARN,
                critical,
                f"present but on a slow link: {probe.reason}",
                "plug the Coral into a USB3 (blue) port with the cable it came with",
                details,
            )
        return CheckResult(name, Verdict.OK, critical, f"present: {probe.reason}", None, details)
    if probe.state is ProbeState.BROKEN:
        return CheckResult(
            name,
            Verdict.FAIL,
            critical,
            f"present but broken: {probe.reason}{fallback}" + (users if required_by else ""),
            _accelerator_fix(probe),
            details,
        )
    # Absent: nothing is wrong unless a pipeline insists on it, or half of it is there.
    if required_by:
        return CheckResult(
            name,
            Verdict.FAIL,
            True,
            f"absent: {probe.reason}{users}",
            _accelerator_fix(probe),
            details,
        )
    half_there = probe.name == "edgetpu" and (
        "library" in probe.details or probe.details.get("devices", "none") != "none"
    )
    if half_there:
        return CheckResult(
            name,
            Verdict.WARN,
            False,
            f"absent: {probe.reason}{fallback}",
            _accelerator_fix(probe),
            details,
        )
    return CheckResult(
        name,
        Verdict.SKIP,
        False,
        f"absent: {probe.reason}{fallback}",
        None,
        details,
    )


def _accelerator_fix(probe: Probe) -> str:
    if probe.name == "edgetpu":
        if "library" not in probe.details:
            return (
                "install the Edge TPU runtime: apt install libedgetpu1-std from "
                "https://packages.cloud.google.com/apt (coral-edgetpu-stable)"
            )
        if probe.state is ProbeState.ABSENT:
            return (
                "plug in the Coral (USB3 port) or, for PCIe/M.2, install gasket-dkms and reboot; "
                "check `lsusb` for 1a6e:089a or 18d1:9302"
            )
        return (
            "re-plug the Coral, check that the service user is in plugdev (udev rule "
            "99-edgeagent-coral.rules), and reinstall libedgetpu1-std"
        )
    if probe.name == "litert-gpu":
        if "library" not in probe.details:
            return "pip install -U 'ai-edge-litert>=2.3' (its wheel carries the GPU accelerator)"
        if probe.state is ProbeState.ABSENT:
            return (
                "install the GPU's Vulkan driver: sudo apt install mesa-vulkan-drivers libvulkan1 "
                "(v3dv on a Pi 4/5); `vulkaninfo --summary` (vulkan-tools) lists the adapters"
            )
        return (
            "see LiteRT's own log: python -m edgeagent.hal.accel.litert_gpu <model.tflite>; "
            "until it compiles, set the pipeline's accelerator to cpu"
        )
    if probe.name == "gpu":
        return (
            "use the GPU accelerator in the ai-edge-litert wheel instead (accelerator "
            "litert-gpu, needs a Vulkan driver); this legacy delegate needs "
            "libtensorflowlite_gpu_delegate.so built from the LiteRT sources"
        )
    return "reinstall ai-edge-litert"


def check_edgetpu_runtime(context: CheckContext) -> list[CheckResult]:
    library = next(
        (p.details.get("library") for p in context.probes() if p.name == "edgetpu"), None
    )
    return [edgetpu_runtime_result(library, context.env)]


def edgetpu_runtime_result(library: str | None, env: Environment) -> CheckResult:
    """The libedgetpu version and whether it is known to pair with this LiteRT."""
    litert = litert_version() or "unknown"
    if library is None:
        return CheckResult(
            "edgetpu.runtime",
            Verdict.SKIP,
            False,
            "no Edge TPU runtime (libedgetpu) installed, so there is no pairing to check",
            None,
            {"litert": litert},
        )
    version, package = _libedgetpu_version(library, env)
    details = {"library": library, "version": version, "package": package, "litert": litert}
    if version is not None and (version, litert) in _EDGETPU_TESTED:
        return CheckResult(
            "edgetpu.runtime",
            Verdict.OK,
            False,
            f"libedgetpu {version} with LiteRT {litert}: a tested pairing",
            None,
            details,
        )
    return CheckResult(
        "edgetpu.runtime",
        Verdict.WARN,
        False,
        f"libedgetpu {version or 'of unknown version'} ({library}) with LiteRT {litert}: "
        "pairing not verified (Coral's runtime was built against TF 2.5-era TFLite)",
        "run `edgeagent bench` with an Edge TPU compiled model and compare its outputs "
        "with the CPU's before relying on it",
        details,
    )


def _libedgetpu_version(library: str, env: Environment) -> tuple[str | None, str | None]:
    """(version, package): from dpkg when a Coral package is installed, else from the
    library's file name (libedgetpu.so.1.0 -> 1.0), else (None, None)."""
    for package in _EDGETPU_PACKAGES:
        out = env.run(["dpkg-query", "-W", "-f", "${Version}", package])
        if out and out.strip():
            return out.strip(), package
    with contextlib.suppress(OSError):
        resolved = Path(library).resolve().name
        match = re.search(r"\.so\.([0-9][0-9.]*)$", resolved)
        if match:
            return match.group(1), None
    return None, None
