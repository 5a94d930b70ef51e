"""Health checks of a device, for `edgeagent doctor` (and anything else that wants them).

Each check answers one question (is the broker reachable? can the camera be opened?)
with a `CheckResult`: a verdict (`ok`, `warn`, `fail`, `skip`), one sentence saying what
was found, one saying what to do when the verdict is not `ok`, and machine-readable
details. A check is *critical* when the agent cannot do its job if it fails (the
configuration, the broker, a pipeline's model or source); a failed non-critical check
(an absent Coral when `accelerator: auto` falls back to the CPU) is reported but does not
make the device unhealthy.

`run_checks(config_path)` runs them all, in a fixed order, and never raises: a check
that cannot run reports why. What the checks read from the machine (`/dev`, `/sys`,
`/proc`, commands on PATH, the clock, the accelerator probes) comes through `Environment`
so that tests can relocate or replace it.
"""

from __future__ import annotations

import contextlib
import grp
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgeagent.config import AgentConfig, MqttConfig, PipelineConfig, load_config
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.hal.accel import Probe, ProbeState, probe_accelerators
from edgeagent.hal.sensor.settings import I2C_ENABLE_HINT as _I2C_ENABLE
from edgeagent.hal.settings import DeviceFamily, DeviceUse
from edgeagent.hal.settings import importable as _importable
from edgeagent.mqtt.client import PasswordFileError, TlsSetupError, agent_client_id, make_client
from edgeagent.paths import model_store_root, outbox_path, state_dir

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MIN_FREE_BYTES = 100 * MIB
"""Less free space than this under the state directory fails the disk check."""
CERT_EXPIRY_WARNING = timedelta(days=30)
EARLIEST_PLAUSIBLE_TIME = datetime(2025, 1, 1, tzinfo=UTC)
"""A clock before this is wrong (a Pi without an RTC boots at its last saved time or 1970)."""
MODEL_STORE_QUOTA = 1 << 40
"""The store is opened only to read it here, so its quota does not matter."""
MIN_PYTHON = (3, 11)
SERVICE_USER = "edgeagent"

_CAMERA_APPS = ("rpicam-hello", "libcamera-hello")
_EDGETPU_PACKAGES = ("libedgetpu1-std", "libedgetpu1-max")
# libedgetpu 16.0 (2021, the last Coral release) was built against TensorFlow 2.5-era
# TFLite; LiteRT keeps the external-delegate C API, but nobody publishes which LiteRT
# releases run compiled models correctly with it.
_EDGETPU_TESTED: frozenset[tuple[str, str]] = frozenset()


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
class _Context:
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


# --- running them --------------------------------------------------------------------


def run_checks(
    config_path: Path | None, *, required: bool = True, env: Environment | None = None
) -> list[CheckResult]:
    """Every check, in display order. `required`: a missing `config_path` is a failure
    (the operator named it) rather than a note (the default path)."""
    env = env or Environment()
    results: list[CheckResult] = []
    config_check, context = _check_config(config_path, required=required, env=env)
    results.append(config_check)
    checks: list[Callable[[_Context], list[CheckResult]]] = [
        lambda _c: [check_python()],
        lambda _c: [check_litert()],
        _check_accelerators,
        _check_edgetpu_runtime,
        _check_camera,
        _check_i2c,
        _check_clock,
        _check_certificates,
        _check_broker,
        _check_disk,
        _check_model_store,
        _check_pipelines,
    ]
    for check in checks:
        try:
            results.extend(check(context))
        except Exception as exc:  # one broken check must not hide the others
            log.debug("check %s crashed", getattr(check, "__name__", check), exc_info=True)
            name = getattr(check, "__name__", "check").lstrip("_").removeprefix("check_")
            results.append(
                CheckResult(
                    name,
                    Verdict.FAIL,
                    False,
                    f"the check itself failed: {type(exc).__name__}: {exc}",
                    "report this as a bug in edgeagent doctor, with `edgeagent -v doctor`",
                )
            )
    return results


def healthy(results: Sequence[CheckResult]) -> bool:
    """True when no critical check failed."""
    return not any(r.blocking for r in results)


# --- configuration, Python, LiteRT ---------------------------------------------------


