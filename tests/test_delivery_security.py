"""What someone who can publish desired states and signed manifests cannot do to a device
(issue 8): make it go back to an older version it has moved past, or make it exhaust its
memory with a manifest's chunking. Versions are ordered as semantic versions, by one
function the device and the fleet tools share; `reported` says what really runs.

The end-to-end tests run the real daemon (`edgeagent run`), the real fleet CLI and a real
mosquitto, and read what the fleet sees, plus the daemon's peak RSS and its model store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import signal
import subprocess
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeagent.cli.main import main
from edgeagent.delivery.signing import (
    MAX_CHUNKS,
    MIN_CHUNK_SIZE,
    DeliveryError,
    DeliveryManifest,
    check_chunking,
    check_version,
    compare_versions,
    generate_keypair,
    key_id,
    sign_manifest,
    verify_manifest,
    version_key,
)
from edgeagent.delivery.store import ModelStore
from edgeagent.delivery.transfer import ChunkAssembler, ChunkBitmap
from edgeagent.fleet.rollout import Rollout, merge_desired
from tests.broker import Mosquitto, MqttReader, publish_once
from tests.delivery_e2e import (
    BUNDLED,
    DELIVERY_STEPS,
    DETECTOR,
    MODEL,
    PREFIX,
    SSD,
    TOPIC,
    command,
    deploy,
    event,
    fresh_results,
    keygen,
    publish,
    results,
    retained_report,
    steps_of,
    version_of,
    watch_until_converged,
    write_config,
)
from tests.waiting import wait_until

DIGITS = BUNDLED / "digits-classifier.tflite"
MiB = 1 << 20


# --- version ordering -----------------------------------------------------------------------

# semver.org section 11's own example, plus numeric (not lexical) comparison everywhere.
ASCENDING = [
    "0.9.9",
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1",
    "1.2.0",
    "1.10.0",
    "2.0.0-0",
    "2.0.0",
    "10.0.0",
]


def test_versions_are_ordered_by_semver_precedence() -> None:
    for i, lower in enumerate(ASCENDING):
        for higher in ASCENDING[i + 1 :]:
            assert compare_versions(lower, higher) == -1, (lower, higher)
            assert compare_versions(higher, lower) == 1, (higher, lower)
        assert compare_versions(lower, lower) == 0
    shuffled = ASCENDING[::2] + ASCENDING[1::2]
    assert sorted(shuffled, key=version_key) == ASCENDING


def test_build_metadata_is_ignored_by_the_ordering_but_cannot_be_a_delivered_version() -> None:
    assert compare_versions("1.0.0+build.1", "1.0.0+build.2") == 0
    assert compare_versions("1.0.0-rc.1+x", "1.0.0") == -1
    assert compare_versions("1.0.1+old", "1.0.0+new") == 1
    with pytest.raises(DeliveryError) as caught:
        check_version("1.0.0+build.1")  # "+" is an MQTT wildcard: not a safe identifier
    assert caught.value.code == "bad-name"


@pytest.mark.parametrize(
    "version",
    ["1", "1.2", "v1.0.0", "01.0.0", "1.00.0", "1.0.0-01", "1.0.0-", "1.0.0-a_b", "latest"],
)
def test_versions_that_are_not_semantic_are_refused(version: str) -> None:
    with pytest.raises(DeliveryError) as caught:
        check_version(version)
    assert caught.value.code == "bad-version"
    assert "semantic version" in str(caught.value)


def test_only_ascii_digits_are_numbers() -> None:
    with pytest.raises(DeliveryError) as caught:
        version_key("\u0661.0.0")  # ARABIC-INDIC DIGIT ONE: re's \d would take it
    assert caught.value.code == "bad-version"


def test_a_manifest_whose_version_is_not_semantic_is_refused_by_the_device() -> None:
    private, public = generate_keypair()
    raw = sign_manifest(manifest_for(b"\0" * 100, "1.0"), private).to_json_bytes()
    with pytest.raises(DeliveryError) as caught:
        verify_manifest(raw, {key_id(public): public}, False)
    assert caught.value.code == "bad-version"


# --- bounded chunk bookkeeping ----------------------------------------------------------------


def manifest_for(data: bytes, version: str, chunk_size: int = MIN_CHUNK_SIZE) -> DeliveryManifest:
    return DeliveryManifest(
        name=MODEL,
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        chunk_size=chunk_size,
        chunks=-(-len(data) // chunk_size),
        created_at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    )


def huge_manifest(version: str = "3.0.0") -> DeliveryManifest:
    """The manifest of issue 8: 128 MiB (the default max_model_bytes) in 1-byte chunks."""
    return DeliveryManifest(
        name=MODEL,
        version=version,
        sha256="ab" * 32,
        size=128 * MiB,
        chunk_size=1,
        chunks=128 * MiB,
        created_at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    )


def test_a_trusted_manifest_past_the_chunk_limits_is_refused_without_allocating(
    tmp_path: Path,
) -> None:
    private, public = generate_keypair()
    raw = sign_manifest(huge_manifest(), private).to_json_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(DeliveryError) as caught:
            verify_manifest(raw, {key_id(public): public}, False, max_size=128 * MiB)
        with pytest.raises(DeliveryError) as direct:
            ChunkAssembler(tmp_path, huge_manifest())  # defence in depth, before any disk use
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == direct.value.code == "chunking"
    assert f"more than the {MAX_CHUNKS}" in str(caught.value)
    assert peak < 1 * MiB
    assert not (tmp_path / "staging").exists()


def test_chunks_below_the_minimum_are_refused_unless_the_model_is_one_chunk() -> None:
    with pytest.raises(DeliveryError) as caught:
        check_chunking(3 * MIN_CHUNK_SIZE, MIN_CHUNK_SIZE - 1, 4)
    assert caught.value.code == "chunking"
    check_chunking(100, 100, 1)  # a small model in one short chunk
    check_chunking(MIN_CHUNK_SIZE + 1, MIN_CHUNK_SIZE, 2)  # a short last chunk
    check_chunking(MAX_CHUNKS * MIN_CHUNK_SIZE, MIN_CHUNK_SIZE, MAX_CHUNKS)
    with pytest.raises(DeliveryError):
        check_chunking(MAX_CHUNKS * MIN_CHUNK_SIZE + 1, MIN_CHUNK_SIZE, MAX_CHUNKS + 1)


def test_the_chunk_bitmap_counts_and_finds_what_is_missing() -> None:
    bitmap = ChunkBitmap(19)
    assert list(bitmap.absent()) == list(range(19))
    for index in [0, 1, 2, 3, 4, 5, 6, 7, 9, 18]:
        assert bitmap.add(index)
    assert not bitmap.add(9)  # a duplicate
    assert bitmap.count_have == 10
    assert list(bitmap.present()) == [0, 1, 2, 3, 4, 5, 6, 7, 9, 18]
    assert list(bitmap.absent()) == [8, 10, 11, 12, 13, 14, 15, 16, 17]
    assert 9 in bitmap
    assert 8 not in bitmap
    assert 19 not in bitmap
    assert -1 not in bitmap
    assert not bitmap.complete
    for index in list(bitmap.absent()):
        bitmap.add(index)
    assert bitmap.complete
    assert list(bitmap.absent()) == []


def test_the_assembler_of_the_most_chunks_allowed_asks_for_a_window_at_a_time(
    tmp_path: Path,
) -> None:
    m = DeliveryManifest(
        name=MODEL,
        version="2.0.0",
        sha256="cd" * 32,
        size=MAX_CHUNKS * MIN_CHUNK_SIZE - 5,
        chunk_size=MIN_CHUNK_SIZE,
        chunks=MAX_CHUNKS,
        created_at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    )
    assembler = ChunkAssembler(tmp_path, m)
    chunk = b"x" * MIN_CHUNK_SIZE
    for index in (0, 1, 3):
        assembler.add(index, chunk)
    assembler.add(MAX_CHUNKS - 1, b"y" * (MIN_CHUNK_SIZE - 5))
    assert assembler.next_missing(4) == [2, 4, 5, 6]
    assert assembler.next_missing(4, skip={2, 5}) == [4, 6, 7, 8]
    assert assembler.next_missing(0) == []
    assert not assembler.complete()
    progress = assembler.progress
    assert (progress.chunks_have, progress.chunks_total) == (4, MAX_CHUNKS)
    assert progress.bytes_have == 4 * MIN_CHUNK_SIZE - 5
    assert len(assembler.missing()) == MAX_CHUNKS - 4
    # Resuming reads the same state back from the staged files.
    resumed = ChunkAssembler(tmp_path, m)
    assert resumed.have() == {0, 1, 3, MAX_CHUNKS - 1}
    assert resumed.bytes_received == 4 * MIN_CHUNK_SIZE - 5


# --- the durable downgrade floor in the store -----------------------------------------------


def install(store: ModelStore, *versions: str) -> None:
    data = DIGITS.read_bytes()
    for version in versions:
        store.install(DIGITS, manifest_for(data, version, 8192), move=False)


def test_the_highest_activated_version_survives_rollback_pruning_and_reopening(
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path, keep=1, quota_bytes=64 * MiB)
    assert store.highest(MODEL) is None
    install(store, "2.0.0", "2.1.0", "1.5.0")
    store.activate(MODEL, "2.0.0")
    store.activate(MODEL, "2.1.0")
    assert store.highest(MODEL) == "2.1.0"
    assert store.rollback(MODEL).version == "2.0.0"
    store.activate(MODEL, "1.5.0")
    assert "2.1.0" in store.prune(MODEL)  # gone from disk and from the pointer's history
    assert "2.1.0" not in {s.version for s in store.previous(MODEL)}
    assert store.highest(MODEL) == "2.1.0"
    reopened = ModelStore(tmp_path, keep=1, quota_bytes=64 * MiB)
    assert reopened.highest(MODEL) == "2.1.0"
    assert reopened.verify_integrity() == []


def test_without_a_record_the_pointer_still_sets_the_floor(tmp_path: Path) -> None:
    """A store written by an older agent, or whose record was lost, refuses going below
    what its pointer names; versions that are not semantic do not count."""
    store = ModelStore(tmp_path, keep=3, quota_bytes=64 * MiB)
    install(store, "1.0.0", "1.2.0", "7")
    store.activate(MODEL, "1.2.0")
    store.activate(MODEL, "1.0.0")
    store.activate(MODEL, "7")
    assert store.highest(MODEL) == "1.2.0"
    (tmp_path / "highest" / f"{MODEL}.json").write_text("{not json")
    assert store.highest(MODEL) == "1.2.0"
    assert any("highest-version record" in p for p in store.verify_integrity())


# --- the fleet side: deploy --allow-downgrade and how a rollout judges a refusal -------------


def test_deploy_allow_downgrade_is_written_only_when_asked(
    capsys: pytest.CaptureFixture[str], mosquitto: Mosquitto, mqtt_reader: Callable[..., MqttReader]
) -> None:
    topic = "edgeagent/pi-9/desired"
    args = ["fleet", "deploy", "--device", "pi-9", "--pipeline", "cam", "--model", "m"]
    broker = ["--host", mosquitto.host, "--port", str(mosquitto.port), "--read-timeout", "0.2"]
    assert main([*args, "--version", "1.0.0", "--allow-downgrade", *broker]) == 0
    assert "(downgrade allowed)" in capsys.readouterr().out
    reader = mqtt_reader(mosquitto, topic)
    state = json.loads(reader.wait_for(lambda m: m.retain).payload)
    assert state["pipelines"]["cam"] == {"model": "m", "version": "1.0.0", "allow_downgrade": True}
    assert main([*args, "--version", "1.1.0", *broker]) == 0
    state = json.loads(reader.wait_for(lambda m: b"1.1.0" in m.payload).payload)
    assert state["pipelines"]["cam"] == {"model": "m", "version": "1.1.0"}
    merged = merge_desired(None, "cam", ("m", "2.0.0"), by="a@b", ts=1.0, allow_downgrade=True)
    assert merged["pipelines"] == {
        "cam": {"model": "m", "version": "2.0.0", "allow_downgrade": True}
    }


def test_a_refused_downgrade_fails_the_rollout_while_the_old_version_runs() -> None:
    rollout = Rollout("edgeagent", ["pi-1"])
    desired = {"pipelines": {"cam": {"model": "m", "version": "1.5.0"}}, "ts": 100.0}
    rollout.feed("edgeagent/pi-1/desired", json.dumps(desired).encode())
    failure = {"version": "1.5.0", "code": "downgrade", "reason": "older", "ts": 101.0}
    entry = {
        "model": "m",
        "version": "2.1.0",
        "state": "running",
        "staged": None,
        "last_failure": failure,
    }
    report = {"ts": 101.0, "pipelines": {"cam": entry}}
    rollout.feed("edgeagent/pi-1/reported", json.dumps(report).encode())
    verdict = rollout.verdict()
    assert not verdict.converged
    assert verdict.failures == ("pi-1 cam: m 1.5.0 failed: downgrade: older",)


# --- the real daemon ----------------------------------------------------------------------


@pytest.fixture
def signing_keys(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh (private, public) signing key pair; `start_device` trusts the public one."""
    return keygen(tmp_path / "keys")


