"""The model store: install, activate, rollback, prune, quota, recovery, and kill -9."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.delivery.signing import DeliveryError
from edgeagent.delivery.store import ModelStore
from edgeagent.delivery.transfer import ChunkAssembler
from edgeagent.inference.engine import Engine
from tests import modelfactory
from tests.manifests import manifest_for

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "bundled"
QUOTA = 10_000_000


def tiny_model(tmp_path: Path, tag: int) -> Path:
    """A distinct, loadable model per tag (y = x @ w.T + b)."""
    w = np.full((2, 3), float(tag), np.float32)
    path = tmp_path / f"src-{tag}.tflite"
    return modelfactory.save(path, modelfactory.float_fc(w, np.zeros(2, np.float32)))


def install(store: ModelStore, tmp_path: Path, version: str, tag: int, name: str = "m") -> Path:
    model = tiny_model(tmp_path, tag)
    return store.install(model, manifest_for(model, version, name), move=False)


def code_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(DeliveryError) as caught:
        call(*args, **kwargs)
    return caught.value.code


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_install_then_activate(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", quota_bytes=QUOTA)
    assert store.active("m") is None
    path = install(store, tmp_path, "1.0", 1)
    assert path == tmp_path / "store/versions/m/1.0/model.tflite"
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "installed.json",
        "manifest.json",
        "model.tflite",
    ]
    assert store.active("m") is None  # installed is not active
    active = store.activate("m", "1.0")
    assert active.version == "1.0"
    assert sha256(active.path) == active.manifest.sha256
    pointer = json.loads((tmp_path / "store/active/m.json").read_text())
    assert pointer["version"] == "1.0"
    assert pointer["previous"] == []
    assert pointer["activated_at"].endswith("+00:00")
    store.activate("m", "1.0")
    assert store.active("m") == active
    Engine.load(active.path, accelerator="cpu").close()


def test_install_moves_a_staged_file_from_the_assembler(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ModelStore(root, quota_bytes=QUOTA)
    source = tiny_model(tmp_path, 1)
    m = manifest_for(source, "2.0")
    assembler = ChunkAssembler(store.staging_root, m)
    data = source.read_bytes()
    for i in range(m.chunks):
        assembler.add(i, data[i * m.chunk_size : (i + 1) * m.chunk_size])
    staged = assembler.assemble()
    installed = store.install(staged, m)
    assert not staged.exists()
    assert installed.read_bytes() == data
    assembler.discard()
    assert list((root / "staging").iterdir()) == []


def test_install_refuses_a_file_that_is_not_the_manifests(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", quota_bytes=QUOTA)
    a, b = tiny_model(tmp_path, 1), tiny_model(tmp_path, 2)
    assert code_of(store.install, b, manifest_for(a, "1.0"), move=False) == "sha256-mismatch"
    assert code_of(store.install, a, manifest_for(a, "1.0", size=7), move=False) in {
        "size-mismatch"
    }
    assert store.versions("m") == []
    assert list((tmp_path / "store/versions").rglob("*.tflite")) == []


def test_versions_are_immutable(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", quota_bytes=QUOTA)
    first = install(store, tmp_path, "1.0", 1)
    assert install(store, tmp_path, "1.0", 1) == first  # the same build again: a no-op
    assert code_of(install, store, tmp_path, "1.0", 2) == "version-conflict"
    assert code_of(store.activate, "m", "9.9") == "not-stored"


def test_rollback_to_the_previous_and_to_a_pinned_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", quota_bytes=QUOTA)
    assert code_of(store.rollback, "m") == "no-rollback"
    for n, version in enumerate(["1", "2", "3"]):
        install(store, tmp_path, version, n)
        store.activate("m", version)
    assert [s.version for s in store.previous("m")] == ["2", "1"]
    assert store.rollback("m").version == "2"
    active = store.active("m")
    assert active is not None
    assert active.version == "2"
    assert [s.version for s in store.previous("m")] == ["3", "1"]
    assert store.rollback("m", to_version="1").version == "1"
    assert code_of(store.rollback, "m", to_version="7") == "not-stored"


def test_rollback_skips_a_corrupt_previous_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", quota_bytes=QUOTA)
    for n, version in enumerate(["1", "2", "3"]):
        install(store, tmp_path, version, n)
        store.activate("m", version)
    flip_a_bit(tmp_path / "store/versions/m/2/model.tflite")
    assert store.rollback("m").version == "1"
    assert code_of(store.activate, "m", "2") == "corrupt-version"


def test_prune_keeps_the_newest_the_active_and_the_rollback_target(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", keep=2, quota_bytes=QUOTA)
    for n in range(1, 6):
        install(store, tmp_path, f"{n}", n)
        store.activate("m", f"{n}")
    assert store.prune("m") == ["1", "2", "3"]
    assert [s.version for s in store.versions("m")] == ["4", "5"]
    # An old version made active again survives, and so does the one it replaced.
    for n in range(6, 9):
        install(store, tmp_path, f"{n}", n)
    store.activate("m", "4")
    assert store.prune("m") == ["6"]
    assert {s.version for s in store.versions("m")} == {"4", "5", "7", "8"}
    assert store.rollback("m").version == "5"  # the rollback target survived pruning


def test_quota_is_checked_and_old_versions_are_evicted_for_room(tmp_path: Path) -> None:
    probe = ModelStore(tmp_path / "probe", quota_bytes=QUOTA)
    install(probe, tmp_path, "1", 1)
    per_version = probe.usage()  # the model plus its manifest and install marker
    size = tiny_model(tmp_path, 1).stat().st_size
    store = ModelStore(tmp_path / "store", quota_bytes=3 * per_version + 100)
    assert code_of(store.check_quota, 4 * per_version) == "quota"
    for n in range(1, 4):
        install(store, tmp_path, f"{n}", n)
    store.activate("m", "2")
    assert code_of(store.check_quota, size) == "quota"  # full, counting nothing reclaimable
    store.check_quota(size, name="m")  # fits once old versions of m are evicted
    install(store, tmp_path, "4", 4)
    assert [s.version for s in store.versions("m")] == ["2", "3", "4"]  # 1 was evicted
    assert store.usage() <= store.quota_bytes
    huge = manifest_for(tiny_model(tmp_path, 9), "5", size=3 * per_version + 101)
    assert code_of(store.check_quota, huge.size, name="m") == "quota"


# --- recovery from what a crash or a bad disk leaves -------------------------------------------


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def three_versions(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "store", quota_bytes=QUOTA)
    for n, version in enumerate(["1", "2", "3"]):
        install(store, tmp_path, version, n)
    for version in ["1", "3", "2"]:  # 2 is active, 3 was before it
        store.activate("m", version)
    return store


def test_a_corrupt_pointer_falls_back_to_the_newest_intact_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    three_versions(tmp_path)
    (tmp_path / "store/active/m.json").write_bytes(b'{"version": "2", "prev')
    with caplog.at_level(logging.WARNING, "edgeagent.delivery.store"):
        store = ModelStore(tmp_path / "store", quota_bytes=QUOTA)
    active = store.active("m")
    assert active is not None
    assert active.version == "3"
    assert "unreadable" in caplog.text
    assert json.loads((tmp_path / "store/active/m.json").read_text())["version"] == "3"


def test_a_corrupt_active_file_falls_back_to_the_previous_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    three_versions(tmp_path)
    flip_a_bit(tmp_path / "store/versions/m/2/model.tflite")
    with caplog.at_level(logging.WARNING, "edgeagent.delivery.store"):
        store = ModelStore(tmp_path / "store", quota_bytes=QUOTA)
    active = store.active("m")
    assert active is not None
    assert active.version == "3"
    assert "corrupt" in caplog.text
    assert [p for p in store.verify_integrity() if "/m/2" in p]


def test_a_pointer_to_a_missing_version_falls_back(tmp_path: Path) -> None:
    three_versions(tmp_path)
    (tmp_path / "store/versions/m/2").rename(tmp_path / "elsewhere2")
    (tmp_path / "store/versions/m/3").rename(tmp_path / "elsewhere3")
    store = ModelStore(tmp_path / "store", quota_bytes=QUOTA)
    active = store.active("m")
    assert active is not None
    assert active.version == "1"


def test_read_only_open_reports_but_does_not_rewrite(tmp_path: Path) -> None:
    three_versions(tmp_path)
    pointer = tmp_path / "store/active/m.json"
    pointer.write_bytes(b"garbage")
    store = ModelStore(tmp_path / "store", quota_bytes=QUOTA, repair=False)
    active = store.active("m")
    assert active is not None
    assert active.version == "3"
    assert pointer.read_bytes() == b"garbage"
    assert any("unreadable" in p for p in store.verify_integrity())


def test_clean_debris_removes_leftovers_and_keeps_live_transfers(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = three_versions(tmp_path)
    (root / "versions/m/.tmp-4-abcd").mkdir()
    (root / "versions/m/.trash-1-abcd").mkdir()
    half = root / "versions/m/5"
    half.mkdir()
    (half / "model.tflite").write_bytes(b"half")  # no manifest, no installed marker
    (root / "active/.tmp-m.json-1234").write_bytes(b"{")
    staging = root / "staging"
    (staging / "no-manifest").mkdir(parents=True)
    live_model = tiny_model(tmp_path, 7)
    live = ChunkAssembler(root, manifest_for(live_model, "7"))
    live.add(0, live_model.read_bytes()[:4096])
    (live.path / ".tmp-chunk-000001-x").write_bytes(b"x")
    done = ChunkAssembler(root, manifest_for(tiny_model(tmp_path, 1), "2"))  # installed
    stale = ChunkAssembler(root, manifest_for(tiny_model(tmp_path, 8), "8"))
    old = time.time() - 30 * 86400
    for f in [stale.path, *stale.path.iterdir()]:
        os.utime(f, (old, old))
    removed = {p.name for p in store.clean_debris()}
    assert removed == {
        ".tmp-4-abcd",
        ".trash-1-abcd",
        "5",
        ".tmp-m.json-1234",
        "no-manifest",
        ".tmp-chunk-000001-x",
        done.path.name,
        stale.path.name,
    }
    assert ChunkAssembler(root, live.manifest).have() == {0}
    assert store.verify_integrity() == []
    assert [s.version for s in store.versions("m")] == ["1", "2", "3"]


# --- kill -9 at random moments -------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from edgeagent.delivery.signing import DeliveryManifest
    from edgeagent.delivery.store import ModelStore

    root, mode = Path(sys.argv[1]), sys.argv[2]
    store = ModelStore(root, keep=2, quota_bytes=10**9)
    print("ready", flush=True)
    i = 0
    if mode == "activate":
        while True:
            store.activate("m", ("a", "b")[i % 2])
            i += 1
    source = Path(sys.argv[3])
    base = DeliveryManifest.model_validate_json(Path(sys.argv[4]).read_bytes())
    while True:
        version = f"v{os.getpid()}-{i}"
        store.install(source, base.model_copy(update={"version": version}), move=False)
        store.activate("m", version)
        store.prune("m")
        i += 1
    """
)