def _check_config(
    path: Path | None, *, required: bool, env: Environment
) -> tuple[CheckResult, _Context]:
    defaults: AgentConfig | None
    try:
        defaults = AgentConfig()
    except ValidationError:  # the host name is no valid device id; the paths need none
        defaults = None
    if path is None or (not path.exists() and not required):
        where = f"{path} does not exist" if path else "no configuration given"
        note = f"no configuration ({where})"
        return (
            CheckResult(
                "config",
                Verdict.WARN,
                False,
                f"{where}: checking only what needs no configuration, with default paths",
                "install a configuration (deploy/install.sh writes one) or pass --config FILE",
                {"path": str(path) if path else None},
            ),
            _Context(env, None, defaults, note),
        )
    try:
        config = load_config(path)
    except ConfigError as exc:
        return (
            CheckResult(
                "config",
                Verdict.FAIL,
                True,
                str(exc),
                "correct the file as the message says (every key: docs/configuration.md)",
                {"path": str(path)},
            ),
            _Context(env, None, defaults, "the configuration is invalid"),
        )
    enabled = sum(1 for p in config.pipelines if p.enabled)
    return (
        CheckResult(
            "config",
            Verdict.OK,
            True,
            f"{path} is valid: device {config.device.id}, {enabled} enabled pipeline(s)",
            None,
            {"path": str(path), "device_id": config.device.id, "pipelines": enabled},
        ),
        _Context(env, config, config, ""),
    )


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


def check_litert() -> CheckResult:
    try:
        version = importlib.metadata.version("ai-edge-litert")
    except importlib.metadata.PackageNotFoundError:
        version = None
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


# --- accelerators --------------------------------------------------------------------


def _required_accelerators(context: _Context) -> dict[str, list[str]]:
    """Accelerator name -> pipelines that name it (no fallback for those)."""
    needed: dict[str, list[str]] = {}
    for p in context.pipelines():
        if p.accelerator != "auto":
            needed.setdefault(p.accelerator, []).append(p.name)
    return needed


def _check_accelerators(context: _Context) -> list[CheckResult]:
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
    if probe.name == "gpu":
        return "build and install libtensorflowlite_gpu_delegate.so, or use the CPU"
    return "reinstall ai-edge-litert"


def _check_edgetpu_runtime(context: _Context) -> list[CheckResult]:
    library = next(
        (p.details.get("library") for p in context.probes() if p.name == "edgetpu"), None
    )
    return [edgetpu_runtime_result(library, context.env)]


def edgetpu_runtime_result(library: str | None, env: Environment) -> CheckResult:
    """The libedgetpu version and whether it is known to pair with this LiteRT."""
    try:
        litert = importlib.metadata.version("ai-edge-litert")
    except importlib.metadata.PackageNotFoundError:
        litert = "unknown"
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


# --- camera and I2C -------------------------------------------------------------------


def _device_users(
    context: _Context, family: DeviceFamily
) -> list[tuple[PipelineConfig, DeviceUse]]:
    """The enabled pipelines whose source uses a device of `family`, as its backend says."""
    uses = [(p, p.source.device()) for p in context.pipelines()]
    return [(p, use) for p, use in uses if use is not None and use.family == family]


def _group_members(group: str) -> tuple[bool, set[str]]:
    """(group exists, its members including users whose primary group it is)."""
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False, set()
    members = set(entry.gr_mem)
    members |= {u.pw_name for u in pwd.getpwall() if u.pw_gid == entry.gr_gid}
    return True, members


def _service_user_in(group: str, env: Environment) -> tuple[str | None, dict[str, Any]]:
    """A warning sentence when the service user exists but is not in `group`."""
    exists, members = _group_members(group)
    try:
        pwd.getpwnam(env.service_user)
    except KeyError:
        return None, {"service_user": f"{env.service_user} (does not exist here)"}
    member = env.service_user in members
    details = {"service_user": env.service_user, f"in_{group}": member}
    if not exists:
        return f"there is no group {group} on this host", details
    if not member:
        return (
            f"the service user {env.service_user} is not in group {group} (the unit's "
            "SupplementaryGroups= grants it under systemd, but not when run by hand)"
        ), details
    return None, details


def _inaccessible(paths: Sequence[Path]) -> list[str]:
    return [str(p) for p in paths if not os.access(p, os.R_OK | os.W_OK)]


