"""A fleet that spans brokers, run for real: a site broker (deploy/mosquitto/edgeagent.conf
and its ACL, plus deploy/mosquitto/bridge.conf.example) bridged to a central broker (the
same files, plus deploy/mosquitto/central-site.acl.example), both real mosquittos on
loopback with TLS and passwords. The device (`edgeagent run`) connects to the site broker;
the fleet tools and the fleet's readers to the central one. The shipped files are used as
they are, rewritten only where they name an address, a file, a password or a site name.
"""

from __future__ import annotations

import inspect
import json
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import topic_matches_sub

from edgeagent.mqtt import topics as topics_module
from edgeagent.mqtt.topics import DEVICE_KINDS, FleetTopics, Topics
from tests.agent_config import (
    shapes_pipeline,
    status_or_none,
    status_where,
    write_agent_config,
)
from tests.broker import Mosquitto, MqttReader, Received, body, publish_once, result_seqs
from tests.delivery_e2e import BUNDLED, DELIVERY_STEPS, MODEL, SSD, keygen, tool
from tests.test_mosquitto_acl import DEPLOY, DeployedMosquitto
from tests.waiting import wait_until

pytestmark = pytest.mark.broker

BRIDGE_EXAMPLE = DEPLOY / "bridge.conf.example"
CENTRAL_ACL_EXAMPLE = DEPLOY / "central-site.acl.example"
SITE = "a"  # replaces CHANGE in the examples: connection edgeagent-site-a, user site-a
DEVICE = "pi-site"
ROOT = f"edgeagent/{DEVICE}"
RESULTS = f"{ROOT}/results/shapes"
CENTRAL_USERS = {f"site-{SITE}": "secret-site", "fleet": "secret-fleet"}
SITE_USERS = {DEVICE: "secret-device"}

# --- the example's topic lines against edgeagent/mqtt/topics.py ---------------------------


@dataclass(frozen=True)
class BridgeTopic:
    pattern: str
    direction: str
    qos: int


