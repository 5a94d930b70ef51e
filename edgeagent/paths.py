"""Where the agent keeps its state and its control socket.

systemd's `StateDirectory=` and `RuntimeDirectory=` set `$STATE_DIRECTORY` and
`$RUNTIME_DIRECTORY`; outside systemd a root process uses /var/lib/edgeagent and
/run/edgeagent, anyone else the XDG directories. An explicit config key always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeagent.config import AgentConfig


def state_dir(config: AgentConfig) -> Path:
    if config.state_dir is not None:
        return config.state_dir
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/edgeagent")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgeagent"


def outbox_path(config: AgentConfig) -> Path:
    return config.outbox.path or state_dir(config) / "outbox.db"


def model_store_root(config: AgentConfig) -> Path:
    return config.delivery.store or state_dir(config) / "models"


def control_socket(config: AgentConfig | None) -> Path:
    if config is not None and config.control_socket is not None:
        return config.control_socket
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "control.sock"
    if os.geteuid() == 0:
        return Path("/run/edgeagent/control.sock")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/edgeagent-{os.geteuid()}"  # noqa: S108
    return Path(base) / "edgeagent" / "control.sock"