def _check_camera(context: _Context) -> list[CheckResult]:
    env = context.env
    video = env.dev("video*")
    media = env.dev("media*")
    apps = {app: env.which(app) for app in _CAMERA_APPS}
    picamera2 = _importable("picamera2")
    uses = _device_users(context, "camera")
    users = [p for p, _use in uses]
    details: dict[str, Any] = {
        "video_devices": [str(p) for p in video],
        "media_devices": [str(p) for p in media],
        "picamera2": picamera2,
        "camera_apps": {k: v for k, v in apps.items() if v},
        "used_by": [p.name for p in users],
    }
    stack = (
        f"libcamera ({', '.join(a for a, p in apps.items() if p)})"
        if any(apps.values())
        else "no libcamera apps"
    )
    summary = (
        f"{len(video)} video and {len(media)} media device(s), {stack}, "
        f"picamera2 {'importable' if picamera2 is True else 'not importable'}"
    )
    critical = bool(users)
    if not video and not media:
        if not users:
            return [
                CheckResult(
                    "camera",
                    Verdict.SKIP,
                    False,
                    "no camera device (/dev/video*, /dev/media*) and no pipeline uses one",
                    None,
                    details,
                )
            ]
        fix = (
            "check the ribbon cable, camera_auto_detect=1 in /boot/firmware/config.txt, "
            "and `rpicam-hello --list-cameras`"
            if env.is_raspberry_pi()
            else "plug in a camera (a USB webcam appears as /dev/video0) or change the pipeline"
        )
        return [
            CheckResult(
                "camera",
                Verdict.FAIL,
                True,
                f"no camera device (/dev/video*, /dev/media*), but pipelines "
                f"{', '.join(p.name for p in users)} need one",
                fix,
                details,
            )
        ]
    problems = []
    denied = _inaccessible([*video, *media])
    if denied:
        details["not_accessible"] = denied
        problems.append(f"user {_whoami()} cannot open {', '.join(denied)}")
    warning, user_details = _service_user_in("video", env)
    details.update(user_details)
    if warning:
        problems.append(warning)
    lacking = [(p, use.node) for p, use in uses if use.node and not env.dev(use.node)]
    if lacking:
        needs = ", ".join(f"{p.source.type} (pipeline {p.name}) needs /dev/{n}" for p, n in lacking)
        return [
            CheckResult(
                "camera",
                Verdict.FAIL,
                True,
                f"{summary}; {needs} (libcamera's media nodes) and there are none",
                "enable the camera (camera_auto_detect=1 in /boot/firmware/config.txt), "
                "reboot, and check `rpicam-hello --list-cameras`",
                details,
            )
        ]
    if problems:
        return [
            CheckResult(
                "camera",
                Verdict.WARN,
                critical,
                f"{summary}; {'; '.join(problems)}",
                f"add the users to group video (`sudo usermod -aG video {env.service_user}`) "
                "or run doctor as the service user",
                details,
            )
        ]
    return [CheckResult("camera", Verdict.OK, critical, summary, None, details)]


def _check_i2c(context: _Context) -> list[CheckResult]:
    env = context.env
    buses = env.dev("i2c-*")
    uses = _device_users(context, "i2c")
    users = [p for p, _use in uses]
    on_pi = env.is_raspberry_pi()
    details: dict[str, Any] = {
        "buses": [str(p) for p in buses],
        "raspberry_pi": on_pi,
        "used_by": [p.name for p in users],
    }
    if not users:
        if buses:
            return [
                CheckResult(
                    "i2c",
                    Verdict.OK,
                    False,
                    f"I2C buses {', '.join(details['buses'])}",
                    None,
                    details,
                )
            ]
        where = "I2C is not enabled" if on_pi else "this machine has no I2C bus"
        return [
            CheckResult(
                "i2c",
                Verdict.SKIP,
                False,
                f"{where} (no /dev/i2c-*) and no pipeline uses an I2C sensor",
                f"{_I2C_ENABLE} when you add one" if on_pi else None,
                details,
            )
        ]
    missing = [
        f"/dev/{use.node} (pipeline {p.name})"
        for p, use in uses
        if use.node and not env.dev(use.node)
    ]
    if missing:
        fix = (
            f"{_I2C_ENABLE} and reboot"
            if on_pi
            else "load the i2c-dev kernel module (`sudo modprobe i2c-dev`) on a board with I2C, "
            "or change the pipeline's bus"
        )
        return [
            CheckResult(
                "i2c",
                Verdict.FAIL,
                True,
                f"missing {', '.join(missing)}, needed by the I2C sources",
                fix,
                details,
            )
        ]
    problems = []
    denied = _inaccessible(buses)
    if denied:
        details["not_accessible"] = denied
        problems.append(f"user {_whoami()} cannot open {', '.join(denied)}")
    warning, user_details = _service_user_in("i2c", env)
    details.update(user_details)
    if warning:
        problems.append(warning)
    if problems:
        return [
            CheckResult(
                "i2c",
                Verdict.WARN,
                True,
                f"I2C buses {', '.join(details['buses'])}; {'; '.join(problems)}",
                f"add the users to group i2c (`sudo usermod -aG i2c {env.service_user}`)",
                details,
            )
        ]
    return [
        CheckResult(
            "i2c", Verdict.OK, True, f"I2C buses {', '.join(details['buses'])}", None, details
        )
    ]


