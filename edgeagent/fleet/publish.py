"""The workstation side of model delivery (`edgeagent model publish/unpublish`): the
delivery manifest built from a .tflite and its YAML manifest, the chunks and the signed
manifest published retained (chunks first), and their removal (manifest first). The wire
format is docs/model-delivery.md; the CLI only parses arguments and prints."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from edgeagent.config import MqttConfig
from edgeagent.delivery.signing import (
    MAX_CHUNKS,
    MIN_CHUNK_SIZE,
    DeliveryManifest,
    DeliveryReference,
    TensorBlob,
    sign_manifest,
)
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.fleet.connection import BROKER_MESSAGE_CAP, FleetConnection
from edgeagent.modelfile.manifest import Manifest, load_manifest, manifest_path
from edgeagent.modelfile.tflite import ModelFile, read_model
from edgeagent.mqtt.topics import FleetTopics

DEFAULT_CHUNK_SIZE = 64 * 1024
# Room left under the broker's message cap for the topic, properties and MQTT header.
MAX_CHUNK_SIZE = BROKER_MESSAGE_CAP - 1024

log = logging.getLogger(__name__)


def check_chunk_size(chunk_size: int) -> None:
    """EdgeAgentError when devices would refuse chunks of `chunk_size` bytes or the broker
    could not carry them."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise EdgeAgentError(
            f"--chunk-size {chunk_size} is out of range: use {MIN_CHUNK_SIZE} to "
            f"{MAX_CHUNK_SIZE} bytes (devices refuse smaller chunks), which leaves room under "
            f"the broker's {BROKER_MESSAGE_CAP // 1024} KiB message cap"
        )


def fleet_topics(prefix: str) -> FleetTopics:
    """The fleet's topics under `prefix`; ConfigError naming `--prefix` when it is invalid."""
    try:
        return FleetTopics(prefix)
    except ValueError as exc:
        raise ConfigError(f"--prefix: {exc}") from exc


