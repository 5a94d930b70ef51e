"""`edgeagent run` as a real subprocess under a stand-in for systemd: `$NOTIFY_SOCKET` is a
real AF_UNIX datagram socket bound by the test, `$WATCHDOG_USEC=2000000` (ping every 1 s),
and a real mosquitto receives the results.

Marked `systemd_e2e` (`pytest -m systemd_e2e`). These tests assume the wiring of
edgeagent/systemd.py into the daemon, which is done separately from that module:

- `cli/run.py` creates a `Notifier()`, starts a `ReadyGate` before the pipelines and
  tells it what became of each result: `result_stored(pipeline)` once it is in the
  outbox, `result_sent(pipeline, acknowledged)` when the outbox is disabled (READY=1 then
  comes with the first stored, or acknowledged, one); after `Agent.start()` it starts
  `Watchdog(notifier, PipelineProgress(lambda: agent.running))`; on SIGTERM it sends
  `STOPPING=1`, then stops the watchdog, the gate and the agent, and exits 0.
- A config that does not validate sends `STATUS=<the error>` before the non-zero exit
  (`edgeagent.systemd.notify_failure`).
- Test-only hang injection: `hang_after=N` starts the agent through tests/fault_agent.py
  (`python -m tests.fault_agent --hang-invoke-after N run ...`), in which a pipeline's
  inference thread blocks forever inside LiteRT's invoke() after N invokes of its own, so
  exactly N results are published, as with a hung delegate or driver. The agent itself
  reads no fault-injection switch.

Until that wiring lands these tests fail (no READY=1 arrives); that is expected.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.broker import Mosquitto, MqttReader, Received
from tests.notify_socket import Notification, NotifySocket

pytestmark = [pytest.mark.systemd_e2e, pytest.mark.broker]

AGENT = [sys.executable, "-m", "edgeagent.cli.main"]
WATCHDOG_USEC = 2_000_000  # systemd's WatchdogSec=2s: pings expected every ~1 s


def write_config(tmp_path: Path, broker: Mosquitto) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "device: {id: e2e}\n"
        f"mqtt: {{host: {broker.host}, port: {broker.port},"
        " reconnect_min_s: 0.2, reconnect_max_s: 1}\n"
        "pipelines:\n"
        "  - name: shapes\n"
        "    source: {type: synthetic, width: 320, height: 240, fps: 20}\n"
        "    model: shapes-detector\n"
        "    threads: 1\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    with NotifySocket(tmp_path) as sock:
        yield sock


AgentStarter = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def start_agent(
    notify: NotifySocket, agent_process: Callable[..., subprocess.Popen[str]]
) -> AgentStarter:
    def start(
        config: Path, *, watchdog: bool = True, hang_after: int | None = None
    ) -> subprocess.Popen[str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        env["NOTIFY_SOCKET"] = notify.env
        if watchdog:
            env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
        if hang_after is None:
            return agent_process(config, env=env)
        fault = ("-m", "tests.fault_agent", "--hang-invoke-after", str(hang_after))
        return agent_process(config, env=env, entry=fault)

    return start


def is_ready(n: Notification) -> bool:
    return n.get("READY") == "1"


def is_ping(n: Notification) -> bool:
    return n.get("WATCHDOG") == "1"


def is_stalled(n: Notification) -> bool:
    return "pipeline shapes stalled: no result for" in (n.get("STATUS") or "")


def is_result(m: Received) -> bool:
    return m.topic == "edgeagent/e2e/results/shapes"


def test_ready_after_the_first_result_pings_while_running_and_stopping_on_sigterm(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    notify: NotifySocket,
    start_agent: AgentStarter,
) -> None:
    reader = mqtt_reader(mosquitto, "edgeagent/e2e/results/#")
    process = start_agent(write_config(tmp_path, mosquitto))

    ready = notify.wait_for(is_ready, timeout=60)
    assert ready.get("STATUS") == "running: first result from pipeline shapes stored in the outbox"
    first = reader.wait_for(is_result, timeout=10)
    assert json.loads(first.payload)["seq"] == 0

    running = notify.drain(4.0)
    pings = [n.at for n in running if is_ping(n)]
    assert len(pings) >= 3, f"pings every ~1 s with WATCHDOG_USEC=2000000: {running}"
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.9
    assert not any(map(is_ready, running)), "READY=1 is sent once"

    process.send_signal(signal.SIGTERM)
    notify.wait_for(lambda n: n.get("STOPPING") == "1", timeout=15)
    assert process.wait(timeout=30) == 0


def test_ready_is_not_sent_before_the_first_result_exists(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    notify: NotifySocket,
    start_agent: AgentStarter,
) -> None:
    reader = mqtt_reader(mosquitto, "edgeagent/e2e/results/#")
    start_agent(write_config(tmp_path, mosquitto), hang_after=1)

    notify.wait_for(is_ready, timeout=60)
    ready_wall_clock = time.time()
    (only,) = reader.wait_for_count(1, is_result, timeout=10)
    # `ts` is taken when the result is built, before it is published and before the
    # agent may send READY=1.
    assert json.loads(only.payload)["ts"] <= ready_wall_clock
    # With the one result out and the inference thread hung, READY=1 was not withheld
    # for more results, and the watchdog notices the hang.
    stalled = notify.wait_for(is_stalled, timeout=15)
    assert "invoke() hung" in (stalled.get("STATUS") or ""), "frames came, results did not"
    assert [m for m in reader.messages if is_result(m)] == [only]


def test_watchdog_pings_stop_when_the_inference_thread_hangs(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    notify: NotifySocket,
    start_agent: AgentStarter,
) -> None:
    reader = mqtt_reader(mosquitto, "edgeagent/e2e/results/#")
    process = start_agent(write_config(tmp_path, mosquitto), hang_after=10)

    notify.wait_for(is_ready, timeout=60)
    reader.wait_for_count(10, is_result, timeout=30)
    stalled = notify.wait_for(is_stalled, timeout=15)
    hang_seen = stalled.at

    after = notify.drain(3.0)
    assert not any(map(is_ping, after)), f"pings withheld while invoke() hangs: {after}"
    assert all(is_stalled(n) for n in after)
    last_ping = max((n.at for n in notify.received if is_ping(n)), default=0.0)
    assert last_ping < hang_seen
    assert len([m for m in reader.messages if is_result(m)]) == 10, "exactly N results"
    # systemd would now abort it (WatchdogSignal=SIGABRT) and restart it; the test kills.
    assert process.poll() is None


def test_without_watchdog_usec_there_are_no_pings(
    tmp_path: Path,
    mosquitto: Mosquitto,
    notify: NotifySocket,
    start_agent: AgentStarter,
) -> None:
    process = start_agent(write_config(tmp_path, mosquitto), watchdog=False)

    notify.wait_for(is_ready, timeout=60)
    assert not any(map(is_ping, notify.received + notify.drain(2.5)))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_an_invalid_config_sends_its_reason_as_status_and_exits_non_zero(
    tmp_path: Path, notify: NotifySocket, start_agent: AgentStarter
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("mqtt:\n  port: 99999\n", encoding="utf-8")

    process = start_agent(config)
    _out, err = process.communicate(timeout=60)

    assert process.returncode == 2
    status = notify.wait_for(lambda n: "STATUS" in n, timeout=5)
    assert "mqtt.port" in (status.get("STATUS") or "")
    assert "mqtt.port" in err
    assert not any(map(is_ready, notify.received))
    assert notify.drain(0.3) == [], "one STATUS, nothing else"
