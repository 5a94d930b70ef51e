"""`edgeagent doctor`: each check's verdict on this machine and against real brokers,
certificates, stores and configurations; the JSON shape and the exit status."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeagent.cli.main import main
from edgeagent.config import MqttConfig, TlsConfig, parse_config
from edgeagent.delivery.store import ModelStore
from edgeagent.doctor import (
    CheckResult,
    Environment,
    Verdict,
    accelerator_result,
    broker_mqtt_result,
    broker_tcp_result,
    certificate_result,
    disk_result,
    healthy,
    model_store_result,
    run_checks,
)
from edgeagent.doctor import runtime as doctor_runtime
from edgeagent.hal.accel import Probe, ProbeState, probe_accelerators
from edgeagent.modelfile.catalog import bundled_dir
from tests.broker import MosquittoFactory, free_port, make_tls_files
from tests.manifests import manifest_for

FAST = Environment(timeout_s=3.0)

PIPELINES = """
pipelines:
  - name: shapes
    source: {type: synthetic, width: 64, height: 64, fps: 0}
    model: shapes-detector
"""


def write_config(tmp_path: Path, body: str, *, mqtt: dict[str, Any] | None = None) -> Path:
    """A config file with the state directory in tmp_path and `mqtt` (default: a port on
    which nothing listens)."""
    mqtt = mqtt or {"host": "127.0.0.1", "port": free_port()}
    lines = [f"state_dir: {tmp_path / 'state'}", "mqtt:"]
    lines += [f"  {key}: {value}" for key, value in mqtt.items() if key != "tls"]
    if "tls" in mqtt:
        lines.append("  tls:")
        lines += [f"    {key}: {value}" for key, value in mqtt["tls"].items()]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(body), encoding="utf-8")
    return path


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["doctor", *args])
    return code, capsys.readouterr().out


# --- this machine: no Coral, no GPU delegate, no camera, no I2C ---------------------------


def skip_if_accelerated() -> None:
    if any(p.state is not ProbeState.ABSENT for p in probe_accelerators()[:-1]):
        pytest.skip("this machine has an Edge TPU runtime, a Vulkan GPU or a GPU delegate")


def test_absent_accelerators_are_reported_with_reasons_and_are_not_critical(
    tmp_path: Path,
) -> None:
    skip_if_accelerated()
    checks = by_name(run_checks(write_config(tmp_path, PIPELINES), env=FAST))
    for name in ("accelerator.edgetpu", "accelerator.gpu"):
        check = checks[name]
        assert check.verdict is Verdict.SKIP, check
        assert not check.critical
        assert check.finding.startswith("absent: ")
        assert "not installed" in check.finding
        assert check.details["state"] == "absent"
    assert "libedgetpu" in checks["accelerator.edgetpu"].finding
    gpu = checks["accelerator.litert-gpu"]
    assert (gpu.verdict, gpu.critical) == (Verdict.SKIP, False)
    assert gpu.finding.startswith("absent: no Vulkan adapter: Dawn reports 'No adapters found'")
    assert checks["accelerator.cpu"].verdict is Verdict.OK
    assert checks["edgetpu.runtime"].verdict is Verdict.SKIP
    assert checks["camera"].verdict is Verdict.SKIP
    assert "no pipeline uses one" in checks["camera"].finding
    assert checks["i2c"].verdict is Verdict.SKIP
    assert "no I2C bus" in checks["i2c"].finding
    assert checks["pipeline.shapes.model"].verdict is Verdict.OK
    assert checks["pipeline.shapes.source"].verdict is Verdict.OK


def test_an_accelerator_a_pipeline_names_is_critical(tmp_path: Path) -> None:
    skip_if_accelerated()
    body = PIPELINES + "    accelerator: edgetpu\n"
    checks = by_name(run_checks(write_config(tmp_path, body), env=FAST))
    edgetpu = checks["accelerator.edgetpu"]
    assert (edgetpu.verdict, edgetpu.critical) == (Verdict.FAIL, True)
    assert "shapes" in edgetpu.finding
    assert "libedgetpu1-std" in (edgetpu.fix or "")


def test_litert_gpu_findings_say_which_fix_applies() -> None:
    library = {"library": "/venv/ai_edge_litert/libLiteRtWebGpuAccelerator.so"}
    no_adapter = Probe("litert-gpu", ProbeState.ABSENT, "no Vulkan adapter", library)
    result = accelerator_result(no_adapter, ["cam"])
    assert (result.verdict, result.critical) == (Verdict.FAIL, True)
    assert "mesa-vulkan-drivers libvulkan1" in (result.fix or "")
    no_library = Probe("litert-gpu", ProbeState.ABSENT, "not in the wheel")
    assert "ai-edge-litert>=2.3" in (accelerator_result(no_library, ["cam"]).fix or "")
    crashed = Probe("litert-gpu", ProbeState.BROKEN, "the GPU check crashed", library)
    result = accelerator_result(crashed)
    assert result.verdict is Verdict.FAIL
    assert "python -m edgeagent.hal.accel.litert_gpu" in (result.fix or "")
    legacy = accelerator_result(Probe("gpu", ProbeState.ABSENT, "not installed"), ["cam"])
    assert "litert-gpu" in (legacy.fix or "")


def test_broken_and_slow_accelerators() -> None:
    broken = Probe("edgetpu", ProbeState.BROKEN, "Edge TPU is present but broken: bad")
    result = accelerator_result(broken)
    assert (result.verdict, result.critical) == (Verdict.FAIL, False)
    assert accelerator_result(broken, ["cam"]).blocking
    slow = Probe(
        "edgetpu",
        ProbeState.PRESENT,
        "USB Coral at 2-1",
        {"library": "/usr/lib/libedgetpu.so.1", "usb_speed": "USB2 (480 Mb/s): slow"},
    )
    result = accelerator_result(slow)
    assert result.verdict is Verdict.WARN
    assert "USB3" in (result.fix or "")
    fast = Probe("edgetpu", ProbeState.PRESENT, "USB Coral", {"usb_speed": "USB3 (5000 Mb/s)"})
    assert accelerator_result(fast).verdict is Verdict.OK
    runtime_only = Probe(
        "edgetpu", ProbeState.ABSENT, "no Coral", {"library": "/x.so", "devices": "none"}
    )
    assert accelerator_result(runtime_only).verdict is Verdict.WARN


def test_edgetpu_runtime_pairing_is_reported_as_not_verified(tmp_path: Path) -> None:
    library = tmp_path / "libedgetpu.so.1"
    library.write_bytes(b"")

    def dpkg(argv: Any) -> str | None:
        return "16.0" if list(argv)[-1] == "libedgetpu1-std" else None

    probe = Probe("edgetpu", ProbeState.PRESENT, "USB Coral", {"library": str(library)})
    env = Environment(timeout_s=3.0, run=dpkg, probe_accelerators=lambda: [probe])
    checks = by_name(run_checks(write_config(tmp_path, ""), env=env))
    runtime = checks["edgetpu.runtime"]
    assert runtime.verdict is Verdict.WARN
    assert "libedgetpu 16.0" in runtime.finding
    assert "not verified" in runtime.finding
    assert runtime.details["package"] == "libedgetpu1-std"


# --- configuration and exit status --------------------------------------------------------


def test_an_invalid_config_is_a_critical_failure_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt:\n  port: 1883\n  hots: broker\n", encoding="utf-8")
    code, out = doctor(capsys, "--config", str(bad))
    assert code == 1
    assert f"{bad}:3: mqtt.hots: unknown key" in out
    assert "NOT READY: critical checks failed: config" in out
    checks = by_name(run_checks(bad, env=FAST))
    assert checks["config"].blocking
    assert checks["broker.tcp"].verdict is Verdict.SKIP  # nothing to check against


def test_a_missing_default_config_checks_what_it_can(tmp_path: Path) -> None:
    missing = tmp_path / "config.yaml"
    checks = by_name(run_checks(missing, required=False, env=FAST))
    assert checks["config"].verdict is Verdict.WARN
    assert not checks["config"].critical
    assert "does not exist" in checks["config"].finding
    assert checks["broker.mqtt"].verdict is Verdict.SKIP
    assert checks["litert"].verdict is Verdict.OK
    assert checks["disk"].verdict in (Verdict.OK, Verdict.WARN)
    # Named on the command line, a missing file is an error.
    assert by_name(run_checks(missing, env=FAST))["config"].blocking


def test_exit_0_and_json_shape_when_every_critical_check_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    config = write_config(tmp_path, PIPELINES, mqtt={"host": broker.host, "port": broker.port})
    code, out = doctor(capsys, "--config", str(config), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert set(report) == {"ok", "config", "checks"}
    assert report["ok"] is True
    for check in report["checks"]:
        assert set(check) == {"name", "verdict", "critical", "finding", "fix", "details"}
        assert check["verdict"] in ("ok", "warn", "fail", "skip")
        assert isinstance(check["critical"], bool)
        assert isinstance(check["details"], dict)
        assert check["finding"]
        if check["verdict"] in ("warn", "fail"):
            assert check["fix"], check
    names = [c["name"] for c in report["checks"]]
    assert names[:3] == ["config", "python", "litert"]
    assert {"broker.tcp", "broker.mqtt", "disk", "pipeline.shapes.model"} <= set(names)
    assert {c["name"]: c["verdict"] for c in report["checks"]}["broker.mqtt"] == "ok"

    broker.stop()
    code, out = doctor(capsys, "--config", str(config))
    assert code == 1
    assert "broker.tcp" in out
    assert "unreachable" in out


# --- the broker --------------------------------------------------------------------------


def test_broker_ok_and_unreachable(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory()
    assert broker_tcp_result(broker.mqtt_config(), FAST).verdict is Verdict.OK
    ok = broker_mqtt_result(broker.mqtt_config(), "dev", FAST)
    assert ok.verdict is Verdict.OK, ok
    assert "anonymous" in ok.finding

    nothing = MqttConfig(host="127.0.0.1", port=free_port())
    tcp = broker_tcp_result(nothing, FAST)
    assert (tcp.verdict, tcp.critical) == (Verdict.FAIL, True)
    assert "unreachable" in tcp.finding
    assert "connection refused" in tcp.finding
    assert "unreachable" in broker_mqtt_result(nothing, "dev", FAST).finding


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_broker_credentials(mosquitto_factory: MosquittoFactory, protocol: str) -> None:
    broker = mosquitto_factory(users={"u": "p"})
    good = broker_mqtt_result(broker.mqtt_config(username="u", protocol=protocol), "dev", FAST)
    assert good.verdict is Verdict.OK, good
    assert "as u" in good.finding

    wrong = broker_mqtt_result(
        broker.mqtt_config(username="u", password="nope", protocol=protocol),  # noqa: S106
        "dev",
        FAST,
    )
    assert (wrong.verdict, wrong.critical) == (Verdict.FAIL, True)
    # mosquitto 2 answers "not authorised" to a wrong password (others say "bad user name
    # or password"); the finding names both causes.
    assert "not authorised" in wrong.finding or "bad user name or password" in wrong.finding
    assert "password is wrong" in wrong.finding
    assert "password" in (wrong.fix or "")

    anonymous = broker_mqtt_result(broker.mqtt_config(protocol=protocol), "dev", FAST)
    assert anonymous.verdict is Verdict.FAIL
    assert "anonymous" in anonymous.finding


def test_broker_tls(mosquitto_factory: MosquittoFactory, tmp_path: Path) -> None:
    broker = mosquitto_factory(tls=True)
    ok = broker_mqtt_result(broker.mqtt_config(), "dev", FAST)
    assert ok.verdict is Verdict.OK, ok
    assert "over TLS" in ok.finding

    other_ca = make_tls_files(tmp_path / "other").ca_file
    wrong = broker_mqtt_result(broker.mqtt_config(tls=TlsConfig(ca_file=other_ca)), "dev", FAST)
    assert (wrong.verdict, wrong.critical) == (Verdict.FAIL, True)
    assert "TLS failure" in wrong.finding
    assert "certificate verify failed" in wrong.finding
    assert wrong.details["reason"] == "tls-verify"

    plain = broker_mqtt_result(broker.mqtt_config(tls=None), "dev", FAST)
    assert plain.verdict is Verdict.FAIL
    assert "TLS port" in plain.finding


def test_tls_to_a_plain_listener(mosquitto_factory: MosquittoFactory, tmp_path: Path) -> None:
    broker = mosquitto_factory()
    ca = make_tls_files(tmp_path / "ca").ca_file
    result = broker_mqtt_result(broker.mqtt_config(tls=TlsConfig(ca_file=ca)), "dev", FAST)
    assert result.verdict is Verdict.FAIL
    assert "TLS failure" in result.finding


# --- certificates and the clock -------------------------------------------------------------


def self_signed(path: Path, not_before: dt.datetime, not_after: dt.datetime) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "doctor test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_certificate_expiry(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    expired = self_signed(tmp_path / "expired.pem", now - 400 * day, now - 2 * day)
    result = certificate_result(MqttConfig(tls=TlsConfig(ca_file=expired)), FAST)
    assert (result.verdict, result.critical) == (Verdict.FAIL, True)
    assert "expired on" in result.finding
    assert "CN=doctor test" in result.finding

    soon = self_signed(tmp_path / "soon.pem", now - day, now + 10 * day)
    result = certificate_result(MqttConfig(tls=TlsConfig(ca_file=soon)), FAST)
    assert result.verdict is Verdict.WARN
    assert "expires on" in result.finding

    good = self_signed(tmp_path / "good.pem", now - day, now + 365 * day)
    assert certificate_result(MqttConfig(tls=TlsConfig(ca_file=good)), FAST).verdict is Verdict.OK

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    result = certificate_result(MqttConfig(tls=TlsConfig(ca_file=garbage)), FAST)
    assert result.verdict is Verdict.FAIL
    assert "not a PEM or DER certificate" in result.finding


def test_a_clock_in_1970_fails_and_a_future_certificate_blames_the_clock(
    tmp_path: Path,
) -> None:
    now = dt.datetime.now(dt.UTC)
    future = self_signed(
        tmp_path / "ca.pem", now + dt.timedelta(days=3), now + dt.timedelta(days=90)
    )
    config = write_config(tmp_path, "", mqtt={"port": free_port(), "tls": {"ca_file": future}})
    checks = by_name(run_checks(config, env=FAST))
    assert checks["clock"].blocking
    assert "before the start of ca_file" in checks["clock"].finding
    assert "not valid before" in checks["tls.certificates"].finding

    booted_1970 = Environment(
        timeout_s=3.0, now=lambda: dt.datetime(1970, 1, 1, 0, 1, tzinfo=dt.UTC)
    )
    clock = by_name(run_checks(config, env=booted_1970))["clock"]
    assert (clock.verdict, clock.critical) == (Verdict.FAIL, True)  # critical: TLS is used
    assert "1970-01-01" in clock.finding
    assert "timedatectl set-ntp true" in (clock.fix or "")

    unsynced = Environment(timeout_s=3.0, run=lambda argv: "no\n")
    plain = write_config(tmp_path, "")
    clock = by_name(run_checks(plain, env=unsynced))["clock"]
    assert (clock.verdict, clock.critical) == (Verdict.WARN, False)
    assert "not NTP-synchronized" in clock.finding


# --- disk, model store --------------------------------------------------------------------------


def test_disk_space_threshold(tmp_path: Path) -> None:
    config = parse_config(f"state_dir: {tmp_path / 'state'}\n")
    ok = disk_result(config, FAST)
    assert ok.verdict in (Verdict.OK, Verdict.WARN)
    assert ok.details["measured_at"] == str(tmp_path)  # the state dir does not exist yet
    full = disk_result(config, Environment(min_free_bytes=ok.details["free_bytes"] + 1))
    assert (full.verdict, full.critical) == (Verdict.FAIL, True)
    assert "under the" in full.finding
    assert full.fix
    # An outbox allowed to grow beyond what the disk has left is a warning.
    config = parse_config(
        f"state_dir: {tmp_path}\noutbox: {{max_bytes: {ok.details['free_bytes'] * 2}}}\n"
    )
    assert disk_result(config, FAST).verdict is Verdict.WARN


def test_model_store_integrity(tmp_path: Path) -> None:
    root = tmp_path / "models"
    assert model_store_result(root).verdict is Verdict.SKIP
    store = ModelStore(root, quota_bytes=100_000_000)
    model = bundled_dir() / "digits-classifier.tflite"
    store.install(model, manifest_for(model, "1.0", "digits-classifier"), move=False)
    store.activate("digits-classifier", "1.0")
    intact = model_store_result(root)
    assert intact.verdict is Verdict.OK
    assert "digits-classifier 1.0" in intact.finding
    installed = root / "versions/digits-classifier/1.0/model.tflite"
    data = bytearray(installed.read_bytes())
    data[100] ^= 0xFF
    installed.write_bytes(bytes(data))
    corrupt = model_store_result(root)
    assert corrupt.verdict is Verdict.FAIL
    assert "corrupt" in corrupt.finding
    assert installed.read_bytes() == bytes(data)  # read-only: nothing repaired


# --- pipelines ----------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("picamera2") is not None, reason="picamera2 is installed here"
)
def test_a_picamera2_pipeline_fails_here_with_the_apt_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = """
    pipelines:
      - name: frontdoor
        source: {type: picamera2}
        model: shapes-detector
    """
    config = write_config(tmp_path, body)
    checks = by_name(run_checks(config, env=FAST))
    source = checks["pipeline.frontdoor.source"]
    assert (source.verdict, source.critical) == (Verdict.FAIL, True)
    assert "picamera2 is not importable" in source.finding
    assert "sudo apt install python3-picamera2" in (source.fix or "")
    camera = checks["camera"]
    assert camera.blocking  # and there is no camera device here either
    assert "frontdoor" in camera.finding
    assert checks["pipeline.frontdoor.model"].verdict is Verdict.OK
    code, out = doctor(capsys, "--config", str(config))
    assert code == 1
    assert "sudo apt install python3-picamera2" in out


def test_an_i2c_pipeline_on_a_pi_without_i2c_says_raspi_config(tmp_path: Path) -> None:
    fake_pi = tmp_path / "root"
    (fake_pi / "proc/device-tree").mkdir(parents=True)
    (fake_pi / "proc/device-tree/model").write_text("Raspberry Pi 4 Model B Rev 1.5\0")
    (fake_pi / "dev").mkdir()
    body = """
    pipelines:
      - name: pump
        source: {type: mpu6050, bus: 1}
        model: vibration-anomaly
    """
    env = Environment(root=fake_pi, timeout_s=3.0)
    i2c = by_name(run_checks(write_config(tmp_path, body), env=env))["i2c"]
    assert i2c.blocking
    assert "/dev/i2c-1" in i2c.finding
    assert "raspi-config" in (i2c.fix or "")
    # The same Pi with no I2C pipeline: nothing to do.
    i2c = by_name(run_checks(write_config(tmp_path, ""), env=env))["i2c"]
    assert i2c.verdict is Verdict.SKIP
    assert "I2C is not enabled" in i2c.finding


def test_a_missing_model_fails_its_pipeline(tmp_path: Path) -> None:
    body = """
    pipelines:
      - name: broken
        source: {type: synthetic}
        model: no-such-model
      - name: parked
        source: {type: picamera2}
        model: no-such-model
        enabled: false
    """
    results = run_checks(write_config(tmp_path, body), env=FAST)
    checks = by_name(results)
    model = checks["pipeline.broken.model"]
    assert model.blocking
    assert "no-such-model" in model.finding
    assert "bundled model" in model.finding
    assert checks["pipeline.parked.source"].verdict is Verdict.SKIP
    assert not healthy(results)


def test_resize_names_the_library_and_warns_without_opencv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("cv2", reason="the dev extra installs OpenCV; this needs it")
    config = write_config(tmp_path, PIPELINES)
    resize = by_name(run_checks(config, env=FAST))["resize"]
    assert resize.verdict is Verdict.OK
    assert "OpenCV" in resize.finding
    monkeypatch.setattr(doctor_runtime, "importable", lambda _module: "not installed")
    resize = by_name(run_checks(config, env=FAST))["resize"]
    assert resize.verdict is Verdict.WARN
    assert not resize.blocking
    assert "shapes" in resize.finding
    assert "Pillow" in resize.finding
    assert resize.fix is not None
    assert "edgeagent[opencv]" in resize.fix
    # Nothing reads a camera: nothing to resize.
    no_camera = by_name(run_checks(write_config(tmp_path, ""), env=FAST))["resize"]
    assert no_camera.verdict is Verdict.SKIP
