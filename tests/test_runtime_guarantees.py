"""Runtime guarantees of the daemon (issue 8, part C), each against `edgeagent run` as a
real subprocess and a real mosquitto:

- `(run, pipeline, seq)` never names two different results: across `pipeline.restart`,
  a pipeline-changing `config.set` and its rollback, and the `restart` command;
- READY=1 means "the first result is safe": stored in the outbox even while the broker
  is away, or, with the outbox disabled, only once the broker acknowledged one;
- a TLS/plain mismatch is named in `edgeagent status`, with what to change.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeagent.control import ask
from tests.agent_config import shapes_pipeline, write_agent_config
from tests.broker import Dashboard, Mosquitto, MqttReader, free_port
from tests.notify_socket import Notification, NotifySocket

pytestmark = pytest.mark.broker

DEVICE = "rt"
ROOT = f"edgeagent/{DEVICE}"
RESULTS = f"{ROOT}/results/shapes"
AgentStarter = Callable[..., subprocess.Popen[str]]


def write_config(tmp_path: Path, broker: Mosquitto, **overrides: Any) -> Path:
    return write_agent_config(
        tmp_path,
        broker,
        device=DEVICE,
        pipelines=[shapes_pipeline(width=320, height=240, fps=20)],
        **overrides,
    )


def results(reader: MqttReader) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in reader.messages if m.topic == RESULTS]


def wait_more_results(reader: MqttReader, count: int, timeout: float = 60) -> None:
    """Waits until `count` more results than now have arrived."""
    have = len(results(reader))
    reader.wait_for_count(have + count, lambda m: m.topic == RESULTS, timeout=timeout)


def assert_keys_name_one_result(found: list[dict[str, Any]]) -> None:
    """A key may arrive twice (QoS 1 redelivery), but only ever with the same result."""
    by_key: dict[tuple[str, str, int], set[str]] = {}
    for result in found:
        key = (result["run"], result["pipeline"], result["seq"])
        by_key.setdefault(key, set()).add(json.dumps(result, sort_keys=True))
    clashes = {key: len(bodies) for key, bodies in by_key.items() if len(bodies) > 1}
    assert not clashes, f"{len(clashes)} keys carry two different results: {sorted(clashes)[:5]}"


def stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    return stderr


# --- (run, pipeline, seq) ------------------------------------------------------------


@dataclass(frozen=True)
class Producing:
    """The agent on `write_config`'s config, 20 results in, and the fleet's dashboard."""

    config: Path
    process: subprocess.Popen[str]
    reader: MqttReader  # of ROOT/results/#
    fleet: Dashboard


@pytest.fixture
def producing(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: AgentStarter,
    dashboard: Callable[..., Dashboard],
) -> Producing:
    reader = mqtt_reader(mosquitto, f"{ROOT}/results/#")
    config = write_config(tmp_path, mosquitto)
    process = agent_process(config)
    wait_more_results(reader, 20)
    return Producing(config, process, reader, dashboard(mosquitto, root=ROOT))


def assert_one_run_numbered_without_gaps(found: list[dict[str, Any]]) -> None:
    assert len({r["run"] for r in found}) == 1, "one agent process, one run"
    assert_keys_name_one_result(found)
    seqs = sorted({r["seq"] for r in found})
    assert seqs == list(range(len(seqs))), "numbers continue across restarts, without gaps"


def test_pipeline_restart_never_repeats_a_result_key(producing: Producing) -> None:
    reader = producing.reader
    for _ in range(2):
        restarted = producing.fleet.call("pipeline.restart", {"pipeline": "shapes"})
        assert restarted["stage"] == "succeeded", restarted
        wait_more_results(reader, 20)
    stop(producing.process)
    assert_one_run_numbered_without_gaps(results(reader))


def test_config_set_and_its_rollback_never_repeat_a_result_key(producing: Producing) -> None:
    reader, fleet = producing.reader, producing.fleet
    pipeline = yaml.safe_load(producing.config.read_text())["pipelines"][0]

    # A threshold change restarts the pipeline with its new configuration.
    lower = {**pipeline, "task": {"type": "detection", "threshold": 0.3}}
    changed = fleet.call("config.set", {"config": {"pipelines": [lower]}})
    assert changed["stage"] == "succeeded", changed
    assert "pipelines" in changed["result"]["changed"]
    wait_more_results(reader, 20)

    # A change whose pipeline cannot start (a sensor model on a camera) is rolled back:
    # the previous pipeline starts again.
    broken = {**pipeline, "model": "vibration-anomaly"}
    rolled_back = fleet.call("config.set", {"config": {"pipelines": [broken]}})
    assert rolled_back["stage"] == "failed", rolled_back
    assert "rolled back" in rolled_back["reason"]
    wait_more_results(reader, 20)
    stop(producing.process)
    assert_one_run_numbered_without_gaps(results(reader))


def test_the_restart_command_starts_a_new_run_of_64_random_bits(producing: Producing) -> None:
    reader, process = producing.reader, producing.process
    first_run = results(reader)[0]["run"]

    assert producing.fleet.call("restart")["stage"] == "succeeded"
    reader.wait_for(
        lambda m: m.topic == RESULTS and json.loads(m.payload)["run"] != first_run, timeout=60
    )
    wait_more_results(reader, 20)
    assert process.poll() is None, "the agent re-executed itself in place"
    stop(process)

    found = results(reader)
    runs = {r["run"] for r in found}
    assert len(runs) == 2
    for run in runs:
        assert re.fullmatch(r"[0-9a-f]{16,}", run), f"run {run!r} is not 64 random bits"
    assert_keys_name_one_result(found)


# --- READY ---------------------------------------------------------------------------


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    with NotifySocket(tmp_path) as sock:
        yield sock


@pytest.fixture
def start_notified(notify: NotifySocket, agent_process: AgentStarter) -> AgentStarter:
    def start(config: Path) -> subprocess.Popen[str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        env["NOTIFY_SOCKET"] = notify.env
        return agent_process(config, env=env)

    return start


def is_ready(n: Notification) -> bool:
    return n.get("READY") == "1"


def agent_status(tmp_path: Path, timeout: float = 60) -> Callable[[], dict[str, Any]]:
    """`status` over the control socket, waiting for the socket to appear first."""
    socket_path = tmp_path / "control.sock"
    deadline = time.monotonic() + timeout
    while not socket_path.exists():
        assert time.monotonic() < deadline, "the control socket never appeared"
        time.sleep(0.1)
    return lambda: ask(socket_path, "status")


def wait_results_out(status: Callable[[], dict[str, Any]], count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 50
    while True:
        now = status()
        pipelines = now["pipelines"]
        if pipelines and pipelines[0].get("results_out", 0) >= count:
            return now
        assert time.monotonic() < deadline, f"no results were produced: {now}"
        time.sleep(0.2)


def test_ready_with_the_broker_away_once_a_result_is_stored_durably(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    mqtt_reader: Callable[..., MqttReader],
    notify: NotifySocket,
    start_notified: AgentStarter,
) -> None:
    broker = mosquitto_factory(port=free_port(), started=False)  # nothing listens yet
    process = start_notified(write_config(tmp_path, broker))

    # Well within the 60 s READY timeout: READY is for the stored result, not the timeout.
    ready = notify.wait_for(is_ready, timeout=45)
    assert ready.get("STATUS") == "running: first result from pipeline shapes stored in the outbox"
    status = agent_status(tmp_path)()
    assert status["mqtt"]["connected"] is False
    assert status["outbox"]["depth"] > 0, "the result READY stands for is on disk"

    broker.start()
    reader = mqtt_reader(broker, f"{ROOT}/results/#")
    reader.wait_for(lambda m: m.topic == RESULTS and json.loads(m.payload)["seq"] == 0, 60)
    stop(process)


def test_without_the_outbox_ready_waits_until_the_broker_acknowledged_a_result(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    notify: NotifySocket,
    start_notified: AgentStarter,
) -> None:
    broker = mosquitto_factory(port=free_port(), started=False)
    process = start_notified(write_config(tmp_path, broker, outbox={"enabled": False}))

    status = agent_status(tmp_path)
    wait_results_out(status, 5)  # results exist, with nowhere safe to go
    assert not any(map(is_ready, notify.received + notify.drain(2.0))), "no READY yet"
    assert status()["mqtt"]["connected"] is False

    broker.start()
    ready = notify.wait_for(is_ready, timeout=30)
    assert ready.get("STATUS") == (
        "running: first result from pipeline shapes acknowledged by the broker"
    )
    stop(process)


# --- clear TLS errors ----------------------------------------------------------------


@pytest.mark.parametrize("agent_speaks", ["tls", "plain"])
def test_a_tls_mismatch_is_named_in_the_status(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    agent_process: AgentStarter,
    agent_speaks: str,
) -> None:
    if agent_speaks == "tls":  # TLS client, plain listener
        tls_broker = mosquitto_factory(tls=True)
        broker = mosquitto_factory()
        assert tls_broker.tls is not None
        tls: dict[str, Any] | None = {"ca_file": str(tls_broker.tls.ca_file)}
        expected = ["TLS handshake with", "is this port a TLS listener?", "mqtt.tls is set"]
    else:  # plain client, TLS listener
        broker = mosquitto_factory(tls=True)
        tls = None
        expected = ["closed the connection before answering", "mqtt.tls is not set"]
    process = agent_process(write_config(tmp_path, broker, mqtt={"tls": tls}))
    status = agent_status(tmp_path)
    deadline = time.monotonic() + 30
    while not (error := status()["mqtt"]["last_error"]):
        assert time.monotonic() < deadline, "no connect error in the status"
        time.sleep(0.2)
    assert f"{broker.host}:{broker.port}" in error
    for part in expected:
        assert part in error, error
    stderr = stop(process)
    assert "is this port a TLS listener?" in stderr, "the log says it too"
