"""deploy/install.sh run for real into a fake root (`--root`): users via useradd --root,
files, modes and owners, idempotent re-runs, uninstall and purge, the 32-bit ARM refusal,
and one real venv + pip install of this package."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from edgeagent.config import load_config

REPO = Path(__file__).resolve().parent.parent
INSTALLER = REPO / "deploy" / "install.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("useradd") is None or os.geteuid() != 0,
    reason="the installer creates users and chowns files: needs root and useradd (passwd)",
)


def fake_root(path: Path, groups: tuple[str, ...] = ("video", "plugdev")) -> Path:
    """A root with the account databases useradd --root edits and only `groups`."""
    etc = path / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "group").write_text(
        "root:x:0:\n" + "".join(f"{g}:x:{100 + i}:\n" for i, g in enumerate(groups))
    )
    (etc / "gshadow").write_text("root:*::\n" + "".join(f"{g}:*::\n" for g in groups))
    return path


def install(
    root: Path, *args: str, env: dict[str, str] | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", str(INSTALLER), "--root", str(root), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def account(root: Path, db: str, name: str) -> list[str] | None:
    for line in (root / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return fake_root(tmp_path / "root")


def test_install_creates_the_user_files_and_unit(root: Path) -> None:
    result = install(root, "--skip-pip", "--device-id", "pi-test")

    user = account(root, "passwd", "edgeagent")
    assert user is not None
    assert user[5:] == ["/var/lib/edgeagent", "/usr/sbin/nologin"]
    uid, gid = int(user[2]), int(user[3])
    assert uid < 1000, "a system user"
    for group in ("video", "plugdev"):
        members = account(root, "group", group)
        assert members is not None
        assert members[3] == "edgeagent", group

    unit = root / "etc/systemd/system/edgeagent.service"
    assert unit.read_text() == (REPO / "systemd/edgeagent.service").read_text()
    assert mode(unit) == 0o644
    # render, i2c and gpio do not exist in this root: systemd would refuse to start the unit
    dropin = root / "etc/systemd/system/edgeagent.service.d/10-groups.conf"
    assert dropin.read_text().splitlines()[1:] == [
        "[Service]",
        "SupplementaryGroups=",
        "SupplementaryGroups=video plugdev",
    ]

    rule = root / "etc/udev/rules.d/99-edgeagent-coral.rules"
    assert rule.read_text() == (REPO / "deploy/udev/99-edgeagent-coral.rules").read_text()
    assert mode(rule) == 0o644
    rules = rule.read_text()
    for vendor, product in [("1a6e", "089a"), ("18d1", "9302")]:
        assert f'ATTRS{{idVendor}}=="{vendor}", ATTRS{{idProduct}}=="{product}"' in rules
    assert rules.count('MODE="0660", GROUP="plugdev"') == 2

    etc = root / "etc/edgeagent"
    assert (mode(etc), etc.stat().st_uid, etc.stat().st_gid) == (0o750, 0, gid)
    config = etc / "config.yaml"
    assert (mode(config), config.stat().st_uid, config.stat().st_gid) == (0o640, 0, gid)
    loaded = load_config(config)
    assert loaded.device.id == "pi-test"
    assert [p.name for p in loaded.pipelines] == ["shapes", "vibration"]
    password = etc / "mqtt-password"
    assert (mode(password), password.stat().st_uid, password.read_bytes()) == (0o600, 0, b"")

    state = root / "var/lib/edgeagent"
    assert (mode(state), state.stat().st_uid, state.stat().st_gid) == (0o750, uid, gid)

    assert not (root / "opt/edgeagent").exists(), "--skip-pip makes no venv"
    assert "skipped (--root): systemctl restart edgeagent.service" in result.stdout
    assert "skipped (--root): udevadm control --reload-rules" in result.stdout


def test_installed_unit_and_drop_in_pass_systemd_analyze_verify(root: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing; CI must verify the unit")
        pytest.skip("systemd-analyze is not installed (apt install systemd)")
    install(root, "--skip-pip")
    check = tmp_path / "verify"
    shutil.copytree(root / "etc/systemd/system", check)
    fake = check / "edgeagent"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    unit = check / "edgeagent.service"
    unit.write_text(
        unit.read_text().replace("ExecStart=/opt/edgeagent/venv/bin/edgeagent", f"ExecStart={fake}")
    )
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_on_a_pi_all_groups_exist_and_no_drop_in_is_left(tmp_path: Path) -> None:
    root = fake_root(tmp_path / "root")
    install(root, "--skip-pip")
    dropin = root / "etc/systemd/system/edgeagent.service.d/10-groups.conf"
    assert dropin.exists()

    for group, gid in [("render", 989), ("i2c", 990), ("gpio", 991)]:  # as on Raspberry Pi OS
        with (root / "etc/group").open("a") as f:
            f.write(f"{group}:x:{gid}:\n")
        with (root / "etc/gshadow").open("a") as f:
            f.write(f"{group}:*::\n")
    install(root, "--skip-pip")

    assert not dropin.exists(), "the unit's own SupplementaryGroups= applies"
    for group in ("video", "render", "i2c", "plugdev", "gpio"):
        members = account(root, "group", group)
        assert members is not None
        assert members[3] == "edgeagent"


def test_rerun_upgrades_in_place_and_keeps_the_operators_config(root: Path) -> None:
    install(root, "--skip-pip", "--device-id", "pi-test")
    config = root / "etc/edgeagent/config.yaml"
    edited = config.read_text().replace("log_level: info", "log_level: debug")
    config.write_text(edited)
    (root / "etc/edgeagent/mqtt-password").write_text("s3cret\n")
    unit = root / "etc/systemd/system/edgeagent.service"
    unit.write_text("stale unit from an older release\n")

    result = install(root, "--skip-pip", "--device-id", "other")

    assert config.read_text() == edited
    assert (root / "etc/edgeagent/mqtt-password").read_text() == "s3cret\n"
    assert unit.read_text() == (REPO / "systemd/edgeagent.service").read_text()
    assert "keeping the existing config" in result.stdout
    assert "user edgeagent exists" in result.stdout
    users = [line.split(":")[0] for line in (root / "etc/passwd").read_text().splitlines()]
    assert users == ["root", "edgeagent"]
    members = account(root, "group", "video")
    assert members is not None
    assert members[3] == "edgeagent", "no duplicate group membership"


def test_uninstall_keeps_config_and_state_and_purge_removes_them(root: Path) -> None:
    install(root, "--skip-pip")
    (root / "var/lib/edgeagent/outbox.db").write_text("results in flight")

    install(root, "--uninstall")

    for gone in [
        "etc/systemd/system/edgeagent.service",
        "etc/systemd/system/edgeagent.service.d",
        "etc/udev/rules.d/99-edgeagent-coral.rules",
        "opt/edgeagent",
    ]:
        assert not (root / gone).exists(), gone
    assert account(root, "passwd", "edgeagent") is None
    assert account(root, "group", "edgeagent") is None
    assert "edgeagent" not in (root / "etc/group").read_text()
    assert (root / "etc/edgeagent/config.yaml").exists()
    assert (root / "var/lib/edgeagent/outbox.db").read_text() == "results in flight"

    install(root, "--uninstall", "--purge")

    assert not (root / "etc/edgeagent").exists()
    assert not (root / "var/lib/edgeagent").exists()


@pytest.mark.parametrize("arch", ["armv7l", "armv6l"])
def test_32_bit_arm_is_refused_with_the_reason(root: Path, arch: str) -> None:
    before = tree(root)
    result = install(root, "--skip-pip", env={"EDGEAGENT_ARCH": arch}, ok=False)

    assert result.returncode != 0
    assert "LiteRT (ai-edge-litert) has no 32-bit ARM wheels" in result.stderr
    assert "install the 64-bit Raspberry Pi OS" in result.stderr
    assert tree(root) == before, "nothing was changed"


def test_dry_run_prints_the_actions_and_changes_nothing(root: Path) -> None:
    before = tree(root)
    result = install(root, "--dry-run", "--device-id", "pi-test")

    assert tree(root) == before
    out = result.stdout
    assert "would run: useradd --root" in out
    assert "would run: install -D -m 0644" in out
    assert f"would write: {root}/etc/edgeagent/config.yaml" in out
    assert "-m venv --system-site-packages" in out
    assert "skipped (--root): systemctl enable edgeagent.service" in out


def test_installer_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt install shellcheck)")
    result = subprocess.run(
        [shellcheck, str(INSTALLER)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


def test_unknown_options_and_stray_purge_are_rejected(root: Path) -> None:
    assert "unknown option: --frobnicate" in install(root, "--frobnicate", ok=False).stderr
    assert "--purge only goes with --uninstall" in install(root, "--purge", ok=False).stderr


def test_real_venv_and_pip_install_provides_the_entry_point(root: Path) -> None:
    """The slow one: a real venv with the system's site-packages and a real pip install
    of this checkout (without its dependencies, which the suite's env already proves)."""
    install(root, "--pip-args", "--no-deps")

    venv = root / "opt/edgeagent/venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    entry = venv / "bin/edgeagent"
    assert os.access(entry, os.X_OK)
    assert entry.read_text().startswith(f"#!{venv}/bin/python")
    assert "from edgeagent.cli.main import main" in entry.read_text()
    version = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import importlib.metadata as m, edgeagent.systemd; print(m.version('edgeagent'))",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.stdout.strip() == "0.1.0"

    again = install(root, "--pip-args", "--no-deps")
    assert f"upgrading in place: {venv}" in again.stdout
