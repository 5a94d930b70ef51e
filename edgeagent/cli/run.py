"""`edgeagent run`: the daemon in the foreground."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from edgeagent.config import load_config
from edgeagent.service import Agent

log = logging.getLogger(__name__)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run the agent in the foreground (as systemd does)",
        description="Run the agent in the foreground until SIGTERM or Ctrl-C; then publish "
        "the results in flight, mark the device offline and exit 0.",
    )
    parser.add_argument("--config", "-c", type=Path, required=True, help="YAML config file")
    parser.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    logging.getLogger().setLevel(config.log_level.upper() if not args.verbose else "DEBUG")
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = Agent(config)
    agent.start()
    if config.pipelines and not agent.running:
        log.error("no pipeline could start; see the reasons above")
        agent.stop()
        return 1
    while not stop.wait(1.0):
        pass
    agent.stop()
    log.info("stopped")
    return 0
