"""What model delivery needs of the agent: its MQTT link (`DeliveryLink`) and its
pipelines, looked up only through `PipelineLookup`, whose answers are taken under the
agent's lock (`LockedPipelines`), so the delivery thread never reads the live dict."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from edgeagent.config import PipelineConfig
from edgeagent.hal.source import Sample
from edgeagent.modelfile.catalog import ModelDescription
from edgeagent.mqtt.protocol import DesiredEntry
from edgeagent.pipeline import PipelineStats

Target = DesiredEntry
"""One pipeline's desired model (`mqtt.protocol.DesiredEntry`)."""


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


class PipelineLookup(Protocol):
    """The agent's pipelines as they are now (started, restarted or stopped later are
    followed); safe to call from any thread."""

    def pipeline(self, name: str) -> DeliveryPipeline | None: ...

    def pipelines(self) -> dict[str, DeliveryPipeline]:
        """A copy: name -> pipeline, in the agent's order."""
        ...


class LockedPipelines:
    """A `PipelineLookup` over the agent's live dict, read only while holding its lock."""

    def __init__(
        self, pipelines: Mapping[str, DeliveryPipeline], lock: AbstractContextManager[Any]
    ) -> None:
        """`lock` is the one the agent holds whenever it changes `pipelines`."""
        self._pipelines = pipelines
        self._lock = lock

    def pipeline(self, name: str) -> DeliveryPipeline | None:
        with self._lock:
            return self._pipelines.get(name)

    def pipelines(self) -> dict[str, DeliveryPipeline]:
        with self._lock:
            return dict(self._pipelines)


__all__ = ["DeliveryLink", "DeliveryPipeline", "LockedPipelines", "PipelineLookup", "Target"]
