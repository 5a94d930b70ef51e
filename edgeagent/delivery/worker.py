"""Model delivery: each pipeline converges on the model version the fleet desires.

The fleet publishes, retained, a desired state per device (`<prefix>/<device>/desired`)
and per group (`<prefix>/group/<g>/desired`)::

    {"pipelines": {"<pipeline>": {"model": "<name>", "version": "<version>",
                                  "allow_downgrade": false}}, "ts": ...}

A pipeline's desired version is the device's entry when there is one, else the entry of
the first group (in config order) that names the pipeline (`mqtt.protocol` parses the
state and merges it, the same code `fleet watch` uses). When it differs from what the
pipeline runs, the version is activated from the store when installed (a pin or a
rollback: no download), else pulled: the signed manifest from
`<prefix>/models/<name>/<version>/manifest`, then the missing chunks (`.../chunk/<i>`, a
window of exact topics at a time, so staged ones are never sent again) into a
resumable `ChunkAssembler`; assembled (size, sha256), validated by the gate in a child
process, installed, swapped into the pipeline and watched on probation. A version that
fails anywhere is reported (`reported.last_failure`, an event) and not tried again until
the desired version changes or the agent restarts; the running model keeps running, and
`reported` keeps saying so (`state` describes what runs, never a refused delivery).

Downgrades: versions are semantic versions (`signing.version_key`). A desired version lower
than the highest this device ever activated for that model (`ModelStore.highest`, durable)
is refused with `downgrade` before anything is fetched, unless its desired entry says
`"allow_downgrade": true`. `rollback()` (the `model.rollback` command) is not a delivery
and is never refused for it; re-deploying what already runs is not a downgrade.

Threads: `handle_message` runs on MqttLink's dispatch thread and only parses the topic and
queues (desired payloads: the newest per topic; chunks: at most `_MAX_QUEUED_BYTES`, more
are dropped and fetched again by re-subscribing when the transfer stalls). One worker,
`edgeagent-delivery`, does everything else: transfers, the gate, swaps, probation,
publishing `reported` and events, and `rollback()` requests.

Crash safety -- the order is swap, probation, then `store.activate`. The active pointer
is what a restarted agent runs (`startup_model`), so it only ever names a version that
loaded in this pipeline and passed probation (or that was active before). A crash before
the swap, between the swap and the activation, or during probation restarts the agent
on the previous, known-good version; the desired state still names the new one, which
is then installed, so it is tried again from the store without a download. Rolling back
a failed probation is therefore only a swap back: the pointer never moved. To stop a
model that kills the agent during probation from doing so on every restart, a durable
marker (`<store>/delivery/<pipeline>.probation.json`) counts the attempts; after
`_MAX_PROBATION_ATTEMPTS` deaths the version fails with `probation-failed`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from edgeagent.config import DeliveryConfig, PipelineConfig
from edgeagent.delivery.gate import validate_model
from edgeagent.delivery.signing import (
    GATE_CODES,
    SAFE_ID,
    DeliveryError,
    DeliveryManifest,
    check_safe_id,
    check_version,
    compare_versions,
    key_id,
    load_public_key,
    verify_manifest,
)
from edgeagent.delivery.store import ModelStore, StoredModel
from edgeagent.delivery.transfer import ChunkAssembler, TransferTimer, fsync_dir, write_file_durably
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.hal.source import Sample
from edgeagent.modelfile.catalog import Declared, ModelDescription, describe_file
from edgeagent.mqtt.payload import to_json
from edgeagent.mqtt.protocol import (
    DesiredEntry,
    DesiredState,
    DesiredStateError,
    ReportedPipeline,
    ReportedState,
    effective_desired,
    event_message,
    failure_record,
    reported_message,
)
from edgeagent.mqtt.topics import Topics
from edgeagent.pipeline import PipelineStats

_log = logging.getLogger(__name__)

MiB: Final = 1 << 20
_CHUNK_WINDOW: Final = 16  # chunk topics subscribed at once (16 x 64 KiB = 1 MiB in flight)
_TICK_S: Final = 0.2  # how often timers and probation are checked
_SWAP_TIMEOUT_S: Final = 30.0
_MAX_QUEUED_BYTES: Final = 64 * MiB  # chunk payloads waiting for the worker
_PROGRESS_STEPS: Final = 10  # download-progress events per transfer, at most
_MAX_PROBATION_ATTEMPTS: Final = 2  # agent deaths during one version's probation
_STALL_LIMIT_FACTOR: Final = 3.0  # probation ends as failed after this x probation_s
_MARKER_DIR: Final = "delivery"

DELIVERY_CODES: Final = frozenset(
    {
        "malformed-desired",
        "unknown-pipeline",
        "wrong-model",
        "downgrade",
        "probation-failed",
        "rolled-back",
    }
)
"""Reason codes of this module, beside `signing.REASON_CODES` (every code may appear in
`reported.last_failure.code` and in events)."""

PipelineState = ReportedState
"""What a pipeline runs, as `reported` says: `running` its version; `probation` a new
version not yet proven; `failed`: the pipeline does not run at all (it could not start).
A refused or rolled-back delivery shows in `last_failure`, never here."""
EventType = Literal[
    "download-progress",
    "downloaded",
    "validated",
    "activated",
    "rejected",
    "rolled-back",
    "probation-passed",
]


class DeliveryLink(Protocol):
    """What delivery needs of the MQTT link (`MqttLink` is one)."""

    @property
    def connected(self) -> bool: ...

    def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> object: ...


class DeliveryPipeline(Protocol):
    """What delivery needs of a pipeline (`edgeagent.pipeline.Pipeline` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> PipelineConfig: ...

    @property
    def model(self) -> ModelDescription | None: ...

    @property
    def stats(self) -> PipelineStats: ...

    @property
    def last(self) -> tuple[Sample, dict[str, Any]] | None: ...

    def swap(self, model: ModelDescription, timeout: float = 30.0) -> None: ...


Target = DesiredEntry
"""One pipeline's desired model (`mqtt.protocol.DesiredEntry`)."""


@dataclass(frozen=True, slots=True)
class TransferStats:
    """The last completed transfer: bytes written by this run and bytes found staged."""

    name: str
    version: str
    size: int
    fetched_bytes: int
    resumed_bytes: int


@dataclass(slots=True)
class _PipelineReport:
    staged: dict[str, Any] | None = None
    last_failure: dict[str, Any] | None = None


@dataclass(slots=True)
class _Job:
    pipeline: str
    target: Target
    timer: TransferTimer
    manifest: DeliveryManifest | None = None
    assembler: ChunkAssembler | None = None
    fetched: int = 0
    resumed: int = 0
    steps: int = 0
    resubscribed: bool = False
    subscribed: set[int] = field(default_factory=set)  # chunk topics asked for now


@dataclass(slots=True)
class _Probation:
    pipeline: DeliveryPipeline
    model: ModelDescription
    previous: ModelDescription
    started: float
    invoke_errors: int
    non_finite: int
    results_out: int
    old_p95: float | None


@dataclass(frozen=True, slots=True)
class _ModelMessage:
    name: str
    version: str
    index: int | None  # None: the manifest
    payload: bytes


@dataclass(frozen=True, slots=True)
class _RollbackRequest:
    pipeline: str
    result: Future[str]


def load_trusted_keys(paths: tuple[Path, ...]) -> dict[str, bytes]:
    """Key id -> public PEM for each file; ConfigError naming the file that is unusable."""
    trusted: dict[str, bytes] = {}
    for path in paths:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the trusted model-signing key {path}: {exc.strerror}"
            ) from exc
        try:
            trusted[key_id(load_public_key(pem))] = pem
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return trusted


