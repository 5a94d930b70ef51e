"""The sd_notify side of the service (edgeagent/systemd.py) against a real datagram socket,
and the unit file (systemd/edgeagent.service) against systemd-analyze."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from edgeagent.pipeline import PipelineStats
from edgeagent.systemd import Notifier, PipelineProgress, ReadyGate, Watchdog, notify_failure
from tests.notify_socket import Notification, NotifySocket

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edgeagent.service"


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    with NotifySocket(tmp_path, abstract=request.param == "abstract") as sock:
        yield sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    with NotifySocket(tmp_path) as sock:
        yield sock


def is_ping(n: Notification) -> bool:
    return n.get("WATCHDOG") == "1"


# --- Notifier --------------------------------------------------------------------------


def test_every_message_arrives_in_the_sd_notify_format(notify_socket: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.env})
    assert notifier.enabled

    assert notifier.ready("running: first result from pipeline shapes")
    assert notifier.status("loading models")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.notify_failure("config.yaml:3: mqtt.port: must be <= 65535", errno=22)
    assert notify_failure("no pipeline could start", {"NOTIFY_SOCKET": notify_socket.env})

    got = [notify_socket.receive(2.0) for _ in range(6)]
    assert [n.raw if n else None for n in got] == [
        b"READY=1\nSTATUS=running: first result from pipeline shapes",
        b"STATUS=loading models",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"STATUS=config.yaml:3: mqtt.port: must be <= 65535\nERRNO=22",
        b"STATUS=no pipeline could start",
    ]


def test_a_status_stays_one_line_so_it_cannot_forge_fields(path_socket: NotifySocket) -> None:
    Notifier({"NOTIFY_SOCKET": path_socket.env}).status("camera gone\nREADY=1\n")

    n = path_socket.receive(2.0)
    assert n is not None
    assert n.raw == b"STATUS=camera gone READY=1"
    assert "READY" not in n


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert not notify_failure("x", {})


def test_an_unreachable_socket_is_reported_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.WARNING, logger="edgeagent.systemd"):
        assert not notifier.watchdog()
        assert not notifier.watchdog()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "gone.sock" in warnings[0]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 2.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "parent"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    env: dict[str, str], expected: float | None
) -> None:
    assert Notifier(env).watchdog_interval() == expected


# --- PipelineProgress ------------------------------------------------------------------


def test_progress_means_a_result_or_a_retried_failure_and_names_the_stalled_stage() -> None:
    cam, vib = PipelineStats(), PipelineStats()
    pipelines = [SimpleNamespace(name="cam", stats=cam), SimpleNamespace(name="vib", stats=vib)]
    progress = PipelineProgress(lambda: pipelines)

    assert progress() == {}, "the first call only takes the baseline"
    cam.frames_in, cam.results_out, vib.frames_in, vib.results_out = 5, 4, 3, 3
    assert progress() == {}

    cam.frames_in += 30  # frames arrive, no result: invoke() hangs
    stalled = progress()
    assert list(stalled) == ["cam", "vib"]
    assert "30 sample(s)" in stalled["cam"]
    assert "invoke() hung" in stalled["cam"]
    assert "no sample from the source" in stalled["vib"]

    cam.results_out += 1
    vib.source_errors += 1  # the source failed again: alive, retrying, not hung
    assert progress() == {}


# --- Watchdog --------------------------------------------------------------------------


class FakeProgress:
    """A progress function a test switches between healthy and stalled."""

    def __init__(self) -> None:
        self.stalled: dict[str, str] = {}
        self.calls = 0

    def __call__(self) -> dict[str, str]:
        self.calls += 1
        return dict(self.stalled)


def test_watchdog_thread_pings_while_pipelines_progress_and_withholds_when_one_stalls(
    path_socket: NotifySocket,
) -> None:
    progress = FakeProgress()
    watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path_socket.env}), progress, interval=0.2)
    watchdog.start()
    try:
        assert any(t.name == "edgeagent-watchdog" for t in threading.enumerate())
        healthy = path_socket.drain(0.55)
        assert sum(map(is_ping, healthy)) >= 4, "a ping at start, then one every 0.1 s"

        progress.stalled = {"shapes": "no sample from the source"}
        report = path_socket.wait_for(lambda n: "STATUS" in n, timeout=2.0)
        status = report.get("STATUS") or ""
        assert re.fullmatch(
            r"pipeline shapes stalled: no result for \d+ s \(no sample from the source\)", status
        ), status
        withheld = path_socket.drain(0.5)
        assert not any(map(is_ping, withheld)), "no ping while a pipeline is stalled"
        assert all("pipeline shapes stalled" in (n.get("STATUS") or "") for n in withheld)

        progress.stalled = {}
        recovered = path_socket.wait_for(lambda n: "STATUS" in n, timeout=2.0)
        assert "producing results again" in (recovered.get("STATUS") or "")
        path_socket.wait_for(is_ping, timeout=2.0)
    finally:
        watchdog.stop()
    assert not any(t.name == "edgeagent-watchdog" for t in threading.enumerate())
    assert path_socket.drain(0.3) == [], "nothing after stop()"


def test_a_stall_reports_how_long_since_the_last_progress(path_socket: NotifySocket) -> None:
    now = [100.0]
    progress = FakeProgress()
    watchdog = Watchdog(
        Notifier({"NOTIFY_SOCKET": path_socket.env}), progress, interval=30, clock=lambda: now[0]
    )
    now[0] = 115.0
    assert watchdog.check()
    progress.stalled = {"cam": "", "vib": ""}
    now[0] = 130.0
    assert not watchdog.check()
    now[0] = 145.0
    assert not watchdog.check()

    statuses = [n.get("STATUS") for n in path_socket.drain(0.2) if "STATUS" in n]
    assert statuses == [
        "pipeline cam stalled: no result for 15 s; pipeline vib stalled: no result for 15 s",
        "pipeline cam stalled: no result for 30 s; pipeline vib stalled: no result for 30 s",
    ]
    assert watchdog.pings == 1


def test_a_failing_progress_check_withholds_the_ping(path_socket: NotifySocket) -> None:
    def broken() -> dict[str, str]:
        raise RuntimeError("stats gone")

    watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path_socket.env}), broken, interval=30)
    assert not watchdog.check()
    n = path_socket.receive(2.0)
    assert n is not None
    assert "progress check" in (n.get("STATUS") or "")
    assert "stats gone" in (n.get("STATUS") or "")


def test_without_a_watchdog_interval_no_thread_starts(path_socket: NotifySocket) -> None:
    progress = FakeProgress()
    watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path_socket.env}), progress)
    assert not watchdog.enabled
    watchdog.start()
    assert not any(t.name == "edgeagent-watchdog" for t in threading.enumerate())
    watchdog.stop()
    assert path_socket.drain(0.2) == []
    assert progress.calls == 0


# --- ReadyGate -------------------------------------------------------------------------


def test_ready_comes_only_after_the_first_result_is_stored(path_socket: NotifySocket) -> None:
    gate = ReadyGate(Notifier({"NOTIFY_SOCKET": path_socket.env}), timeout=30)
    gate.start()
    try:
        assert path_socket.drain(0.3) == [], "nothing before a result"
        assert not gate.is_ready

        gate.result_stored("shapes")
        gate.result_stored("shapes")
        gate.result_stored("vibration")

        got = path_socket.drain(0.3)
        assert [n.raw for n in got] == [
            b"READY=1\nSTATUS=running: first result from pipeline shapes stored in the outbox"
        ]
        assert gate.is_ready
    finally:
        gate.stop()


def test_a_result_kept_in_memory_says_so(path_socket: NotifySocket) -> None:
    gate = ReadyGate(Notifier({"NOTIFY_SOCKET": path_socket.env}), timeout=30)
    gate.result_stored("shapes", durable=False)
    (ready,) = path_socket.drain(0.3)
    assert "in memory only" in (ready.get("STATUS") or "")


def test_an_unstored_result_makes_ready_only_once_the_broker_acknowledged_it(
    path_socket: NotifySocket,
) -> None:
    gate = ReadyGate(Notifier({"NOTIFY_SOCKET": path_socket.env}), timeout=30)
    acked = threading.Event()
    refused = threading.Event()  # a result the broker never acknowledges
    gate.start()
    try:
        gate.result_sent("shapes", refused.is_set)
        gate.result_sent("shapes", acked.is_set)
        assert path_socket.drain(0.5) == [], "no READY while no result is acknowledged"
        assert not gate.is_ready

        acked.set()
        ready = path_socket.wait_for(lambda n: "READY" in n, timeout=3.0)
        assert ready.raw == (
            b"READY=1\nSTATUS=running: first result from pipeline shapes acknowledged by the broker"
        )
        gate.result_sent("shapes", acked.is_set)
        gate.result_stored("shapes")
        assert path_socket.drain(0.3) == [], "READY=1 is sent once"
    finally:
        gate.stop()


def test_ready_comes_after_the_timeout_with_the_reasons(path_socket: NotifySocket) -> None:
    gate = ReadyGate(
        Notifier({"NOTIFY_SOCKET": path_socket.env}),
        timeout=0.3,
        reasons=lambda: "frontdoor: camera read failed (3 errors)",
    )
    started = time.monotonic()
    gate.start()
    try:
        n = path_socket.wait_for(lambda n: "READY" in n, timeout=3.0)
    finally:
        gate.stop()
    assert n.at - started >= 0.3
    assert n.raw == (
        b"READY=1\nSTATUS=running, but no result has been stored or acknowledged yet: "
        b"frontdoor: camera read failed (3 errors)"
    )
    gate.result_stored("frontdoor")
    assert path_socket.drain(0.2) == [], "READY=1 is sent once"


def test_release_sends_ready_now_and_stop_cancels_the_timeout(path_socket: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": path_socket.env})
    gate = ReadyGate(notifier, timeout=0.2)
    gate.start()
    assert gate.release("running: no pipeline configured")
    assert not gate.release("again")
    gate.stop()

    quiet = ReadyGate(notifier, timeout=0.2)
    quiet.start()
    quiet.stop()
    got = path_socket.drain(0.5)
    assert [n.raw for n in got] == [b"READY=1\nSTATUS=running: no pipeline configured"]


# --- journald-friendly logs ------------------------------------------------------------


@pytest.mark.parametrize("journal", [True, False])
def test_logs_carry_no_timestamp_under_journald(journal: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal:
        env["JOURNAL_STREAM"] = "8:12345"
    code = (
        "import logging; from edgeagent.cli.main import configure_logging; "
        "configure_logging(); logging.getLogger('edgeagent.x').info('hello')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = out.stderr.strip().splitlines()[-1]
    if journal:
        assert line == "INFO edgeagent.x: hello"
    else:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO edgeagent.x: hello$", line)


# --- the unit file ---------------------------------------------------------------------


@pytest.fixture
def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        reason = "systemd-analyze is not installed (apt install systemd)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must verify the unit, not skip it")
        pytest.skip(reason)
    return binary


def unit_directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order; repeated keys kept."""
    section, out = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_directives(UNIT.read_text()) if s == section and k == key]


