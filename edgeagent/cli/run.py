"""`edgeagent run`: the daemon in the foreground, as systemd runs it."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from edgeagent.config import load_config
from edgeagent.service import Agent, ResultHandoff
from edgeagent.systemd import Notifier, PipelineProgress, ReadyGate, Watchdog

log = logging.getLogger(__name__)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        description="Run the agent in the foreground until SIGTERM or Ctrl-C; then publish "
        "the results in flight, mark the device offline and exit 0. Under systemd "
        "(Type=notify) it reports READY once the first result is stored in the outbox "
        "(with the outbox disabled: acknowledged by the broker) and pings the watchdog "
        "only while every pipeline makes progress.",
    )
    parser.add_argument("--config", "-c", type=Path, required=True, help="YAML config file")
    parser.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    logging.getLogger().setLevel("DEBUG" if args.verbose else config.log_level.upper())
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    notifier = Notifier()
    agent: Agent | None = None

    def not_ready_reasons() -> str:
        return agent.readiness_reasons() if agent is not None else "the agent did not start"

    gate = ReadyGate(notifier, reasons=not_ready_reasons)

    def on_result(handoff: ResultHandoff) -> None:
        if gate.is_ready:
            return
        if handoff.stored:
            gate.result_stored(handoff.pipeline, durable=handoff.durable)
        elif handoff.ticket is not None:
            ticket = handoff.ticket
            gate.result_sent(handoff.pipeline, lambda: ticket.ok)

    agent = Agent(config, config_path=args.config, on_result=on_result)
    gate.start()
    agent.start()
    if config.pipelines and not agent.running:
        log.error("no pipeline could start; see the reasons above")
        notifier.notify_failure("no pipeline could start: " + "; ".join(agent.failed.values()))
        gate.stop()
        agent.stop()
        return 1
    if not agent.running:
        gate.release("running: no pipeline configured")
    watchdog = Watchdog(notifier, PipelineProgress(lambda: agent.running))
    watchdog.start()
    while not stop.wait(1.0) and not agent.restart_requested.is_set():
        pass
    notifier.stopping()
    watchdog.stop()
    gate.stop()
    agent.stop()
    log.info("stopped")
    if agent.restart_requested.is_set():
        return agent.reexec()
    return 0