def open_store(config: DeliveryConfig, default_root: Path | None = None) -> ModelStore:
    """The model store the config names, else `default_root` (created when missing,
    repaired on open)."""
    root = config.store or default_root
    if root is None:
        raise ConfigError("delivery.store is not set and no state directory was given")
    return ModelStore(root, keep=config.keep, quota_bytes=config.quota_bytes)


def describe_stored(stored: StoredModel, config: PipelineConfig) -> ModelDescription:
    """A pipeline's description of an installed version, by the catalog's one precedence
    (`catalog.describe_file`): the pipeline config, then the delivery manifest's task,
    labels and preprocess, then the model's TFLite metadata, then its graph."""
    m = stored.manifest
    return describe_file(
        stored.path,
        Declared(m.task, m.labels, m.preprocess, origin="the delivery manifest"),
        name=m.name,
        version=m.version,
        task=config.task,
        labels=config.labels,
        preprocess=config.preprocess,
    )


class ModelDelivery:
    """Converges the pipelines on the desired model versions (see the module doc).
    `start()`, route messages with `wants()`/`handle_message()`, `stop()`."""

    def __init__(
        self,
        config: DeliveryConfig,
        link: DeliveryLink,
        topics: Topics,
        store: ModelStore,
        pipelines: Mapping[str, DeliveryPipeline],
        *,
        publish_event: Callable[[str, bytes], None] | None = None,
    ) -> None:
        """`pipelines` is read live (the agent's own dict: pipelines started, restarted or
        stopped later are followed). `publish_event(topic, payload)` sends events (the
        agent's durable outbox); by default they go straight to the link. Raises
        ConfigError when a trusted key file is unusable."""
        self._config = config
        self._link = link
        self._publish_event = publish_event or (
            lambda topic, payload: self._link.publish(topic, payload, qos=1)
        )
        self._topics = topics
        self._store = store
        self._pipelines = pipelines  # live: pipelines started or replaced later are followed
        self._trusted = load_trusted_keys(config.trusted_keys)
        self._group_topics = {topics.group_desired(g): g for g in config.groups}
        self._marker_dir = store.root / _MARKER_DIR

        # Shared with handle_message (the dispatch thread), guarded by _cond.
        self._cond = threading.Condition()
        self._desired_raw: dict[str, bytes] = {}
        self._inbox: deque[_ModelMessage | _RollbackRequest] = deque()
        self._queued_bytes = 0
        self._wanted: tuple[str, str] | None = None
        self._reconnected = False
        self._stopping = False
        self.dropped_chunks = 0

        # Owned by the worker thread.
        self._device_desired: DesiredState | None = None
        self._group_desired: dict[str, DesiredState | None] = {}
        self._reports: defaultdict[str, _PipelineReport] = defaultdict(_PipelineReport)
        self._failed: defaultdict[str, dict[tuple[str, str], str]] = defaultdict(dict)
        self._unknown_reported: set[str] = set()
        self._job: _Job | None = None
        self._probation: dict[str, _Probation] = {}
        self._last_transfer: TransferStats | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def subscriptions(self) -> list[str]:
        """The fixed topics delivery listens to (model topics are subscribed on demand)."""
        return [self._topics.desired, *self._group_topics]

    def start(self) -> None:
        """Cleans staging debris, subscribes to the desired states, starts the worker."""
        if self._thread is not None:
            raise RuntimeError("ModelDelivery.start() called twice")
        self._store.clean_debris()
        for topic in self.subscriptions():
            self._link.subscribe(topic, 1)
        self._thread = threading.Thread(target=self._run, name="edgeagent-delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the worker (a gate in progress may delay it up to its time-out). A probation
        in progress is abandoned: the restart runs the active (previous) version."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                _log.warning("the model delivery worker did not stop within %.0f s", timeout)

    @property
    def last_transfer(self) -> TransferStats | None:
        return self._last_transfer

    # --- the dispatch thread: parse and queue, never block --------------------------------

    def wants(self, topic: str) -> bool:
        """True for the topics `handle_message` takes: the desired states and model topics."""
        return (
            topic == self._topics.desired
            or topic in self._group_topics
            or self._topics.fleet.is_model_topic(topic)
        )

    def handle_message(self, topic: str, payload: bytes, properties: Mapping[str, Any]) -> None:
        """Hands a received message to the worker; returns at once."""
        if topic == self._topics.desired or topic in self._group_topics:
            with self._cond:
                self._desired_raw[topic] = payload  # only the newest matters
                self._cond.notify()
            return
        parsed = self._topics.fleet.parse_model(topic)
        if parsed is None:
            return
        name, version, index = parsed
        with self._cond:
            if self._wanted != (name, version):
                return  # not (or no longer) being fetched
            if self._inbox and self._queued_bytes + len(payload) > _MAX_QUEUED_BYTES:
                self.dropped_chunks += 1
                _log.debug("delivery inbox full: dropped %s (fetched again on a stall)", topic)
                return
            self._inbox.append(_ModelMessage(name, version, index, payload))
            self._queued_bytes += len(payload)
            self._cond.notify()

    def on_connected(self) -> None:
        """Call after every (re)connect: reported is published again (a broker without
        persistence forgot it) and the desired state re-evaluated."""
        with self._cond:
            self._reconnected = True
            self._cond.notify()

    # --- requests from other threads -----------------------------------------------------

    def rollback(self, pipeline: str, *, timeout: float = 120.0) -> str:
        """Switches `pipeline` back to the version active before the current one (during
        probation: to the version that ran before it) and returns that version. The version
        left is not tried again until the desired state changes. DeliveryError (no-rollback,
        not-stored, corrupt-version), EdgeAgentError (unknown pipeline, not running)."""
        if pipeline not in self._pipelines:
            raise EdgeAgentError(
                f"no pipeline {pipeline!r} here (pipelines: {', '.join(self._pipelines)})"
            )
        request = _RollbackRequest(pipeline, Future())
        with self._cond:
            if self._thread is None or self._stopping:
                raise EdgeAgentError("model delivery is not running: cannot roll back now")
            self._inbox.append(request)
            self._cond.notify()
        try:
            return request.result.result(timeout)
        except FutureTimeout:
            raise EdgeAgentError(
                f"the rollback of {pipeline} did not finish within {timeout:g} s (the delivery "
                "worker is busy, e.g. validating a model); try again"
            ) from None

    def startup_model(self, config: PipelineConfig) -> ModelDescription | None:
        """The store's active version of `config.model` to start the pipeline with, or None
        (run the configured model) when none was delivered or the store cannot provide one;
        the reason is logged."""
        name = config.model
        if not SAFE_ID.fullmatch(name) or ".." in name:
            return None  # a path: delivery addresses bundled names only
        try:
            stored = self._store.active(name)
            if stored is None:
                return None
            return describe_stored(stored, config)
        except (EdgeAgentError, OSError) as exc:
            _log.error(
                "pipeline %s: cannot use the delivered %s (%s); starting the configured model",
                config.name,
                name,
                exc,
            )
            return None

    # --- the worker ----------------------------------------------------------------------

    def _run(self) -> None:
        self._publish_reported()
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._stopping
                        or bool(self._inbox)
                        or bool(self._desired_raw)
                        or self._reconnected
                    ),
                    timeout=_TICK_S,
                )
                if self._stopping:
                    break
                desired, self._desired_raw = self._desired_raw, {}
                items = list(self._inbox)
                self._inbox.clear()
                self._queued_bytes = 0
                reconnected, self._reconnected = self._reconnected, False
            try:
                if reconnected:
                    self._publish_reported()
                for topic, payload in desired.items():
                    self._on_desired(topic, payload)
                for item in items:
                    if isinstance(item, _RollbackRequest):
                        self._serve_rollback(item)
                    else:
                        self._on_model_message(item)
                self._tick()
                self._reconcile()
            except Exception:  # noqa: BLE001 - the worker must outlive a bug in one step
                _log.exception("model delivery step failed")
        self._shutdown()

    def _shutdown(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            self._unsubscribe(job)
        for name in list(self._probation):
            self._remove_marker(name)  # a clean stop is no death during probation
        with self._cond:
            pending = [i for i in self._inbox if isinstance(i, _RollbackRequest)]
            self._inbox.clear()
        for request in pending:
            request.result.set_exception(EdgeAgentError("model delivery stopped"))

    # --- desired state -------------------------------------------------------------------

    def _on_desired(self, topic: str, payload: bytes) -> None:
        group = self._group_topics.get(topic)
        where = "device" if group is None else f"group {group}"
        try:
            state = DesiredState.parse(payload, where)
        except DesiredStateError as exc:
            why = (
                f"it is not UTF-8 JSON ({exc.detail})"
                if exc.problem == "not-json"
                else 'it must be an object {"pipelines": {...}}'
            )
            reason = f"the {where} desired state was ignored: {why}"
            _log.warning("%s", reason)
            self._event("rejected", None, None, None, code="malformed-desired", reason=reason)
            return
        before = {p: self._effective(p) for p in list(self._pipelines)}
        if group is None:
            self._device_desired = state
            entries = state.pipelines if state is not None else {}
            unknown = sorted(set(entries) - set(self._pipelines))
            for p in unknown:
                if p not in self._unknown_reported:
                    self._event(
                        "rejected",
                        p,
                        entries[p].model,
                        entries[p].version,
                        code="unknown-pipeline",
                        reason=f"the device desired state names pipeline {p!r}, which this "
                        f"device does not run (pipelines: {', '.join(self._pipelines)})",
                    )
            self._unknown_reported = set(unknown)
        else:
            self._group_desired[group] = state
        for p, old in before.items():
            new = self._effective(p)
            if new != old:
                self._target_changed(p, new)

    def _effective(self, pipeline: str) -> Target | None:
        groups = (self._group_desired.get(g) for g in self._config.groups)
        found = effective_desired(self._device_desired, groups).get(pipeline)
        return found[0] if found is not None else None

    def _target_changed(self, pipeline: str, target: Target | None) -> None:
        """A new desired version: earlier failures may be retried; a bad entry fails now."""
        self._failed[pipeline].clear()
        if target is None:
            return
        _log.info("pipeline %s: desired model is now %s %s", pipeline, target.model, target.version)
        error = (
            ("malformed-desired", target.error)
            if target.error is not None
            else self._check_target(pipeline, target)
        )
        if error is not None:
            self._fail(pipeline, target.model, target.version, error[0], error[1])

    def _check_target(self, pipeline: str, target: Target) -> tuple[str, str] | None:
        found = self._pipelines.get(pipeline)
        if found is None:
            return "unknown-pipeline", f"pipeline {pipeline} does not run here"
        configured = found.config.model
        if target.model != configured:
            return (
                "wrong-model",
                f"pipeline {pipeline} runs model {configured!r}; the desired state names "
                f"{target.model!r}: deliver versions of {configured!r}, or change the "
                "pipeline's configured model",
            )
        try:
            check_safe_id(target.model, "name")
            check_version(target.version)
        except DeliveryError as exc:
            return exc.code, exc.message
        return None

    def _check_downgrade(self, target: Target) -> tuple[str, str] | None:
        """("downgrade", why) when `target` is below the highest version of its model ever
        activated here and its desired entry does not allow that; else None."""
        if target.allow_downgrade:
            return None
        highest = self._store.highest(target.model)
        if highest is None or compare_versions(target.version, highest) >= 0:
            return None
        return (
            "downgrade",
            f"{target.model} {target.version} is older than {highest}, the highest version "
            "this device has activated: an older version may be one withdrawn for a reason. "
            f"Deploy {highest} or newer, roll back with model.rollback, or deploy "
            f'{target.version} again with --allow-downgrade ("allow_downgrade": true) if '
            "going back is meant",
        )

    def _reconcile(self) -> None:
        """Starts the next piece of work: at most one transfer at a time."""
        job = self._job
        if job is not None:
            if self._effective(job.pipeline) == job.target:
                return
            _log.info(
                "pipeline %s: abandoning the transfer of %s %s: the desired version changed "
                "(staged chunks are kept)",
                job.pipeline,
                job.target.model,
                job.target.version,
            )
            self._end_job(job)
            self._reports[job.pipeline].staged = None
            self._publish_reported()
        for name, pipeline in list(self._pipelines.items()):
            running = pipeline.model
            target = self._effective(name)
            if running is None or name in self._probation or target is None:
                continue
            if target.error is not None or self._check_target(name, target) is not None:
                continue
            if running.name == target.model and running.version == target.version:
                continue
            if (target.model, target.version) in self._failed[name]:
                continue
            refused = self._check_downgrade(target)
            if refused is not None:
                self._fail(name, target.model, target.version, *refused)
                continue
            self._begin(name, target)
            return

    def _begin(self, pipeline: str, target: Target) -> None:
        stored = self._installed(target.model, target.version)
        if stored is not None:
            _log.info(
                "pipeline %s: %s %s is in the store; activating it without a download",
                pipeline,
                target.model,
                target.version,
            )
            self._start_probation(pipeline, stored)
            return
        job = _Job(pipeline, target, TransferTimer(self._config.chunk_timeout_s))
        self._job = job
        self._reports[pipeline].staged = {"version": target.version, "progress": 0.0}
        self._publish_reported()
        with self._cond:
            self._wanted = (target.model, target.version)
        self._link.subscribe(self._topics.model_manifest(target.model, target.version), 1)

    def _installed(self, name: str, version: str) -> StoredModel | None:
        for stored in self._store.versions(name):
            if stored.version == version:
                return stored
        return None

    # --- the transfer ------------------------------------------------------------------

    def _on_model_message(self, message: _ModelMessage) -> None:
        job = self._job
        if job is None or (message.name, message.version) != (job.target.model, job.target.version):
            return
        try:
            if message.index is None:
                self._on_manifest(job, message.payload)
            elif job.assembler is not None:
                self._on_chunk(job, message.index, message.payload)
        except DeliveryError as exc:
            self._job_failed(job, exc)

    def _on_manifest(self, job: _Job, raw: bytes) -> None:
        if job.manifest is not None:
            return  # another copy of the retained manifest
        target = job.target
        manifest = verify_manifest(
            raw,
            self._trusted,
            self._config.allow_unsigned,
            max_size=self._config.max_model_bytes,
        )
        if (manifest.name, manifest.version) != (target.model, target.version):
            raise DeliveryError(
                "malformed-manifest",
                f"the manifest published for {target.model} {target.version} describes "
                f"{manifest.name} {manifest.version}: the publisher put it on the wrong topic",
            )
        self._link.unsubscribe(self._topics.model_manifest(target.model, target.version))
        self._store.check_quota(manifest.size, name=manifest.name)
        assembler = ChunkAssembler(self._store.staging_root, manifest)
        job.manifest, job.assembler = manifest, assembler
        job.resumed = assembler.bytes_received
        job.timer.progressed()
        if assembler.complete():
            self._finish_transfer(job)
        else:
            self._request_chunks(job)

    def _request_chunks(self, job: _Job) -> None:
        """Subscribes to the exact topics of the next missing chunks, at most
        `_CHUNK_WINDOW` at a time. The broker then sends only those retained copies: what
        is already staged is never sent again, not after a reconnect (MqttLink restores
        only the current window) nor after a restart. The window also bounds how much
        model data waits in the inbox."""
        assembler = job.assembler
        assert assembler is not None
        room = _CHUNK_WINDOW - len(job.subscribed)
        for index in assembler.next_missing(room, job.subscribed) if room > 0 else ():
            job.subscribed.add(index)
            self._link.subscribe(self._chunk_topic(job.target, index), 1)

    def _chunk_topic(self, target: Target, index: int) -> str:
        return self._topics.model_chunk(target.model, target.version, index)

    def _on_chunk(self, job: _Job, index: int, data: bytes) -> None:
        assembler = job.assembler
        assert assembler is not None
        if assembler.add(index, data):
            job.fetched += len(data)
            job.timer.progressed()
        if index in job.subscribed:
            job.subscribed.discard(index)
            self._link.unsubscribe(self._chunk_topic(job.target, index))
        if assembler.complete():
            self._finish_transfer(job)
            return
        self._request_chunks(job)
        fraction = assembler.progress.fraction
        step = math.floor(fraction * _PROGRESS_STEPS)
        if step > job.steps:
            job.steps = step
            report = self._reports[job.pipeline]
            report.staged = {"version": job.target.version, "progress": round(fraction, 3)}
            self._event(
                "download-progress",
                job.pipeline,
                job.target.model,
                job.target.version,
                progress=round(fraction, 3),
            )
            self._publish_reported()

    def _finish_transfer(self, job: _Job) -> None:
        """Assembles, validates and installs, then starts the probation."""
        assembler, manifest = job.assembler, job.manifest
        assert assembler is not None
        assert manifest is not None
        self._end_job(job)
        pipeline = self._pipelines.get(job.pipeline)
        if pipeline is None:
            _log.warning("pipeline %s went away: %s stays staged", job.pipeline, job.target)
            return
        staged = assembler.assemble()
        self._last_transfer = TransferStats(
            manifest.name, manifest.version, manifest.size, job.fetched, job.resumed
        )
        _log.info(
            "downloaded %s %s: %d bytes fetched, %d resumed from disk",
            manifest.name,
            manifest.version,
            job.fetched,
            job.resumed,
        )
        self._reports[job.pipeline].staged = {"version": manifest.version, "progress": 1.0}
        self._event("downloaded", job.pipeline, manifest.name, manifest.version, progress=1.0)
        self._publish_reported()
        try:
            validate_model(
                staged,
                manifest,
                source_kind=pipeline.config.source.kind,
                source_shape=_source_shape(pipeline),
                timeout_s=self._config.gate_timeout_s,
            )
            self._event("validated", job.pipeline, manifest.name, manifest.version)
            self._store.install(staged, manifest)
        except DeliveryError:
            assembler.discard()  # it is the model that is bad, not the transfer
            raise
        except (OSError, EdgeAgentError) as exc:
            # Recorded as a failure like any other, so the version is not retried in a loop.
            raise DeliveryError("io-error", f"installing {manifest.version} failed: {exc}") from exc
        assembler.discard()
        stored = self._installed(manifest.name, manifest.version)
        if stored is None:
            raise DeliveryError(
                "not-stored", f"{manifest.name} {manifest.version} vanished after its install"
            )
        self._start_probation(job.pipeline, stored)

    def _end_job(self, job: _Job) -> None:
        if self._job is job:
            self._job = None
        with self._cond:
            self._wanted = None
        self._unsubscribe(job)

    def _unsubscribe(self, job: _Job) -> None:
        self._link.unsubscribe(self._topics.model_manifest(job.target.model, job.target.version))
        for index in job.subscribed:
            self._link.unsubscribe(self._chunk_topic(job.target, index))
        job.subscribed.clear()

    def _job_failed(self, job: _Job, exc: DeliveryError) -> None:
        self._end_job(job)
        if exc.code in GATE_CODES and job.assembler is not None:
            job.assembler.discard()
        self._fail(job.pipeline, job.target.model, job.target.version, exc.code, exc.message)

    # --- timers: stalls and probation ----------------------------------------------------

    def _tick(self) -> None:
        job = self._job
        if job is not None:
            try:
                self._check_stall(job)
            except DeliveryError as exc:
                self._job_failed(job, exc)
        for name, probation in list(self._probation.items()):
            if self._pipelines.get(name) is not probation.pipeline:
                # Stopped or restarted (on the active, previous version): nothing to watch.
                _log.info("pipeline %s was restarted: its probation is abandoned", name)
                del self._probation[name]
                self._remove_marker(name)
                self._publish_reported()
                continue
            self._check_probation(name, probation)

    def _check_stall(self, job: _Job) -> None:
        if not self._link.connected:
            job.timer.progressed()  # the broker is away: its retained copies come back later
            return
        if job.assembler is not None:
            job.timer.check(job.assembler)
        remaining = job.timer.remaining()
        if not job.resubscribed and remaining < self._config.chunk_timeout_s * 0.75:
            # Chunks dropped from a full inbox come again as retained copies on re-subscribe.
            job.resubscribed = True
            if job.assembler is None:
                self._link.subscribe(
                    self._topics.model_manifest(job.target.model, job.target.version), 1
                )
            for index in job.subscribed:
                self._link.subscribe(self._chunk_topic(job.target, index), 1)
        if job.assembler is None and remaining <= 0:
            raise DeliveryError(
                "timeout",
                f"no manifest for {job.target.model} {job.target.version} arrived in "
                f"{self._config.chunk_timeout_s:g} s on "
                f"{self._topics.model_manifest(job.target.model, job.target.version)}: "
                "publish the model (retained) before setting the desired version",
            )

    def _start_probation(self, pipeline_name: str, stored: StoredModel) -> None:
        pipeline = self._pipelines.get(pipeline_name)
        previous = pipeline.model if pipeline is not None else None
        if pipeline is None or previous is None:
            return
        model = describe_stored(stored, pipeline.config)
        attempts = self._marker_attempts(pipeline_name, model)
        if attempts >= _MAX_PROBATION_ATTEMPTS:
            self._fail(
                pipeline_name,
                model.name,
                model.version,
                "probation-failed",
                f"agent-restart: the agent stopped {attempts} times during the probation of "
                f"{model.name} {model.version}; it is not tried again until the desired version "
                "changes",
            )
            return
        old_p95 = _invoke_p95(pipeline.stats)
        self._write_marker(pipeline_name, model, attempts + 1)
        try:
            pipeline.swap(model, _SWAP_TIMEOUT_S)
        except EdgeAgentError as exc:
            self._remove_marker(pipeline_name)
            self._fail(pipeline_name, model.name, model.version, "load-failed", str(exc))
            return
        stats = pipeline.stats
        self._probation[pipeline_name] = _Probation(
            pipeline=pipeline,
            model=model,
            previous=previous,
            started=time.monotonic(),
            invoke_errors=stats.invoke_errors,
            non_finite=stats.non_finite,
            results_out=stats.results_out,
            old_p95=old_p95,
        )
        self._reports[pipeline_name].staged = None
        _log.info(
            "pipeline %s: now running %s %s (was %s) on probation for %g s",
            pipeline_name,
            model.name,
            model.version,
            previous.version,
            self._config.probation_s,
        )
        self._event("activated", pipeline_name, model.name, model.version)
        self._publish_reported()

    def _check_probation(self, name: str, probation: _Probation) -> None:
        stats = probation.pipeline.stats
        elapsed = time.monotonic() - probation.started
        results = stats.results_out - probation.results_out
        cfg = self._config
        if stats.invoke_errors > probation.invoke_errors:
            errors = stats.invoke_errors - probation.invoke_errors
            self._probation_failed(
                name, "invoke-errors", f"{errors} invoke error(s) (last: {stats.last_error})"
            )
        elif stats.non_finite > probation.non_finite:
            bad = stats.non_finite - probation.non_finite
            self._probation_failed(
                name, "non-finite", f"{bad} of {results} result(s) held NaN or infinite outputs"
            )
        elif elapsed >= cfg.probation_s and results >= cfg.probation_min_results:
            p95 = _invoke_p95(stats, last=results)
            old = probation.old_p95
            if (
                old is not None
                and p95 is not None
                and p95 > cfg.latency_factor * old
                and p95 - old > cfg.latency_floor_ms
            ):
                self._probation_failed(
                    name,
                    "latency",
                    f"p95 invoke latency {p95:.2f} ms is over {cfg.latency_factor:g} x the "
                    f"previous model's {old:.2f} ms",
                )
            else:
                self._probation_passed(name, probation)
        elif elapsed >= max(cfg.probation_s, _TICK_S) * _STALL_LIMIT_FACTOR:
            self._probation_failed(
                name,
                "too-few-results",
                f"only {results} result(s) in {elapsed:.0f} s, {cfg.probation_min_results} "
                "needed: the model may hang in invoke",
            )

    def _probation_passed(self, name: str, probation: _Probation) -> None:
        model = probation.model
        try:
            self._store.activate(model.name, model.version)
        except DeliveryError as exc:
            self._probation_failed(name, "activate", exc.message)
            return
        del self._probation[name]
        self._remove_marker(name)
        try:
            self._store.prune(model.name)
        except DeliveryError as exc:
            _log.warning("cannot prune old versions of %s: %s", model.name, exc)
        _log.info("pipeline %s: %s %s passed probation", name, model.name, model.version)
        self._event("probation-passed", name, model.name, model.version)
        self._publish_reported()

    def _probation_failed(self, name: str, check: str, why: str) -> None:
        probation = self._probation.pop(name)
        model, previous = probation.model, probation.previous
        self._swap_back(probation.pipeline, previous)
        self._remove_marker(name)
        self._fail(
            name,
            model.name,
            model.version,
            "probation-failed",
            f"{check}: {why}; rolled back to {previous.version}",
            event="rolled-back",
        )

    def _swap_back(self, pipeline: DeliveryPipeline, model: ModelDescription) -> None:
        name = pipeline.name
        try:
            pipeline.swap(model, _SWAP_TIMEOUT_S)
        except EdgeAgentError as exc:
            # The active pointer still names the previous version: a restart runs it.
            _log.error(
                "pipeline %s: cannot switch back to %s %s: %s; restart the agent to run it",
                name,
                model.name,
                model.version,
                exc,
            )

    # --- rollback on command ----------------------------------------------------------

    def _serve_rollback(self, request: _RollbackRequest) -> None:
        if not request.result.set_running_or_notify_cancel():
            return
        try:
            request.result.set_result(self._rollback(request.pipeline))
        except Exception as exc:  # noqa: BLE001 - whatever it was, the caller gets it
            request.result.set_exception(exc)

    def _rollback(self, name: str) -> str:
        pipeline = self._pipelines.get(name)
        running = pipeline.model if pipeline is not None else None
        if pipeline is None or running is None:
            raise EdgeAgentError(f"pipeline {name} is not running: nothing to roll back")
        probation = self._probation.get(name)
        if probation is not None:
            del self._probation[name]
            self._swap_back(probation.pipeline, probation.previous)
            self._remove_marker(name)
            target = probation.previous
        else:
            stored = self._store.rollback(pipeline.config.model)
            target = describe_stored(stored, pipeline.config)
            try:
                pipeline.swap(target, _SWAP_TIMEOUT_S)
            except EdgeAgentError:
                self._store.activate(running.name, running.version)  # the pointer follows
                raise
        self._fail(
            name,
            running.name,
            running.version,
            "rolled-back",
            f"rolled back on command to {target.version}",
            event="rolled-back",
        )
        return target.version

    # --- reporting -----------------------------------------------------------------------

    def _fail(
        self,
        pipeline: str,
        model: str,
        version: str,
        code: str,
        reason: str,
        *,
        event: EventType = "rejected",
    ) -> None:
        """Records a refused or rolled-back version: `last_failure` and an event. The
        pipeline's state is untouched: it runs what it ran."""
        _log.warning("pipeline %s: %s %s %s: %s", pipeline, model, version, code, reason)
        self._failed[pipeline][(model, version)] = code
        report = self._reports[pipeline]
        report.staged = None
        report.last_failure = failure_record(version, code, reason)
        self._event(event, pipeline, model, version, code=code, reason=reason)
        self._publish_reported()

    def _event(
        self,
        kind: EventType,
        pipeline: str | None,
        model: str | None,
        version: str | None,
        **extra: Any,
    ) -> None:
        body = event_message(kind, pipeline, model=model, version=version, **extra)
        self._publish_event(self._topics.events, to_json(body))

    def _publish_reported(self) -> None:
        pipelines: dict[str, ReportedPipeline] = {}
        for name, pipeline in list(self._pipelines.items()):
            running = pipeline.model
            report = self._reports[name]
            state: PipelineState = "probation" if name in self._probation else "running"
            pipelines[name] = ReportedPipeline(
                running.name if running is not None else pipeline.config.model,
                running.version if running is not None else None,
                state if running is not None else "failed",
                report.staged,
                report.last_failure,
            )
        body = reported_message(pipelines)
        self._link.publish(self._topics.reported, to_json(body), qos=1, retain=True)

    # --- the probation marker (see the module doc) ------------------------------------

    def _marker_path(self, pipeline: str) -> Path:
        return self._marker_dir / f"{pipeline}.probation.json"

    def _marker_attempts(self, pipeline: str, model: ModelDescription) -> int:
        try:
            marker = json.loads(self._marker_path(pipeline).read_bytes())
            if marker["model"] == model.name and marker["version"] == model.version:
                return int(marker["attempts"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log.warning("ignoring the unreadable probation marker of %s: %s", pipeline, exc)
        return 0

    def _write_marker(self, pipeline: str, model: ModelDescription, attempts: int) -> None:
        body = {"model": model.name, "version": model.version, "attempts": attempts}
        try:
            self._marker_dir.mkdir(parents=True, exist_ok=True)
            write_file_durably(self._marker_path(pipeline), to_json(body))
            fsync_dir(self._marker_dir)
        except OSError as exc:
            _log.warning("cannot write the probation marker of %s: %s", pipeline, exc)

    def _remove_marker(self, pipeline: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._marker_path(pipeline).unlink()


def _source_shape(pipeline: DeliveryPipeline) -> tuple[int, ...]:
    """One sample's shape for the gate: the last sample seen, else what the config says."""
    last = pipeline.last
    if last is not None:
        return tuple(int(d) for d in last[0].data.shape)
    return pipeline.config.source.sample_shape()


def _invoke_p95(stats: PipelineStats, last: int | None = None) -> float | None:
    """p95 invoke latency (ms) of the pipeline's recent results, or of the `last` ones
    (during probation: only the new model's)."""
    p95 = stats.percentiles(last).get("invoke", {}).get("p95")
    return float(p95) if p95 is not None else None


__all__ = [
    "DELIVERY_CODES",
    "DeliveryConfig",
    "DeliveryLink",
    "DeliveryPipeline",
    "ModelDelivery",
    "Target",
    "TransferStats",
    "describe_stored",
    "load_trusted_keys",
    "open_store",
]
