"""Model delivery end to end: a real mosquitto, a real MqttLink, a real Pipeline running a
bundled model, a real ModelStore, signed manifests and retained chunks published as the
fleet would. Every bad input must be refused with its reason while the old model runs on.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from edgeagent.config import ClassificationTask, ImagePreprocess, ImagesCamera, PipelineConfig
from edgeagent.delivery import gate, transfer
from edgeagent.delivery.signing import (
    DeliveryManifest,
    canonical_bytes,
    generate_keypair,
    key_id,
    sign_manifest,
)
from edgeagent.delivery.store import ModelStore, StoredModel
from edgeagent.delivery.worker import (
    DeliveryConfig,
    LockedPipelines,
    ModelDelivery,
    describe_stored,
)
from edgeagent.inference import Engine, make_decoder, make_preprocessor
from edgeagent.modelfile.catalog import samples_dir
from edgeagent.modelfile.metadata import TENSOR_AXIS_LABELS
from edgeagent.mqtt import MqttLink, Topics
from edgeagent.pipeline import Pipeline
from tests import modelfactory
from tests.broker import Mosquitto, MqttReader, Publisher
from tests.waiting import wait_until

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "bundled"
DIGITS = BUNDLED / "digits-classifier.tflite"
PREFIX = "fleet"
DEVICE = "pi-1"
CHUNK = 8192
MODEL = "digits-classifier"
FAST = {"probation_s": 0.5, "probation_min_results": 5}

# --- publishing as the fleet does --------------------------------------------------------


def make_manifest(
    data: bytes, name: str, version: str, chunk_size: int = CHUNK, **changes: Any
) -> DeliveryManifest:
    """A manifest for `data`, with the task, labels and preprocess of the bundled digits
    classifier unless `changes` says otherwise."""
    spec = yaml.safe_load((BUNDLED / "digits-classifier.yaml").read_text())
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "chunk_size": chunk_size,
        "chunks": -(-len(data) // chunk_size),
        "task": spec["task"],
        "labels": spec["labels"],
        "preprocess": spec["preprocess"],
        "created_at": datetime(2025, 6, 1, tzinfo=UTC),
    }
    fields.update(changes)
    return DeliveryManifest.model_validate(fields)


def chunks_of(data: bytes, chunk_size: int) -> list[bytes]:
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


def publish_model(
    broker: Mosquitto,
    prefix: str,
    name: str,
    version: str,
    file: Path | bytes,
    key: bytes | None,
    chunk_size: int = CHUNK,
    *,
    manifest: bytes | None = None,
    chunks: list[tuple[int, bytes]] | None = None,
    **changes: Any,
) -> bytes:
    """Publishes a model retained as the fleet does: the manifest (signed with `key`, or
    unsigned when None; `manifest` replaces it outright), then every chunk (or `chunks`:
    (index, payload) pairs in the order given). Returns the model's bytes."""
    data = file.read_bytes() if isinstance(file, Path) else file
    topics = Topics(prefix, DEVICE)
    if manifest is None:
        m = make_manifest(data, name, version, chunk_size, **changes)
        manifest = (sign_manifest(m, key) if key is not None else m).to_json_bytes()
    if chunks is None:
        chunks = list(enumerate(chunks_of(data, chunk_size)))
    fleet = Publisher(broker)
    try:
        fleet.publish(topics.model_manifest(name, version), manifest)
        for index, payload in chunks:
            fleet.publish(topics.model_chunk(name, version, index), payload)
    finally:
        fleet.close()
    return data


def set_desired(broker: Mosquitto, topic: str, pipelines: dict[str, dict[str, Any]] | None) -> None:
    payload = b"" if pipelines is None else json.dumps({"pipelines": pipelines, "ts": 1}).encode()
    fleet = Publisher(broker)
    try:
        fleet.publish(topic, payload)
    finally:
        fleet.close()


# --- the device under test ---------------------------------------------------------------