def bridge_topics(text: str) -> list[BridgeTopic]:
    """The `topic PATTERN DIRECTION QOS` lines of a mosquitto bridge configuration."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] == "topic":
            assert len(words) == 4, f"a topic line without prefixes: {line!r}"
            found.append(BridgeTopic(words[1], words[2], int(words[3])))
    return found


# What each public member of Topics and FleetTopics is. A member not listed here is new:
# decide whether it is a topic that must cross a bridge, and which way.
DEVICE_TO_FLEET = {"status", "results", "tracks", "state", "snapshot", "events", "telemetry"}
DEVICE_TO_FLEET |= {"reply", "reported"}
FLEET_TO_DEVICE = {"cmd", "desired", "group_desired", "group_cmd", "model_manifest"}
FLEET_TO_DEVICE |= {"model_chunk"}
NOT_A_TOPIC = {
    "fleet",
    "prefix",
    "device_id",
    "device_root",
    "device_filter",
    "every_device",
    "cmd_filter",
    "group_cmd_filter",
    "model_chunk_pattern",
    "cmd_name",
    "result_pipeline",
    "parse_device",
    "parse_group",
    "parse_model",
    "is_model_topic",
}
MODULE_TOPICS = {"discovery_config": "out", "discovery_birth": "in"}
SAMPLE_ARGS: dict[str, Any] = {
    "pipeline": "shapes",
    "track_id": "18f3a9c2b01-4",
    "name": "ping",
    "group": "kitchen",
    "version": "1.0.0",
    "index": 3,
    "device_id": "pi-1",
    "ha_prefix": "homeassistant",
    "node": "pi-1",
    "object_id": "shapes_result",
}


def _call(member: Any) -> str:
    if not callable(member):
        return str(member)
    params = inspect.signature(member).parameters
    topic: str = member(**{name: SAMPLE_ARGS[name] for name in params if name in SAMPLE_ARGS})
    return topic


def sample_topics() -> dict[str, str]:
    """One sample topic of every topic `edgeagent/mqtt/topics.py` builds, and its direction
    across a bridge (`out`: device to fleet, `in`: fleet to device)."""
    device, fleet = Topics("edgeagent", "pi-1"), FleetTopics("edgeagent")
    members = {
        name
        for cls in (Topics, FleetTopics)
        for name in dir(cls)
        if not name.startswith("_") and name not in ("count", "index")
    }
    unknown = members - DEVICE_TO_FLEET - FLEET_TO_DEVICE - NOT_A_TOPIC
    assert not unknown, (
        f"edgeagent/mqtt/topics.py has new members {sorted(unknown)}: if they are topics, "
        "carry them in deploy/mosquitto/bridge.conf.example (and central-site.acl.example) "
        "and list them here"
    )
    samples = {}
    for name in sorted(DEVICE_TO_FLEET | FLEET_TO_DEVICE):
        owner = device if hasattr(device, name) else fleet
        direction = "out" if name in DEVICE_TO_FLEET else "in"
        samples[_call(getattr(owner, name))] = direction
    functions = {
        name
        for name, value in vars(topics_module).items()
        if inspect.isfunction(value)
        and value.__module__ == topics_module.__name__
        and not name.startswith("_")
    }
    assert functions == set(MODULE_TOPICS), f"new topic functions in topics.py: {functions}"
    for name, direction in MODULE_TOPICS.items():
        samples[_call(getattr(topics_module, name))] = direction
    # A command's MQTT 5 response topic below the device's reply topic, and the snapshot
    # a command publishes below it.
    samples["edgeagent/pi-1/reply/3f2a/snapshot"] = "out"
    parsed = [fleet.parse_device(topic) for topic in samples]
    kinds = {topic.kind for topic in parsed if topic is not None}
    assert kinds == set(DEVICE_KINDS), f"kinds without a sample: {set(DEVICE_KINDS) - kinds}"
    return samples


def test_the_example_bridge_carries_every_topic_one_way_at_qos_1() -> None:
    lines = bridge_topics(BRIDGE_EXAMPLE.read_text(encoding="utf-8"))
    samples = sample_topics()
    for topic, direction in samples.items():
        matching = [line for line in lines if topic_matches_sub(line.pattern, topic)]
        assert matching, f"{topic} ({direction}) does not cross the example bridge"
        # One direction only, or a message could loop between the brokers.
        assert {line.direction for line in matching} == {direction}, (topic, matching)
        assert {line.qos for line in matching} == {1}, (topic, matching)
    for line in lines:
        assert any(topic_matches_sub(line.pattern, topic) for topic in samples), (
            f"{line.pattern} carries no topic of the protocol"
        )


def test_the_central_acl_example_lets_the_bridge_carry_exactly_those_topics() -> None:
    lines = bridge_topics(BRIDGE_EXAMPLE.read_text(encoding="utf-8"))
    acl = [
        line.split()[1:]
        for line in CENTRAL_ACL_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line.startswith("topic ")
    ]
    notification = next(
        line.split()[1]
        for line in BRIDGE_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line.startswith("notification_topic ")
    )
    writes = {topic for access, topic in acl if access == "write"}
    reads = {topic for access, topic in acl if access == "read"}
    assert writes == {line.pattern for line in lines if line.direction == "out"} | {notification}
    assert reads == {line.pattern for line in lines if line.direction == "in"}


# --- the two brokers ----------------------------------------------------------------------


class CentralBroker(DeployedMosquitto):
    """deploy/mosquitto/edgeagent.conf with edgeagent.acl plus the site's lines from
    central-site.acl.example."""

    def _config_text(self) -> str:
        acl = self.workdir / "central.acl"
        site_lines = CENTRAL_ACL_EXAMPLE.read_text(encoding="utf-8").replace("CHANGE", SITE)
        acl.write_text((DEPLOY / "edgeagent.acl").read_text(encoding="utf-8") + site_lines)
        return (
            super()
            ._config_text()
            .replace(f"acl_file {DEPLOY / 'edgeagent.acl'}", f"acl_file {acl}")
        )


class SiteBroker(DeployedMosquitto):
    """deploy/mosquitto/edgeagent.conf and edgeagent.acl, plus bridge.conf.example pointed
    at `central`."""

    def __init__(self, workdir: Path, *, central: Mosquitto, **options: Any) -> None:
        super().__init__(workdir, **options)
        self.central = central
        self.queue_limit: int | None = None  # replaces max_queued_messages at the next start

    def _config_text(self) -> str:
        central = self.central
        assert central.tls is not None
        rewrite = {
            "address": f"address {central.host}:{central.port}",
            "bridge_cafile": f"bridge_cafile {central.tls.ca_file}",
            "remote_password": f"remote_password {CENTRAL_USERS[f'site-{SITE}']}",
            # The shipped back-off (2 s growing to 30 s) would only make the test wait.
            "restart_timeout": "restart_timeout 1",
        }
        if self.queue_limit is not None:
            rewrite["max_queued_messages"] = f"max_queued_messages {self.queue_limit}"
        seen, lines = set(), []
        for line in BRIDGE_EXAMPLE.read_text(encoding="utf-8").splitlines():
            key = line.split(" ", 1)[0]
            if key in rewrite:
                seen.add(key)
            lines.append(rewrite.get(key, line).replace("CHANGE", SITE))
        assert seen == set(rewrite), f"the bridge example lacks {set(rewrite) - seen}"
        bridge = "\n".join(lines) + "\n"
        assert "CHANGE" not in bridge
        return super()._config_text() + bridge


@dataclass
class Fleet:
    central: CentralBroker
    site: SiteBroker
    tmp_path: Path

    def fleet_args(self) -> list[str]:
        """The fleet tools' options for the central broker, as the `fleet` user."""
        assert self.central.tls is not None
        password = self.tmp_path / "fleet.secret"
        password.write_text(CENTRAL_USERS["fleet"] + "\n", encoding="utf-8")
        return [
            "--host", self.central.host, "--port", str(self.central.port),
            "--username", "fleet", "--password-file", str(password),
            "--tls-ca", str(self.central.tls.ca_file),
        ]  # fmt: skip

    def central_reader(self, topic_filter: str, session: str | None = None) -> MqttReader:
        return MqttReader(self.central, topic_filter, username="fleet", session=session)

    def agent_config(self, *, fps: int, **overrides: Any) -> Path:
        """The device on the site broker: TLS, its own user, the `shapes` pipeline."""
        assert self.site.tls is not None
        password = self.tmp_path / "device.secret"
        password.write_text(SITE_USERS[DEVICE] + "\n", encoding="utf-8")
        return write_agent_config(
            self.tmp_path,
            self.site,
            device=DEVICE,
            pipelines=[shapes_pipeline(MODEL, fps=fps)],
            mqtt={
                "username": DEVICE,
                "password_file": str(password),
                "tls": {"ca_file": str(self.site.tls.ca_file)},
                "reconnect_max_s": 1,
            },
            **overrides,
        )