def kill_at_random(args: list[str], rng: random.Random, max_delay: float) -> None:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, max_delay))
        assert proc.poll() is None, "the worker died by itself"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def assert_sound_after_crash(root: Path) -> tuple[str, list[Path]]:
    """A fresh open has an intact, loadable active model; returns its version and the
    debris the killed worker left (proof that the kill landed mid-operation)."""
    store = ModelStore(root, keep=2, quota_bytes=10**9)
    active = store.active("m")
    assert active is not None, "a crash left no active model"
    assert sha256(active.path) == active.manifest.sha256
    Engine.load(active.path, accelerator="cpu").close()
    debris = store.clean_debris()
    assert store.verify_integrity() == []
    return active.version, debris


def test_kill_during_activation_never_leaves_a_broken_active(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ModelStore(root, keep=2, quota_bytes=10**9)
    install(store, tmp_path, "a", 1)
    install(store, tmp_path, "b", 2)
    store.activate("m", "a")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    rng = random.Random(20250301)
    seen = set()
    mid_write = 0
    for _ in range(20):
        kill_at_random([str(script), str(root), "activate"], rng, max_delay=0.08)
        version, debris = assert_sound_after_crash(root)
        seen.add(version)
        mid_write += bool(debris)
    print(f"{mid_write} of 20 kills interrupted a pointer write")
    assert seen == {"a", "b"}  # the kills landed at different points of the loop
    assert mid_write > 0


def test_kill_during_install_never_leaves_a_broken_active(tmp_path: Path) -> None:
    root = tmp_path / "store"
    source = BUNDLED / "digits-classifier.tflite"
    base = manifest_for(source, "base")
    manifest_file = tmp_path / "base.json"
    manifest_file.write_bytes(base.to_json_bytes())
    store = ModelStore(root, keep=2, quota_bytes=10**9)
    store.install(source, base, move=False)
    store.activate("m", "base")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    rng = random.Random(7)
    mid_install = 0
    for _ in range(10):
        kill_at_random(
            [str(script), str(root), "install", str(source), str(manifest_file)],
            rng,
            max_delay=0.25,
        )
        _, debris = assert_sound_after_crash(root)
        mid_install += any(p.parent.parent.name == "versions" for p in debris)
    print(f"{mid_install} of 10 kills interrupted an install")
    assert mid_install > 0
    assert len(ModelStore(root, keep=2, quota_bytes=10**9).versions("m")) >= 2
