"""`edgeagent fleet simulate` against a real mosquitto: the real CLI starts simulated devices
in worker processes; the fleet side is the real `model keygen|publish` and `fleet
deploy|watch` CLI and a dashboard sending group commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Dashboard, Mosquitto, MqttReader, publish_once
from tests.delivery_e2e import CLI, DETECTOR, keygen, on, tool
from tests.waiting import wait_until

Reader = Callable[..., MqttReader]
GROUP = "sim"
PIPELINE = "detect"
MODEL = "shapes-detector"


class Simulation:
    """One `edgeagent fleet simulate` process and the JSON summary lines it printed."""

    def __init__(self, proc: subprocess.Popen[str], devices: int) -> None:
        self.proc = proc
        self.devices = [f"sim-{i:04d}" for i in range(1, devices + 1)]

    def stop(self, timeout: float = 90) -> tuple[int, list[dict[str, Any]], str]:
        """SIGTERM, then its exit status, summary lines and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return self.proc.returncode, lines, err


@pytest.fixture
def simulate(tmp_path: Path) -> Iterator[Callable[..., Simulation]]:
    started: list[Simulation] = []

    def start(broker: Mosquitto, devices: int, *options: str) -> Simulation:
        proc = subprocess.Popen(
            [
                *CLI,
                "fleet",
                "simulate",
                "--devices",
                str(devices),
                "--group",
                GROUP,
                "--pipeline",
                PIPELINE,
                "--rate",
                "2",
                "--probation-s",
                "1",
                "--reconnect-min-s",
                "0.2",
                "--reconnect-max-s",
                "1",
                "--report-every",
                "1",
                "--json",
                "--state-dir",
                str(tmp_path / "sim-state"),
                *options,
                *on(broker),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        simulation = Simulation(proc, devices)
        started.append(simulation)
        return simulation

    yield start
    for simulation in started:
        if simulation.proc.poll() is None:
            simulation.proc.kill()
        simulation.proc.communicate(timeout=60)


def statuses(reader: MqttReader) -> dict[str, str]:
    """Device -> the state of the last status message it published."""
    last: dict[str, str] = {}
    for message in reader.messages:
        device = message.topic.split("/")[1]
        last[device] = json.loads(message.payload)["state"]
    return last


def all_online(reader: MqttReader, devices: list[str]) -> bool:
    seen = statuses(reader)
    return all(seen.get(d) == "online" for d in devices)


def publish_model(broker: Mosquitto, key: Path, version: str) -> None:
    done = tool(
        "model",
        "publish",
        str(DETECTOR),
        "--name",
        MODEL,
        "--version",
        version,
        "--key",
        str(key),
        *on(broker),
    )
    assert done.returncode == 0, done.stderr


def deploy_to_group(broker: Mosquitto, version: str) -> None:
    done = tool(
        "fleet",
        "deploy",
        "--group",
        GROUP,
        "--pipeline",
        PIPELINE,
        "--model",
        MODEL,
        "--version",
        version,
        *on(broker),
    )
    assert done.returncode == 0, done.stderr


def watch_group(broker: Mosquitto, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return tool(
        "fleet",
        "watch",
        "--group",
        GROUP,
        "--until-converged",
        "--json",
        "--timeout",
        str(timeout),
        *on(broker),
        timeout=timeout + 30,
    )


def test_simulated_devices_come_online_take_a_signed_rollout_answer_a_group_command_and_stop(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Reader,
    dashboard: Callable[..., Dashboard],
    simulate: Callable[..., Simulation],
) -> None:
    private, public = keygen(tmp_path / "keys")
    status = mqtt_reader(mosquitto, "edgeagent/+/status")
    simulation = simulate(mosquitto, 20, "--processes", "2", "--trusted-key", str(public))
    wait_until(
        lambda: all_online(status, simulation.devices),
        timeout=90,
        message=lambda: f"20 devices online; seen {statuses(status)}",
    )
    results = mqtt_reader(mosquitto, f"edgeagent/+/results/{PIPELINE}")
    first = results.wait_for(lambda m: True, timeout=30)
    assert json.loads(first.payload)["model"]["name"] == MODEL

    publish_model(mosquitto, private, "1.1.0")
    deploy_to_group(mosquitto, "1.1.0")
    watched = watch_group(mosquitto)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    verdict = json.loads(watched.stdout.splitlines()[-1])
    assert verdict["outcome"] == "converged"
    converged = {
        line["device"]
        for line in map(json.loads, watched.stdout.splitlines())
        if line["type"] == "device" and line["converged"]
    }
    assert converged == set(simulation.devices)
    # The stand-in's results name the model each device runs now.
    results.wait_for(lambda m: json.loads(m.payload)["model"]["version"] == "1.1.0", timeout=30)

    board = dashboard(mosquitto, root=f"edgeagent/group/{GROUP}")
    request = board.send("ping")
    wait_until(
        lambda: len(board.terminal_replies(request)) >= 20,
        timeout=60,
        message=lambda: f"20 replies; got {len(board.terminal_replies(request))}",
    )
    replies = board.terminal_replies(request)
    assert {r["device"] for r in replies} == set(simulation.devices)
    assert {r["stage"] for r in replies} == {"succeeded"}

    code, lines, err = simulation.stop()
    assert code == 0, err
    assert lines[-1]["type"] == "stopped"
    # Every device said goodbye itself: the retained status of each is `offline`.
    after = mqtt_reader(mosquitto, "edgeagent/+/status")
    wait_until(
        lambda: len(statuses(after)) == 20,
        timeout=30,
        message=lambda: f"20 retained statuses; got {statuses(after)}",
    )
    assert set(statuses(after).values()) == {"offline"}
    for pid in lines[-1]["workers"]:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} is still there"


@pytest.mark.parametrize("attack", ["untrusted-key", "tampered-chunk"])
def test_every_simulated_device_refuses_a_model_it_cannot_trust(
    attack: str,
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Reader,
    simulate: Callable[..., Simulation],
) -> None:
    private, public = keygen(tmp_path / "keys")
    status = mqtt_reader(mosquitto, "edgeagent/+/status")
    simulation = simulate(mosquitto, 6, "--processes", "1", "--trusted-key", str(public))
    wait_until(lambda: all_online(status, simulation.devices), timeout=60, message="6 online")

    if attack == "untrusted-key":
        other, _ = keygen(tmp_path / "other-keys")
        publish_model(mosquitto, other, "1.2.0")
        expected = {"untrusted-key"}
    else:
        publish_model(mosquitto, private, "1.2.0")
        chunk = f"edgeagent/models/{MODEL}/1.2.0/chunk/1"
        publish_once(mosquitto, chunk, os.urandom(65536), retain=True)
        expected = {"sha256-mismatch", "bad-chunk"}
    deploy_to_group(mosquitto, "1.2.0")
    watched = watch_group(mosquitto, timeout=60)
    assert watched.returncode == 1, watched.stdout
    assert json.loads(watched.stdout.splitlines()[-1])["outcome"] == "failed"

    reported = mqtt_reader(mosquitto, "edgeagent/+/reported")

    def failures() -> dict[str, Any]:
        found = {}
        for message in reported.messages:
            entry = json.loads(message.payload)["pipelines"][PIPELINE]
            failure = entry.get("last_failure")
            if failure and failure.get("version") == "1.2.0":
                found[message.topic.split("/")[1]] = (failure["code"], entry["version"])
        return found

    wait_until(
        lambda: len(failures()) == 6, timeout=60, message=lambda: f"6 failures: {failures()}"
    )
    codes = {code for code, _ in failures().values()}
    assert codes <= expected, codes
    # Nothing was installed: every device still runs the version it started with.
    assert "1.2.0" not in {running for _, running in failures().values()}
    code, _lines, err = simulation.stop()
    assert code == 0, err


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--devices", "300", "--processes", "2", "--allow-unsigned"], "select()"),
        (["--devices", "5"], "--trusted-key"),
        (["--devices", "5", "--trusted-key", "/nonexistent/key.pub"], "no such file"),
        (["--devices", "5", "--allow-unsigned", "--id-prefix", "bad/prefix"], "--id-prefix"),
    ],
)
def test_simulate_refuses_what_could_not_work_and_starts_nothing(
    options: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """More than 110 devices in one process would leave some never connected (paho's
    select() and file descriptors over 1023); no key means no signature could be checked."""
    from edgeagent.cli.main import main

    code = main(["fleet", "simulate", *options, "--port", "1"])
    err = capsys.readouterr().err
    assert code != 0
    assert says in err