def read_yaml_manifest(path: Path) -> Manifest:
    """A model manifest file (docs/models.md) given by path; ConfigError when unusable."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Manifest.model_validate(raw)
    except OSError as exc:
        raise ConfigError(f"cannot read the model manifest {path}: {exc.strerror}") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"model manifest {path} is invalid: {exc}") from exc


def build_manifest(
    path: Path,
    model: ModelFile,
    data: bytes,
    *,
    name: str,
    version: str,
    chunk_size: int,
    spec: Manifest | None,
    spec_dir: Path | None,
    min_agent_version: str = "0",
) -> DeliveryManifest:
    """The unsigned delivery manifest of `data` (see docs/model-delivery.md)."""
    values: dict[str, Any] = {
        "name": name,
        "version": version,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "chunk_size": chunk_size,
        "chunks": -(-len(data) // chunk_size),
        "labels": model.labels,
        "min_agent_version": min_agent_version,
        "created_at": dt.datetime.now(dt.UTC),
    }
    if spec is not None:
        if "task" in spec.model_fields_set:  # else the device infers it, as for a local model
            values["task"] = spec.task
        values["labels"] = spec.labels or model.labels
        values["preprocess"] = spec.preprocess
        if spec.reference is not None and spec_dir is not None:
            values["reference"] = _reference(path, model, spec, spec_dir)
    try:
        return DeliveryManifest(**values)
    except ValidationError as exc:
        raise EdgeAgentError(f"cannot build the delivery manifest: {exc}") from exc


def _reference(path: Path, model: ModelFile, spec: Manifest, folder: Path) -> DeliveryReference:
    ref = spec.reference
    assert ref is not None
    input_path, output_path = folder / ref.input, folder / ref.output
    if input_path.suffix.lower() == ".npy":
        sample = _load_npy(input_path)
    else:
        sample = _prepared_image(path, spec, input_path)
    expected = _load_npy(output_path).astype(np.float32)
    if model.inputs and sample.dtype.name != model.inputs[0].dtype:
        raise EdgeAgentError(
            f"reference input {input_path} is {sample.dtype.name} but the model's input is "
            f"{model.inputs[0].dtype}: save it in the input tensor's dtype"
        )
    try:
        return DeliveryReference(
            input=TensorBlob.from_array(sample),
            output=TensorBlob.from_array(expected),
            atol=ref.atol,
        )
    except ValidationError as exc:
        raise EdgeAgentError(f"the reference check of {path} is unusable: {exc}") from exc


def _load_npy(path: Path) -> np.ndarray[Any, Any]:
    try:
        array: np.ndarray[Any, Any] = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EdgeAgentError(f"cannot read reference array {path}: {exc}") from exc
    return array


def _prepared_image(model_path: Path, spec: Manifest, image: Path) -> np.ndarray[Any, Any]:
    from edgeagent.hal.camera.images import read_image
    from edgeagent.inference import Engine, make_preprocessor

    engine = Engine.load(model_path, accelerator="cpu")
    try:
        prepare = make_preprocessor(spec.preprocess, engine.inputs[0], "image")
        result: np.ndarray[Any, Any] = prepare(read_image(image)).tensor
    finally:
        engine.close()
    return result


def _topics(prefix: str) -> FleetTopics:
    try:
        return FleetTopics(prefix)
    except ValueError as exc:
        raise ConfigError(f"--prefix: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Publication:
    """A model version to publish: the file, the private signing key (PEM), its YAML
    manifest (None: the one beside the file, if any) and how to chunk it."""

    file: Path
    name: str
    version: str
    key: Path
    manifest: Path | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    min_agent_version: str = "0"


def publish_model(
    config: MqttConfig,
    item: Publication,
    *,
    timeout: float,
    on_start: Callable[[int], Callable[[int], None]] | None = None,
    on_done: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Signs `item`'s delivery manifest and publishes its chunks, then the manifest, all
    retained with QoS 1, waiting for the broker's acknowledgements (giving up after
    `timeout` s without one). `on_start(chunks)` returns the progress callback for the
    chunks' acknowledgements; `on_done` is called once they are in (or failed). Returns
    the `publish --json` report."""
    topics = fleet_topics(config.prefix)
    name, ver, chunk_size = item.name, item.version, item.chunk_size
    model = read_model(item.file)
    data = item.file.read_bytes()
    if -(-len(data) // chunk_size) > MAX_CHUNKS:
        raise EdgeAgentError(
            f"{item.file} ({len(data)} bytes) makes more than the {MAX_CHUNKS} chunks devices "
            f"take at --chunk-size {chunk_size}: use a larger --chunk-size"
        )
    spec: Manifest | None
    if item.manifest is not None:
        spec, spec_dir = read_yaml_manifest(item.manifest), item.manifest.parent
    else:
        spec, spec_dir = load_manifest(item.file), item.file.parent
        if spec is not None:
            log.info("using the manifest beside the model: %s", manifest_path(item.file))
    try:
        key_pem = item.key.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the signing key {item.key}: {exc.strerror}") from exc
    unsigned = build_manifest(
        item.file,
        model,
        data,
        name=name,
        version=ver,
        chunk_size=chunk_size,
        spec=spec,
        spec_dir=spec_dir,
        min_agent_version=item.min_agent_version,
    )
    signed = sign_manifest(unsigned, key_pem)
    manifest_bytes = signed.to_json_bytes()
    if len(manifest_bytes) > MAX_CHUNK_SIZE:
        raise EdgeAgentError(
            f"the signed manifest is {len(manifest_bytes)} bytes, over the {MAX_CHUNK_SIZE} "
            "that fit in one broker message: use a smaller reference input"
        )
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    progress = on_start(len(chunks)) if on_start is not None else None
    with FleetConnection(config, name="publish") as link:
        mids = [
            link.publish(topics.model_chunk(name, ver, i), chunk, retain=True)
            for i, chunk in enumerate(chunks)
        ]
        try:
            link.wait_acked(mids, stall_timeout=timeout, progress=progress)
        finally:
            if on_done is not None:
                on_done()
        # Last, so that a device never sees a manifest whose chunks are not there yet.
        mid = link.publish(topics.model_manifest(name, ver), manifest_bytes, retain=True)
        link.wait_acked([mid], stall_timeout=timeout)
    assert signed.signature is not None
    return {
        "name": name,
        "version": ver,
        "size": signed.size,
        "sha256": signed.sha256,
        "chunk_size": signed.chunk_size,
        "chunks": signed.chunks,
        "key_id": signed.signature.key_id,
        "manifest_topic": topics.model_manifest(name, ver),
        "chunk_topics": topics.model_chunk_pattern(name, ver),
    }


def unpublish_model(
    config: MqttConfig, name: str, version: str, chunks: int | None, *, timeout: float
) -> int:
    """Clears the retained manifest (first: a device that sees no manifest fetches
    nothing) and the chunks of a version; without `chunks`, their count is read from the
    retained manifest. Returns how many chunks were cleared."""
    topics = fleet_topics(config.prefix)
    manifest_topic = topics.model_manifest(name, version)
    with FleetConnection(config, name="unpublish") as link:
        count = chunks
        if count is None:
            count = _published_chunks(link.read_retained(manifest_topic, 2.0), manifest_topic)
        mids = [link.publish(manifest_topic, b"", retain=True)]
        mids += [
            link.publish(topics.model_chunk(name, version, i), b"", retain=True)
            for i in range(count)
        ]
        link.wait_acked(mids, stall_timeout=timeout)
    return count


def _published_chunks(payload: bytes | None, topic: str) -> int:
    if payload is None:
        raise EdgeAgentError(
            f"no retained manifest on {topic}: nothing to read the chunk count from; pass "
            "--chunks K to clear chunks anyway"
        )
    try:
        chunks = json.loads(payload.decode("utf-8"))["chunks"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise EdgeAgentError(
            f"the retained manifest on {topic} is unreadable ({exc}): pass --chunks K"
        ) from exc
    if not isinstance(chunks, int) or chunks < 0:
        raise EdgeAgentError(f"the retained manifest on {topic} has chunks={chunks!r}")
    return chunks