# --- clock and certificates -------------------------------------------------------------


def _tls_files(mqtt: MqttConfig) -> list[tuple[str, Path]]:
    if mqtt.tls is None:
        return []
    return [
        (role, path)
        for role, path in (("ca_file", mqtt.tls.ca_file), ("cert_file", mqtt.tls.cert_file))
        if path is not None
    ]


def _load_certificates(path: Path) -> list[Any]:
    """Every certificate in a PEM (or DER) file; ValueError/OSError when none parse."""
    from cryptography import x509

    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return list(x509.load_pem_x509_certificates(data))
    return [x509.load_der_x509_certificate(data)]


def _check_clock(context: _Context) -> list[CheckResult]:
    env = context.env
    now = env.now()
    tls = context.config is not None and context.config.mqtt.tls is not None
    details: dict[str, Any] = {"now": now.isoformat(timespec="seconds")}
    ntp = env.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    synced = {"yes": True, "no": False}.get((ntp or "").strip())
    details["ntp_synchronized"] = synced
    if now < EARLIEST_PLAUSIBLE_TIME:
        return [
            CheckResult(
                "clock",
                Verdict.FAIL,
                tls,
                f"the system clock says {now:%Y-%m-%d %H:%M} UTC, before this agent was "
                "released: certificates are not yet valid and timestamps are wrong",
                "enable time sync (`sudo timedatectl set-ntp true`, systemd-timesyncd) and "
                "let it reach an NTP server; a Pi has no RTC unless you add one",
                details,
            )
        ]
    behind = []
    if context.config is not None:
        for role, path in _tls_files(context.config.mqtt):
            with contextlib.suppress(OSError, ValueError):
                for cert in _load_certificates(path):
                    if cert.not_valid_before_utc > now:
                        behind.append(
                            f"{role} {path} (valid from {cert.not_valid_before_utc:%Y-%m-%d})"
                        )
    if behind:
        return [
            CheckResult(
                "clock",
                Verdict.FAIL,
                True,
                f"the clock ({now:%Y-%m-%d %H:%M} UTC) is before the start of "
                f"{'; '.join(behind)}: the clock is behind or the certificate is from the future",
                "sync the clock (`sudo timedatectl set-ntp true`) and check its date",
                details,
            )
        ]
    if synced is False:
        return [
            CheckResult(
                "clock",
                Verdict.WARN,
                tls,
                f"the clock says {now:%Y-%m-%d %H:%M} UTC but is not NTP-synchronized",
                "enable time sync: `sudo timedatectl set-ntp true`",
                details,
            )
        ]
    sync_text = "NTP-synchronized" if synced else "NTP state unknown (timedatectl did not answer)"
    return [
        CheckResult(
            "clock", Verdict.OK, tls, f"{now:%Y-%m-%d %H:%M} UTC, {sync_text}", None, details
        )
    ]


def _check_certificates(context: _Context) -> list[CheckResult]:
    if context.config is None or context.config.mqtt.tls is None:
        why = context.config_note or "mqtt.tls is not set (plain TCP)"
        return [CheckResult("tls.certificates", Verdict.SKIP, False, f"{why}: nothing to check")]
    return [certificate_result(context.config.mqtt, context.env)]