@pytest.fixture
def bridged(mosquitto_binary: str, tmp_path: Path) -> Iterator[Fleet]:
    # Persistence on: sessions and queues survive a stop.
    central = CentralBroker(
        tmp_path / "central",
        binary=mosquitto_binary,
        users=CENTRAL_USERS,
        tls=True,
        persistence=True,
    )
    site = SiteBroker(
        tmp_path / "site",
        central=central,
        binary=mosquitto_binary,
        users=SITE_USERS,
        tls=True,
        persistence=True,
    )
    try:
        central.start()
        site.start()
        yield Fleet(central, site, tmp_path)
    finally:
        site.stop()
        central.stop()


def bridge_up(reader: MqttReader) -> Received:
    """The bridge's notification that it is connected, as `reader` (on central) sees it."""
    return reader.wait_for(lambda m: m.payload == b"1", timeout=60)


@pytest.fixture
def readers() -> Iterator[list[MqttReader]]:
    made: list[MqttReader] = []
    yield made
    for reader in made:
        reader.close()


def _terminal(reader: MqttReader, request_id: str) -> Received:
    def done(message: Received) -> bool:
        try:
            reply = body(message)
        except ValueError:
            return False
        return reply.get("id") == request_id and reply.get("stage") in ("succeeded", "failed")

    return reader.wait_for(done, timeout=60)


# --- through the bridge ---------------------------------------------------------------------


