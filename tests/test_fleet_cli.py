"""`edgeagent fleet deploy|watch` against a real mosquitto; the devices are played by the
test, publishing the status/reported/events messages of docs/protocol.md "Model delivery"."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeagent.cli.main import main
from edgeagent.fleet.rollout import Rollout, merge_desired
from tests.broker import Mosquitto, MqttReader, publish_once

Reader = Callable[..., MqttReader]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def broker_args(broker: Mosquitto) -> list[str]:
    return ["--host", broker.host, "--port", str(broker.port)]


def retained_json(broker: Mosquitto, mqtt_reader: Reader, topic: str) -> dict[str, Any]:
    message = mqtt_reader(broker, topic).wait_for(lambda m: m.retain, timeout=5)
    state: dict[str, Any] = json.loads(message.payload)
    return state


def send(broker: Mosquitto, topic: str, payload: dict[str, Any], *, retain: bool = False) -> None:
    publish_once(broker, topic, json.dumps(payload).encode(), retain=retain)


def reported(pipeline: str, model: str, version: str, **extra: Any) -> dict[str, Any]:
    entry = {
        "model": model,
        "version": version,
        "state": "running",
        "staged": None,
        "last_failure": None,
    }
    entry.update(extra)
    return {"ts": time.time(), "pipelines": {pipeline: entry}}


# --- deploy -------------------------------------------------------------------------------


def test_deploy_writes_a_retained_desired_state_for_the_device(
    capsys: pytest.CaptureFixture[str], mosquitto: Mosquitto, mqtt_reader: Reader
) -> None:
    before = time.time()
    code, out, err = cli(
        capsys,
        "fleet",
        "deploy",
        "--device",
        "pi-1",
        "--pipeline",
        "cam",
        "--model",
        "shapes",
        "--version",
        "1.1.0",
        "--read-timeout",
        "0.2",
        *broker_args(mosquitto),
    )
    assert code == 0, err
    assert "device pi-1: pipeline cam -> shapes 1.1" in out
    state = retained_json(mosquitto, mqtt_reader, "edgeagent/pi-1/desired")
    assert state["pipelines"] == {"cam": {"model": "shapes", "version": "1.1.0"}}
    assert before <= state["ts"] <= time.time()
    assert "@" in state["by"]


def test_deploy_merges_with_the_existing_state_and_clear_removes_one_pipeline(
    capsys: pytest.CaptureFixture[str], mosquitto: Mosquitto, mqtt_reader: Reader
) -> None:
    topic = "edgeagent/pi-2/desired"
    existing = {
        "pipelines": {"door": {"model": "digits", "version": "3"}},
        "ts": 1.0,
        "by": "someone@else",
        "note": "kept as it is",
    }
    send(mosquitto, topic, existing, retain=True)
    args = ["fleet", "deploy", "--device", "pi-2", "--pipeline", "cam", *broker_args(mosquitto)]
    assert cli(capsys, *args, "--model", "shapes", "--version", "1.0.0")[0] == 0
    code, out, _ = cli(capsys, *args, "--model", "shapes", "--version", "1.1.0", "--json")
    assert code == 0
    assert json.loads(out)["topic"] == topic
    state = retained_json(mosquitto, mqtt_reader, topic)
    assert state["pipelines"] == {
        "door": {"model": "digits", "version": "3"},
        "cam": {"model": "shapes", "version": "1.1.0"},
    }
    assert state["note"] == "kept as it is"
    assert state["ts"] > 1.0
    # Deploying the previous version again (a device takes it only with --allow-downgrade,
    # see test_delivery_security.py); the human report says what was.
    code, out, _ = cli(capsys, *args, "--model", "shapes", "--version", "1.0.0")
    assert code == 0
    assert "(was shapes 1.1.0)" in out
    assert "other pipelines kept: door" in out
    code, out, _ = cli(capsys, *args, "--clear")
    assert code == 0
    assert "no desired model" in out
    state = retained_json(mosquitto, mqtt_reader, topic)
    assert state["pipelines"] == {"door": {"model": "digits", "version": "3"}}


def test_deploy_to_a_group_uses_the_group_topic(
    capsys: pytest.CaptureFixture[str], mosquitto: Mosquitto, mqtt_reader: Reader
) -> None:
    devices = mqtt_reader(mosquitto, "edgeagent/+/desired")
    code, out, err = cli(
        capsys,
        "fleet",
        "deploy",
        "--group",
        "kitchen",
        "--pipeline",
        "cam",
        "--model",
        "shapes",
        "--version",
        "2.0.0",
        "--read-timeout",
        "0.2",
        "--protocol",
        "3.1.1",
        *broker_args(mosquitto),
    )
    assert code == 0, err
    assert "group kitchen" in out
    state = retained_json(mosquitto, mqtt_reader, "edgeagent/group/kitchen/desired")
    assert state["pipelines"] == {"cam": {"model": "shapes", "version": "2.0.0"}}
    assert devices.messages == []  # no device's own desired state was touched


def test_deploy_refuses_a_desired_state_it_cannot_merge_unless_replaced(
    capsys: pytest.CaptureFixture[str], mosquitto: Mosquitto, mqtt_reader: Reader
) -> None:
    topic = "edgeagent/pi-3/desired"
    publish_once(mosquitto, topic, b"{not json", retain=True)
    args = [
        "fleet",
        "deploy",
        "--device",
        "pi-3",
        "--pipeline",
        "cam",
        "--model",
        "m",
        "--version",
        "1.0.0",
        *broker_args(mosquitto),
    ]
    code, _, err = cli(capsys, *args)
    assert code == 1
    assert "is not JSON" in err
    assert "--replace" in err
    code, _, err = cli(capsys, *args, "--replace")
    assert code == 0, err
    state = retained_json(mosquitto, mqtt_reader, topic)
    assert state["pipelines"] == {"cam": {"model": "m", "version": "1.0.0"}}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--pipeline", "cam", "--model", "m"], "--model and --version"),
        (["--pipeline", "cam", "--clear", "--version", "1"], "drop --model/--version"),
        (["--pipeline", "a/b", "--model", "m", "--version", "1"], "not a safe identifier"),
        (["--pipeline", "cam", "--model", "m", "--version", "../1"], "not a safe identifier"),
        (["--pipeline", "cam", "--model", "m", "--version", "1"], "not a semantic version"),
        (["--pipeline", "cam", "--model", "m", "--version", "1.0"], "not a semantic version"),
        (["--pipeline", "cam", "--clear", "--allow-downgrade"], "drop --model/--version"),
    ],
)
def test_deploy_refuses_bad_arguments_before_connecting(
    capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    code, _, err = cli(capsys, "fleet", "deploy", "--device", "pi-1", *extra, "--port", "1")
    assert code == 1
    assert needle in err


def test_deploy_refuses_a_reserved_device_id(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(
        capsys,
        "fleet",
        "deploy",
        "--device",
        "models",
        "--pipeline",
        "cam",
        "--model",
        "m",
        "--version",
        "1.0.0",
        "--port",
        "1",
    )
    assert code == 2
    assert "reserved" in err


# --- watch --------------------------------------------------------------------------------


class Watch:
    """`edgeagent fleet watch` in a child process, its stdout read line by line."""

    def __init__(self, broker: Mosquitto, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeagent.cli.main",
                "fleet",
                "watch",
                *args,
                *broker_args(broker),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, name="test-watch-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no matching line within {timeout} s; seen: {self.seen}")

    def finish(self, timeout: float = 20.0) -> tuple[int, list[str], str]:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)
            assert self.proc.stderr is not None
            err = self.proc.stderr.read()
            self.proc.stderr.close()
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.proc.returncode, self.seen, err


def json_line(pred: Callable[[dict[str, Any]], bool]) -> Callable[[str], bool]:
    def check(line: str) -> bool:
        try:
            return bool(pred(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            return False

    return check


def test_watch_follows_a_rollout_until_it_converges(mosquitto: Mosquitto) -> None:
    base = "edgeagent/pi-1"
    desired_ts = time.time()
    send(
        mosquitto,
        f"{base}/desired",
        {
            "pipelines": {"cam": {"model": "shapes", "version": "1.1"}},
            "ts": desired_ts,
            "by": "test@here",
        },
        retain=True,
    )
    send(mosquitto, f"{base}/status", {"state": "online", "device": "pi-1", "ts": 1.0}, retain=True)
    send(
        mosquitto,
        f"{base}/reported",
        reported("cam", "shapes", "1.0", staged={"version": "1.1", "progress": 0.25}),
        retain=True,
    )
    watch = Watch(mosquitto, "--device", "pi-1", "--json", "--until-converged", "--timeout", "30")
    try:
        first = watch.wait_line(json_line(lambda s: "25%" in s["pipelines"]["cam"]["detail"]))
        state = json.loads(first)
        assert state["online"] is True
        cam = state["pipelines"]["cam"]
        assert cam["desired"] == {"model": "shapes", "version": "1.1"}
        assert cam["running"] == {"model": "shapes", "version": "1.0", "state": "running"}
        assert cam["status"] == "waiting"
        event = {"ts": time.time(), "pipeline": "cam", "model": "shapes", "version": "1.1"}
        send(mosquitto, f"{base}/events", {**event, "type": "download-progress", "progress": 0.5})
        watch.wait_line(json_line(lambda s: "50%" in s["pipelines"]["cam"]["detail"]))
        send(mosquitto, f"{base}/events", {**event, "type": "validated"})
        watch.wait_line(
            json_line(lambda s: s["pipelines"]["cam"]["last_event"]["type"] == "validated")
        )
        send(
            mosquitto,
            f"{base}/reported",
            reported("cam", "shapes", "1.1", state="probation"),
            retain=True,
        )
        watch.wait_line(json_line(lambda s: "in probation" in s["pipelines"]["cam"]["detail"]))
        send(mosquitto, f"{base}/reported", reported("cam", "shapes", "1.1"), retain=True)
    finally:
        code, lines, err = watch.finish()
    assert code == 0, (lines, err)
    result = json.loads(lines[-1])
    assert result["type"] == "result"
    assert result["outcome"] == "converged"
    assert json.loads(lines[-2])["converged"] is True


def test_watch_renders_devices_and_events_for_people(mosquitto: Mosquitto) -> None:
    base = "edgeagent/pi-2"
    send(
        mosquitto,
        f"{base}/desired",
        {"pipelines": {"cam": {"model": "shapes", "version": "2"}}, "ts": time.time()},
        retain=True,
    )
    send(mosquitto, f"{base}/status", {"state": "online", "device": "pi-2"}, retain=True)
    send(mosquitto, f"{base}/reported", reported("cam", "shapes", "1"), retain=True)
    send(mosquitto, "edgeagent/pi-9/status", {"state": "offline", "device": "pi-9"}, retain=True)
    watch = Watch(mosquitto, "--timeout", "4")
    try:
        watch.wait_line(lambda line: "pi-2 online" in line)
        watch.wait_line(lambda line: "pi-9 OFFLINE" in line)
        send(
            mosquitto,
            f"{base}/events",
            {
                "ts": time.time(),
                "type": "download-progress",
                "pipeline": "cam",
                "model": "shapes",
                "version": "2",
                "progress": 0.75,
            },
        )
        watch.wait_line(lambda line: "cam: download-progress shapes 2 75%" in line)
        watch.wait_line(lambda line: "fetching shapes 2: 75%" in line)
    finally:
        code, lines, err = watch.finish()
    assert code == 0, err  # no --until-converged: the time-out is a normal end
    assert any("cam [..] running shapes 1; wants shapes 2" in line for line in lines)


@pytest.mark.parametrize("how", ["reported", "event"])
def test_watch_until_converged_exits_1_when_the_desired_version_fails(
    mosquitto: Mosquitto, how: str
) -> None:
    base = "edgeagent/pi-3"
    desired_ts = time.time()
    send(
        mosquitto,
        f"{base}/desired",
        {"pipelines": {"cam": {"model": "shapes", "version": "1.1"}}, "ts": desired_ts},
        retain=True,
    )
    send(mosquitto, f"{base}/status", {"state": "online", "device": "pi-3"}, retain=True)
    failure = {
        "version": "1.1",
        "code": "sha256-mismatch",
        "reason": "the assembled model's sha256 differs",
        "ts": desired_ts + 1,
    }
    if how == "reported":
        send(
            mosquitto,
            f"{base}/reported",
            reported("cam", "shapes", "1.0", last_failure=failure),
            retain=True,
        )
        watch = Watch(mosquitto, "--device", "pi-3", "--until-converged", "--timeout", "20")
    else:
        send(mosquitto, f"{base}/reported", reported("cam", "shapes", "1.0"), retain=True)
        watch = Watch(mosquitto, "--device", "pi-3", "--until-converged", "--timeout", "20")
        watch.wait_line(lambda line: "pi-3 online" in line)
        send(
            mosquitto,
            f"{base}/events",
            {
                "ts": desired_ts + 2,
                "type": "rejected",
                "pipeline": "cam",
                "model": "shapes",
                "version": "1.1",
                "code": "sha256-mismatch",
                "reason": "bad bytes",
            },
        )
    code, lines, err = watch.finish()
    assert code == 1, (lines, err)
    assert "not converged (failed):" in lines
    assert any("pi-3 cam: shapes 1.1" in line and "sha256-mismatch" in line for line in lines)


def test_watch_until_converged_times_out_with_the_reasons(mosquitto: Mosquitto) -> None:
    base = "edgeagent/pi-4"
    send(
        mosquitto,
        f"{base}/desired",
        {"pipelines": {"cam": {"model": "shapes", "version": "9"}}, "ts": time.time()},
        retain=True,
    )
    send(mosquitto, f"{base}/status", {"state": "offline", "device": "pi-4"}, retain=True)
    send(mosquitto, f"{base}/reported", reported("cam", "shapes", "8"), retain=True)
    started = time.monotonic()
    watch = Watch(
        mosquitto,
        "--device",
        "pi-4",
        "--device",
        "pi-never",
        "--json",
        "--until-converged",
        "--timeout",
        "1.5",
    )
    code, lines, err = watch.finish()
    assert code == 1, err
    assert time.monotonic() - started >= 1.5
    result = json.loads(lines[-1])
    assert result["outcome"] == "timeout"
    assert result["failures"] == []
    assert "pi-4 cam: device offline; wants shapes 9" in result["waiting"]
    assert "pi-never: no report yet" in result["waiting"]


def test_watch_with_a_group_judges_devices_against_the_group_state(
    mosquitto: Mosquitto,
) -> None:
    send(
        mosquitto,
        "edgeagent/group/lab/desired",
        {"pipelines": {"cam": {"model": "shapes", "version": "3"}}, "ts": time.time()},
        retain=True,
    )
    send(mosquitto, "edgeagent/pi-5/status", {"state": "online", "device": "pi-5"}, retain=True)
    send(mosquitto, "edgeagent/pi-5/reported", reported("cam", "shapes", "3"), retain=True)
    watch = Watch(
        mosquitto, "--group", "lab", "--device", "pi-5", "--until-converged", "--timeout", "20"
    )
    code, lines, err = watch.finish()
    assert code == 0, (lines, err)
    assert "converged: 1 device(s) run their desired versions" in lines


# --- the rollout logic on its own -----------------------------------------------------------


def _feed(rollout: Rollout, device: str, kind: str, payload: dict[str, Any]) -> None:
    rollout.feed(f"edgeagent/{device}/{kind}", json.dumps(payload).encode())


def test_a_failure_older_than_the_desired_state_is_history_not_a_verdict() -> None:
    rollout = Rollout("edgeagent", ["pi-1"])
    _feed(
        rollout,
        "pi-1",
        "desired",
        {"pipelines": {"cam": {"model": "m", "version": "2"}}, "ts": 100.0},
    )
    old = {"version": "2", "code": "smoke-crash", "reason": "x", "ts": 50.0}
    _feed(rollout, "pi-1", "reported", reported("cam", "m", "1", last_failure=old))
    verdict = rollout.verdict()
    assert verdict.failures == ()
    assert verdict.waiting == ("pi-1 cam: running m 1; wants m 2",)
    new = {**old, "ts": 150.0}
    _feed(rollout, "pi-1", "reported", reported("cam", "m", "1", last_failure=new))
    assert rollout.verdict().failures == ("pi-1 cam: m 2 failed: smoke-crash: x",)


def test_a_rollback_to_the_previous_version_converges_despite_the_failed_one() -> None:
    rollout = Rollout("edgeagent", ["pi-1"])
    _feed(
        rollout,
        "pi-1",
        "desired",
        {"pipelines": {"cam": {"model": "m", "version": "1"}}, "ts": 100.0},
    )
    failed = {"version": "2", "code": "reference-mismatch", "reason": "x", "ts": 90.0}
    _feed(rollout, "pi-1", "reported", reported("cam", "m", "1", last_failure=failed))
    assert rollout.verdict().converged


def test_a_devices_own_desired_state_overrides_its_groups() -> None:
    rollout = Rollout("edgeagent", ["pi-1"], group="lab")
    rollout.feed(
        "edgeagent/group/lab/desired",
        json.dumps(
            {
                "pipelines": {
                    "cam": {"model": "m", "version": "1"},
                    "door": {"model": "d", "version": "5"},
                }
            }
        ).encode(),
    )
    _feed(rollout, "pi-1", "desired", {"pipelines": {"cam": {"model": "m", "version": "2"}}})
    view = rollout.devices["pi-1"]
    desired = {n: e for n, (e, _) in rollout.effective_desired(view).items()}
    assert desired == {
        "cam": {"model": "m", "version": "2"},
        "door": {"model": "d", "version": "5"},
    }
    # Topics outside the rollout are ignored.
    assert rollout.feed("edgeagent/models/m/2/manifest", b"{}") == (None, None)
    assert rollout.feed("edgeagent/pi-other/status", b"{}") == (None, None)


def test_a_device_without_any_desired_state_has_not_converged() -> None:
    rollout = Rollout("edgeagent", ["pi-1"])
    _feed(rollout, "pi-1", "reported", reported("cam", "m", "1"))
    verdict = rollout.verdict()
    assert not verdict.converged
    assert verdict.waiting == ("pi-1: no desired state (deploy first, or pass --group)",)
    _feed(rollout, "pi-1", "desired", {"pipelines": {"cam": {"model": "m", "version": "1"}}})
    assert rollout.verdict().converged


def test_merge_desired_sets_and_clears_one_pipeline() -> None:
    state = merge_desired(None, "cam", ("m", "1"), by="a@b", ts=5.0)
    assert state == {"pipelines": {"cam": {"model": "m", "version": "1"}}, "ts": 5.0, "by": "a@b"}
    state = merge_desired(state, "door", ("d", "2"), by="c@d", ts=6.0)
    assert set(state["pipelines"]) == {"cam", "door"}
    state = merge_desired(state, "cam", None, by="c@d", ts=7.0)
    assert state["pipelines"] == {"door": {"model": "d", "version": "2"}}


def test_broker_options_tls_and_password_file(
    capsys: pytest.CaptureFixture[str],
    mosquitto_factory: Callable[..., Mosquitto],
    mqtt_reader: Reader,
    tmp_path: Path,
) -> None:
    password = "s3cret"  # noqa: S105 - a throw-away broker's user
    broker = mosquitto_factory(users={"fleet": password}, tls=True)
    assert broker.tls is not None
    secret = tmp_path / "password"
    secret.write_text(password + "\n", encoding="utf-8")
    args = [
        "fleet",
        "deploy",
        "--device",
        "pi-7",
        "--pipeline",
        "cam",
        "--model",
        "m",
        "--version",
        "1.0.0",
        "--read-timeout",
        "0.2",
        "--host",
        "localhost",
        "--port",
        str(broker.port),
        "--tls-ca",
        str(broker.tls.ca_file),
        "--username",
        "fleet",
    ]
    code, _, err = cli(capsys, *args, "--password-file", str(secret))
    assert code == 0, err
    reader = mqtt_reader(broker, "edgeagent/pi-7/desired", username="fleet", password=password)
    assert json.loads(reader.wait_for(lambda m: m.retain).payload)["pipelines"]["cam"] == {
        "model": "m",
        "version": "1.0.0",
    }
    secret.write_text("wrong\n", encoding="utf-8")
    code, _, err = cli(capsys, *args, "--password-file", str(secret))
    assert code == 1
    assert "refused the connection" in err
    assert "--password-file" in err
