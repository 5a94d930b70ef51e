"""Home Assistant MQTT discovery: the device appears in HA with its availability, its
telemetry (CPU %, temperature, memory used, per pipeline fps and invoke p95), the
latest result of each pipeline, and for a pipeline in `publish: {mode: events}` the counts
and occupancy per label and per zone, read from its retained summary `state/<pipeline>`.

Each entity is one retained config message on
`<ha prefix>/<sensor|binary_sensor>/<node_id>/<object_id>/config`
(`discovery_messages`). Every entity is available while the retained status says
`"state": "online"`. Announce on every connect (a broker restarted without persistence
forgot the retained configs) and whenever HA publishes its birth message, `online` on
`<ha prefix>/status` (`DiscoveryAnnouncer`), because a HA that restarted without the
retained configs asks again that way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from edgeagent.config import DiscoveryConfig
from edgeagent.events.settings import EventsPublish
from edgeagent.mqtt.topics import Topics, discovery_birth, discovery_config

log = logging.getLogger(__name__)

Message = tuple[str, bytes]
Entity = tuple[str, str, dict[str, Any]]  # component, object id, config
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
    events: Mapping[str, EventsPublish] | None = None,
) -> list[Message]:
    """The retained config messages (topic, JSON payload) of every entity of this device:
    CPU %, CPU temperature, memory used, per pipeline fps, invoke p95 and last result,
    and counts and occupancy of the pipelines in `events` (name -> its `publish:`).
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
    every: list[Entity] = [("sensor", object_id, entity) for object_id, entity in entities]
    for pipeline, settings in (events or {}).items():
        every += _occupancy_entities(topics, pipeline, settings)
    messages: list[Message] = []
    for component, object_id, entity in every:
        config = {**entity, "unique_id": f"edgeagent_{node}_{object_id}", **common}
        topic = discovery_config(prefix, node, object_id, component)
        messages.append((topic, json.dumps(config, separators=(",", ":")).encode()))
    return messages


def _occupancy_entities(topics: Topics, pipeline: str, settings: EventsPublish) -> list[Entity]:
    """Per label, per zone, and per zone and label: a count sensor and an occupancy
    binary sensor, read from the retained summary `{"counts": {label: n}, "zones": {zone:
    {label: n}}}` (a label absent from it counts 0). The labels are `settings.labels`,
    the zones' `labels` and the `filters`' keys."""
    state = topics.state(pipeline)
    slug = _slug(pipeline)
    labels = sorted(
        {*settings.labels, *settings.filters, *(x for z in settings.zones for x in z.labels or ())}
    )

    def pair(object_id: str, name: str, count: str, any_: str) -> list[Entity]:
        return [
            (
                "sensor",
                f"{object_id}_count",
                {
                    "name": f"{name} count",
                    "state_topic": state,
                    "state_class": "measurement",
                    "value_template": f"{{{{ {count} }}}}",
                    "icon": "mdi:counter",
                },
            ),
            (
                "binary_sensor",
                f"{object_id}_occupancy",
                {
                    "name": f"{name} occupancy",
                    "state_topic": state,
                    "device_class": "occupancy",
                    "value_template": f'{{{{ "ON" if {any_} else "OFF" }}}}',
                    "payload_on": "ON",
                    "payload_off": "OFF",
                },
            ),
        ]

    entities: list[Entity] = []
    for label in labels:
        count = f"value_json.counts.get({_jinja_key(label)}, 0)"
        entities += pair(
            f"{slug}_label_{_slug(label)}", f"{pipeline} {label}", count, f"{count} > 0"
        )
    for zone in settings.zones:
        # A zone of a pipeline that has no zones in its summary (not a detection) is empty.
        in_zone = f"value_json.zones.get({_jinja_key(zone.name)}, {{}})"
        entities += pair(
            f"{slug}_zone_{_slug(zone.name)}",
            f"{pipeline} {zone.name}",
            f"{in_zone}.values() | sum",
            in_zone,
        )
        for label in labels if zone.labels is None else sorted(zone.labels):
            count = f"{in_zone}.get({_jinja_key(label)}, 0)"
            entities += pair(
                f"{slug}_zone_{_slug(zone.name)}_label_{_slug(label)}",
                f"{pipeline} {zone.name} {label}",
                count,
                f"{count} > 0",
            )
    return entities


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
