"""Facts about the machine for telemetry: temperature, throttling, load, memory, disk.

Everything comes from the kernel's files (stdlib only). A fact this kernel does not
provide is None, never a made-up value.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Thermal zone types that measure the CPU, best first (Pi, x86, other ARM boards).
_CPU_ZONES = ("cpu-thermal", "cpu_thermal", "x86_pkg_temp", "soc-thermal", "soc_thermal")

_THROTTLE_BITS = {
    "under_voltage": 0,
    "freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
}
_SINCE_BOOT_SHIFT = 16


@dataclass(frozen=True, slots=True)
class Throttling:
    """`vcgencmd get_throttled` decoded: what is happening now and what has since boot."""

    raw: int
    under_voltage_now: bool
    freq_capped_now: bool
    throttled_now: bool
    soft_temp_limit_now: bool
    under_voltage_since_boot: bool
    freq_capped_since_boot: bool
    throttled_since_boot: bool
    soft_temp_limit_since_boot: bool

    @property
    def ok(self) -> bool:
        return self.raw == 0

    def problems(self) -> list[str]:
        """Human words for each bit that is set, e.g. 'under-voltage now'."""
        words = []
        for name in _THROTTLE_BITS:
            for when in ("now", "since_boot"):
                if getattr(self, f"{name}_{when}"):
                    words.append(f"{name.replace('_', '-')} {when.replace('_', ' ')}")
        return words


def decode_throttled(output: str) -> Throttling:
    """Decodes `vcgencmd get_throttled` output such as 'throttled=0x50005'."""
    _, _, value = output.strip().partition("=")
    raw = int(value or output, 16)
    flags: dict[str, bool] = {}
    for name, bit in _THROTTLE_BITS.items():
        flags[f"{name}_now"] = bool(raw >> bit & 1)
        flags[f"{name}_since_boot"] = bool(raw >> (bit + _SINCE_BOOT_SHIFT) & 1)
    return Throttling(raw=raw, **flags)


def run_vcgencmd() -> str | None:
    """`vcgencmd get_throttled` output, or None where there is no vcgencmd (not a Pi)."""
    binary = shutil.which("vcgencmd")
    if binary is None:
        return None
    try:
        result = subprocess.run(
            [binary, "get_throttled"], capture_output=True, text=True, timeout=2, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("vcgencmd get_throttled failed: %s", exc)
        return None
    return result.stdout


@dataclass(frozen=True, slots=True)
class SystemFacts:
    hostname: str
    kernel: str
    machine: str
    pi_model: str | None
    cpu_count: int
    cpu_percent: float | None
    load_average: tuple[float, float, float] | None
    cpu_temp_c: float | None
    cpu_temp_zone: str | None  # the thermal zone type the temperature came from
    throttling: Throttling | None  # None: unknown (not a Pi, or vcgencmd failed)
    mem_total_bytes: int | None
    mem_available_bytes: int | None
    disk_path: str
    disk_total_bytes: int | None
    disk_free_bytes: int | None
    uptime_s: float | None

    def to_json(self) -> dict[str, Any]:
        """A dict of JSON types (None stays null: unknown), for telemetry payloads."""
        data = asdict(self)
        if self.load_average is not None:
            data["load_average"] = list(self.load_average)
        if self.throttling is not None:
            data["throttling"]["problems"] = self.throttling.problems()
        return data


class CpuSampler:
    """CPU utilisation between successive calls, from two /proc/stat readings."""

    def __init__(self, root: Path = Path("/")) -> None:
        self._stat = root / "proc/stat"
        self._lock = threading.Lock()
        self._last = _read_cpu_times(self._stat)
        self._percent: float | None = None

    def percent(self) -> float | None:
        """Busy percent of all CPUs since the previous call (or construction); None when
        /proc/stat is unreadable or no time has passed yet."""
        with self._lock:
            now = _read_cpu_times(self._stat)
            if now is None or self._last is None:
                self._last = now
                return None
            total = now[0] - self._last[0]
            idle = now[1] - self._last[1]
            if total > 0:
                self._percent = round(100.0 * (total - idle) / total, 1)
                self._last = now
            return self._percent


def read_system_facts(
    disk_path: str | Path = "/",
    *,
    root: Path = Path("/"),
    sampler: CpuSampler | None = None,
    vcgencmd: Callable[[], str | None] = run_vcgencmd,
) -> SystemFacts:
    """The facts now. `root` relocates /proc and /sys (tests); `vcgencmd` returns the
    `get_throttled` output or None."""
    temp, zone = read_cpu_temperature(root)
    meminfo = _read_meminfo(root / "proc/meminfo")
    disk_total, disk_free = _disk_usage(Path(disk_path))
    return SystemFacts(
        hostname=socket.gethostname(),
        kernel=platform.release(),
        machine=platform.machine() or "unknown",
        pi_model=_read_text(root / "proc/device-tree/model"),
        cpu_count=os.cpu_count() or 1,
        cpu_percent=sampler.percent() if sampler is not None else None,
        load_average=_read_loadavg(root / "proc/loadavg"),
        cpu_temp_c=temp,
        cpu_temp_zone=zone,
        throttling=_throttling(vcgencmd),
        mem_total_bytes=meminfo.get("MemTotal"),
        mem_available_bytes=meminfo.get("MemAvailable"),
        disk_path=str(disk_path),
        disk_total_bytes=disk_total,
        disk_free_bytes=disk_free,
        uptime_s=_read_uptime(root / "proc/uptime"),
    )


def read_cpu_temperature(root: Path = Path("/")) -> tuple[float | None, str | None]:
    """(degrees Celsius, zone type) of the CPU's thermal zone; (None, None) without one."""
    zones: dict[str, Path] = {}
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        kind = _read_text(zone / "type")
        if kind and kind not in zones:
            zones[kind] = zone
    if not zones:
        return None, None
    preferred = [k for k in _CPU_ZONES if k in zones]
    preferred += [k for k in zones if "cpu" in k.lower() and k not in preferred]
    kind = (preferred or list(zones))[0]
    text = _read_text(zones[kind] / "temp")
    try:
        return (int(text) / 1000.0, kind) if text else (None, kind)
    except ValueError:
        return None, kind