def certificate_result(mqtt: MqttConfig, env: Environment) -> CheckResult:
    """Whether the configured CA and client certificates parse and are valid now."""
    now = env.now()
    tls = mqtt.tls
    assert tls is not None
    files = _tls_files(mqtt)
    failures: list[str] = []
    warnings: list[str] = []
    certs: list[dict[str, Any]] = []
    if tls.key_file is not None and not os.access(tls.key_file, os.R_OK):
        failures.append(f"key_file {tls.key_file} is missing or unreadable")
    for role, path in files:
        try:
            loaded = _load_certificates(path)
        except OSError as exc:
            failures.append(f"{role} {path} cannot be read ({exc.strerror})")
            continue
        except ValueError as exc:
            failures.append(f"{role} {path} is not a PEM or DER certificate ({exc})")
            continue
        for cert in loaded:
            start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
            subject = cert.subject.rfc4514_string() or "(no subject)"
            certs.append(
                {
                    "file": str(path),
                    "role": role,
                    "subject": subject,
                    "not_before": start.isoformat(),
                    "not_after": end.isoformat(),
                }
            )
            label = f"{role} {path} ({subject})"
            if end < now:
                failures.append(f"{label} expired on {end:%Y-%m-%d}")
            elif start > now:
                failures.append(f"{label} is not valid before {start:%Y-%m-%d %H:%M} UTC")
            elif end - now < env.expiry_warning:
                warnings.append(f"{label} expires on {end:%Y-%m-%d}, in {(end - now).days} days")
    details: dict[str, Any] = {"certificates": certs}
    if tls.ca_file is None:
        details["ca"] = "system trust store"
    if failures:
        return CheckResult(
            "tls.certificates",
            Verdict.FAIL,
            True,
            "; ".join(failures),
            "install current certificates (and check the clock if one is 'not valid before')",
            details,
        )
    if warnings:
        return CheckResult(
            "tls.certificates",
            Verdict.WARN,
            True,
            "; ".join(warnings),
            "renew the certificate before it expires",
            details,
        )
    if not certs:
        return CheckResult(
            "tls.certificates",
            Verdict.OK,
            True,
            "no certificate files configured; the broker is checked against the system trust store",
            None,
            details,
        )
    latest = min(c["not_after"] for c in certs)[:10]
    return CheckResult(
        "tls.certificates",
        Verdict.OK,
        True,
        f"{len(certs)} certificate(s) valid, the first to expire on {latest}",
        None,
        details,
    )


# --- the broker -------------------------------------------------------------------------


def _check_broker(context: _Context) -> list[CheckResult]:
    if context.config is None:
        why = f"{context.config_note}: no broker to check"
        return [
            CheckResult("broker.tcp", Verdict.SKIP, False, why),
            CheckResult("broker.mqtt", Verdict.SKIP, False, why),
        ]
    config = context.config
    tcp = broker_tcp_result(config.mqtt, context.env)
    if tcp.verdict is Verdict.FAIL:
        mqtt_check = CheckResult(
            "broker.mqtt", Verdict.SKIP, True, "not tried: the broker is unreachable over TCP"
        )
    else:
        mqtt_check = broker_mqtt_result(config.mqtt, config.device.id, context.env)
    return [tcp, mqtt_check]


def broker_tcp_result(mqtt: MqttConfig, env: Environment) -> CheckResult:
    where = f"{mqtt.host}:{mqtt.port}"
    details = {"host": mqtt.host, "port": mqtt.port}
    started = time.monotonic()
    try:
        with socket.create_connection((mqtt.host, mqtt.port), timeout=env.timeout_s):
            pass
    except socket.gaierror as exc:
        finding = f"broker {where} unreachable: the host name does not resolve ({exc.strerror})"
        fix = "check mqtt.host and the device's DNS (/etc/resolv.conf)"
    except ConnectionRefusedError:
        finding = f"broker {where} unreachable: connection refused (nothing listens there)"
        fix = "start the broker, or correct mqtt.host/mqtt.port (8883 is the usual TLS port)"
    except TimeoutError:
        finding = f"broker {where} unreachable: no answer within {env.timeout_s:g} s"
        fix = "check the network route and firewalls between the device and the broker"
    except OSError as exc:
        finding = f"broker {where} unreachable: {exc.strerror or exc}"
        fix = "check the network (`ip route`, Wi-Fi) and mqtt.host"
    else:
        ms = (time.monotonic() - started) * 1000
        details["connect_ms"] = round(ms, 1)
        return CheckResult(
            "broker.tcp",
            Verdict.OK,
            True,
            f"TCP connection to {where} in {ms:.0f} ms",
            None,
            details,
        )
    return CheckResult("broker.tcp", Verdict.FAIL, True, finding, fix, details)