@dataclass
class Device:
    broker: Mosquitto
    tmp_path: Path
    config: DeliveryConfig
    pipeline_config: PipelineConfig
    public_pem: bytes
    private_pem: bytes
    results: list[dict[str, Any]] = field(default_factory=list)
    topics: Topics = field(default_factory=lambda: Topics(PREFIX, DEVICE))
    pipeline: Pipeline | None = None
    link: MqttLink | None = None
    delivery: ModelDelivery | None = None
    store: ModelStore | None = None

    def start(self) -> None:
        """Opens the store and the link, starts the pipeline on what the store says is
        active (as the agent will), then starts delivery."""
        self.store = ModelStore(
            self.config.store, keep=self.config.keep, quota_bytes=self.config.quota_bytes
        )
        holder: list[ModelDelivery] = []

        def route(topic: str, payload: bytes, props: dict[str, Any]) -> None:
            if holder and holder[0].wants(topic):
                holder[0].handle_message(topic, payload, props)

        self.link = MqttLink(
            self.broker.mqtt_config(prefix=PREFIX),
            DEVICE,
            will_payload=b'{"state":"offline"}',
            on_message=route,
        )
        if self.pipeline is None:
            self.pipeline = Pipeline(self.pipeline_config, self._record)
        self.delivery = ModelDelivery(
            self.config,
            self.link,
            self.topics,
            self.store,
            LockedPipelines({"digits": self.pipeline}, threading.Lock()),
        )
        holder.append(self.delivery)
        if self.pipeline.model is None:
            self.pipeline.start(self.delivery.startup_model(self.pipeline_config))
        self.link.start()
        self.delivery.start()
        wait_until(
            lambda: self.link is not None and self.link.connected, message="the link connects"
        )

    def stop_delivery(self) -> None:
        """Stops delivery and the link (the pipeline runs on), as a restart would begin."""
        if self.delivery is not None:
            self.delivery.stop()
        if self.link is not None:
            self.link.stop()

    def stop(self) -> None:
        self.stop_delivery()
        if self.pipeline is not None:
            self.pipeline.stop()

    def _record(self, _pipeline: str, result: dict[str, Any]) -> None:
        self.results.append(result)

    def results_after(self, count: int, since: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.results) >= since + count, timeout, f"{count} more results")
        return self.results[since:]

    def desired(self, pipelines: dict[str, dict[str, Any]] | None) -> None:
        set_desired(self.broker, self.topics.desired, pipelines)


def doc(message: Any) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(message.payload)
    return parsed


def reported_where(
    reader: MqttReader,
    check: Callable[[dict[str, Any]], bool],
    since: int = 0,
    timeout: float = 20.0,
) -> dict[str, Any]:
    """The `digits` entry of the first reported message from the `since`-th on that
    passes `check`."""
    found: list[dict[str, Any]] = []

    def arrived() -> bool:
        for message in reader.messages[since:]:
            entry = doc(message)["pipelines"]["digits"]
            if check(entry):
                found.append(entry)
                return True
        return False

    wait_until(arrived, timeout, "a matching reported state")
    return found[0]


def event_types(reader: MqttReader) -> list[str]:
    return [doc(m)["type"] for m in reader.messages]


@pytest.fixture
def keys() -> tuple[bytes, bytes]:
    return generate_keypair()


@pytest.fixture
def device_factory(
    tmp_path: Path, mosquitto: Mosquitto, keys: tuple[bytes, bytes]
) -> Iterator[Callable[..., Device]]:
    devices: list[Device] = []
    private_pem, public_pem = keys
    key_file = tmp_path / "fleet.pub.pem"
    key_file.write_bytes(public_pem)

    def make(*, source_path: str | None = None, start: bool = True, **options: Any) -> Device:
        values: dict[str, Any] = {
            "store": tmp_path / "store",
            "trusted_keys": (key_file,),
            "chunk_timeout_s": 10.0,
            "gate_timeout_s": 30.0,
            **FAST,
        }
        values.update(options)
        pipeline_config = PipelineConfig(
            name="digits",
            source=ImagesCamera(
                type="images", path=source_path or f"{samples_dir()}/digit-*.png", fps=40
            ),
            model=MODEL,
            threads=1,
        )
        device = Device(
            mosquitto,
            tmp_path,
            DeliveryConfig(**values),
            pipeline_config,
            public_pem,
            private_pem,
        )
        devices.append(device)
        if start:
            device.start()
        return device

    yield make
    for device in devices:
        device.stop()


@pytest.fixture
def readers(
    mosquitto: Mosquitto, mqtt_reader: Callable[..., MqttReader]
) -> tuple[MqttReader, MqttReader]:
    topics = Topics(PREFIX, DEVICE)
    return mqtt_reader(mosquitto, topics.reported), mqtt_reader(mosquitto, topics.events)


def versions_of(results: list[dict[str, Any]]) -> list[str]:
    return [r["model"]["version"] for r in results]


