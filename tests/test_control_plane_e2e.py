"""The fleet control plane against the real daemon: `edgeagent run` as a subprocess, a real
mosquitto, and a client playing the fleet dashboard (commands, replies, telemetry), plus
the durable outbox through a broker outage and a kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from edgeagent.control import ask
from tests.agent_config import (
    shapes_pipeline,
    status_or_none,
    status_where,
    write_agent_config,
)
from tests.broker import Dashboard, Mosquitto, MqttReader, all_running, body, result_seqs
from tests.waiting import wait_until

AGENT = [sys.executable, "-m", "edgeagent.cli.main"]
ROOT = "edgeagent/cp"


def write_config(tmp_path: Path, broker: Mosquitto, *, protocol: str = "5", fps: int = 20) -> Path:
    return write_agent_config(
        tmp_path,
        broker,
        device="cp",
        pipelines=[shapes_pipeline(fps=fps)],
        mqtt={"protocol": protocol},
        telemetry={"interval_s": 1},
    )


running = all_running(ROOT)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_every_command_round_trips(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[[Path], subprocess.Popen[str]],
    dashboard: Callable[..., Dashboard],
    protocol: str,
) -> None:
    config_path = write_config(tmp_path, mosquitto, protocol=protocol)
    reader = mqtt_reader(mosquitto, f"{ROOT}/#", protocol=protocol)
    process = agent_process(config_path)
    first = body(reader.wait_for(running, timeout=30))
    board = dashboard(mosquitto, protocol)

    pong = board.call("ping")
    assert pong["stage"] == "succeeded"
    assert pong["result"]["pong"] is True
    if protocol == "5":
        assert any(m.topic == board.response_topic for m in board.replies), "v5 response topic used"
    else:
        assert any(m.topic == f"{ROOT}/reply" for m in board.replies)

    status = board.call("status")["result"]
    assert status["pipelines"][0]["name"] == "shapes"
    assert status["mqtt"]["connected"] is True

    assert board.call("config.get")["result"]["pipelines"][0]["model"] == "shapes-detector"

    # A valid change is applied live and persisted; the old file is kept as .bak.
    changed = board.call("config.set", {"config": {"telemetry": {"interval_s": 2}}})
    assert changed["stage"] == "succeeded", changed
    assert changed["result"]["restart_required"] == ["telemetry"]
    assert yaml.safe_load(config_path.read_text())["telemetry"]["interval_s"] == 2
    assert config_path.with_name("agent.yaml.bak").exists()

    # An invalid one changes nothing.
    before = config_path.read_text()
    bad = board.call("config.set", {"config": {"mqtt": {"hots": "x"}}})
    assert bad["stage"] == "failed"
    assert "mqtt.hots" in bad["reason"]
    assert config_path.read_text() == before

    # One that would break a pipeline is rolled back and the pipeline keeps running (a
    # model name neither bundled nor delivered: a path would be refused before, as
    # forbidden-path, since this device has no commands.remote_paths).
    broken = board.call(
        "config.set",
        {
            "config": {
                "pipelines": [
                    {
                        "name": "shapes",
                        "source": {"type": "synthetic", "fps": 20},
                        "model": "no-such-model",
                    }
                ]
            }
        },
    )
    assert broken["stage"] == "failed"
    assert "rolled back" in broken["reason"]
    assert config_path.read_text() == before
    count = len(reader.messages)
    reader.wait_for_count(count + 5, lambda m: True, timeout=30)

    stopped = board.call("pipeline.stop", {"pipeline": "shapes"})
    assert stopped["result"]["state"] == "stopped"
    assert board.call("pipeline.start", {"pipeline": "shapes"})["result"]["state"] == "running"
    assert board.call("pipeline.restart", {"pipeline": "shapes"})["stage"] == "succeeded"
    nope = board.call("pipeline.start", {"pipeline": "nope"})
    assert nope["stage"] == "failed"
    assert "no pipeline 'nope'" in nope["reason"]

    reader.wait_for(lambda m: m.topic == f"{ROOT}/results/shapes", timeout=30)
    snap = board.call("snapshot", {"pipeline": "shapes"})
    assert snap["stage"] == "succeeded", snap
    jpeg = [m for m in board.replies if m.topic == snap["result"]["topic"]]
    assert jpeg, "the JPEG arrived on its reply sub-topic"
    assert jpeg[0].payload[:2] == b"\xff\xd8"
    assert len(jpeg[0].payload) == snap["result"]["bytes"]

    bench_id = board.send("bench", {"pipeline": "shapes", "runs": 5})
    bench = board.wait_terminal(bench_id)
    assert bench["stage"] == "succeeded", bench
    stages = [r["stage"] for r in board.json_replies(bench_id)]
    assert stages[0] == "accepted"
    assert stages.count("succeeded") == 1
    assert bench["result"]["invoke_ms"]["median"] > 0

    logs = board.call("logs", {"lines": 20})["result"]["lines"]
    assert 0 < len(logs) <= 20

    rollback = board.call("model.rollback", {"pipeline": "shapes"})
    assert rollback["stage"] in ("succeeded", "failed")
    if rollback["stage"] == "failed":
        assert rollback["reason"]

    # Bad input: each gets a failed reply and the daemon keeps running.
    unknown = board.call("selfdestruct")
    assert unknown["stage"] == "failed"
    assert "unknown command" in unknown["reason"]
    board.send("ping", raw=b"{not json")
    malformed = board.wait_terminal(None)
    assert "not valid JSON" in malformed["reason"]

    # Idempotent by id: the repeat gets the first answer again.
    board.send("ping", request_id="same-id")
    first_answer = board.wait_terminal("same-id")
    board.send("ping", request_id="same-id")
    answers = wait_until(
        lambda: len(board.terminal_replies("same-id")) >= 2 and board.terminal_replies("same-id"),
        10,
        lambda: f"a second answer to same-id; got {board.json_replies('same-id')}",
    )
    again = answers[1]
    assert again == first_answer

    # Telemetry carries real numbers.
    telemetry = body(
        reader.wait_for(
            lambda m: (
                m.topic == f"{ROOT}/telemetry"
                and body(m)["pipelines"].get("shapes", {}).get("results_out", 0) > 0
            ),
            timeout=30,
        )
    )
    shapes = telemetry["pipelines"]["shapes"]
    assert shapes["latency_ms"]["invoke"]["p95"] > 0
    assert telemetry["mqtt"]["connected"] is True
    assert telemetry["system"]["mem_total_bytes"] > 0

    # restart: the service restarts in place (same pid under systemd) with a new run.
    assert board.call("restart")["stage"] == "succeeded"
    reader.wait_for(lambda m: running(m) and body(m)["run"] != first["run"], timeout=60)
    assert process.poll() is None

    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_status_answers_over_the_control_socket_while_the_broker_is_down(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[[Path], subprocess.Popen[str]],
) -> None:
    reader = mqtt_reader(mosquitto, f"{ROOT}/status")
    agent_process(write_config(tmp_path, mosquitto))
    reader.wait_for(running, timeout=30)
    mosquitto.stop()
    # Until the agent noticed the outage and results queued up.
    wait_until(
        lambda: status_where(
            tmp_path, lambda s: not s["mqtt"]["connected"] and s["outbox"]["depth"] > 0
        ),
        30,
        lambda: f"the outage to show in the status: {status_or_none(tmp_path)}",
    )
    human = subprocess.run(
        [*AGENT, "status", "--socket", str(tmp_path / "control.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert human.returncode == 0, human.stderr
    assert "DISCONNECTED" in human.stdout
    assert "shapes" in human.stdout

    # A malformed request gets an error, not a crash.
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(tmp_path / "control.sock"))
        sock.sendall(b"\x00garbage\n")
        assert b'"ok": false' in sock.recv(4096)
    assert ask(tmp_path / "control.sock", "status")["device"] == "cp"
    mosquitto.start()


def test_a_broker_outage_loses_no_result(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[[Path], subprocess.Popen[str]],
) -> None:
    broker = mosquitto_factory(persistence=True)
    reader = mqtt_reader(broker, f"{ROOT}/results/#", session="outage-dashboard")
    process = agent_process(write_config(tmp_path, broker, fps=30))
    reader.wait_for_count(30, timeout=30)
    broker.stop()
    # More than 150 results are produced with nowhere to go.
    wait_until(
        lambda: status_where(
            tmp_path, lambda s: not s["mqtt"]["connected"] and s["outbox"]["depth"] > 150
        ),
        60,
        lambda: f"a backlog of 150 results in the outbox: {status_or_none(tmp_path)}",
    )
    broker.start()
    # The backlog drains and results flow live again.
    wait_until(
        lambda: status_where(
            tmp_path, lambda s: s["mqtt"]["connected"] and s["outbox"]["depth"] < 30
        ),
        60,
        lambda: f"the backlog to drain: {status_or_none(tmp_path)}",
    )
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    runs = result_seqs(reader.messages, f"{ROOT}/results/shapes")
    assert len(runs) == 1
    seqs = sorted(next(iter(runs.values())))
    assert len(seqs) > 150
    assert seqs == list(range(len(seqs))), "every result arrived after de-duplication by seq"


def test_a_kill_9_with_a_backlog_on_disk_loses_no_result(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[[Path], subprocess.Popen[str]],
) -> None:
    broker = mosquitto_factory(persistence=True)
    config = write_config(tmp_path, broker, fps=30)
    broker.stop()  # the first run never reaches the broker: everything goes to disk
    first = agent_process(config)
    filled = wait_until(
        lambda: status_where(tmp_path, lambda s: s["outbox"]["depth"] >= 60),
        60,
        lambda: f"the outbox to fill: {status_or_none(tmp_path)}",
    )
    # The outbox also holds each pipeline's retained state summary: count results only.
    stored = sum(p["results_out"] for p in filled["pipelines"])
    assert stored >= 50, filled
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    broker.start()
    reader = mqtt_reader(broker, f"{ROOT}/results/#")
    second = agent_process(config)
    second_run = wait_until(lambda: status_or_none(tmp_path), 60, "the second agent's status")[
        "run"
    ]

    def killed_runs() -> list[set[int]]:
        runs = result_seqs(reader.messages, f"{ROOT}/results/shapes")
        return [seqs for run, seqs in runs.items() if run != second_run]

    wait_until(
        lambda: sum(len(seqs) for seqs in killed_runs()) >= stored,
        60,
        lambda: f"the killed run's {stored} stored results; got runs {list(killed_runs())[:1]}",
    )
    second.send_signal(signal.SIGTERM)
    second.communicate(timeout=60)
    runs = result_seqs(reader.messages, f"{ROOT}/results/shapes")
    killed = [seqs for run, seqs in runs.items() if run != second_run]
    assert len(killed) == 1, f"the killed run's backlog arrived: {list(runs)}"
    seqs = sorted(killed[0])
    assert len(seqs) >= stored, "every result stored before the kill arrived"
    assert seqs == list(range(len(seqs))), "no gap: nothing stored before the kill was lost"
