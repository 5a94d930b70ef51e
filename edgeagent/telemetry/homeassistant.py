"""Home Assistant MQTT discovery: the device appears in HA with its availability, its
telemetry (CPU %, temperature, memory used, per pipeline fps and invoke p95) and the
latest result of each pipeline.

Each entity is one retained config message on
`<ha prefix>/sensor/<node_id>/<object_id>/config` (`discovery_messages`). Every entity is
available while the retained status says `"state": "online"`. Announce on every connect
(a broker restarted without persistence forgot the retained configs) and whenever HA
publishes its birth message, `online` on `<ha prefix>/status` (`DiscoveryAnnouncer`),
because a HA that restarted without the retained configs asks again that way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from edgeagent.config import DiscoveryConfig
from edgeagent.mqtt.topics import Topics, discovery_birth, discovery_config

log = logging.getLogger(__name__)

Message = tuple[str, bytes]
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MANUFACTURER = "edgeagent"


def _slug(name: str) -> str:
    """`name` as a HA node or object id ([A-Za-z0-9_-]); a changed name gets a short hash
    so that `a.b` and `a_b` stay apart."""
    slug = _UNSAFE.sub("_", name)
    if slug != name:
        slug += "_" + hashlib.sha256(name.encode()).hexdigest()[:6]
    return slug


def _jinja_key(name: str) -> str:
    # JSON string syntax is a valid Jinja string literal.
    return json.dumps(name)


def discovery_messages(
    topics: Topics,
    device_id: str,
    pipelines: Sequence[str],
    version: str,
    *,
    prefix: str = "homeassistant",
    model: str | None = None,
) -> list[Message]:
    """The retained config messages (topic, JSON payload) of every entity of this device:
    CPU %, CPU temperature, memory used, and per pipeline fps, invoke p95 and last result.
    `model` is the hardware (e.g. the Pi model) shown in HA's device page."""
    node = _slug(device_id)
    device = {
        "identifiers": [f"edgeagent_{node}"],
        "name": device_id,
        "model": model or "edgeagent",
        "sw_version": version,
        "manufacturer": _MANUFACTURER,
    }
    common: dict[str, Any] = {
        "availability": [
            {
                "topic": topics.status,
                "value_template": "{{ value_json.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "device": device,
        "origin": {"name": "edgeagent", "sw_version": version},
    }
    measurement = {"state_topic": topics.telemetry, "state_class": "measurement"}
    entities: list[tuple[str, dict[str, Any]]] = [
        (
            "cpu",
            {
                **measurement,
                "name": "CPU",
                "value_template": "{{ value_json.system.cpu_percent }}",
                "unit_of_measurement": "%",
                "icon": "mdi:cpu-64-bit",
            },
        ),
        (
            "temperature",
            {
                **measurement,
                "name": "CPU temperature",
                "device_class": "temperature",
                "value_template": "{{ value_json.system.cpu_temp_c }}",
                "unit_of_measurement": "°C",
            },
        ),
        (
            "memory",
            {
                **measurement,
                "name": "Memory used",
                "value_template": "{{ value_json.system.mem_used_percent }}",
                "unit_of_measurement": "%",
                "icon": "mdi:memory",
            },
        ),
    ]
    for pipeline in pipelines:
        key = _jinja_key(pipeline)
        slug = _slug(pipeline)
        entities += [
            (
                f"{slug}_fps",
                {
                    **measurement,
                    "name": f"{pipeline} fps",
                    "value_template": f"{{{{ value_json.pipelines[{key}].fps }}}}",
                    "unit_of_measurement": "fps",
                    "icon": "mdi:speedometer",
                },
            ),
            (
                f"{slug}_invoke_p95",
                {
                    **measurement,
                    "name": f"{pipeline} invoke p95",
                    "device_class": "duration",
                    "value_template": (
                        f"{{{{ value_json.pipelines[{key}].latency_ms.invoke.p95 }}}}"
                    ),
                    "unit_of_measurement": "ms",
                },
            ),
            (
                f"{slug}_result",
                {
                    # The state is the result's number; the result itself is attributes.
                    "name": f"{pipeline} last result",
                    "state_topic": topics.results(pipeline),
                    "value_template": "{{ value_json.seq }}",
                    "json_attributes_topic": topics.results(pipeline),
                    "icon": "mdi:eye",
                },
            ),
        ]
    messages: list[Message] = []
    for object_id, entity in entities:
        config = {**entity, "unique_id": f"edgeagent_{node}_{object_id}", **common}
        topic = discovery_config(prefix, node, object_id)
        messages.append((topic, json.dumps(config, separators=(",", ":")).encode()))
    return messages


def birth_topic(config: DiscoveryConfig) -> str:
    """Where HA publishes `online` when it starts: subscribe to it (QoS 1)."""
    return discovery_birth(config.prefix)


def is_birth_message(config: DiscoveryConfig, topic: str, payload: bytes) -> bool:
    """True for HA's birth message, which asks every device to announce again."""
    return topic == birth_topic(config) and payload.strip() == b"online"


class DiscoveryAnnouncer:
    """Publishes the discovery configs through `publish(topic, payload)` (the agent makes
    it retained, QoS 1) on `announce()` and on every HA birth message."""

    def __init__(
        self,
        config: DiscoveryConfig,
        messages: Callable[[], list[Message]],
        publish: Callable[[str, bytes], object],
    ) -> None:
        self._config = config
        self._messages = messages
        self._publish = publish
        self.announcements = 0

    def subscriptions(self) -> list[str]:
        return [birth_topic(self._config)] if self._config.enabled else []

    def announce(self) -> int:
        """Publishes every config message; returns how many (0 when disabled)."""
        if not self._config.enabled:
            return 0
        messages = self._messages()
        for topic, payload in messages:
            self._publish(topic, payload)
        self.announcements += 1
        log.info("announced %d Home Assistant entities", len(messages))
        return len(messages)

    def handle_message(self, topic: str, payload: bytes, properties: Mapping[str, Any]) -> bool:
        """Re-announces on HA's birth message; True if the message was one (consumed)."""
        if not self._config.enabled or topic != birth_topic(self._config):
            return False
        if is_birth_message(self._config, topic, payload):
            log.info("Home Assistant came online: announcing again")
            self.announce()
        return True
