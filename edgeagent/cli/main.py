"""`edgeagent` entry point: parses the command line and turns operator errors into one
clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from edgeagent import __version__
from edgeagent.cli import bench, demo, doctor, fleet, infer, model, models, run, status
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.systemd import notify_failure

EXIT_ERROR = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeagent",
        description="On-device LiteRT inference agent: runs models on cameras and sensors "
        "and publishes results over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (run, demo, infer, bench, status, doctor, models, model, fleet):
        module.register(commands)
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
    args = _parser().parse_args(argv)
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