# --- the happy path ------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["in-order", "shuffled-with-duplicates"])
def test_a_new_version_is_pulled_validated_swapped_in_and_activated(
    device_factory: Callable[..., Device],
    readers: tuple[MqttReader, MqttReader],
    keys: tuple[bytes, bytes],
    order: str,
) -> None:
    reported, events = readers
    dev = device_factory()
    assert dev.delivery is not None
    assert dev.store is not None
    dev.results_after(5, 0)
    data = DIGITS.read_bytes()
    if order == "in-order":
        # Published before the desired state: the device catches up on retained messages.
        publish_model(dev.broker, PREFIX, MODEL, "2.0.0", DIGITS, keys[0])
        dev.desired({"digits": {"model": MODEL, "version": "2.0.0"}})
    else:
        # Desired first: the device waits for the manifest, the chunks come live, reversed,
        # with duplicates.
        dev.desired({"digits": {"model": MODEL, "version": "2.0.0"}})
        reported_where(reported, lambda e: e["staged"] is not None)
        pieces = list(enumerate(chunks_of(data, CHUNK)))
        pieces = pieces[::-1] + pieces[2:5] + pieces[2:5]
        publish_model(dev.broker, PREFIX, MODEL, "2.0.0", DIGITS, keys[0], chunks=pieces)

    entry = reported_where(reported, lambda e: e["version"] == "2.0.0" and e["state"] == "running")
    assert entry == {
        "model": MODEL,
        "version": "2.0.0",
        "state": "running",
        "staged": None,
        "last_failure": None,
    }
    reported_where(reported, lambda e: e["state"] == "probation" and e["version"] == "2.0.0")
    events.wait_for(lambda m: doc(m)["type"] == "probation-passed")
    kinds = event_types(events)
    main = [k for k in kinds if k != "download-progress"]
    assert main == ["downloaded", "validated", "activated", "probation-passed"]
    progress = [doc(m) for m in events.messages if doc(m)["type"] == "download-progress"]
    assert 1 <= len(progress) <= 10
    assert all(0 < p["progress"] < 1 for p in progress)
    assert all(p["pipeline"] == "digits" and p["version"] == "2.0.0" for p in progress)

    # Results switched version with no gap in the sequence.
    seen = len(dev.results)
    results = dev.results_after(5, seen)
    assert set(versions_of(results[-5:])) == {"2.0.0"}
    seqs = [r["seq"] for r in dev.results]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    versions = versions_of(dev.results)
    assert versions[0] == "1.0.0"
    switch = versions.index("2.0.0")
    assert set(versions[:switch]) == {"1.0.0"}
    assert set(versions[switch:]) == {"2.0.0"}

    # Activated durably: a restart starts on it, and the transfer fetched each byte once.
    stored = dev.store.active(MODEL)
    assert stored is not None
    assert stored.version == "2.0.0"
    started = dev.delivery.startup_model(dev.pipeline_config)
    assert started is not None
    assert (started.version, started.path) == ("2.0.0", stored.path)
    transfer_stats = dev.delivery.last_transfer
    assert transfer_stats is not None
    assert transfer_stats.fetched_bytes == len(data)
    assert not list((dev.config.store / "staging").iterdir())


# --- every bad input is refused, the old model keeps running -----------------------------


@dataclass(frozen=True)
class BadCase:
    codes: frozenset[str]
    publish: Callable[[Device, str], None]
    options: dict[str, Any] = field(default_factory=dict)
    version: str = "6.6.6"


def _publish(dev: Device, version: str, file: Path | bytes, **kwargs: Any) -> None:
    publish_model(dev.broker, PREFIX, MODEL, version, file, dev.private_pem, **kwargs)


def _signed_then(dev: Device, version: str, change: Callable[[dict[str, Any]], None]) -> bytes:
    m = sign_manifest(make_manifest(DIGITS.read_bytes(), MODEL, version), dev.private_pem)
    obj = json.loads(m.to_json_bytes())
    change(obj)
    return json.dumps(obj).encode()


def _flipped(dev: Device, version: str) -> None:
    pieces = list(enumerate(chunks_of(DIGITS.read_bytes(), CHUNK)))
    bad = bytearray(pieces[3][1])
    bad[100] ^= 0x10
    pieces[3] = (3, bytes(bad))
    _publish(dev, version, DIGITS, chunks=pieces)


def _missing_chunk(dev: Device, version: str) -> None:
    pieces = list(enumerate(chunks_of(DIGITS.read_bytes(), CHUNK)))
    _publish(dev, version, DIGITS, chunks=[p for p in pieces if p[0] != 2])


def _untrusted(dev: Device, version: str) -> None:
    other_private, _ = generate_keypair()
    publish_model(dev.broker, PREFIX, MODEL, version, DIGITS, other_private)


def _tampered(dev: Device, version: str) -> None:
    manifest = _signed_then(dev, version, lambda o: o.update(labels=["cat"] * 10))
    _publish(dev, version, DIGITS, manifest=manifest)


def _unsigned(dev: Device, version: str) -> None:
    publish_model(dev.broker, PREFIX, MODEL, version, DIGITS, None)


def _bad_manifest_name(dev: Device, version: str) -> None:
    obj = make_manifest(DIGITS.read_bytes(), MODEL, version).payload()
    obj["name"] = "../../etc"  # validly signed: the name itself is what is wrong
    _publish(dev, version, DIGITS, manifest=_resign(obj, dev.private_pem))