def broker_mqtt_result(mqtt: MqttConfig, device_id: str, env: Environment) -> CheckResult:
    """A real CONNECT through the agent's own client factory with the agent's settings
    (credentials, TLS, protocol, keepalive); the verdict names the CONNACK reason. The
    client id is the agent's with `-doctor-<pid>` appended: the same prefix (a broker that
    restricts client ids treats both alike), but never the same id, so the running agent's
    session is not taken over. No last will: a doctor run never marks the device offline."""
    outcome = _mqtt_connect(mqtt, device_id, env.timeout_s)
    details = {
        "host": mqtt.host,
        "port": mqtt.port,
        "protocol": mqtt.protocol,
        "tls": mqtt.tls is not None,
        "username": mqtt.username,
        "reason": outcome.reason,
    }
    if outcome.ok:
        return CheckResult(
            "broker.mqtt",
            Verdict.OK,
            True,
            f"MQTT {mqtt.protocol} CONNECT accepted by {mqtt.host}:{mqtt.port}"
            + (" over TLS" if mqtt.tls else "")
            + (f" as {mqtt.username}" if mqtt.username else " (anonymous)"),
            None,
            details,
        )
    return CheckResult("broker.mqtt", Verdict.FAIL, True, outcome.finding, outcome.fix, details)


@dataclass(frozen=True, slots=True)
class _Connect:
    ok: bool
    reason: str
    finding: str = ""
    fix: str | None = None


def _mqtt_connect(mqtt: MqttConfig, device_id: str, timeout_s: float) -> _Connect:
    import paho.mqtt.client as paho

    where = f"{mqtt.host}:{mqtt.port}"
    client_id = f"{agent_client_id(mqtt, device_id)}-doctor-{os.getpid()}"
    try:
        client = make_client(mqtt, client_id=client_id, connect_timeout_s=timeout_s)
    except PasswordFileError as exc:
        return _Connect(False, "password-file", str(exc), "create the file with the password")
    except TlsSetupError as exc:
        return _Connect(
            False,
            "tls-setup",
            f"TLS failure: {exc}",
            "check mqtt.tls.ca_file, cert_file and key_file (PEM, readable, key matches cert)",
        )

    answer: dict[str, Any] = {}

    def on_connect(
        _client: Any, _userdata: Any, _flags: Any, reason_code: Any, _properties: Any
    ) -> None:
        answer["reason"] = reason_code

    client.on_connect = on_connect
    try:
        client.reconnect()  # the first connect: make_client recorded where to
    except ssl.SSLCertVerificationError as exc:
        return _Connect(
            False,
            "tls-verify",
            f"TLS failure with {where}: certificate verify failed: {exc.verify_message}",
            "set mqtt.tls.ca_file to the CA that signed the broker's certificate, and check "
            "that the certificate names mqtt.host",
        )
    except ssl.SSLError as exc:
        return _Connect(
            False,
            "tls-handshake",
            f"TLS failure with {where}: {exc.reason or exc}",
            "check that the port is the broker's TLS listener and that a client certificate "
            "is configured if the broker requires one",
        )
    except (ConnectionResetError, BrokenPipeError) as exc:
        if mqtt.tls is None:
            return _Connect(
                False,
                "closed",
                f"{where} closed the connection during CONNECT: {exc}",
                "check mqtt.port and mqtt.tls against the broker's listener",
            )
        return _Connect(
            False,
            "tls-handshake",
            f"TLS failure with {where}: the connection was reset during the TLS handshake "
            "(a plain MQTT port?)",
            "point mqtt.port at the broker's TLS listener (usually 8883), or remove mqtt.tls",
        )
    except ConnectionRefusedError:
        return _Connect(
            False,
            "unreachable",
            f"broker {where} unreachable: connection refused",
            "start the broker or correct mqtt.host/mqtt.port",
        )
    except OSError as exc:
        return _Connect(
            False,
            "unreachable",
            f"broker {where} unreachable: {exc}",
            "check the network and mqtt.host/mqtt.port",
        )
    deadline = time.monotonic() + timeout_s
    try:
        while "reason" not in answer and time.monotonic() < deadline:
            rc = client.loop(timeout=0.1)
            if rc != paho.MQTT_ERR_SUCCESS and "reason" not in answer:
                return _Connect(
                    False,
                    "closed",
                    f"{where} closed the connection before answering CONNECT"
                    + ("" if mqtt.tls else " (is it a TLS port? then set mqtt.tls)"),
                    "check mqtt.port and mqtt.tls against the broker's listener",
                )
    finally:
        if "reason" in answer and not answer["reason"].is_failure:
            client.disconnect()
            client.loop(timeout=0.1)  # sends DISCONNECT, then paho closes the socket
        sock = client.socket()
        if sock is not None:  # no CONNACK came: close it ourselves
            with contextlib.suppress(OSError):
                sock.close()
    reason = answer.get("reason")
    if reason is None:
        return _Connect(
            False,
            "timeout",
            f"{where} accepted TCP but sent no CONNACK within {timeout_s:g} s",
            "check that the port is an MQTT listener (and TLS or not, as configured)",
        )
    if not reason.is_failure:
        return _Connect(True, str(reason))
    code = int(reason.value)
    text = str(reason)
    if code == 0x86:  # Bad user name or password (3.1.1: 4)
        return _Connect(
            False,
            "bad-credentials",
            f"{where} refused the connection: {text.lower()} (user {mqtt.username or 'none'})",
            "check mqtt.username and the password in mqtt.password_file against the broker's "
            "password file (mosquitto_passwd)",
        )
    if code == 0x87:  # Not authorized (3.1.1: 5)
        if mqtt.username is None:
            return _Connect(
                False,
                "not-authorised",
                f"{where} refused the connection: not authorised ({text}); the broker does "
                "not allow anonymous clients",
                "set mqtt.username and mqtt.password_file to an account the broker knows",
            )
        # mosquitto 2 answers "not authorised", not "bad user name or password", to a
        # wrong password as well, so both causes are named.
        return _Connect(
            False,
            "not-authorised",
            f"{where} refused the connection: not authorised ({text}) for user "
            f"{mqtt.username}: the password is wrong or the user is not allowed",
            "check the password in mqtt.password_file against the broker's password file "
            "(mosquitto_passwd) and that the broker allows this user",
        )
    return _Connect(
        False,
        f"refused-{code}",
        f"{where} refused the connection: {text} (reason code {code})",
        "see the broker's log for why",
    )


