"""Home Assistant discovery: the config messages and what their templates point at, and
the re-announce on HA's birth message through a real broker."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from edgeagent.config import DiscoveryConfig
from edgeagent.events.policy import make_policy
from edgeagent.events.settings import EventsPublish
from edgeagent.hal.system import read_system_facts
from edgeagent.mqtt import MqttLink, Topics
from edgeagent.pipeline import PipelineStats
from edgeagent.telemetry.homeassistant import (
    DiscoveryAnnouncer,
    birth_topic,
    discovery_messages,
    is_birth_message,
)
from edgeagent.telemetry.report import (
    LatencyWindow,
    MqttSnapshot,
    PipelineSnapshot,
    build_telemetry,
)
from tests.agent_config import shapes_pipeline, write_agent_config
from tests.broker import Mosquitto, MqttReader, publish_once

DEVICE = "pi-ha-01"
TOPICS = Topics("edgeagent", DEVICE)
PIPELINES = ["shapes", "door.cam", "door_cam"]
Reader = Callable[..., MqttReader]
_CONFIG_TOPIC = re.compile(r"homeassistant/(?:binary_)?sensor/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config")
# `{{ value_json.a.b["c"].d }}`: the only template shape the configs use.
_PATH_TEMPLATE = re.compile(r"\{\{ value_json((?:\.[a-z_0-9]+|\[\"[^\"]+\"\])+) \}\}")


def messages() -> list[tuple[str, dict[str, Any]]]:
    return [
        (topic, json.loads(payload))
        for topic, payload in discovery_messages(
            TOPICS, DEVICE, PIPELINES, "0.1.0", model="Raspberry Pi 5 Model B Rev 1.0"
        )
    ]


def evaluate(template: str, value: Any) -> Any:
    """What HA would render for our path templates (jinja2 is not installed here)."""
    match = _PATH_TEMPLATE.fullmatch(template)
    assert match, f"unexpected template shape: {template}"
    for key in re.findall(r"\.([a-z_0-9]+)|\[\"([^\"]+)\"\]", match[1]):
        value = value[key[0] or key[1]]
    return value


def test_every_config_is_a_valid_sensor_of_this_device() -> None:
    configs = messages()

    assert len(configs) == 3 + 3 * len(PIPELINES)
    assert len({c["unique_id"] for _, c in configs}) == len(configs)
    assert len({t for t, _ in configs}) == len(configs)
    for topic, config in configs:
        assert _CONFIG_TOPIC.fullmatch(topic), topic
        assert {"name", "unique_id", "state_topic", "value_template", "device"} <= set(config)
        assert config["device"] == {
            "identifiers": ["edgeagent_pi-ha-01"],
            "name": DEVICE,
            "model": "Raspberry Pi 5 Model B Rev 1.0",
            "sw_version": "0.1.0",
            "manufacturer": "edgeagent",
        }
        assert config["availability"] == [
            {
                "topic": "edgeagent/pi-ha-01/status",
                "value_template": "{{ value_json.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ]


def test_telemetry_sensors_point_at_real_figures() -> None:
    window = LatencyWindow()
    window.add({"capture": 1.0, "preprocess": 1.0, "invoke": 4.5, "postprocess": 0.2})
    telemetry = build_telemetry(
        DEVICE,
        system=read_system_facts(),
        pipelines=[
            PipelineSnapshot.capture(name, PipelineStats(results_out=3), window)
            for name in PIPELINES
        ],
        mqtt=MqttSnapshot(connected=True, reconnects=0, outbox_depth=0),
        version="0.1.0",
    )
    telemetry["system"]["cpu_temp_c"] = 48.5  # containers often have no thermal zone
    telemetry["system"]["cpu_percent"] = 12.5
    # HA reads the payload as JSON, as any subscriber would.
    decoded = json.loads(json.dumps(telemetry))

    by_object = {
        topic.split("/")[3]: config
        for topic, config in messages()
        if config["state_topic"] == TOPICS.telemetry
    }
    values = {k: evaluate(c["value_template"], decoded) for k, c in by_object.items()}

    assert values["cpu"] == 12.5
    assert values["temperature"] == 48.5
    assert by_object["temperature"]["device_class"] == "temperature"
    assert 0 < values["memory"] < 100
    assert values["shapes_fps"] == decoded["pipelines"]["shapes"]["fps"]
    assert values["shapes_invoke_p95"] == 4.5
    assert by_object["shapes_invoke_p95"]["unit_of_measurement"] == "ms"
    # "door.cam" and "door_cam" stay two entities
    dotted = [k for k in values if k.startswith("door_cam_") and k.endswith("_invoke_p95")]
    assert len(dotted) == 2
    assert all(values[k] == 4.5 for k in dotted)


def test_each_pipeline_has_a_last_result_sensor_with_the_result_as_attributes() -> None:
    results = {
        config["name"]: config
        for _, config in messages()
        if config["state_topic"].startswith("edgeagent/pi-ha-01/results/")
    }

    assert set(results) == {f"{p} last result" for p in PIPELINES}
    for pipeline in PIPELINES:
        config = results[f"{pipeline} last result"]
        assert config["state_topic"] == TOPICS.results(pipeline)
        assert config["json_attributes_topic"] == TOPICS.results(pipeline)
        assert evaluate(config["value_template"], {"seq": 41, "result": {}}) == 41


def test_config_and_birth_message() -> None:
    config = DiscoveryConfig(enabled=True)
    assert not DiscoveryConfig().enabled
    assert birth_topic(config) == "homeassistant/status"
    assert is_birth_message(config, "homeassistant/status", b"online")
    assert is_birth_message(config, "homeassistant/status", b"online\n")
    assert not is_birth_message(config, "homeassistant/status", b"offline")
    assert not is_birth_message(config, "ha/status", b"online")
    assert birth_topic(DiscoveryConfig(prefix="ha/")) == "ha/status"
    with pytest.raises(ValidationError):
        DiscoveryConfig(prefix="ha/#")


def test_a_disabled_announcer_does_nothing() -> None:
    sent: list[str] = []
    announcer = DiscoveryAnnouncer(
        DiscoveryConfig(), lambda: [("t", b"{}")], lambda t, _p: sent.append(t)
    )
    assert announcer.subscriptions() == []
    assert announcer.announce() == 0
    assert not announcer.handle_message("homeassistant/status", b"online", {})
    assert sent == []


def test_the_announcer_answers_only_ha_coming_online() -> None:
    sent: list[tuple[str, bytes]] = []
    announcer = DiscoveryAnnouncer(
        DiscoveryConfig(enabled=True, prefix="ha"),
        lambda: discovery_messages(TOPICS, DEVICE, ["shapes"], "0.1.0", prefix="ha"),
        lambda t, p: sent.append((t, p)),
    )
    assert announcer.subscriptions() == ["ha/status"]

    assert announcer.handle_message("ha/status", b"offline", {})  # consumed, no announce
    assert sent == []
    assert not announcer.handle_message(TOPICS.cmd("ping"), b"online", {})  # not HA's
    assert sent == []
    assert announcer.handle_message("ha/status", b"online", {"retain": True})

    assert len(sent) == 6
    assert all(t.startswith("ha/sensor/pi-ha-01/") for t, _ in sent)
    assert announcer.announcements == 1


def test_announced_on_connect_and_again_on_ha_birth_through_a_real_broker(
    mosquitto: Mosquitto, mqtt_reader: Reader
) -> None:
    config = DiscoveryConfig(enabled=True)
    holder: dict[str, Any] = {}
    announced = threading.Condition()

    def publish(topic: str, payload: bytes) -> None:
        holder["link"].publish(topic, payload, qos=1, retain=True)

    def on_connected() -> None:  # what the agent does on every (re)connect
        announcer.announce()
        with announced:
            announced.notify_all()

    def on_message(topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        if announcer.handle_message(topic, payload, properties):
            with announced:
                announced.notify_all()

    announcer = DiscoveryAnnouncer(
        config, lambda: discovery_messages(TOPICS, DEVICE, ["shapes"], "0.1.0"), publish
    )
    count = len(discovery_messages(TOPICS, DEVICE, ["shapes"], "0.1.0"))
    reader = mqtt_reader(mosquitto, "homeassistant/sensor/#")
    link = MqttLink(
        mosquitto.mqtt_config(),
        DEVICE,
        will_payload=b"{}",
        on_connected=on_connected,
        on_message=on_message,
    )
    holder["link"] = link
    for topic_filter in announcer.subscriptions():
        link.subscribe(topic_filter, qos=1)
    link.start()
    try:
        reader.wait_for_count(count)
        publish_once(mosquitto, "homeassistant/status", b"offline")  # HA going away: ignored
        # Repeat the birth until the link's subscription is surely live.
        for _ in range(40):
            publish_once(mosquitto, "homeassistant/status", b"online")
            with announced:
                if announced.wait_for(lambda: announcer.announcements >= 2, timeout=0.25):
                    break
        again = reader.wait_for_count(2 * count)
    finally:
        link.stop()

    assert announcer.announcements >= 2
    assert [m.topic for m in again[count:]] == [m.topic for m in again[:count]]
    late = mqtt_reader(mosquitto, "homeassistant/sensor/#")  # a HA that starts later
    retained = late.wait_for_count(count)
    assert all(m.retain for m in retained)
    assert {m.topic for m in retained} == {m.topic for m in again}


# --- counts and occupancy of `events` pipelines ----------------------------------------

EVENTS = TypeAdapter(EventsPublish).validate_python(
    {
        "mode": "events",
        "tracking": {"min_hits": 1, "max_misses": 2},
        "summary_s": 0.1,
        "labels": ["square"],
        "filters": {"triangle": {"min_score": 0.5}},
        "zones": [
            {"name": "left", "polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]},
            {
                "name": "door.in",
                "polygon": [[0.5, 0], [1, 0], [1, 1], [0.5, 1]],
                "labels": ["circle"],
            },
        ],
    }
)


class _Json(dict[str, Any]):
    """A JSON object whose keys also read as attributes, as Jinja's `value_json.x` does."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def render(template: str, payload: bytes) -> Any:
    """What HA renders for the occupancy templates (jinja2 is not installed here): each is
    one Python expression over `value_json`, optionally piped into `sum`."""
    match = re.fullmatch(r"\{\{ (.+?)( \| sum)? \}\}", template)
    assert match, f"unexpected template shape: {template}"
    value_json = json.loads(payload, object_hook=_Json)
    value = eval(match[1], {"__builtins__": {}}, {"value_json": value_json})  # noqa: S307
    return sum(value) if match[2] else value


