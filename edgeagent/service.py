"""The agent: wires the pipelines, the MQTT link, the durable outbox, fleet commands,
telemetry, Home Assistant discovery and the local control socket, and stops them cleanly.

Each concern lives in its own module; this one only connects them (docs/architecture.md).

Result identity: every result carries `run`, a 64-bit random id of this process, and a
`seq` per pipeline name that the agent keeps for the life of the process (a restarted or
reconfigured pipeline continues its numbers), so `(run, pipeline, seq)` names one result
for the life of the device (docs/protocol.md, "De-duplication").
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from edgeagent import __version__
from edgeagent.commands.operations import Operations
from edgeagent.commands.router import CommandRouter
from edgeagent.config import AgentConfig, PipelineConfig
from edgeagent.control import ControlServer
from edgeagent.delivery.gate import ModelValidator, validate_model
from edgeagent.delivery.worker import LockedPipelines, ModelDelivery, open_store
from edgeagent.errors import EdgeAgentError
from edgeagent.events.policy import make_policy
from edgeagent.events.settings import EventsPublish
from edgeagent.hal.accel import probe_accelerators
from edgeagent.hal.accel.base import Accelerator
from edgeagent.hal.sources import open_source
from edgeagent.hal.system import CpuSampler, read_system_facts
from edgeagent.logbuffer import install as install_log_buffer
from edgeagent.mqtt import MqttLink, PublishTicket, Topics
from edgeagent.mqtt.payload import to_json
from edgeagent.mqtt.protocol import StatusState, event_message, status_message
from edgeagent.outbox import Outbox, OutboxPublisher, OutboxStats
from edgeagent.paths import control_socket, model_store_root, outbox_path
from edgeagent.pipeline import Pipeline, PipelineStats, ResultSequence, SourceFactory
from edgeagent.telemetry.homeassistant import DiscoveryAnnouncer, discovery_messages
from edgeagent.telemetry.prometheus import PrometheusExporter
from edgeagent.telemetry.report import (
    MqttSnapshot,
    PipelineSnapshot,
    TelemetryPublisher,
    build_telemetry,
)
from edgeagent.threadnames import name_kernel_threads

if TYPE_CHECKING:
    import numpy as np

    from edgeagent.hal.source import Sample

log = logging.getLogger(__name__)

RUN_ID_BYTES = 8
"""`run` is this many random bytes (hex): 64 bits. A device that restarts every 5 s for
ten years draws about 6e7 ids; the chance that any two of them collide is about 1e-4.
With 32 bits the odds of a collision reach even after about 77,000 restarts: four and a
half days of such a crash loop."""


def new_run_id() -> str:
    """A fresh random id for one agent process: `(run, pipeline, seq)` keys its results."""
    return secrets.token_hex(RUN_ID_BYTES)


@dataclass(frozen=True, slots=True)
class ResultHandoff:
    """What became of one result the agent was given: stored in the outbox (`stored`;
    `durable` unless the outbox file was unusable and it fell back to memory), or, with
    `outbox.enabled: false`, handed to the MQTT link, whose `ticket` says when the broker
    acknowledged it. A result the outbox could not store (disk full) is not reported."""

    pipeline: str
    stored: bool
    durable: bool = False
    ticket: PublishTicket | None = None


class Agent:
    """Owns everything that runs. `start`, then `stop` (from any thread)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        config_path: Path | None = None,
        source_factory: SourceFactory = open_source,
        accelerators: dict[str, Accelerator] | None = None,
        on_result: Callable[[ResultHandoff], None] | None = None,
        pipeline_factory: Callable[..., Pipeline] = Pipeline,
        validate_model: ModelValidator = validate_model,
    ) -> None:
        """`pipeline_factory` builds each pipeline (called like `Pipeline`) and
        `validate_model` is delivery's gate: both are replaced only by `edgeagent fleet
        simulate`, whose devices run a stand-in for inference instead of LiteRT."""
        self.config = config
        self.config_path = config_path
        self.device_id = config.device.id
        self.topics = Topics(config.mqtt.prefix, self.device_id)
        self.started_at = time.time()
        # (run, pipeline, seq) names one result for the life of the device: run is new
        # for each process, seq continues per pipeline name within it.
        self.run_id = new_run_id()
        self._sequences: dict[str, ResultSequence] = {}
        self.restart_requested = threading.Event()
        self.logs = install_log_buffer()
        self._on_result = on_result  # told what became of each result
        self._source_factory = source_factory
        self._pipeline_factory = pipeline_factory
        self._accelerators = accelerators
        self._stopped = threading.Event()
        self._pipelines_lock = threading.RLock()
        self.pipelines: dict[str, Pipeline] = {}
        self.failed: dict[str, str] = {}  # pipeline name -> why it could not start
        self.stopped: set[str] = set()  # stopped by command
        self._cpu = CpuSampler()

        self._link = MqttLink(
            config.mqtt,
            self.device_id,
            will_payload=to_json(self._status("offline")),
            on_connected=self._on_connected,
            on_message=self._on_message,
        )
        self.outbox: Outbox | None = None
        self._outbox_publisher: OutboxPublisher | None = None
        if config.outbox.enabled:
            self.outbox = Outbox.from_config(config.outbox, outbox_path(config))
            self._outbox_publisher = OutboxPublisher.from_config(
                self.outbox, self._link, config.outbox
            )
        self.store = open_store(config.delivery, model_store_root(config))
        # Looks self.pipelines up under its lock: pipelines started or restarted later are followed.
        self.delivery = ModelDelivery(
            config.delivery,
            self._link,
            self.topics,
            self.store,
            LockedPipelines(self.pipelines, self._pipelines_lock),
            publish_event=self._publish_delivery_event,
            validate=validate_model,
        )
        self.operations = Operations(self)
        self.router = CommandRouter(
            self.topics,
            config.commands,
            self._reply,
        )
        self.operations.register_commands(self.router)
        self.discovery = DiscoveryAnnouncer(
            config.homeassistant,
            lambda: discovery_messages(
                self.topics,
                self.device_id,
                list(self.pipelines),
                __version__,
                prefix=config.homeassistant.prefix,
                events={
                    name: p.config.publish
                    for name, p in self.pipelines.items()
                    if isinstance(p.config.publish, EventsPublish)
                },
            ),
            lambda topic, payload: self._link.publish(topic, payload, qos=1, retain=True),
        )
        self.telemetry = TelemetryPublisher(
            config.telemetry.interval_s,
            self.telemetry_snapshot,
            # QoS 0: telemetry queued through an outage is stale when it arrives.
            lambda payload: self._link.publish(self.topics.telemetry, payload, qos=0),
        )
        self._exporter = (
            PrometheusExporter(config.telemetry.prometheus, self.telemetry_snapshot)
            if config.telemetry.prometheus is not None
            else None
        )
        self.control = ControlServer(control_socket(config), self.operations.local_handlers())
        for topic_filter in self.router.subscriptions() + self.discovery.subscriptions():
            self._link.subscribe(topic_filter, qos=1)

    @property
    def running(self) -> list[Pipeline]:
        with self._pipelines_lock:
            return [p for name, p in self.pipelines.items() if name not in self.failed]

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Starts MQTT (never fails on an unreachable broker), every pipeline that can
        start (one that cannot is skipped with its reason in the status), telemetry and
        the control socket."""
        if self._outbox_publisher is not None:
            self._outbox_publisher.start()
        self.delivery.start()
        self._link.start()
        self.control.start()
        for config in self.config.pipelines:
            if config.enabled:
                self.start_pipeline(config)
        if self._link.connected:
            # Connected before the pipelines existed: announce their entities too.
            self.discovery.announce()
        self.telemetry.start()
        if self._exporter is not None:
            self._exporter.start()
        name_kernel_threads()
        self.publish_status()

    def stop(self) -> None:
        """Stops pipelines (their last results are stored and published), waits for the
        broker's acknowledgements, publishes `offline` and disconnects."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.control.stop()
        self.delivery.stop()
        for pipeline in self.running:
            pipeline.stop()
        self.router.close()
        self.telemetry.stop()
        if self._exporter is not None:
            self._exporter.stop()
        if self._outbox_publisher is not None:
            if self._link.connected and not self._outbox_publisher.flush(timeout=5.0):
                log.warning("stopping with results still in the outbox; they go out after start")
            self._outbox_publisher.stop()
        if not self._link.wait_acked(timeout=5.0):
            log.warning(
                "stopping with %d message(s) not acknowledged by the broker", self._link.outstanding
            )
        self._link.stop(publish_offline=to_json(self._status("offline")))
        if self.outbox is not None:
            self.outbox.close()

    def reexec(self) -> NoReturn:
        """Replaces this process with a fresh agent (the `restart` command). Under systemd
        the PID stays the same, so the service simply continues."""
        log.info("restarting")
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, "-m", "edgeagent.cli.main", *sys.argv[1:]])  # noqa: S606

    # --- pipelines -------------------------------------------------------------------

    def start_pipeline(self, config: PipelineConfig) -> Pipeline | None:
        """Starts a pipeline; on failure records why and returns None. Its results
        continue the `seq` numbers of every earlier pipeline of that name in this run."""
        with self._pipelines_lock:
            sequence = self._sequences.setdefault(config.name, ResultSequence())
        pipeline = self._pipeline_factory(
            config,
            self._publish_result,
            source_factory=self._source_factory,
            accelerators=self._accelerators,
            on_event=self._publish_event,
            run_id=self.run_id,
            sequence=sequence,
            policy=lambda task: make_policy(
                config.name,
                config.publish,
                task,
                self.topics,
                lambda topic, payload, retain: self._publish_from(
                    config.name, topic, payload, retain
                ),
            ),
        )
        with self._pipelines_lock:
            previous = self.pipelines.get(config.name)
            self.pipelines[config.name] = pipeline
            self.failed.pop(config.name, None)
            self.stopped.discard(config.name)
        if previous is not None:
            previous.stop()  # never two pipelines of one name holding one camera
        try:
            # A version delivered over MQTT (the store's active one) wins over the bundled.
            pipeline.start(self.delivery.startup_model(config))
        except EdgeAgentError as exc:
            with self._pipelines_lock:
                self.failed[config.name] = str(exc)
            log.error("pipeline %s skipped: %s", config.name, exc)
            return None
        finally:
            self.delivery.pipelines_changed()
        name_kernel_threads()
        return pipeline

    def stop_pipeline(self, name: str) -> None:
        with self._pipelines_lock:
            pipeline = self.pipelines.pop(name, None)
            self.failed.pop(name, None)
            self.stopped.add(name)
        if pipeline is not None:
            pipeline.stop()
        self.delivery.pipelines_changed()

    # --- MQTT ------------------------------------------------------------------------

    def _on_connected(self) -> None:
        # Retained status is re-sent after every reconnect (a broker restarted without
        # persistence has forgotten it), then discovery, then the outbox backlog drains.
        self.publish_status()
        self.discovery.announce()
        self.delivery.on_connected()
        if self._outbox_publisher is not None:
            self._outbox_publisher.on_reconnected()

    def _reply(self, topic: str, payload: bytes, properties: dict[str, Any] | None) -> None:
        self._link.publish(topic, payload, qos=1, properties=properties)

    def _on_message(self, topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        if self.delivery.wants(topic):
            self.delivery.handle_message(topic, payload, properties)
        elif not self.discovery.handle_message(topic, payload, properties):
            self.router.handle_message(topic, payload, properties)

    def publish_status(self) -> None:
        if not self._stopped.is_set():
            self._link.publish(
                self.topics.status, to_json(self._status("online")), qos=1, retain=True
            )

    def _publish_durably(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> int | PublishTicket | None:
        """Results and events: stored first, removed once the broker acknowledged them.
        Returns the outbox entry id (None: not stored, counted by the outbox) or, with no
        outbox, the link's ticket."""
        qos = self.config.mqtt.qos
        if self._outbox_publisher is None:
            return self._link.publish(topic, payload, qos=qos, retain=retain)
        return self._outbox_publisher.submit(topic, payload, qos=qos, retain=retain)

    def _publish_delivery_event(self, topic: str, payload: bytes) -> None:
        """Model delivery's events go out durably; what became of them is not reported."""
        self._publish_durably(topic, payload)

    def _publish_result(self, pipeline: str, result: dict[str, Any]) -> None:
        self._publish_from(pipeline, self.topics.results(pipeline), to_json(result), False)

    def _publish_from(self, pipeline: str, topic: str, payload: bytes, retain: bool) -> None:
        """A pipeline's results, aggregates, track events, snapshots and retained summary
        (edgeagent/events/policy.py), durably; each stored one is reported to `on_result`
        (the READY gate)."""
        handed = self._publish_durably(topic, payload, retain=retain)
        handoff: ResultHandoff | None
        if isinstance(handed, PublishTicket):
            handoff = ResultHandoff(pipeline, stored=False, ticket=handed)
        elif handed is None:
            handoff = None  # not stored (disk full, storage error): counted by the outbox
        else:
            durable = self.outbox is not None and self.outbox.durable
            handoff = ResultHandoff(pipeline, stored=True, durable=durable)
        if handoff is not None and self._on_result is not None:
            self._on_result(handoff)

    def _publish_event(self, pipeline: str, kind: str, details: dict[str, Any]) -> None:
        event = event_message(kind, pipeline, **details)
        self._publish_durably(self.topics.events, to_json(event))
        if kind.startswith("accelerator-"):
            # Off the calling (inference) thread: the status probes every accelerator.
            threading.Thread(
                target=self.publish_status, name="edgeagent-status", daemon=True
            ).start()

    # --- what the agent says about itself --------------------------------------------

    def _status(self, state: StatusState) -> dict[str, Any]:
        if state == "offline":
            return status_message(state, self.device_id)
        return status_message(
            state,
            self.device_id,
            version=__version__,
            run=self.run_id,
            started_at=round(self.started_at, 3),
            groups=list(
                dict.fromkeys((*self.config.delivery.groups, *self.config.commands.groups))
            ),
            pipelines=[
                self.describe_pipeline(p.name)
                if p.name in self.pipelines
                else {
                    "name": p.name,
                    "source": p.source.type,
                    "state": "stopped" if p.name in self.stopped else "starting",
                }
                for p in self.config.pipelines
                if p.enabled or p.name in self.pipelines
            ],
            accelerators=[
                {"name": p.name, "state": str(p.state), "reason": p.reason}
                for p in probe_accelerators()
            ],
        )

    def readiness_reasons(self) -> str:
        """Why no result is stored or acknowledged yet, per running pipeline (for the
        STATUS line that goes with a READY sent on the timeout)."""
        parts = []
        for pipeline in self.running:
            stats = pipeline.stats
            if stats.results_out == 0:
                parts.append(f"{pipeline.name}: {stats.last_error or 'no result yet'}")
            elif self._outbox_publisher is None:
                link = self._link
                state = "connected" if link.connected else f"not connected: {link.last_error}"
                mqtt = self.config.mqtt
                parts.append(
                    f"{pipeline.name}: {stats.results_out} result(s), none acknowledged by "
                    f"the broker at {mqtt.host}:{mqtt.port} ({state}); the outbox is "
                    "disabled, so results are not stored"
                )
            else:
                parts.append(f"{pipeline.name}: {stats.results_out} result(s), none stored")
        return "; ".join(parts) or "no pipeline is running"

    def describe_pipeline(self, name: str) -> dict[str, Any]:
        with self._pipelines_lock:
            pipeline = self.pipelines.get(name)
            error = self.failed.get(name)
        if pipeline is None:  # stopped meanwhile
            return {"name": name, "state": "stopped"}
        info = pipeline.describe()
        if error is not None:
            info.update(state="failed", error=error)
        else:
            info["state"] = "running" if pipeline.runner is not None else "starting"
        return info

    def telemetry_snapshot(self) -> dict[str, Any]:
        snapshots = []
        with self._pipelines_lock:
            pipelines = list(self.pipelines.items())
        for name, pipeline in pipelines:
            runner = pipeline.runner
            snapshots.append(
                PipelineSnapshot.capture(
                    name,
                    pipeline.stats,
                    pipeline.stats.window,
                    state="failed" if name in self.failed else "running",
                    accelerator=runner.engine.accelerator if runner else None,
                    # Accelerators skipped at load, then the failovers while running.
                    fallbacks=(
                        (*runner.engine.fallbacks, *pipeline.stats.fallback_reasons)
                        if runner
                        else ()
                    ),
                    model_name=runner.model.name if runner else None,
                    model_version=runner.model.version if runner else None,
                )
            )
        stats = self.outbox.stats() if self.outbox is not None else None
        return build_telemetry(
            self.device_id,
            system=read_system_facts(
                str(self.outbox.path.parent) if self.outbox else "/", sampler=self._cpu
            ),
            pipelines=snapshots,
            mqtt=MqttSnapshot.of(self._link, stats),
            version=__version__,
        )

    @property
    def link(self) -> MqttLink:
        return self._link

    # --- what the operations see and do (commands.operations.AgentControl) ----------

    def replace_config(self, config: AgentConfig) -> None:
        self.config = config

    def outbox_stats(self) -> OutboxStats | None:
        return self.outbox.stats() if self.outbox is not None else None

    def pipeline_names(self) -> list[str]:
        with self._pipelines_lock:
            return list(self.pipelines)

    def _pipeline(self, name: str) -> Pipeline | None:
        with self._pipelines_lock:
            return self.pipelines.get(name)

    def pipeline_stats(self, name: str) -> PipelineStats | None:
        pipeline = self._pipeline(name)
        return pipeline.stats if pipeline is not None else None

    def pipeline_failure(self, name: str) -> str | None:
        with self._pipelines_lock:
            return self.failed.get(name)

    def last_output(self, name: str) -> tuple[Sample, dict[str, Any]] | None:
        pipeline = self._pipeline(name)
        return pipeline.last if pipeline is not None else None

    def last_mask(self, name: str) -> np.ndarray[Any, Any] | None:
        pipeline = self._pipeline(name)
        return pipeline.last_mask if pipeline is not None else None

    def running_model_path(self, name: str) -> Path | None:
        pipeline = self._pipeline(name)
        runner = pipeline.runner if pipeline is not None else None
        return runner.model.path if runner is not None else None

    def log_tail(self, lines: int) -> list[str]:
        return self.logs.tail(lines)

    def request_restart(self) -> None:
        self.restart_requested.set()

    def rollback_model(self, pipeline: str) -> str:
        return self.delivery.rollback(pipeline)