def verifiable_copy(unit_text: str, directory: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists (verify checks it)."""
    directory.mkdir(parents=True, exist_ok=True)
    fake = directory / "edgeagent"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = unit_text.replace("ExecStart=/opt/edgeagent/venv/bin/edgeagent", f"ExecStart={fake}")
    assert f"ExecStart={fake} run --config /etc/edgeagent/config.yaml" in text
    unit = directory / "edgeagent.service"
    unit.write_text(text)
    return unit


def verify(systemd_analyze: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze, "verify", "--man=no", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
    )


def test_unit_passes_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path) -> None:
    result = verify(systemd_analyze, verifiable_copy(UNIT.read_text(), tmp_path / "unit"))
    # verify exits 0 even for unknown keys; any output is a finding.
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).strip() == ""


def test_verify_would_catch_a_broken_unit(systemd_analyze: str, tmp_path: Path) -> None:
    broken = UNIT.read_text().replace(
        "NotifyAccess=main", "NotifyAccess=main\nWatchDogSec=30\nRestrictAddressFamilies=AF_BOGUS"
    )
    result = verify(systemd_analyze, verifiable_copy(broken, tmp_path / "unit"))
    assert "Unknown key 'WatchDogSec'" in result.stderr
    assert "AF_BOGUS" in result.stderr


def test_unit_exposure_stays_low(systemd_analyze: str, tmp_path: Path) -> None:
    unit = verifiable_copy(UNIT.read_text(), tmp_path / "unit")
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--threshold=25", "--no-pager", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_unit_is_a_watched_notify_service_with_a_start_limit() -> None:
    assert values("Service", "Type") == ["notify"]
    assert values("Service", "NotifyAccess") == ["main"]
    assert values("Service", "ExecStart") == [
        "/opt/edgeagent/venv/bin/edgeagent run --config /etc/edgeagent/config.yaml"
    ]
    assert values("Service", "Restart") == ["on-failure"]
    assert values("Service", "WatchdogSec") == ["30s"]
    assert values("Unit", "StartLimitIntervalSec") == ["600"]
    assert values("Unit", "StartLimitBurst") == ["5"]
    assert values("Service", "Environment") == ["PYTHONUNBUFFERED=1"]
    assert values("Service", "SyslogIdentifier") == ["edgeagent"]
    # the ReadyGate's 60 s fallback must come before systemd gives up on the start
    timeout = values("Service", "TimeoutStartSec")[0]
    assert int(timeout.removesuffix("s")) > ReadyGate(Notifier({})).timeout


def test_unit_is_hardened_but_reaches_camera_coral_and_i2c() -> None:
    assert values("Service", "User") == ["edgeagent"]
    assert values("Service", "SupplementaryGroups") == ["video render i2c plugdev gpio"]
    for key, value in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectControlGroups", "yes"),
        ("StateDirectory", "edgeagent"),
        ("ConfigurationDirectory", "edgeagent"),
        ("RuntimeDirectory", "edgeagent"),
        ("DevicePolicy", "closed"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),
    ]:
        assert values("Service", key) == [value], key
    assert "PrivateDevices" not in {k for _, k, _ in unit_directives(UNIT.read_text())}
    allowed = {v.split()[0]: v.split()[1] for v in values("Service", "DeviceAllow")}
    for device in [
        "char-video4linux",  # /dev/video*, V4L2 sub-devices
        "char-media",  # /dev/media* (libcamera)
        "char-dma_heap",  # /dev/dma_heap/* (libcamera buffers)
        "/dev/vchiq",
        "char-i2c",
        "/dev/apex_0",  # Coral PCIe
        "char-usb_device",  # Coral USB
        "char-drm",  # /dev/dri/*
    ]:
        assert allowed.get(device) == "rw", device
    # DeviceAllow= takes no globs in paths: /dev/media* would silently allow nothing.
    assert not [d for d in allowed if d.startswith("/") and any(c in d for c in "*?[")]


def test_credential_reaches_the_path_the_tls_config_reads() -> None:
    assert values("Service", "LoadCredential") == ["mqtt-password:/etc/edgeagent/mqtt-password"]
    config = yaml.safe_load((REPO / "deploy" / "edgeagent-tls.yaml").read_text())
    credential = Path(config["mqtt"]["password_file"])
    # %d (the credentials directory) of edgeagent.service, then the credential's id:
    assert credential.parent == Path("/run/credentials/edgeagent.service")
    assert credential.name == "mqtt-password"
