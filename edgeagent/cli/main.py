"""`edgeagent` entry point: parses the command line and turns operator errors into one
clear message and a non-zero exit, never a traceback.

Only the chosen command's module is imported (each module's `register` adds its parser),
so `edgeagent status` or `--help` never loads LiteRT, paho or the model store; the other
commands appear in the listing by their summary alone.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

from edgeagent import __version__
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.systemd import notify_failure

EXIT_ERROR = 1
EXIT_CONFIG = 2

_COMMANDS: dict[str, str] = {
    "run": "run the agent in the foreground (as systemd does)",
    "demo": "run a broker, the agent and a live view on this machine",
    "infer": "run one inference on an image or a CSV window and print the result",
    "bench": "measure load time and invoke latency of a model on this device",
    "status": "show what the running agent is doing (pipelines, fps, broker, outbox)",
    "doctor": "check that this device can run the agent (hardware, broker, models)",
    "models": "list the models stored on this device, activate a version, roll back",
    "model": "inspect, quantise, sign and publish models",
    "fleet": "deploy model versions to devices, follow the rollout, simulate devices",
}
"""Each command's summary; its parser and handler are in `edgeagent.cli.<command>`, except
where `_MODULES` names another module."""

_MODULES: dict[str, str] = {"models": "store"}
"""`edgeagent models` works on the on-device model store: `cli/store.py`, so that it is not
confused with `edgeagent model` (`cli/model.py`, the workstation's model tools)."""


class _Summarised:
    """The subcommands action as a command module's `register` sees it: the parser it adds
    is listed with the summary from `_COMMANDS`."""

    def __init__(self, commands: Any, summary: str) -> None:
        self._commands = commands
        self._summary = summary

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("help", self._summary)
        return cast(argparse.ArgumentParser, self._commands.add_parser(name, **kwargs))


def _chosen(argv: Sequence[str]) -> str | None:
    """The command named on the command line: the first argument that is not an option
    (the top-level options take no values)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in _COMMANDS else None
    return None


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeagent",
        description="On-device LiteRT inference agent: runs models on cameras and sensors "
        "and publishes results over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    for name, summary in _COMMANDS.items():
        if name == chosen:
            importlib.import_module(f"edgeagent.cli.{_MODULES.get(name, name)}").register(
                _Summarised(commands, summary)
            )
        else:
            commands.add_parser(name, help=summary)
    return parser


def configure_logging(level: str = "info") -> None:
    """Journald adds its own timestamps: under systemd (JOURNAL_STREAM set) logs carry
    only the level and the logger name."""
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv).parse_args(argv)
    configure_logging(
        "debug" if args.verbose else "warning" if args.command in ("infer", "bench") else "info"
    )
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        notify_failure(str(exc))  # under systemd, `systemctl status` shows why
        print(f"edgeagent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except EdgeAgentError as exc:
        print(f"edgeagent: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
