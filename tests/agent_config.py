"""The agent.yaml a test writes for `edgeagent run` against a test broker, and the control
socket that file names. Used by the end-to-end tests that start the real daemon."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from edgeagent.control import ask
from edgeagent.errors import EdgeAgentError
from tests.broker import Mosquitto


def write_agent_config(
    tmp_path: Path,
    broker: Mosquitto,
    *,
    device: str,
    pipelines: list[dict[str, Any]],
    **overrides: Any,
) -> Path:
    """Writes `tmp_path/agent.yaml`: device `device` on `broker`, reconnecting within
    0.2-0.5 s, its state and control socket under `tmp_path`, running `pipelines`. Each
    override sets a top-level key; a mapping given for a mapping (`mqtt={"tls": ...}`)
    updates it key by key instead."""
    config: dict[str, Any] = {
        "device": {"id": device},
        "state_dir": str(tmp_path / "state"),
        "control_socket": str(tmp_path / "control.sock"),
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 0.5,
        },
        "pipelines": pipelines,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def shapes_pipeline(model: str = "shapes-detector", **source: Any) -> dict[str, Any]:
    """The `shapes` pipeline: `model` on the synthetic camera (`source` sets its size and
    fps), one thread."""
    return {
        "name": "shapes",
        "source": {"type": "synthetic", **source},
        "model": model,
        "threads": 1,
    }


def status_or_none(tmp_path: Path) -> dict[str, Any] | None:
    """The agent's status over its control socket; None while the socket is not up yet."""
    try:
        status: dict[str, Any] = ask(tmp_path / "control.sock", "status")
    except EdgeAgentError:  # the socket appears once the agent started
        return None
    return status


def status_where(tmp_path: Path, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The agent's status when `check` holds for it, else None."""
    status = status_or_none(tmp_path)
    return status if status is not None and check(status) else None