def test_results_commands_a_signed_model_and_the_last_will_cross_the_bridge(
    bridged: Fleet,
    readers: list[MqttReader],
    agent_process: Callable[[Path], subprocess.Popen[str]],
) -> None:
    key, public = keygen(bridged.tmp_path / "keys")
    notifications = bridged.central_reader(f"bridges/edgeagent-site-{SITE}/state")
    readers.append(notifications)
    bridge_up(notifications)
    central = bridged.central_reader(f"{ROOT}/#")
    readers.append(central)
    config = bridged.agent_config(
        fps=20,
        delivery={
            "trusted_keys": [str(public)],
            "probation_s": 3,
            "probation_min_results": 10,
            "chunk_timeout_s": 10,
            "latency_factor": 50,
        },
    )
    agent = agent_process(config)

    # 1. Results published on the site arrive on central, in order.
    central.wait_for_count(10, lambda m: m.topic == f"{ROOT}/results/shapes", timeout=60)
    seqs = [body(m)["seq"] for m in central.messages if m.topic == RESULTS]
    assert seqs[:10] == list(range(10))

    # 2. A command from central, MQTT 5 response topic and correlation data: the reply
    # comes back to central on that topic with that correlation data.
    request_id = uuid.uuid4().hex
    properties = {
        "ResponseTopic": f"{ROOT}/reply/{request_id}",
        "CorrelationData": request_id.encode(),
    }
    payload = json.dumps({"id": request_id, "args": {}}).encode()
    publish_once(
        bridged.central, f"{ROOT}/cmd/ping", payload, properties=properties, username="fleet"
    )
    reply = _terminal(central, request_id)
    assert reply.topic == f"{ROOT}/reply/{request_id}"
    assert reply.properties.get("CorrelationData") == request_id.encode()
    assert body(reply)["stage"] == "succeeded"
    assert body(reply)["result"]["pong"] is True
    # Without a response topic the reply goes to the device's reply topic.
    plain_id = uuid.uuid4().hex
    publish_once(
        bridged.central, f"{ROOT}/cmd/ping", json.dumps({"id": plain_id}).encode(), username="fleet"
    )
    assert _terminal(central, plain_id).topic == f"{ROOT}/reply"

    # 3. A signed model published and deployed on central reaches the device through the
    # bridge and is activated; central sees every step and the retained reported state.
    fleet = bridged.fleet_args()
    published = tool(
        "model", "publish", str(SSD), "--name", MODEL, "--version", "2.0.0",
        "--manifest", str(BUNDLED / "shapes-detector-ssd.yaml"), "--key", str(key),
        "--chunk-size", "16384", *fleet,
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    deployed = tool(
        "fleet", "deploy", "--device", DEVICE, "--pipeline", "shapes",
        "--model", MODEL, "--version", "2.0.0", *fleet,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr
    watched = tool(
        "fleet", "watch", "--device", DEVICE, "--until-converged", "--timeout", "120", *fleet,
        timeout=180,
    )  # fmt: skip
    assert watched.returncode == 0, watched.stdout + watched.stderr
    steps = [
        body(m)["type"]
        for m in central.messages
        if m.topic == f"{ROOT}/events"
        and body(m).get("version") == "2.0.0"
        and body(m)["type"] != "download-progress"
    ]
    assert steps[: len(DELIVERY_STEPS) - 1] == list(DELIVERY_STEPS[:-1])
    newcomer = bridged.central_reader(f"{ROOT}/reported")
    readers.append(newcomer)
    report = body(newcomer.wait_for(lambda m: m.retain, timeout=30))["pipelines"]["shapes"]
    assert (report["model"], report["version"]) == (MODEL, "2.0.0")
    assert report["state"] in ("probation", "running")

    # 4. The device dies: its last will (offline), published by the site broker, reaches
    # central and stays there retained.
    agent.send_signal(signal.SIGKILL)
    agent.wait(30)
    central.wait_for(
        lambda m: m.topic == f"{ROOT}/status" and body(m)["state"] == "offline", timeout=60
    )
    late = bridged.central_reader(f"{ROOT}/status")
    readers.append(late)
    assert body(late.wait_for(lambda m: m.retain, timeout=30))["state"] == "offline"


def _status_when(
    tmp_path: Path, check: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    """The agent's status (over its control socket) once `check` holds for it."""
    found = wait_until(
        lambda: status_where(tmp_path, check),
        timeout,
        lambda: f"{what}: {status_or_none(tmp_path)}",
    )
    assert found is not None
    return found


def _produced(status: dict[str, Any]) -> int:
    return sum(int(p["results_out"]) for p in status["pipelines"])


def _agent_seen_on_central(
    bridged: Fleet,
    readers: list[MqttReader],
    agent_process: Callable[[Path], subprocess.Popen[str]],
    results: int,
) -> tuple[subprocess.Popen[str], MqttReader]:
    """The agent at 20 fps on the site broker, once `results` of its results reached a
    reader on central (a dashboard whose session central keeps while either side is away)."""
    notifications = bridged.central_reader(f"bridges/edgeagent-site-{SITE}/state")
    readers.append(notifications)
    bridge_up(notifications)
    central = bridged.central_reader(f"{ROOT}/results/#", session="central-dashboard")
    readers.append(central)
    agent = agent_process(bridged.agent_config(fps=20))
    central.wait_for_count(results, timeout=60)
    return agent, central


def _central_away_for_100_results(bridged: Fleet) -> dict[str, Any]:
    """Stops central and returns the agent's status once it produced 100 more results,
    still connected to its own (site) broker."""
    bridged.central.stop()
    before = _status_when(bridged.tmp_path, lambda _s: True, 30, "the agent's status")
    during = _status_when(
        bridged.tmp_path,
        lambda s: _produced(s) >= _produced(before) + 100,
        90,
        "100 results during central's outage",
    )
    assert during["mqtt"]["connected"], "the device never lost its own broker"
    return during


def test_outages_of_central_and_of_the_site_broker_lose_no_result(
    bridged: Fleet,
    readers: list[MqttReader],
    agent_process: Callable[[Path], subprocess.Popen[str]],
) -> None:
    tmp_path = bridged.tmp_path
    agent, central = _agent_seen_on_central(bridged, readers, agent_process, 20)

    # 1. Central goes away. The device stays connected to the site broker, which
    # acknowledges every result: they wait in the bridge's session on the site broker.
    during = _central_away_for_100_results(bridged)
    assert during["outbox"]["depth"] < 50, "the site broker took the results, not the outbox"
    bridged.central.start()
    wait_until(
        lambda: (
            max(map(len, result_seqs(central.messages, RESULTS).values()), default=0)
            >= _produced(during)
        ),
        120,
        lambda: f"the site's queue to reach central: {len(central.messages)} results",
    )

    # 2. The site broker goes away (the bridge with it): now the device's outbox holds the
    # results until the site broker is back.
    bridged.site.stop()
    stored = _status_when(
        tmp_path,
        lambda s: not s["mqtt"]["connected"] and s["outbox"]["depth"] > 100,
        90,
        "a backlog of 100 results in the outbox",
    )
    bridged.site.start()
    wait_until(
        lambda: (
            max(map(len, result_seqs(central.messages, RESULTS).values()), default=0)
            >= _produced(stored)
        ),
        120,
        lambda: f"the outbox's backlog to reach central: {len(central.messages)} results",
    )
    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=60)
    assert agent.returncode == 0, stderr

    runs = result_seqs(central.messages, RESULTS)
    assert len(runs) == 1, f"one run of the agent: {list(runs)}"
    seqs = sorted(next(iter(runs.values())))
    assert len(seqs) >= _produced(stored) > _produced(during) + 100
    assert seqs == list(range(len(seqs))), "no gap in seq: no result lost on either hop"


def test_the_retained_repository_is_copied_to_the_site_cleared_from_central_and_resent(
    bridged: Fleet, readers: list[MqttReader]
) -> None:
    notifications = bridged.central_reader(f"bridges/edgeagent-site-{SITE}/state")
    readers.append(notifications)
    bridge_up(notifications)
    chunks = [f"edgeagent/models/{MODEL}/9.0.0/chunk/{i}" for i in range(3)]
    for topic in chunks:
        publish_once(bridged.central, topic, topic.encode(), retain=True, username="fleet")

    def device_view() -> MqttReader:
        """What a device that subscribes now finds retained on the site broker."""
        reader = MqttReader(
            bridged.site, f"edgeagent/models/{MODEL}/#", username=DEVICE, session=None
        )
        readers.append(reader)
        return reader

    first = device_view()
    first.wait_for_count(3, lambda m: m.retain and m.payload != b"", timeout=30)

    # A bridge reconnect (central restarted) sends every retained message again: the
    # device still subscribed receives the three chunks a second time.
    bridged.central.stop()
    bridged.central.start()
    first.wait_for_count(6, lambda m: m.payload != b"", timeout=60)

    # Clearing a chunk on central (an empty retained message) clears the site's copy.
    publish_once(bridged.central, chunks[0], b"", retain=True, username="fleet")
    first.wait_for(lambda m: m.topic == chunks[0] and m.payload == b"", timeout=30)
    later = device_view()
    retained = later.wait_for_count(2, lambda m: m.retain, timeout=30)
    assert sorted(m.topic for m in retained) == chunks[1:]
    assert chunks[0] not in {m.topic for m in later.messages}


def test_during_a_site_outage_central_keeps_retained_state_not_commands(
    bridged: Fleet, readers: list[MqttReader]
) -> None:
    """With `bridge_protocol_version mqttv50`, mosquitto's bridge sends no session expiry,
    so central ends the bridge's session when the link drops (docs/deploy.md): a desired
    state deployed meanwhile still arrives (retained, sent again when the bridge subscribes
    again), a command sent meanwhile does not, as a command to an offline device does not."""
    notifications = bridged.central_reader(f"bridges/edgeagent-site-{SITE}/state")
    readers.append(notifications)
    bridge_up(notifications)
    # The device's session on the site broker survives the site broker's restart, so
    # whatever the bridge brings in after it is queued for the device.
    device = MqttReader(bridged.site, f"{ROOT}/#", username=DEVICE, session="device-session")
    readers.append(device)
    bridged.site.stop()
    desired = json.dumps({"pipelines": {"shapes": {"model": MODEL, "version": "2.0.0"}}})
    publish_once(
        bridged.central, f"{ROOT}/desired", desired.encode(), retain=True, username="fleet"
    )
    publish_once(
        bridged.central, f"{ROOT}/cmd/ping", b'{"id": "during-the-outage"}', username="fleet"
    )

    bridged.site.start()
    arrived = device.wait_for(lambda m: m.topic == f"{ROOT}/desired", timeout=60)
    assert json.loads(arrived.payload) == json.loads(desired)
    # A command sent now arrives; one queued by central would have arrived before it.
    publish_once(
        bridged.central, f"{ROOT}/cmd/ping", b'{"id": "after-the-outage"}', username="fleet"
    )
    device.wait_for(lambda m: m.payload == b'{"id": "after-the-outage"}', timeout=60)
    commands = [m.payload for m in device.messages if m.topic == f"{ROOT}/cmd/ping"]
    assert commands == [b'{"id": "after-the-outage"}']


def test_a_bridge_queue_too_small_for_the_outage_loses_results_no_outbox_can_see(
    bridged: Fleet,
    readers: list[MqttReader],
    agent_process: Callable[[Path], subprocess.Popen[str]],
) -> None:
    """Why docs/deploy.md says to size max_queued_messages for the outage: the site broker
    acknowledged every result, so the devices' outboxes hold none of what it drops."""
    bridged.site.queue_limit = 30
    bridged.site.stop()
    bridged.site.start()
    agent, central = _agent_seen_on_central(bridged, readers, agent_process, 10)

    during = _central_away_for_100_results(bridged)
    assert during["outbox"]["depth"] < 30, "the site broker acknowledged the results"
    bridged.central.start()
    # Results produced after the outage arrive again...
    wait_until(
        lambda: (
            max(max(seqs) for seqs in result_seqs(central.messages, RESULTS).values())
            >= _produced(during)
        ),
        120,
        "results from after the outage",
    )
    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=60)
    assert agent.returncode == 0, stderr
    # ...but most of those produced during it are gone for good.
    (seqs,) = result_seqs(central.messages, RESULTS).values()
    missing = set(range(max(seqs))) - seqs
    assert len(missing) >= 50, f"{len(missing)} results lost"