def _throttling(vcgencmd: Callable[[], str | None]) -> Throttling | None:
    output = vcgencmd()
    if output is None:
        return None
    try:
        return decode_throttled(output)
    except ValueError:
        logger.warning("cannot decode vcgencmd get_throttled output %r", output)
        return None


def _read_cpu_times(path: Path) -> tuple[int, int] | None:
    """(total, idle) jiffies of the aggregate 'cpu' line."""
    text = _read_text(path)
    if not text or not text.startswith("cpu "):
        return None
    values = [int(v) for v in text.splitlines()[0].split()[1:9]]
    values += [0] * (8 - len(values))
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    return sum(values), values[3] + values[4]


def _read_meminfo(path: Path) -> dict[str, int]:
    text = _read_text(path)
    result: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            factor = 1024 if parts[1:] == ["kB"] else 1
            result[key.strip()] = int(parts[0]) * factor
    return result


def _read_loadavg(path: Path) -> tuple[float, float, float] | None:
    text = _read_text(path)
    try:
        one, five, fifteen = (float(v) for v in (text or "").split()[:3])
    except ValueError:
        return None
    return one, five, fifteen


def _read_uptime(path: Path) -> float | None:
    text = _read_text(path)
    try:
        return float(text.split()[0]) if text else None
    except ValueError:
        return None


def _disk_usage(path: Path) -> tuple[int | None, int | None]:
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        logger.debug("disk usage of %s unknown: %s", path, exc)
        return None, None
    return usage.total, usage.free


def _read_text(path: Path) -> str | None:
    """The file's stripped text, or None if it is absent or unreadable. Device-tree
    strings end in NUL, which is stripped too."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip().rstrip("\0")
    except OSError:
        return None
