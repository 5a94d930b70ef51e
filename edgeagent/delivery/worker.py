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

The parts: `download` (manifest, chunks, gate, install, stalls), `probation` (swap, checks,
swap back, the markers), `reporting` (`reported`, events), `agent_view` (what delivery needs
of the agent: the link, a locked view of its pipelines). This module is the worker: its
thread and queue, the desired state, reconciliation, and `rollback()`.

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

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edgeagent.config import DeliveryConfig, PipelineConfig
from edgeagent.delivery.agent_view import (
    DeliveryLink,
    DeliveryPipeline,
    LockedPipelines,
    PipelineLookup,
    Target,
)
from edgeagent.delivery.download import ModelDownload, ModelMessage, TransferStats, find_installed
from edgeagent.delivery.gate import ModelValidator, validate_model
from edgeagent.delivery.probation import SWAP_TIMEOUT_S, TICK_S, Probations, describe_stored
from edgeagent.delivery.reporting import DELIVERY_CODES, DeliveryReport, EventType, PipelineState
from edgeagent.delivery.signing import (
    SAFE_ID,
    DeliveryError,
    check_safe_id,
    check_version,
    compare_versions,
    key_id,
    load_public_key,
)
from edgeagent.delivery.store import ModelStore, StoredModel
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.modelfile.catalog import ModelDescription
from edgeagent.mqtt.protocol import DesiredState, DesiredStateError, effective_desired
from edgeagent.mqtt.topics import Topics

_log = logging.getLogger(__name__)

MiB: Final = 1 << 20
_MAX_QUEUED_BYTES: Final = 64 * MiB  # chunk payloads waiting for the worker


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


