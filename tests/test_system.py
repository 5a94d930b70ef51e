"""System facts on this machine, and on a fake /proc and /sys tree of a throttled Pi."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from edgeagent.hal.system import (
    CpuSampler,
    decode_throttled,
    read_cpu_temperature,
    read_system_facts,
)


def test_facts_on_this_machine_are_plausible(tmp_path: Path) -> None:
    facts = read_system_facts(tmp_path, vcgencmd=lambda: None)
    assert facts.mem_total_bytes is not None
    assert facts.mem_available_bytes is not None
    assert 0 < facts.mem_available_bytes <= facts.mem_total_bytes
    assert facts.cpu_count == os.cpu_count()
    assert facts.uptime_s is not None
    assert facts.uptime_s > 0
    assert facts.load_average is not None
    assert len(facts.load_average) == 3
    assert facts.disk_total_bytes is not None
    assert facts.disk_free_bytes is not None
    assert 0 <= facts.disk_free_bytes <= facts.disk_total_bytes
    assert facts.disk_path == str(tmp_path)
    assert facts.throttling is None
    assert facts.hostname
    assert facts.machine
    json.dumps(facts.to_json())  # serialisable as it is


def test_absent_files_give_none_not_made_up_values(tmp_path: Path) -> None:
    facts = read_system_facts(tmp_path / "missing-disk", root=tmp_path, vcgencmd=lambda: None)
    assert facts.cpu_temp_c is None
    assert facts.cpu_temp_zone is None
    assert facts.mem_total_bytes is None
    assert facts.uptime_s is None
    assert facts.load_average is None
    assert facts.pi_model is None
    assert facts.disk_total_bytes is None
    assert facts.cpu_percent is None
    assert CpuSampler(tmp_path).percent() is None


@pytest.fixture
def pi_root(tmp_path: Path) -> Path:
    zones = tmp_path / "sys/class/thermal"
    for index, (kind, millidegrees) in enumerate([("gpu-thermal", 41000), ("cpu-thermal", 61850)]):
        zone = zones / f"thermal_zone{index}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(f"{millidegrees}\n")
    proc = tmp_path / "proc"
    (proc / "device-tree").mkdir(parents=True)
    (proc / "device-tree/model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\0")
    (proc / "meminfo").write_text(
        "MemTotal:        3882984 kB\nMemFree:          123456 kB\nMemAvailable:    2951234 kB\n"
    )
    (proc / "uptime").write_text("12345.67 40000.00\n")
    (proc / "loadavg").write_text("0.52 0.58 0.59 1/234 5678\n")
    (proc / "stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\n")
    return tmp_path


def test_pi_facts_from_a_fake_tree(pi_root: Path) -> None:
    facts = read_system_facts(root=pi_root, vcgencmd=lambda: "throttled=0x50005\n")
    assert facts.cpu_temp_c == pytest.approx(61.85)
    assert facts.cpu_temp_zone == "cpu-thermal"
    assert facts.pi_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert facts.mem_total_bytes == 3882984 * 1024
    assert facts.mem_available_bytes == 2951234 * 1024
    assert facts.uptime_s == pytest.approx(12345.67)
    assert facts.load_average == (0.52, 0.58, 0.59)
    throttling = facts.throttling
    assert throttling is not None
    assert throttling.under_voltage_now
    assert throttling.throttled_now
    assert not throttling.freq_capped_now
    assert throttling.under_voltage_since_boot
    assert throttling.throttled_since_boot
    assert not throttling.soft_temp_limit_since_boot
    payload = facts.to_json()
    assert payload["throttling"]["problems"] == [
        "under-voltage now",
        "under-voltage since boot",
        "throttled now",
        "throttled since boot",
    ]
    assert payload["load_average"] == [0.52, 0.58, 0.59]


def test_throttled_decode_of_a_healthy_pi_and_garbage(pi_root: Path) -> None:
    healthy = decode_throttled("throttled=0x0")
    assert healthy.ok
    assert healthy.problems() == []
    assert decode_throttled("throttled=0x80008").soft_temp_limit_since_boot
    facts = read_system_facts(root=pi_root, vcgencmd=lambda: "error: VCHI not available")
    assert facts.throttling is None


def test_cpu_temperature_falls_back_to_a_cpu_named_zone(tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/thermal/thermal_zone3"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu0-thermal\n")
    (zone / "temp").write_text("48500\n")
    assert read_cpu_temperature(tmp_path) == (48.5, "cpu0-thermal")


def test_cpu_sampler_computes_from_two_readings(pi_root: Path) -> None:
    sampler = CpuSampler(pi_root)
    assert sampler.percent() is None  # no time has passed: nothing measured yet
    (pi_root / "proc/stat").write_text("cpu  250 0 150 900 100 0 0 0 0 0\n")
    # 400 jiffies passed; 100 idle + 100 iowait of them were idle, so 200 were busy
    assert sampler.percent() == pytest.approx(50.0)


def test_cpu_sampler_on_this_machine() -> None:
    sampler = CpuSampler()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        sum(range(10000))  # keep one core busy
    percent = sampler.percent()
    assert percent is not None
    assert 0.0 < percent <= 100.0