# --- disk and the model store -----------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _check_disk(context: _Context) -> list[CheckResult]:
    config = context.config or context.defaults
    if config is None:
        return [CheckResult("disk", Verdict.SKIP, True, "no configuration and no default paths")]
    return [disk_result(config, context.env, defaults=context.config is None)]


def disk_result(config: AgentConfig, env: Environment, *, defaults: bool = False) -> CheckResult:
    """Free space for the outbox and the model store, against `min_free_bytes` and the
    outbox's bound."""
    state = state_dir(config)
    outbox = outbox_path(config)
    measured = _existing_ancestor(state)
    usage = shutil.disk_usage(measured)
    outbox_used = sum(
        p.stat().st_size for p in (outbox, outbox.with_name(outbox.name + "-wal")) if p.exists()
    )
    growth = max(config.outbox.max_bytes - outbox_used, 0) if config.outbox.enabled else 0
    details = {
        "state_dir": str(state),
        "measured_at": str(measured),
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "outbox_max_bytes": config.outbox.max_bytes if config.outbox.enabled else 0,
        "outbox_used_bytes": outbox_used,
        "min_free_bytes": env.min_free_bytes,
    }
    where = f"{state}" + (" (default)" if defaults else "")
    if measured != state:
        where += f", not created yet, measured at {measured}"
    free = f"{usage.free / MIB:.0f} MiB free of {usage.total / MIB:.0f} MiB"
    if usage.free < env.min_free_bytes:
        return CheckResult(
            "disk",
            Verdict.FAIL,
            True,
            f"{free} for {where}: under the {env.min_free_bytes / MIB:.0f} MiB minimum for "
            "the outbox and model deliveries",
            "free space (`sudo journalctl --vacuum-size=50M`, `sudo apt clean`, old files) "
            "or use a larger SD card",
            details,
        )
    if usage.free - env.min_free_bytes < growth:
        return CheckResult(
            "disk",
            Verdict.WARN,
            True,
            f"{free} for {where}: the outbox may grow by {growth / MIB:.0f} MiB more "
            "(outbox.max_bytes), which would not leave the minimum free",
            "lower outbox.max_bytes or free space",
            details,
        )
    return CheckResult("disk", Verdict.OK, True, f"{free} for {where}", None, details)


def _check_model_store(context: _Context) -> list[CheckResult]:
    config = context.config or context.defaults
    if config is None:
        return [CheckResult("model_store", Verdict.SKIP, False, "no configuration")]
    return [model_store_result(model_store_root(config))]


