"""The Python and LiteRT checks: the interpreter is new enough, LiteRT imports, and frames
are resized by OpenCV (Pillow costs about four times the CPU)."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

from edgeagent.doctor.base import CheckContext, CheckResult, Verdict
from edgeagent.hal.settings import importable

MIN_PYTHON = (3, 11)


def check_python() -> CheckResult:
    version = ".".join(str(v) for v in sys.version_info[:3])
    details = {"version": version, "executable": sys.executable}
    if sys.version_info[:2] < MIN_PYTHON:
        return CheckResult(
            "python",
            Verdict.FAIL,
            True,
            f"Python {version} is older than the {MIN_PYTHON[0]}.{MIN_PYTHON[1]} edgeagent needs",
            "use Raspberry Pi OS bookworm (Python 3.11) or newer and reinstall",
            details,
        )
    return CheckResult("python", Verdict.OK, True, f"Python {version}", None, details)


def litert_version() -> str | None:
    """The installed ai-edge-litert distribution's version, None when it is not installed."""
    try:
        return importlib.metadata.version("ai-edge-litert")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_litert() -> CheckResult:
    version = litert_version()
    try:
        importlib.import_module("ai_edge_litert.interpreter")
    except ImportError as exc:
        return CheckResult(
            "litert",
            Verdict.FAIL,
            True,
            f"LiteRT does not import: {exc}",
            "pip install ai-edge-litert in the agent's venv (64-bit OS only: there are no "
            "32-bit ARM wheels)",
            {"version": version},
        )
    return CheckResult(
        "litert",
        Verdict.OK,
        True,
        f"LiteRT (ai-edge-litert) {version or 'of unknown version'} imports",
        None,
        {"version": version},
    )


def check_resize(context: CheckContext) -> list[CheckResult]:
    """Which library shrinks camera frames to the model's input (inference/preprocess.py):
    OpenCV when it imports, else Pillow at about four times the CPU per frame."""
    cameras = [p.name for p in context.pipelines() if p.source.kind == "image"]
    available = importable("cv2")
    details = {"opencv": available, "image_pipelines": cameras}
    if available is True:
        found = "frames are resized with OpenCV"
        return [CheckResult("resize", Verdict.OK, False, found, None, details)]
    if not cameras:
        return [
            CheckResult(
                "resize", Verdict.SKIP, False, "no enabled pipeline reads a camera", None, details
            )
        ]
    return [
        CheckResult(
            "resize",
            Verdict.WARN,
            False,
            f"OpenCV does not import ({available}): pipelines {', '.join(cameras)} resize "
            "frames with Pillow, about 4x the CPU per frame",
            "pip install 'edgeagent[opencv]' in the agent's venv (deploy/install.sh does)",
            details,
        )
    ]
