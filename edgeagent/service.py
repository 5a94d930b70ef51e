"""The agent: starts the MQTT link and every pipeline, publishes their results and the
device's retained status, and stops them all cleanly."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from edgeagent import __version__
from edgeagent.config import AgentConfig
from edgeagent.errors import EdgeAgentError
from edgeagent.hal.accel import probe_accelerators
from edgeagent.hal.accel.base import Accelerator
from edgeagent.hal.sources import open_source
from edgeagent.mqtt import MqttLink, Topics
from edgeagent.pipeline import Pipeline, SourceFactory

log = logging.getLogger(__name__)


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


class Agent:
    """Owns the pipelines and the MQTT link. `start`, then `stop` (from any thread)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        source_factory: SourceFactory = open_source,
        accelerators: dict[str, Accelerator] | None = None,
    ) -> None:
        self.config = config
        self.device_id = config.device.id
        self.topics = Topics(config.mqtt.prefix, self.device_id)
        self.started_at = time.time()
        self.pipelines: list[Pipeline] = [
            Pipeline(
                p, self._publish_result, source_factory=source_factory, accelerators=accelerators
            )
            for p in config.pipelines
            if p.enabled
        ]
        self.failed: dict[str, str] = {}  # pipeline name -> why it could not start
        self._stopped = threading.Event()
        self._link = MqttLink(
            config.mqtt,
            self.device_id,
            will_payload=_json(self._status("offline")),
            on_connected=self._on_connected,
            on_message=None,
        )

    @property
    def running(self) -> list[Pipeline]:
        return [p for p in self.pipelines if p.name not in self.failed]

    def start(self) -> None:
        """Starts MQTT (never fails on an unreachable broker) and every pipeline that can
        start; a pipeline that cannot is skipped with its reason in the status."""
        self._link.start()
        for pipeline in self.pipelines:
            try:
                pipeline.start()
            except EdgeAgentError as exc:
                self.failed[pipeline.name] = str(exc)
                log.error("pipeline %s skipped: %s", pipeline.name, exc)
        self._publish_status()

    def stop(self) -> None:
        """Stops pipelines (their last results are published), waits for the broker's
        acknowledgements, publishes `offline` and disconnects."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for pipeline in self.running:
            pipeline.stop()
        if not self._link.wait_acked(timeout=5.0):
            log.warning(
                "stopping with %d result(s) not acknowledged by the broker", self._link.outstanding
            )
        self._link.stop(publish_offline=_json(self._status("offline")))

    def _on_connected(self) -> None:
        # Retained status is re-sent after every reconnect: a broker restarted without
        # persistence has forgotten it.
        self._publish_status()

    def _publish_status(self) -> None:
        if not self._stopped.is_set():
            self._link.publish(
                self.topics.status, _json(self._status("online")), qos=1, retain=True
            )

    def _publish_result(self, pipeline: str, result: dict[str, Any]) -> None:
        self._link.publish(self.topics.results(pipeline), _json(result), qos=self.config.mqtt.qos)

    def _status(self, state: str) -> dict[str, Any]:
        status: dict[str, Any] = {
            "state": state,
            "device": self.device_id,
            "ts": round(time.time(), 3),
        }
        if state == "online":
            status.update(
                version=__version__,
                started_at=round(self.started_at, 3),
                pipelines=[self._describe(p) for p in self.pipelines],
                accelerators=[
                    {"name": p.name, "state": str(p.state), "reason": p.reason}
                    for p in probe_accelerators()
                ],
            )
        return status

    def _describe(self, pipeline: Pipeline) -> dict[str, Any]:
        info = pipeline.describe()
        if pipeline.name in self.failed:
            info.update(state="failed", error=self.failed[pipeline.name])
        else:
            info["state"] = "running" if pipeline.engine is not None else "starting"
        return info