def occupancy_configs(pipeline: str = "shapes") -> dict[str, tuple[str, dict[str, Any]]]:
    """object id -> (component, config) of the count and occupancy entities."""
    out = {}
    for topic, payload in discovery_messages(
        TOPICS, DEVICE, [pipeline], "0.1.0", events={pipeline: EVENTS}
    ):
        _, component, _, object_id, _ = topic.split("/")
        config = json.loads(payload)
        if config["state_topic"] == TOPICS.state(pipeline):
            out[object_id] = (component, config)
    return out


def test_an_events_pipeline_has_counts_and_occupancy_per_label_and_zone() -> None:
    configs = occupancy_configs()

    labels = ["circle", "square", "triangle"]  # `labels`, the zones' and the `filters`' keys
    expected = {f"shapes_label_{x}" for x in labels}
    expected |= {"shapes_zone_left"} | {f"shapes_zone_left_label_{x}" for x in labels}
    expected |= {f"shapes_zone_{_door_slug()}", f"shapes_zone_{_door_slug()}_label_circle"}
    assert set(configs) == {f"{e}_{kind}" for e in expected for kind in ("count", "occupancy")}
    for object_id, (component, config) in configs.items():
        if object_id.endswith("_occupancy"):
            assert component == "binary_sensor"
            assert config["device_class"] == "occupancy"
            assert (config["payload_on"], config["payload_off"]) == ("ON", "OFF")
        else:
            assert component == "sensor"
            assert config["state_class"] == "measurement"
    assert len(discovery_messages(TOPICS, DEVICE, ["shapes"], "0.1.0")) == 6, "every: none"


