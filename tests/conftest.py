"""Fixtures shared by the whole suite. The broker machinery itself is in tests/broker.py.

- `mosquitto`: a running anonymous mosquitto on a free loopback port.
- `mosquitto_factory(users=..., tls=..., port=...)`: more brokers (password file, TLS
  listener, a chosen port); every broker is stopped at teardown.
- `mqtt_reader(broker, topic_filter, ...)`: a subscriber whose `wait_for(predicate)`
  returns a matching message or fails listing what arrived.
- `agent_process(config, env=None, entry=...)`: `edgeagent run --config CONFIG` as a
  subprocess (stderr kept for the test to read); killed at teardown if the test left it
  running. `entry` replaces `-m edgeagent.cli.main`, e.g. with tests/fault_agent.py.
- `dashboard(broker, protocol="5", root=...)`: a `Dashboard` (tests/broker.py) playing the
  fleet for the device at `root`; closed at teardown.
- `agents(config)`: `edgeagent run` processes whose log goes to a file (tests/delivery_e2e.py's
  `Agent`); killed at teardown.
- `_no_leaks` (automatic): a test fails if it leaves threads or child processes behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Dashboard, Mosquitto, MosquittoFactory, MqttReader, find_mosquitto
from tests.delivery_e2e import Agent

# Threads our code and paho start are daemons, so a leaked one would not hang the run;
# they are named so that a leak is still caught.
_OWN_THREAD_PREFIXES = ("paho-mqtt-client-", "edgeagent-")


def _child_pids() -> set[int]:
    """Live child processes of this process (Linux /proc; empty elsewhere)."""
    me = str(os.getpid())
    children: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == me:  # fields[0] is the state, fields[1] the parent pid
            children.add(int(stat.parent.name))
    return children


def _leaked_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t not in before
        and t.is_alive()
        and (not t.daemon or t.name.startswith(_OWN_THREAD_PREFIXES))
    ]


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    children_before = _child_pids()
    yield
    deadline = time.monotonic() + 3.0  # threads told to stop may need a moment to end
    while time.monotonic() < deadline:
        threads = _leaked_threads(threads_before)
        children = _child_pids() - children_before
        if not threads and not children:
            return
        time.sleep(0.05)
    problems = [f"thread {t.name!r} (daemon={t.daemon})" for t in threads]
    problems += [f"child process {pid}" for pid in sorted(children)]
    pytest.fail("the test left behind: " + ", ".join(problems))


@pytest.fixture
def mosquitto_binary() -> str:
    binary = find_mosquitto()
    if binary is None:
        reason = "mosquitto is not installed (apt install mosquitto mosquitto-clients)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the broker tests, not skip them")
        pytest.skip(reason)
    return binary


@pytest.fixture
def mosquitto_factory(mosquitto_binary: str, tmp_path: Path) -> Iterator[MosquittoFactory]:
    brokers: list[Mosquitto] = []

    def start(
        *,
        users: dict[str, str] | None = None,
        tls: bool = False,
        port: int | None = None,
        started: bool = True,
        persistence: bool = False,
    ) -> Mosquitto:
        workdir = tmp_path / f"mosquitto-{len(brokers)}"
        broker = Mosquitto(
            workdir,
            binary=mosquitto_binary,
            users=users,
            tls=tls,
            port=port,
            persistence=persistence,
        )
        brokers.append(broker)
        if started:
            broker.start()
        return broker

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> Mosquitto:
    return mosquitto_factory()


@pytest.fixture
def mqtt_reader() -> Iterator[Callable[..., MqttReader]]:
    readers: list[MqttReader] = []

    def subscribe(broker: Mosquitto, topic_filter: str, **options: Any) -> MqttReader:
        reader = MqttReader(broker, topic_filter, **options)
        readers.append(reader)
        return reader

    yield subscribe
    for reader in readers:
        reader.close()


@pytest.fixture
def dashboard() -> Iterator[Callable[..., Dashboard]]:
    made: list[Dashboard] = []

    def make(broker: Mosquitto, protocol: str = "5", root: str = "edgeagent/cp") -> Dashboard:
        board = Dashboard(broker, protocol, root)
        made.append(board)
        return board

    yield make
    for board in made:
        board.close()


@pytest.fixture
def agent_process() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []

    def start(
        config: Path,
        env: dict[str, str] | None = None,
        *,
        entry: Sequence[str] = ("-m", "edgeagent.cli.main"),
    ) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, *entry, "run", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[Path], Agent]]:
    started: list[Agent] = []

    def start(config: Path) -> Agent:
        agent = Agent(config, tmp_path / f"agent-{len(started)}.log")
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.process.poll() is None:
            agent.process.kill()
        agent.process.wait(30)
