"""What every doctor check shares: the `Verdict` and `CheckResult` it returns, the
`Environment` it reads the machine through, and the `CheckContext` of one run."""

from __future__ import annotations

import logging
import platform
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgeagent.config import AgentConfig, PipelineConfig
from edgeagent.hal.accel import Probe, probe_accelerators

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MIN_FREE_BYTES = 100 * MIB
"""Less free space than this under the state directory fails the disk check."""
CERT_EXPIRY_WARNING = timedelta(days=30)
SERVICE_USER = "edgeagent"


class Verdict(StrEnum):
    OK = "ok"
    WARN = "warn"  # works, but something deserves attention
    FAIL = "fail"
    SKIP = "skip"  # not applicable here (no config, not used, no such hardware)


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    verdict: Verdict
    critical: bool
    finding: str  # one sentence: what was found
    fix: str | None = None  # one sentence: what to do; always set for warn and fail
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def blocking(self) -> bool:
        """A critical check that failed: the device cannot do its job."""
        return self.critical and self.verdict is Verdict.FAIL

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "verdict": str(self.verdict),
            "critical": self.critical,
            "finding": self.finding,
            "fix": self.fix,
            "details": self.details,
        }


def _run_command(argv: Sequence[str]) -> str | None:
    """The stdout of `argv`, or None when it is missing, fails or takes over 5 s."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s did not run: %s", argv[0], exc)
        return None
    if result.returncode != 0:
        log.debug("%s exited %d: %s", argv[0], result.returncode, result.stderr.strip())
        return None
    return result.stdout


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Environment:
    """Everything the checks read from the machine; tests replace parts of it."""

    root: Path = Path("/")  # where /dev, /sys and /proc are
    service_user: str = SERVICE_USER
    min_free_bytes: int = MIN_FREE_BYTES
    expiry_warning: timedelta = CERT_EXPIRY_WARNING
    timeout_s: float = 5.0  # per network step
    now: Callable[[], datetime] = _now
    which: Callable[[str], str | None] = shutil.which
    run: Callable[[Sequence[str]], str | None] = _run_command
    probe_accelerators: Callable[[], list[Probe]] = probe_accelerators

    def dev(self, pattern: str) -> list[Path]:
        return sorted((self.root / "dev").glob(pattern))

    def is_raspberry_pi(self) -> bool:
        try:
            model = (self.root / "proc/device-tree/model").read_text(errors="replace")
        except OSError:
            return False
        return "Raspberry Pi" in model


@dataclass
class CheckContext:
    """What the checks of one run share: the environment, the configuration (or default
    paths and why there is none) and the accelerator probes, taken once."""

    env: Environment
    config: AgentConfig | None  # None: no usable configuration
    defaults: AgentConfig | None  # the configuration used for paths (config or defaults)
    config_note: str  # why there is no config, for the checks that need one
    _probes: list[Probe] | None = None

    def probes(self) -> list[Probe]:
        """The accelerator probes, taken once per run."""
        if self._probes is None:
            self._probes = self.env.probe_accelerators()
        return self._probes

    def pipelines(self) -> list[PipelineConfig]:
        return [p for p in self.config.pipelines if p.enabled] if self.config else []


def healthy(results: Sequence[CheckResult]) -> bool:
    """True when no critical check failed."""
    return not any(r.blocking for r in results)


def machine_summary() -> str:
    """One line for the report header: host, machine, OS."""
    return f"{socket.gethostname()} ({platform.machine()}, {platform.platform(terse=True)})"