def model_store_result(root: Path) -> CheckResult:
    """The read-only integrity check of the store at `root` (skip when there is none)."""
    from edgeagent.delivery.store import ModelStore

    details: dict[str, Any] = {"root": str(root)}
    if not root.is_dir():
        return CheckResult(
            "model_store",
            Verdict.SKIP,
            False,
            f"no model store at {root} yet (it is created with the first model delivery)",
            None,
            details,
        )
    store = ModelStore(root, quota_bytes=MODEL_STORE_QUOTA, repair=False)
    try:
        names = store.names()
        problems = store.verify_integrity()
        active = {n: (a.version if (a := store.active(n)) else None) for n in names}
    except OSError as exc:
        return CheckResult(
            "model_store",
            Verdict.FAIL,
            False,
            f"cannot read the model store {root}: {exc}",
            "run doctor as root or as the service user",
            details,
        )
    details.update(active=active, problems=problems)
    if problems:
        return CheckResult(
            "model_store",
            Verdict.FAIL,
            False,
            f"{len(problems)} problem(s) in {root}: {problems[0]}",
            "the agent falls back to intact versions at start; deliver the damaged models "
            "again or roll back with `edgeagent models rollback NAME`",
            details,
        )
    listed = ", ".join(f"{n} {v or '(none active)'}" for n, v in active.items()) or "no models"
    return CheckResult("model_store", Verdict.OK, False, f"{root}: intact; {listed}", None, details)


# --- pipelines --------------------------------------------------------------------------


def _check_pipelines(context: _Context) -> list[CheckResult]:
    if context.config is None:
        return [
            CheckResult("pipelines", Verdict.SKIP, False, f"{context.config_note}: no pipelines")
        ]
    results = []
    for p in context.config.pipelines:
        if not p.enabled:
            note = "disabled (enabled: false)"
            results.append(CheckResult(f"pipeline.{p.name}.model", Verdict.SKIP, False, note))
            results.append(CheckResult(f"pipeline.{p.name}.source", Verdict.SKIP, False, note))
            continue
        results.append(pipeline_model_result(p))
        results.append(pipeline_source_result(p, context.env))
    if not results:
        results.append(
            CheckResult(
                "pipelines",
                Verdict.WARN,
                False,
                "the configuration has no pipelines: the agent will run but infer nothing",
                "add a pipeline (docs/configuration.md)",
            )
        )
    return results


def pipeline_model_result(pipeline: PipelineConfig) -> CheckResult:
    """Resolves the model and loads it as the pipeline does, on the CPU (one warm-up)."""
    from edgeagent.modelfile.catalog import describe_model
    from edgeagent.pipeline import build_runner

    name = f"pipeline.{pipeline.name}.model"
    started = time.monotonic()
    try:
        model = describe_model(
            pipeline.model,
            task=pipeline.task,
            labels=pipeline.labels,
            preprocess=pipeline.preprocess,
        )
        runner = build_runner(model, pipeline, accelerator="cpu")
    except (EdgeAgentError, ValueError) as exc:
        return CheckResult(
            name,
            Verdict.FAIL,
            True,
            f"model {pipeline.model!r} cannot run: {exc}",
            "fix the pipeline's model (a bundled name or a .tflite path) as the message says",
            {"model": pipeline.model},
        )
    runner.engine.close()
    ms = (time.monotonic() - started) * 1000
    return CheckResult(
        name,
        Verdict.OK,
        True,
        f"{model.name} {model.version} ({model.task.type}) loads and runs on the CPU "
        f"in {ms:.0f} ms",
        None,
        {"model": pipeline.model, "path": str(model.path), "version": model.version},
    )


def pipeline_source_result(pipeline: PipelineConfig, env: Environment) -> CheckResult:
    """Whether the source's backend and what it reads are there (without opening it)."""
    kind = pipeline.source.type
    found = pipeline.source.preflight(env)
    return CheckResult(
        f"pipeline.{pipeline.name}.source",
        Verdict.OK if found.ok else Verdict.FAIL,
        True,
        f"{kind}: {found.finding}",
        found.fix,
        {"type": kind, **found.details},
    )


# --- small helpers ---------------------------------------------------------------------


def _whoami() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def machine_summary() -> str:
    """One line for the report header: host, machine, OS."""
    return f"{socket.gethostname()} ({platform.machine()}, {platform.platform(terse=True)})"


__all__ = [
    "CheckResult",
    "Environment",
    "Verdict",
    "accelerator_result",
    "broker_mqtt_result",
    "broker_tcp_result",
    "certificate_result",
    "check_litert",
    "check_python",
    "disk_result",
    "edgetpu_runtime_result",
    "healthy",
    "machine_summary",
    "model_store_result",
    "pipeline_model_result",
    "pipeline_source_result",
    "run_checks",
]
