"""`edgeagent models list|activate|rollback` on a store built in tmp_path with two
versions of a bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeagent.cli.main import main
from edgeagent.delivery.store import ModelStore
from edgeagent.modelfile.catalog import bundled_dir
from tests.manifests import manifest_for

NAME = "digits-classifier"


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    """A store with digits-classifier 1.0 then 1.1 installed and activated in that order."""
    root = tmp_path / "state" / "models"
    store = ModelStore(root, quota_bytes=100_000_000)
    model = bundled_dir() / f"{NAME}.tflite"
    for version in ("1.0", "1.1"):
        store.install(model, manifest_for(model, version, NAME), move=False)
        store.activate(NAME, version)
    return root


def models(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["models", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def active_version(root: Path) -> str:
    return str(json.loads((root / "active" / f"{NAME}.json").read_text())["version"])


def test_list_shows_versions_active_previous_size_and_integrity(
    store_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = models(capsys, "list", "--store", str(store_root))
    assert code == 0
    assert f"{NAME}  (active: 1.1)" in out
    rows = {
        line.split()[1] if line.startswith("  *") else line.split()[0]: line
        for line in out.splitlines()
        if line.startswith("  ")
    }
    assert rows["1.1"].startswith("  * 1.1")
    assert rows["1.1"].split()[2] == "active"
    previous = rows["1.0"]
    assert "previous" in previous
    assert "KiB" in previous
    assert "installed 20" in previous
    assert previous.rstrip().endswith("ok")

    code, out, _ = models(capsys, "list", "--store", str(store_root), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["store"] == str(store_root)
    assert report["problems"] == []
    (entry,) = report["models"]
    assert entry["name"] == NAME
    assert entry["active"] == "1.1"
    assert entry["previous"] == ["1.0"]
    size = (bundled_dir() / f"{NAME}.tflite").stat().st_size
    assert [
        (v["version"], v["active"], v["previous"], v["size"], v["integrity"])
        for v in entry["versions"]
    ] == [("1.0", False, True, size, "ok"), ("1.1", True, False, size, "ok")]
    assert all(v["installed_at"].endswith("+00:00") for v in entry["versions"])


def test_list_reports_a_corrupt_version_and_exits_1(
    store_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = store_root / "versions" / NAME / "1.0" / "model.tflite"
    data = bytearray(model.read_bytes())
    data[64] ^= 0xFF
    model.write_bytes(bytes(data))
    code, out, _ = models(capsys, "list", "--store", str(store_root), "--json")
    assert code == 1
    versions = {v["version"]: v["integrity"] for v in json.loads(out)["models"][0]["versions"]}
    assert versions["1.1"] == "ok"
    assert "corrupt" in versions["1.0"]


def test_activate_and_rollback_through_the_cli(
    store_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = models(capsys, "rollback", NAME, "--store", str(store_root))
    assert code == 0
    assert f"{NAME}: 1.1 -> 1.0 (active)" in out
    assert "restart the service" in out
    assert "model.rollback" in out
    assert active_version(store_root) == "1.0"

    code, out, _ = models(capsys, "activate", NAME, "1.1", "--store", str(store_root))
    assert code == 0
    assert f"{NAME}: 1.0 -> 1.1 (active)" in out
    assert active_version(store_root) == "1.1"

    code, out, _ = models(capsys, "activate", NAME, "1.1", "--store", str(store_root))
    assert (code, out.splitlines()[0]) == (0, f"{NAME} 1.1 was already active")

    code, out, _ = models(capsys, "rollback", NAME, "--to", "1.0", "--store", str(store_root))
    assert code == 0
    assert active_version(store_root) == "1.0"
    # The store, opened as the agent opens it, agrees.
    active = ModelStore(store_root, quota_bytes=100_000_000).active(NAME)
    assert active is not None
    assert active.version == "1.0"


def test_errors_are_one_clear_line(store_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = models(capsys, "activate", NAME, "9.9", "--store", str(store_root))
    assert code == 1
    assert "9.9 is not installed (installed: 1.0, 1.1)" in err
    assert active_version(store_root) == "1.1"

    code, _, err = models(capsys, "rollback", "unknown-model", "--store", str(store_root))
    assert code == 1
    assert "no previous version" in err

    missing = store_root.parent / "nowhere"
    code, _, err = models(capsys, "activate", NAME, "1.0", "--store", str(missing))
    assert code == 1
    assert f"there is no model store at {missing}" in err
    code, out, _ = models(capsys, "list", "--store", str(missing))
    assert code == 0
    assert "no model store" in out


def test_the_store_is_found_through_the_config(
    store_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {store_root.parent}\n", encoding="utf-8")
    code, out, _ = models(capsys, "rollback", NAME, "--config", str(config))
    assert code == 0
    assert active_version(store_root) == "1.0"
    code, out, _ = models(capsys, "list", "--config", str(config))
    assert f"model store {store_root}" in out

    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dri: /x\n", encoding="utf-8")
    code, _, err = models(capsys, "list", "--config", str(bad))
    assert code == 2  # a configuration error, as for every command
    assert "state_dri: unknown key" in err