DeviceStarter = Callable[..., tuple[MqttReader, subprocess.Popen[str], Path]]


@pytest.fixture
def start_device(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[..., subprocess.Popen[str]],
    signing_keys: tuple[Path, Path],
) -> DeviceStarter:
    """`start(**models)`: writes the delivery e2e config with `models` settings, logging
    warnings only (the fixture pipes stderr), subscribes to everything the device publishes
    and starts the daemon; returns (reader, daemon, config)."""

    def start(**models: Any) -> tuple[MqttReader, subprocess.Popen[str], Path]:
        _key, public = signing_keys
        config = write_config(tmp_path, mosquitto, public, log_level="warning", **models)
        reader = mqtt_reader(mosquitto, f"{TOPIC}/#")
        return reader, agent_process(config), config

    return start


def stop(agent: subprocess.Popen[str]) -> None:
    agent.send_signal(signal.SIGTERM)
    _, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    assert "Traceback" not in err


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def runs_only(reader: MqttReader, version: str) -> None:
    """`version` gave a result, and then the next 10 results (those in flight at a swap are
    done)."""
    since = len(reader.messages)
    wait_until(
        lambda: any(version_of(r) == version for r in results(reader, since)), 30, f"{version} runs"
    )
    assert {version_of(r) for r in fresh_results(reader, 10)} == {version}