def _resign(obj: dict[str, Any], private_pem: bytes) -> bytes:
    private = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(private, Ed25519PrivateKey)
    obj["signature"] = {
        "key_id": key_id(private.public_key()),
        "algorithm": "ed25519",
        "value": base64.b64encode(private.sign(canonical_bytes(obj))).decode(),
    }
    return json.dumps(obj).encode()


def _custom_op(dev: Device, version: str) -> None:
    _publish(dev, version, modelfactory.custom_op("FancyOp"))


def _window_model(dev: Device, version: str) -> None:
    spec = yaml.safe_load((BUNDLED / "vibration-anomaly.yaml").read_text())
    _publish(
        dev,
        version,
        BUNDLED / "vibration-anomaly.tflite",
        task=spec["task"],
        labels=(),
        preprocess=spec["preprocess"],
    )


BAD_CASES: dict[str, BadCase] = {
    "truncated-model": BadCase(
        frozenset({"not-tflite", "load-failed"}),
        lambda d, v: _publish(d, v, DIGITS.read_bytes()[: 100344 // 3]),
    ),
    "flipped-bit": BadCase(frozenset({"sha256-mismatch"}), _flipped),
    "wrong-sha256": BadCase(
        frozenset({"sha256-mismatch"}),
        lambda d, v: _publish(d, v, DIGITS, sha256=hashlib.sha256(b"other").hexdigest()),
    ),
    "wrong-size": BadCase(
        frozenset({"size-mismatch"}),
        lambda d, v: _publish(d, v, DIGITS, size=100344 - 1),
    ),
    "missing-chunk-times-out": BadCase(
        frozenset({"timeout"}), _missing_chunk, {"chunk_timeout_s": 1.0}
    ),
    "untrusted-key": BadCase(frozenset({"untrusted-key"}), _untrusted),
    "tampered-manifest": BadCase(frozenset({"bad-signature"}), _tampered),
    "unsigned-when-required": BadCase(frozenset({"unsigned"}), _unsigned),
    "path-characters-in-version": BadCase(
        frozenset({"bad-name"}), lambda d, v: None, version="../../etc"
    ),
    "path-characters-in-manifest-name": BadCase(frozenset({"bad-name"}), _bad_manifest_name),
    "over-the-quota": BadCase(
        frozenset({"quota"}), lambda d, v: _publish(d, v, DIGITS), {"quota_bytes": 100_000}
    ),
    "over-the-model-size-limit": BadCase(
        frozenset({"too-large"}),
        lambda d, v: _publish(d, v, DIGITS),
        {"max_model_bytes": 65_536},
    ),
    "not-a-flatbuffer": BadCase(
        frozenset({"not-tflite"}), lambda d, v: _publish(d, v, b"just some text\n" * 500)
    ),
    "unsupported-operator": BadCase(frozenset({"unsupported-op"}), _custom_op),
    "input-does-not-fit-the-source": BadCase(frozenset({"input-mismatch"}), _window_model),
    "disk-full-during-download": BadCase(
        frozenset({"disk-full"}), lambda d, v: _publish(d, v, DIGITS)
    ),
    "smoke-test-crashes": BadCase(frozenset({"smoke-crash"}), lambda d, v: _publish(d, v, DIGITS)),
    "smoke-test-hangs": BadCase(
        frozenset({"smoke-hang"}), lambda d, v: _publish(d, v, DIGITS), {"gate_timeout_s": 1.5}
    ),
}


def _fill_disk_after_two_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    real = transfer.write_file_durably
    written: list[Path] = []

    def write(path: Path, data: bytes) -> None:
        if path.name.startswith("chunk-"):
            if len(written) >= 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            written.append(path)
        real(path, data)

    monkeypatch.setattr(transfer, "write_file_durably", write)


def _gate_entry(tmp_path: Path, body: str) -> tuple[str, ...]:
    script = tmp_path / "gate_entry.py"
    script.write_text(textwrap.dedent(body))
    return (gate._GATE_ENTRY[0], str(script))


@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_a_bad_delivery_is_refused_and_the_old_model_keeps_running(
    device_factory: Callable[..., Device],
    readers: tuple[MqttReader, MqttReader],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    case: str,
) -> None:
    bad = BAD_CASES[case]
    if case == "disk-full-during-download":
        _fill_disk_after_two_chunks(monkeypatch)
    elif case == "smoke-test-crashes":
        crash = "import os, signal, sys\nsys.stdin.read()\nos.kill(os.getpid(), signal.SIGSEGV)\n"
        monkeypatch.setattr(gate, "_GATE_ENTRY", _gate_entry(tmp_path, crash))
    elif case == "smoke-test-hangs":
        hang = "import sys, time\nsys.stdin.read()\ntime.sleep(1e9)\n"
        monkeypatch.setattr(gate, "_GATE_ENTRY", _gate_entry(tmp_path, hang))
    reported, events = readers
    dev = device_factory(**bad.options)
    assert dev.store is not None
    dev.results_after(3, 0)
    bad.publish(dev, bad.version)
    dev.desired({"digits": {"model": MODEL, "version": bad.version}})

    entry = reported_where(reported, lambda e: e["last_failure"] is not None)
    failure = entry["last_failure"]
    assert failure["code"] in bad.codes, failure
    assert failure["version"] == bad.version
    assert failure["reason"]
    # `state` says what runs (the old model, fine); the refusal is in last_failure only.
    assert (entry["version"], entry["state"], entry["staged"]) == ("1.0.0", "running", None)
    rejected = events.wait_for(lambda m: doc(m)["type"] == "rejected")
    assert doc(rejected)["code"] == failure["code"]
    assert doc(rejected)["pipeline"] == "digits"
    assert "activated" not in event_types(events)

    # The old model never stopped, and nothing was installed or activated.
    results = dev.results_after(5, len(dev.results))
    assert set(versions_of(results)) == {"1.0.0"}
    assert dev.store.active(MODEL) is None
    assert [v.version for v in dev.store.versions(MODEL)] == []
    # Not retried in a loop: the same desired state arriving again changes nothing.
    dev.desired({"digits": {"model": MODEL, "version": bad.version}})
    time.sleep(0.5)  # lets time pass to show that no second attempt (and rejection) follows
    assert sum(1 for k in event_types(events) if k == "rejected") == 1


# --- resuming ------------------------------------------------------------------------------


@pytest.mark.parametrize("restart_agent", [False, True], ids=["same-agent", "agent-restarted"])
def test_a_transfer_resumes_after_the_broker_goes_away(
    device_factory: Callable[..., Device],
    mosquitto: Mosquitto,
    keys: tuple[bytes, bytes],
    restart_agent: bool,
) -> None:
    dev = device_factory(chunk_timeout_s=2.0)
    assert dev.delivery is not None
    data = DIGITS.read_bytes()
    pieces = list(enumerate(chunks_of(data, CHUNK)))
    half = len(pieces) // 2
    publish_model(mosquitto, PREFIX, MODEL, "2.0.0", DIGITS, keys[0], chunks=pieces[:half])
    dev.desired({"digits": {"model": MODEL, "version": "2.0.0"}})
    staging = dev.config.store / "staging"
    wait_until(
        lambda: len(list(staging.glob("*/chunk-*"))) == half, message="half the chunks are staged"
    )

    mosquitto.stop()  # without persistence: every retained message is gone with it
    link = dev.link
    assert link is not None
    wait_until(lambda: not link.connected, message="the device to notice the broker is gone")
    if restart_agent:
        dev.stop_delivery()
    staged_bytes = sum(p.stat().st_size for p in staging.glob("*/chunk-*"))
    assert staged_bytes == half * CHUNK
    time.sleep(2.5)  # longer than the chunk time-out: it does not run while disconnected
    mosquitto.start()
    if restart_agent:
        dev.start()
    assert dev.delivery is not None
    # The fleet publishes again (the broker forgot it all), everything, desired last.
    publish_model(mosquitto, PREFIX, MODEL, "2.0.0", DIGITS, keys[0])
    dev.desired({"digits": {"model": MODEL, "version": "2.0.0"}})

    wait_until(
        lambda: bool(dev.results) and dev.results[-1]["model"]["version"] == "2.0.0",
        20.0,
        "the pipeline runs 2.0.0",
    )
    stats = dev.delivery.last_transfer
    assert stats is not None
    if restart_agent:
        assert stats.resumed_bytes == staged_bytes
        assert stats.fetched_bytes <= len(data) - staged_bytes + CHUNK
    else:
        assert stats.fetched_bytes <= len(data) + CHUNK  # nothing fetched twice, at most one
    assert (
        hashlib.sha256(
            (dev.config.store / "versions" / MODEL / "2.0.0" / "model.tflite").read_bytes()
        ).hexdigest()
        == hashlib.sha256(data).hexdigest()
    )


# --- probation -----------------------------------------------------------------------------


BENCH_MODEL = Path(__file__).resolve().parents[1] / "models" / "bench" / "mobilenet-224-int8.tflite"


def nan_on_bright_frames() -> bytes:
    """y = sqrt(0.75 - mean(x)) on a float [1, 8, 8, 3] input in [0, 1]: finite on the
    gate's zeros and its random sample (mean ~0.5), NaN on a white frame (mean 1)."""
    g = modelfactory.Graph()
    n = 8 * 8 * 3
    x = g.tensor("image", [1, 8, 8, 3])
    y = modelfactory.sqrt_of_fc(g, x, np.full((1, n), -1.0 / n, np.float32), 0.75)
    return g.build([x], [y])


def test_a_model_that_gives_nan_in_service_is_rolled_back_by_itself(
    device_factory: Callable[..., Device],
    readers: tuple[MqttReader, MqttReader],
    keys: tuple[bytes, bytes],
    tmp_path: Path,
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.new("RGB", (16, 16), (255, 255, 255)).save(frames / "white.png")
    reported, events = readers
    dev = device_factory(source_path=str(frames / "*.png"), probation_s=2.0)
    assert dev.store is not None
    dev.results_after(3, 0)
    publish_model(
        dev.broker,
        PREFIX,
        MODEL,
        "9.0.0",
        nan_on_bright_frames(),
        keys[0],
        task={"type": "raw"},
        labels=(),
        preprocess={"type": "image", "resize": "stretch", "color": "rgb", "std": [255.0]},
    )
    dev.desired({"digits": {"model": MODEL, "version": "9.0.0"}})

    rolled = events.wait_for(lambda m: doc(m)["type"] == "rolled-back", timeout=30)
    assert doc(rolled)["code"] == "probation-failed"
    assert "non-finite" in doc(rolled)["reason"]
    assert doc(rolled)["version"] == "9.0.0"
    main = [k for k in event_types(events) if k != "download-progress"]
    assert main == ["downloaded", "validated", "activated", "rolled-back"]
    entry = reported_where(reported, lambda e: e["last_failure"] is not None)
    assert entry["version"] == "1.0.0"
    assert entry["state"] == "running"  # 1.0.0 runs again
    assert entry["last_failure"]["code"] == "probation-failed"
    # The new model did run (and gave NaN), then the old one came back and stays.
    assert "9.0.0" in versions_of(dev.results)
    results = dev.results_after(5, len(dev.results))
    assert set(versions_of(results)) == {"1.0.0"}
    assert dev.store.active(MODEL) is None  # the pointer never named 9.0.0
    assert not list((dev.config.store / "delivery").glob("*.json"))


def test_a_model_whose_latency_regresses_is_rolled_back_by_itself(
    device_factory: Callable[..., Device],
    readers: tuple[MqttReader, MqttReader],
    keys: tuple[bytes, bytes],
) -> None:
    """The bench MobileNet (224x224, ~100x the digits model's work) delivered as a new
    version of the digits model: probation sees its p95 invoke far past the factor."""
    reported, events = readers
    dev = device_factory(probation_s=2.0, latency_factor=3.0, latency_floor_ms=0.2)
    dev.results_after(20, 0)  # a baseline for the old model's p95
    publish_model(
        dev.broker,
        PREFIX,
        MODEL,
        "8.0.0",
        BENCH_MODEL.read_bytes(),
        keys[0],
        task={"type": "classification", "top_k": 1},
        labels=(),
        preprocess={"type": "image", "resize": "stretch", "mean": [127.5], "std": [127.5]},
    )
    dev.desired({"digits": {"model": MODEL, "version": "8.0.0"}})

    rolled = events.wait_for(lambda m: doc(m)["type"] == "rolled-back", timeout=60)
    assert doc(rolled)["code"] == "probation-failed"
    assert "latency" in doc(rolled)["reason"]
    entry = reported_where(reported, lambda e: e["last_failure"] is not None)
    assert entry["version"] == "1.0.0"
    assert "8.0.0" in versions_of(dev.results)
    results = dev.results_after(5, len(dev.results))
    assert set(versions_of(results)) == {"1.0.0"}


# --- pinning, rollback, groups -----------------------------------------------------------


def preinstall(store_root: Path, versions: list[str]) -> None:
    """Installs digits-classifier `versions` into the store, as earlier deliveries did."""
    store = ModelStore(store_root, quota_bytes=64 << 20)
    data = DIGITS.read_bytes()
    for version in versions:
        store.install(DIGITS, make_manifest(data, MODEL, version), move=False)


def test_pinning_a_stored_version_activates_it_without_a_download(
    device_factory: Callable[..., Device],
    readers: tuple[MqttReader, MqttReader],
    tmp_path: Path,
) -> None:
    reported, events = readers
    preinstall(tmp_path / "store", ["2.0.0", "3.0.0"])
    dev = device_factory()
    assert dev.store is not None
    assert dev.delivery is not None

    for version, back in [("2.0.0", False), ("3.0.0", False), ("2.0.0", True)]:
        since = len(reported.messages)
        # Going back from 3.0.0 to 2.0.0 is a downgrade: the desired state must say so.
        dev.desired({"digits": {"model": MODEL, "version": version, "allow_downgrade": back}})
        reported_where(
            reported, lambda e, v=version: e["version"] == v and e["state"] == "running", since
        )
        active = dev.store.active(MODEL)
        assert active is not None
        assert active.version == version
    # Events travel through the outbox, the reported state does not: either may arrive first.
    events.wait_for_count(3, lambda m: doc(m)["type"] == "probation-passed")
    assert not {"downloaded", "validated", "rejected"} & set(event_types(events))

    # Rollback on command: back to the version active before (3.0.0); 2.0.0 is not
    # re-deployed although the desired state still names it.
    since = len(reported.messages)
    assert dev.delivery.rollback("digits") == "3.0.0"
    entry = reported_where(reported, lambda e: e["last_failure"] is not None, since)
    assert (entry["version"], entry["state"]) == ("3.0.0", "running")
    assert entry["last_failure"]["code"] == "rolled-back"
    assert entry["last_failure"]["version"] == "2.0.0"
    time.sleep(1.0)  # lets time pass to show that 2.0.0 does not come back
    results = dev.results_after(5, len(dev.results))
    assert set(versions_of(results)) == {"3.0.0"}
    active = dev.store.active(MODEL)
    assert active is not None
    assert active.version == "3.0.0"


def test_device_desired_state_wins_over_groups_and_the_first_group_wins(
    device_factory: Callable[..., Device],
    readers: tuple[MqttReader, MqttReader],
    tmp_path: Path,
) -> None:
    reported, events = readers
    preinstall(tmp_path / "store", ["2.0.0", "3.0.0", "4.0.0"])
    dev = device_factory(groups=("lab", "all"))
    topics = dev.topics

    def converges(version: str, action: Callable[[], None]) -> None:
        since = len(reported.messages)
        action()
        reported_where(
            reported, lambda e: e["version"] == version and e["state"] == "running", since
        )
        results = dev.results_after(3, len(dev.results))
        assert versions_of(results)[-1] == version

    def group(name: str, version: str, **more: dict[str, str]) -> Callable[[], None]:
        # lab's 3.0.0 applies again after 4.0.0 ran: a downgrade the entry allows.
        entry = {"model": MODEL, "version": version, "allow_downgrade": True}
        pipelines = {"digits": entry, **more}
        return lambda: set_desired(dev.broker, topics.group_desired(name), pipelines)

    converges("2.0.0", group("all", "2.0.0"))
    converges("3.0.0", group("lab", "3.0.0"))
    # The second group changing changes nothing: the first group (lab) names the pipeline.
    group("all", "2.0.0", other={"model": "x", "version": "1"})()
    converges("4.0.0", lambda: dev.desired({"digits": {"model": MODEL, "version": "4.0.0"}}))
    # The device entry cleared: the first group's applies again.
    converges("3.0.0", lambda: dev.desired(None))
    assert "rejected" not in event_types(events)


def test_a_malformed_or_foreign_desired_state_is_rejected_with_a_reason(
    device_factory: Callable[..., Device],
    readers: tuple[MqttReader, MqttReader],
) -> None:
    reported, events = readers
    dev = device_factory()
    set_desired_raw = Publisher(dev.broker)
    try:
        set_desired_raw.publish(dev.topics.desired, b"{not json")
    finally:
        set_desired_raw.close()
    bad = events.wait_for(lambda m: doc(m)["type"] == "rejected")
    assert doc(bad)["code"] == "malformed-desired"
    dev.desired({"digits": {"model": "shapes-detector", "version": "2.0.0"}})
    entry = reported_where(reported, lambda e: e["last_failure"] is not None)
    assert entry["last_failure"]["code"] == "wrong-model"
    dev.desired({"digits": {"model": MODEL}})
    entry = reported_where(
        reported,
        lambda e: (
            e["last_failure"] is not None and e["last_failure"]["code"] == "malformed-desired"
        ),
    )
    assert entry["version"] == "1.0.0"
    results = dev.results_after(3, len(dev.results))
    assert set(versions_of(results)) == {"1.0.0"}


def test_startup_model_survives_a_corrupt_store(tmp_path: Path) -> None:
    preinstall(tmp_path / "store", ["2.0.0"])
    store = ModelStore(tmp_path / "store", quota_bytes=64 << 20)
    store.activate(MODEL, "2.0.0")
    (tmp_path / "store" / "versions" / MODEL / "2.0.0" / "model.tflite").write_bytes(b"junk")
    broken = ModelStore(tmp_path / "store", quota_bytes=64 << 20)  # falls back: nothing intact
    delivery = ModelDelivery(
        DeliveryConfig(store=tmp_path / "store"),
        _NoLink(),
        Topics(PREFIX, DEVICE),
        broken,
        LockedPipelines({}, threading.Lock()),
    )
    config = PipelineConfig(
        name="digits",
        source=ImagesCamera(type="images", path=f"{samples_dir()}/digit-*.png"),
        model=MODEL,
    )
    assert delivery.startup_model(config) is None
    assert delivery.startup_model(config.model_copy(update={"model": "/tmp/x.tflite"})) is None


class _NoLink:
    connected = False

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        raise AssertionError("not used")

    def unsubscribe(self, topic_filter: str) -> None:
        raise AssertionError("not used")

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> object:
        raise AssertionError("not used")


# --- what a delivered model is described as --------------------------------------------

COLOURS = ("red", "green", "blue")


def _colour_model() -> bytes:
    """A float classifier of an 8x8 RGB frame (the mean of R, of G, of B) whose TFLite
    metadata says mean/std 127.5 and packs its labels: what a published model carries."""
    weights = np.zeros((3, 8, 8, 3), np.float32)
    for channel in range(3):
        weights[channel, :, :, channel] = 1 / 64
    meta = modelfactory.metadata_buffer(
        [
            modelfactory.TensorMeta(
                name="image", content="image", color_space=1, mean=[127.5], std=[127.5]
            )
        ],
        [modelfactory.TensorMeta(name="probability", files=[("colours.txt", TENSOR_AXIS_LABELS)])],
    )
    return modelfactory.with_metadata(
        modelfactory.image_fc(weights), meta, {"colours.txt": "\n".join(COLOURS) + "\n"}
    )


def _stored(tmp_path: Path, data: bytes, **manifest: Any) -> StoredModel:
    """`data` installed and activated as colours 1.0.0, read back from the store's disk."""
    store = ModelStore(tmp_path / "store", quota_bytes=1 << 24)
    staged = tmp_path / "staged.tflite"
    staged.write_bytes(data)
    store.install(staged, make_manifest(data, "colours", "1.0.0", **manifest))
    store.activate("colours", "1.0.0")
    stored = store.active("colours")
    assert stored is not None
    return stored


def _pipeline(**overrides: Any) -> PipelineConfig:
    source = ImagesCamera(type="images", path="/nonexistent/frames")
    return PipelineConfig(name="colours", source=source, model="colours", **overrides)


def test_a_delivered_model_without_a_task_is_described_from_its_metadata_and_graph(
    tmp_path: Path,
) -> None:
    """A delivery manifest with no task, labels or preprocess: the device reads them from
    the model as it does for a local model with no manifest, and the real interpreter
    classifies a red frame as red (raw pixels / 255 with no labels would not say so)."""
    stored = _stored(tmp_path, _colour_model(), task=None, labels=(), preprocess=None)

    description = describe_stored(stored, _pipeline())

    assert description.task == ClassificationTask()
    assert description.sources["task"].startswith("classification: one [1, 3] output")
    assert description.labels == COLOURS
    assert description.preprocess == ImagePreprocess(mean=(127.5,), std=(127.5,))
    assert (description.name, description.version) == ("colours", "1.0.0")
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    engine = Engine.load(description.path, accelerator="cpu")
    try:
        prepare = make_preprocessor(description.preprocess, engine.inputs[0], "image")
        decode = make_decoder(description.task, engine.outputs, description.labels)
        prepared = prepare(red)
        result = decode(engine.invoke([prepared.tensor]), prepared)
    finally:
        engine.close()
    assert result["classes"][0]["label"] == "red"


def test_a_delivered_model_follows_the_catalogs_precedence(tmp_path: Path) -> None:
    """Pipeline config, then the delivery manifest, then metadata: the manifest's labels
    beat the packed ones, the config's task keys beat the manifest's, and the config's
    labels beat both."""
    stored = _stored(
        tmp_path,
        _colour_model(),
        task=ClassificationTask(top_k=2),
        labels=("rouge", "vert", "bleu"),
        preprocess=None,
    )

    from_manifest = describe_stored(stored, _pipeline())
    assert from_manifest.task == ClassificationTask(top_k=2)
    assert from_manifest.labels == ("rouge", "vert", "bleu")
    assert from_manifest.sources["labels"] == "from the delivery manifest"
    assert from_manifest.preprocess == ImagePreprocess(mean=(127.5,), std=(127.5,))

    overridden = describe_stored(
        stored, _pipeline(task=ClassificationTask(threshold=0.5), labels=("r", "g", "b"))
    )
    assert overridden.task == ClassificationTask(top_k=2, threshold=0.5)
    assert overridden.labels == ("r", "g", "b")
    assert overridden.sources["labels"] == "from the pipeline config"