class ModelDelivery:
    """Converges the pipelines on the desired model versions (see the module doc).
    `start()`, route messages with `wants()`/`handle_message()`, `stop()`."""

    def __init__(
        self,
        config: DeliveryConfig,
        link: DeliveryLink,
        topics: Topics,
        store: ModelStore,
        pipelines: PipelineLookup,
        *,
        publish_event: Callable[[str, bytes], None] | None = None,
        validate: ModelValidator = validate_model,
    ) -> None:
        """`pipelines` looks the agent's pipelines up under its lock (`LockedPipelines`):
        pipelines started, restarted or stopped later are followed. `publish_event(topic,
        payload)` sends events (the agent's durable outbox); by default they go straight to
        the link. `validate` is the gate (`validate_model`; the simulator's stand-in skips only
        LiteRT). Raises ConfigError when a trusted key file is unusable."""
        self._config = config
        self._link = link
        self._topics = topics
        self._store = store
        self._pipelines = pipelines
        self._group_topics = {topics.group_desired(g): g for g in config.groups}

        # Shared with handle_message (the dispatch thread), guarded by _cond.
        self._cond = threading.Condition()
        self._desired_raw: dict[str, bytes] = {}
        self._inbox: deque[ModelMessage | _RollbackRequest] = deque()
        self._queued_bytes = 0
        self._wanted: tuple[str, str] | None = None
        self._republish = False
        self._stopping = False
        self.dropped_chunks = 0

        # Owned by the worker thread.
        self._device_desired: DesiredState | None = None
        self._group_desired: dict[str, DesiredState | None] = {}
        self._unknown_reported: set[str] = set()
        self._report = DeliveryReport(
            link,
            topics,
            pipelines,
            publish_event or (lambda topic, payload: self._link.publish(topic, payload, qos=1)),
            on_probation=lambda name: name in self._probations,
        )
        self._probations = Probations(config, store, pipelines, self._report)
        self._download = ModelDownload(
            config,
            link,
            topics,
            store,
            trusted=load_trusted_keys(config.trusted_keys),
            pipelines=pipelines,
            report=self._report,
            on_wanted=self._set_wanted,
            on_installed=self._probations.start,
            validate=validate,
        )
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
        return self._download.last_transfer

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
            self._inbox.append(ModelMessage(name, version, index, payload))
            self._queued_bytes += len(payload)
            self._cond.notify()

    def on_connected(self) -> None:
        """Call after every (re)connect: reported is published again (a broker without
        persistence forgot it) and the desired state re-evaluated."""
        self.pipelines_changed()

    def pipelines_changed(self) -> None:
        """Call after a pipeline started, failed to start or stopped: reported is published
        again (one published while the pipeline was loading its model said `failed`)."""
        with self._cond:
            self._republish = True
            self._cond.notify()

    # --- requests from other threads -----------------------------------------------------

    def rollback(self, pipeline: str, *, timeout: float = 120.0) -> str:
        """Switches `pipeline` back to the version active before the current one (during
        probation: to the version that ran before it) and returns that version. The version
        left is not tried again until the desired state changes. DeliveryError (no-rollback,
        not-stored, corrupt-version), EdgeAgentError (unknown pipeline, not running)."""
        if self._pipelines.pipeline(pipeline) is None:
            raise EdgeAgentError(
                f"no pipeline {pipeline!r} here (pipelines: "
                f"{', '.join(self._pipelines.pipelines())})"
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
        self._report.publish()
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._stopping
                        or bool(self._inbox)
                        or bool(self._desired_raw)
                        or self._republish
                    ),
                    timeout=TICK_S,
                )
                if self._stopping:
                    break
                desired, self._desired_raw = self._desired_raw, {}
                items = list(self._inbox)
                self._inbox.clear()
                self._queued_bytes = 0
                republish, self._republish = self._republish, False
            try:
                if republish:
                    self._report.publish()
                for topic, payload in desired.items():
                    self._on_desired(topic, payload)
                for item in items:
                    if isinstance(item, _RollbackRequest):
                        self._serve_rollback(item)
                    else:
                        self._download.on_message(item)
                self._download.check_stall()
                self._probations.check()
                self._reconcile()
            except Exception:  # noqa: BLE001 - the worker must outlive a bug in one step
                _log.exception("model delivery step failed")
        self._shutdown()

    def _set_wanted(self, wanted: tuple[str, str] | None) -> None:
        with self._cond:
            self._wanted = wanted

    def _shutdown(self) -> None:
        self._download.shutdown()
        self._probations.abandon_all()
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
            self._report.event(
                "rejected", None, None, None, code="malformed-desired", reason=reason
            )
            return
        names = list(self._pipelines.pipelines())
        before = {p: self._effective(p) for p in names}
        if group is None:
            self._device_desired = state
            entries = state.pipelines if state is not None else {}
            unknown = sorted(set(entries) - set(names))
            for p in unknown:
                if p not in self._unknown_reported:
                    self._report.event(
                        "rejected",
                        p,
                        entries[p].model,
                        entries[p].version,
                        code="unknown-pipeline",
                        reason=f"the device desired state names pipeline {p!r}, which this "
                        f"device does not run (pipelines: {', '.join(names)})",
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
        self._report.forget_failures(pipeline)
        if target is None:
            return
        _log.info("pipeline %s: desired model is now %s %s", pipeline, target.model, target.version)
        error = (
            ("malformed-desired", target.error)
            if target.error is not None
            else self._check_target(pipeline, target)
        )
        if error is not None:
            self._report.fail(pipeline, target.model, target.version, error[0], error[1])

    def _check_target(self, pipeline: str, target: Target) -> tuple[str, str] | None:
        found = self._pipelines.pipeline(pipeline)
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
        current = self._download.current
        if current is not None:
            pipeline_name, job_target = current
            if self._effective(pipeline_name) == job_target:
                return
            self._download.abandon()
        for name, pipeline in self._pipelines.pipelines().items():
            running = pipeline.model
            target = self._effective(name)
            if running is None or name in self._probations or target is None:
                continue
            if target.error is not None or self._check_target(name, target) is not None:
                continue
            if running.name == target.model and running.version == target.version:
                continue
            if self._report.has_failed(name, target.model, target.version):
                continue
            refused = self._check_downgrade(target)
            if refused is not None:
                self._report.fail(name, target.model, target.version, *refused)
                continue
            self._begin(name, target)
            return

    def _begin(self, pipeline: str, target: Target) -> None:
        stored = find_installed(self._store, target.model, target.version)
        if stored is not None:
            _log.info(
                "pipeline %s: %s %s is in the store; activating it without a download",
                pipeline,
                target.model,
                target.version,
            )
            self._probations.start(pipeline, stored)
            return
        self._download.begin(pipeline, target)

    # --- rollback on command ----------------------------------------------------------

    def _serve_rollback(self, request: _RollbackRequest) -> None:
        if not request.result.set_running_or_notify_cancel():
            return
        try:
            request.result.set_result(self._rollback(request.pipeline))
        except Exception as exc:  # noqa: BLE001 - whatever it was, the caller gets it
            request.result.set_exception(exc)

    def _rollback(self, name: str) -> str:
        pipeline = self._pipelines.pipeline(name)
        running = pipeline.model if pipeline is not None else None
        if pipeline is None or running is None:
            raise EdgeAgentError(f"pipeline {name} is not running: nothing to roll back")
        previous = self._probations.end_and_swap_back(name)
        target: ModelDescription
        if previous is not None:
            target = previous
        else:
            stored = self._store.rollback(pipeline.config.model)
            target = describe_stored(stored, pipeline.config)
            try:
                pipeline.swap(target, SWAP_TIMEOUT_S)
            except EdgeAgentError:
                self._store.activate(running.name, running.version)  # the pointer follows
                raise
        self._report.fail(
            name,
            running.name,
            running.version,
            "rolled-back",
            f"rolled back on command to {target.version}",
            event="rolled-back",
        )
        return target.version


__all__ = [
    "DELIVERY_CODES",
    "DeliveryConfig",
    "DeliveryLink",
    "DeliveryPipeline",
    "EventType",
    "LockedPipelines",
    "ModelDelivery",
    "PipelineLookup",
    "PipelineState",
    "StoredModel",
    "Target",
    "TransferStats",
    "describe_stored",
    "load_trusted_keys",
    "open_store",
]
