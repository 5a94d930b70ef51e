"""Thread names in the kernel: in this process, and in the real daemon."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeagent.threadnames import kernel_name, name_kernel_threads
from tests.agent_config import write_agent_config
from tests.broker import Mosquitto, MqttReader

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="kernel thread names are read from Linux /proc"
)


def kernel_names(pid: int | str = "self") -> set[str]:
    names = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.add((task / "comm").read_text().strip())
        except OSError:
            continue  # the thread ended meanwhile
    return names


def test_kernel_names_fit_in_15_bytes() -> None:
    assert kernel_name("edgeagent-front-door-capture") == "front-door-capt"
    assert kernel_name("edgeagent-outbox") == "outbox"
    assert kernel_name("paho-mqtt-client-edgeagent-pi-17") == "paho-mqtt"
    assert kernel_name("edgeagent-" + "é" * 9) == "é" * 7  # 14 bytes: no half a character


def test_live_threads_get_their_python_name_in_the_kernel() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="edgeagent-cam-decode")
    thread.start()
    try:
        name_kernel_threads()
        comm = Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip()
        assert comm == "cam-decode"
    finally:
        release.set()
        thread.join()


def test_a_thread_is_named_again_only_when_its_name_changed() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="edgeagent-cam-decode")
    thread.start()
    comm = Path(f"/proc/self/task/{thread.native_id}/comm")
    try:
        name_kernel_threads()
        comm.write_text("renamed-aside")  # a second write would undo this
        name_kernel_threads()
        assert comm.read_text().strip() == "renamed-aside"
        thread.name = "edgeagent-cam-infer"
        name_kernel_threads()
        assert comm.read_text().strip() == "cam-infer"
    finally:
        release.set()
        thread.join()


@pytest.mark.broker
def test_the_daemon_names_its_threads_in_the_kernel(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[..., subprocess.Popen[str]],
) -> None:
    reader = mqtt_reader(mosquitto, "edgeagent/names/results/#")
    config = write_agent_config(
        tmp_path,
        mosquitto,
        device="names",
        pipelines=[
            {"name": "cam", "source": {"type": "synthetic", "fps": 20}, "model": "shapes-detector"}
        ],
    )
    process = agent_process(config)
    reader.wait_for_count(3, lambda m: True, timeout=60)
    names = kernel_names(process.pid)
    assert {"cam-capture", "cam-infer", "cam-decode", "outbox", "paho-mqtt"} <= names, names
