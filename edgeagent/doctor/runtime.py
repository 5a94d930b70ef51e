"""The Python and LiteRT checks: the interpreter is new enough and LiteRT imports."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

from edgeagent.doctor.base import CheckResult, Verdict

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