def _door_slug() -> str:
    return next(
        o.removesuffix("_count")[len("shapes_zone_") :]
        for o in occupancy_configs()
        if o.startswith("shapes_zone_door") and o.endswith("_count") and "_label_" not in o
    )


def test_the_templates_read_the_summary_the_policy_publishes() -> None:
    sent: list[tuple[str, bytes]] = []
    policy = make_policy(
        "shapes", EVENTS, "detection", TOPICS, lambda t, p, _r: sent.append((t, p)), id_prefix="t"
    )
    frame = [
        {"label": "square", "score": 0.9, "box": [0.1, 0.1, 0.2, 0.2]},  # left
        {"label": "square", "score": 0.9, "box": [0.3, 0.5, 0.4, 0.6]},  # left
        {"label": "circle", "score": 0.9, "box": [0.7, 0.7, 0.8, 0.8]},  # door.in
        {"label": "triangle", "score": 0.9, "box": [0.6, 0.1, 0.7, 0.2]},  # door.in rejects it
    ]
    for i in range(3):
        policy.feed({"captured_at": 100.0 + i, "result": {"detections": frame}})
    state = [p for t, p in sent if t == TOPICS.state("shapes")][-1]
    assert json.loads(state)["counts"] == {"square": 2, "circle": 1, "triangle": 1}

    door = _door_slug()
    values = {o: render(c["value_template"], state) for o, (_, c) in occupancy_configs().items()}
    assert values == {
        "shapes_label_circle_count": 1,
        "shapes_label_circle_occupancy": "ON",
        "shapes_zone_left_label_circle_count": 0,
        "shapes_zone_left_label_circle_occupancy": "OFF",
        "shapes_label_square_count": 2,
        "shapes_label_square_occupancy": "ON",
        "shapes_label_triangle_count": 1,
        "shapes_label_triangle_occupancy": "ON",
        "shapes_zone_left_count": 2,
        "shapes_zone_left_occupancy": "ON",
        "shapes_zone_left_label_square_count": 2,
        "shapes_zone_left_label_square_occupancy": "ON",
        "shapes_zone_left_label_triangle_count": 0,
        "shapes_zone_left_label_triangle_occupancy": "OFF",
        f"shapes_zone_{door}_count": 1,
        f"shapes_zone_{door}_occupancy": "ON",
        f"shapes_zone_{door}_label_circle_count": 1,
        f"shapes_zone_{door}_label_circle_occupancy": "ON",
    }

    for i in range(3, 8):  # everyone leaves and ends
        policy.feed({"captured_at": 100.0 + i, "result": {"detections": []}})
    empty = [p for t, p in sent if t == TOPICS.state("shapes")][-1]
    for object_id, (_, config) in occupancy_configs().items():
        assert render(config["value_template"], empty) == (
            "OFF" if object_id.endswith("_occupancy") else 0
        )