def test_downgrades_are_refused_unless_allowed_and_the_floor_survives_restarts_and_pruning(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[..., subprocess.Popen[str]],
    signing_keys: tuple[Path, Path],
    start_device: DeviceStarter,
) -> None:
    key, _public = signing_keys
    detector = BUNDLED / "shapes-detector.yaml"
    publish(mosquitto, key, SSD, "2.0.0", BUNDLED / "shapes-detector-ssd.yaml", 16384)
    publish(mosquitto, key, DETECTOR, "2.1.0", detector, 16384)
    publish(mosquitto, key, DETECTOR, "1.5.0", detector, 16384)
    reader, agent, config = start_device(
        keep=1,  # 2.1.0 is pruned once 1.5.0 is activated: only the record remembers it
        probation_s=1,
        probation_min_results=5,
        chunk_timeout_s=10,
        latency_factor=50,  # ~0.15 ms models: keep scheduler noise out of probation
    )
    store = tmp_path / "state" / "models"
    reader.wait_for(lambda m: m.topic.endswith("/results/shapes"), timeout=30)
    for version in ("2.0.0", "2.1.0"):
        deploy(mosquitto, version)
        watched = watch_until_converged(mosquitto, 90)
        assert watched.returncode == 0, watched.stdout + watched.stderr

    # 1.5.0 is below 2.1.0: refused before anything is fetched; 2.1.0 runs on.
    since = len(reader.messages)
    deploy(mosquitto, "1.5.0")
    refused = event(reader, "rejected", "1.5.0", since)
    assert refused["code"] == "downgrade"
    assert "2.1.0" in refused["reason"]
    assert steps_of(reader, "1.5.0", since) == ["rejected"]
    watched = watch_until_converged(mosquitto, 60)
    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert "downgrade" in watched.stdout
    report = retained_report(mosquitto, mqtt_reader)
    assert (report["version"], report["state"]) == ("2.1.0", "running")
    assert (report["last_failure"]["version"], report["last_failure"]["code"]) == (
        "1.5.0",
        "downgrade",
    )
    runs_only(reader, "2.1.0")

    # model.rollback is not a delivery: it goes back below the floor.
    done = command(mosquitto, reader, "model.rollback", {"pipeline": "shapes"})
    assert done["stage"] == "succeeded", done
    assert done["result"] == {"pipeline": "shapes", "version": "2.0.0"}
    runs_only(reader, "2.0.0")

    # Said explicitly, the downgrade is delivered like any version.
    since = len(reader.messages)
    deploy(mosquitto, "1.5.0", allow_downgrade=True)
    watched = watch_until_converged(mosquitto, 90)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert steps_of(reader, "1.5.0", since) == list(DELIVERY_STEPS)
    runs_only(reader, "1.5.0")
    assert not (store / "versions" / MODEL / "2.1.0").exists(), "2.1.0 was pruned"

    # After a restart, 2.0.5 is still below the floor although every version the store
    # still holds or names (1.5.0, 2.0.0) is lower: the durable record remembers 2.1.0.
    stop(agent)
    agent = agent_process(config)
    since = len(reader.messages)
    runs_only(reader, "1.5.0")
    deploy(mosquitto, "2.0.5")
    refused = event(reader, "rejected", "2.0.5", since)
    assert refused["code"] == "downgrade"
    assert "2.1.0" in refused["reason"]
    # The highest version itself is no downgrade (it is fetched again: it was pruned).
    since = len(reader.messages)
    deploy(mosquitto, "2.1.0")
    watched = watch_until_converged(mosquitto, 90)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert steps_of(reader, "2.1.0", since) == list(DELIVERY_STEPS)
    stop(agent)


