"""The download of one version at a time: its signed manifest, then the missing chunks (a
window of exact retained topics, so staged ones are never sent again), assembled, gated in
a child process and installed; a stalled transfer is re-subscribed once, then fails with
`timeout`. Owned by the delivery worker thread; `on_wanted` tells the dispatch thread which
model topics to keep."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from edgeagent.config import DeliveryConfig
from edgeagent.delivery.agent_view import DeliveryLink, DeliveryPipeline, PipelineLookup, Target
from edgeagent.delivery.gate import ModelValidator, validate_model
from edgeagent.delivery.reporting import DeliveryReport
from edgeagent.delivery.signing import GATE_CODES, DeliveryError, DeliveryManifest, verify_manifest
from edgeagent.delivery.store import ModelStore, StoredModel
from edgeagent.delivery.transfer import ChunkAssembler, TransferTimer
from edgeagent.errors import EdgeAgentError
from edgeagent.mqtt.topics import Topics

_log = logging.getLogger(__name__)

_CHUNK_WINDOW: Final = 16  # chunk topics subscribed at once (16 x 64 KiB = 1 MiB in flight)
_PROGRESS_STEPS: Final = 10  # download-progress events per transfer, at most


@dataclass(frozen=True, slots=True)
class TransferStats:
    """The last completed transfer: bytes written by this run and bytes found staged."""

    name: str
    version: str
    size: int
    fetched_bytes: int
    resumed_bytes: int


@dataclass(frozen=True, slots=True)
class ModelMessage:
    """A manifest or chunk received on a model topic, queued for the worker."""

    name: str
    version: str
    index: int | None  # None: the manifest
    payload: bytes


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


def find_installed(store: ModelStore, name: str, version: str) -> StoredModel | None:
    """The installed `version` of `name`, or None."""
    for stored in store.versions(name):
        if stored.version == version:
            return stored
    return None


class ModelDownload:
    """At most one transfer at a time: `begin`, feed it `on_message`, `check_stall` on each
    tick; a finished one calls `on_installed(pipeline, stored)`, a failed one is reported."""

    def __init__(
        self,
        config: DeliveryConfig,
        link: DeliveryLink,
        topics: Topics,
        store: ModelStore,
        *,
        trusted: dict[str, bytes],
        pipelines: PipelineLookup,
        report: DeliveryReport,
        on_wanted: Callable[[tuple[str, str] | None], None],
        on_installed: Callable[[str, StoredModel], None],
        validate: ModelValidator = validate_model,
    ) -> None:
        """`validate` is the gate (`validate_model`, the LiteRT child process)."""
        self._config = config
        self._validate = validate
        self._link = link
        self._topics = topics
        self._store = store
        self._trusted = trusted
        self._pipelines = pipelines
        self._report = report
        self._on_wanted = on_wanted
        self._on_installed = on_installed
        self._job: _Job | None = None
        self.last_transfer: TransferStats | None = None

    @property
    def current(self) -> tuple[str, Target] | None:
        """(pipeline, target) of the transfer in progress, or None."""
        job = self._job
        return (job.pipeline, job.target) if job is not None else None

    def begin(self, pipeline: str, target: Target) -> None:
        """Starts fetching `target` for `pipeline`: its manifest first."""
        job = _Job(pipeline, target, TransferTimer(self._config.chunk_timeout_s))
        self._job = job
        self._report.set_staged(pipeline, {"version": target.version, "progress": 0.0})
        self._report.publish()
        self._on_wanted((target.model, target.version))
        self._link.subscribe(self._topics.model_manifest(target.model, target.version), 1)

    def abandon(self) -> None:
        """Stops the transfer in progress (the desired version changed); staged chunks are
        kept for a later attempt."""
        job = self._job
        if job is None:
            return
        _log.info(
            "pipeline %s: abandoning the transfer of %s %s: the desired version changed "
            "(staged chunks are kept)",
            job.pipeline,
            job.target.model,
            job.target.version,
        )
        self._end_job(job)
        self._report.set_staged(job.pipeline, None)
        self._report.publish()

    def shutdown(self) -> None:
        """Unsubscribes from the transfer in progress (the worker is stopping)."""
        job, self._job = self._job, None
        if job is not None:
            self._unsubscribe(job)

    def on_message(self, message: ModelMessage) -> None:
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

    def check_stall(self) -> None:
        """Re-subscribes a stalling transfer once; fails it with `timeout` when no manifest
        came in time (chunks' time-outs are the assembler's)."""
        job = self._job
        if job is None:
            return
        try:
            self._check_stall(job)
        except DeliveryError as exc:
            self._job_failed(job, exc)

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
            progress = round(fraction, 3)
            self._report.set_staged(
                job.pipeline, {"version": job.target.version, "progress": progress}
            )
            self._report.event(
                "download-progress",
                job.pipeline,
                job.target.model,
                job.target.version,
                progress=progress,
            )
            self._report.publish()

    def _finish_transfer(self, job: _Job) -> None:
        """Assembles, validates and installs, then hands the version on (`on_installed`)."""
        assembler, manifest = job.assembler, job.manifest
        assert assembler is not None
        assert manifest is not None
        self._end_job(job)
        pipeline = self._pipelines.pipeline(job.pipeline)
        if pipeline is None:
            _log.warning("pipeline %s went away: %s stays staged", job.pipeline, job.target)
            return
        staged = assembler.assemble()
        self.last_transfer = TransferStats(
            manifest.name, manifest.version, manifest.size, job.fetched, job.resumed
        )
        _log.info(
            "downloaded %s %s: %d bytes fetched, %d resumed from disk",
            manifest.name,
            manifest.version,
            job.fetched,
            job.resumed,
        )
        self._report.set_staged(job.pipeline, {"version": manifest.version, "progress": 1.0})
        self._report.event(
            "downloaded", job.pipeline, manifest.name, manifest.version, progress=1.0
        )
        self._report.publish()
        try:
            self._validate(
                staged,
                manifest,
                source_kind=pipeline.config.source.kind,
                source_shape=_source_shape(pipeline),
                timeout_s=self._config.gate_timeout_s,
            )
            self._report.event("validated", job.pipeline, manifest.name, manifest.version)
            self._store.install(staged, manifest)
        except DeliveryError:
            assembler.discard()  # it is the model that is bad, not the transfer
            raise
        except (OSError, EdgeAgentError) as exc:
            # Recorded as a failure like any other, so the version is not retried in a loop.
            raise DeliveryError("io-error", f"installing {manifest.version} failed: {exc}") from exc
        assembler.discard()
        stored = find_installed(self._store, manifest.name, manifest.version)
        if stored is None:
            raise DeliveryError(
                "not-stored", f"{manifest.name} {manifest.version} vanished after its install"
            )
        self._on_installed(job.pipeline, stored)

    def _end_job(self, job: _Job) -> None:
        if self._job is job:
            self._job = None
        self._on_wanted(None)
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
        self._report.fail(job.pipeline, job.target.model, job.target.version, exc.code, exc.message)


def _source_shape(pipeline: DeliveryPipeline) -> tuple[int, ...]:
    """One sample's shape for the gate: the last sample seen, else what the config says."""
    last = pipeline.last
    if last is not None:
        return tuple(int(d) for d in last[0].data.shape)
    return pipeline.config.source.sample_shape()


__all__ = ["ModelDownload", "ModelMessage", "TransferStats", "find_installed"]