def test_occupancy_entities_announced_by_the_daemon_read_its_retained_summary(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Reader,
    agent_process: Callable[..., subprocess.Popen[str]],
) -> None:
    pipeline = shapes_pipeline(width=320, height=240, fps=15)
    pipeline["publish"] = {
        "mode": "events",
        "tracking": {"min_hits": 2, "max_misses": 10},
        "summary_s": 0.5,
        "labels": ["circle", "square", "triangle"],
        "zones": [{"name": "all", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]]}],
    }
    config = write_agent_config(
        tmp_path, mosquitto, device=DEVICE, pipelines=[pipeline], homeassistant={"enabled": True}
    )
    reader = mqtt_reader(mosquitto, "homeassistant/#")
    agent_process(config)
    ids = [f"shapes_label_{x}" for x in ("circle", "square", "triangle")]
    ids += ["shapes_zone_all"] + [
        f"shapes_zone_all_label_{x}" for x in ("circle", "square", "triangle")
    ]
    wanted = {f"{i}_{k}" for i in ids for k in ("count", "occupancy")}

    def announced() -> dict[str, dict[str, Any]]:
        return {
            m.topic.split("/")[3]: json.loads(m.payload)
            for m in reader.messages
            if m.topic.split("/")[3] in wanted
        }

    reader.wait_for(lambda _m: set(announced()) == wanted, timeout=60)
    configs = announced()
    assert all(c["state_topic"] == TOPICS.state("shapes") for c in configs.values())
    states = mqtt_reader(mosquitto, TOPICS.state("shapes"))
    state = states.wait_for(lambda m: bool(json.loads(m.payload)["counts"]), timeout=60)

    summary = json.loads(state.payload)
    values = {o: render(c["value_template"], state.payload) for o, c in configs.items()}
    for label in ("circle", "square", "triangle"):
        n = summary["counts"].get(label, 0)
        assert values[f"shapes_label_{label}_count"] == n
        assert values[f"shapes_label_{label}_occupancy"] == ("ON" if n else "OFF")
        assert values[f"shapes_zone_all_label_{label}_count"] == summary["zones"]["all"].get(
            label, 0
        )
    assert values["shapes_zone_all_count"] == sum(summary["counts"].values()) >= 1
    assert values["shapes_zone_all_occupancy"] == "ON"