def test_a_trusted_manifest_of_134_million_chunks_is_refused_and_costs_no_memory(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    signing_keys: tuple[Path, Path],
    start_device: DeviceStarter,
) -> None:
    key, _public = signing_keys
    reader, agent, _config = start_device()  # max_model_bytes: 128 MiB (default)
    wait_until(lambda: len(results(reader)) >= 40, 30, "the agent settles into producing results")
    before = peak_rss_kib(agent.pid)

    signed = sign_manifest(huge_manifest("3.0.0"), key.read_bytes())
    topic = f"{PREFIX}/models/{MODEL}/3.0.0/manifest"
    publish_once(mosquitto, topic, signed.to_json_bytes(), retain=True)
    since = len(reader.messages)
    deploy(mosquitto, "3.0.0")
    refused = event(reader, "rejected", "3.0.0", since, timeout=30)
    assert refused["code"] == "chunking"
    assert "chunks" in refused["reason"]
    after = fresh_results(reader, 20)  # results keep flowing, from the old model
    assert {version_of(r) for r in after} == {"1.0.0"}
    grown_kib = peak_rss_kib(agent.pid) - before
    assert grown_kib < 20 * 1024, f"peak RSS grew by {grown_kib} KiB"
    report = retained_report(mosquitto, mqtt_reader)
    assert (report["version"], report["state"]) == ("1.0.0", "running")
    assert report["last_failure"]["code"] == "chunking"
    assert agent.poll() is None
    assert not list((tmp_path / "state" / "models" / "staging").iterdir())
    stop(agent)
