"""The retained `reported` state tells what runs once a pipeline has started, even when
the agent connected (and published `reported`) while the pipeline was still loading its
model: the in-process `Agent` against a real mosquitto."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeagent.config import load_config
from edgeagent.pipeline import Pipeline
from edgeagent.service import Agent
from tests.agent_config import shapes_pipeline, write_agent_config
from tests.broker import Mosquitto, MqttReader
from tests.waiting import wait_until

pytestmark = pytest.mark.broker

DEVICE = "rep"


def test_reported_says_running_after_a_pipeline_that_was_loading_when_it_was_sent(
    tmp_path: Path, mosquitto: Mosquitto, mqtt_reader: Callable[..., MqttReader]
) -> None:
    reported = mqtt_reader(mosquitto, f"edgeagent/{DEVICE}/reported")
    config = load_config(
        write_agent_config(
            tmp_path,
            mosquitto,
            device=DEVICE,
            pipelines=[shapes_pipeline(width=160, height=120, fps=10)],
        )
    )
    agent: Agent | None = None

    class SlowToLoad(Pipeline):
        """Loads its model only after the agent connected and published `reported`."""

        def start(self, *args: Any, **kwargs: Any) -> None:
            wait_until(
                lambda: agent is not None and agent.link.connected and bool(reported.messages),
                timeout=30,
                message="the agent connected and published reported",
            )
            super().start(*args, **kwargs)

    agent = Agent(config, pipeline_factory=SlowToLoad)
    starting = threading.Thread(target=agent.start, name="test-agent-start")
    starting.start()
    try:
        starting.join(60)

        def running() -> bool:
            last = json.loads(reported.messages[-1].payload)["pipelines"].get("shapes")
            return last is not None and last["state"] == "running" and bool(last["version"])

        wait_until(running, timeout=20, message="reported says shapes is running")
    finally:
        agent.stop()
        starting.join(30)
