"""`edgeagent doctor`: checks that this device can run the agent, one line per check.

Each line has a verdict (ok / warn / fail / skip), what was found, and for anything not
ok what to do; critical checks are marked `!`. The exit status is 0 when no critical
check failed, 1 otherwise (an invalid configuration is a critical failure).

`--json` prints one object, whose shape is stable::

    {
      "ok": true,                  # no critical check failed (same as exit status 0)
      "config": "/etc/edgeagent/config.yaml",
      "checks": [
        {
          "name": "broker.mqtt",   # dotted, stable: config, python, litert,
                                   # accelerator.<name>, edgetpu.runtime, camera, i2c,
                                   # clock, tls.certificates, broker.tcp, broker.mqtt,
                                   # disk, model_store, pipeline.<name>.model,
                                   # pipeline.<name>.source (or pipelines)
          "verdict": "fail",       # "ok" | "warn" | "fail" | "skip"
          "critical": true,        # a failure means the agent cannot do its job
          "finding": "...",        # one sentence: what was found
          "fix": "..." | null,     # one sentence: what to do (null when ok)
          "details": {...}         # check-specific facts (paths, versions, reason codes)
        }
      ]
    }
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeagent.doctor import CheckResult, Verdict, healthy, machine_summary, run_checks

DEFAULT_CONFIG = Path("/etc/edgeagent/config.yaml")

_MARK = {Verdict.OK: "ok  ", Verdict.WARN: "warn", Verdict.FAIL: "FAIL", Verdict.SKIP: "skip"}


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "doctor",
        description="Check the configuration, LiteRT, accelerators, camera, I2C, clock, TLS "
        "certificates, broker, disk space, model store and each pipeline's model and "
        "source. Exit status 0 when no critical check fails, 1 otherwise.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"agent configuration (default {DEFAULT_CONFIG}; if that is missing, only what "
        "needs no configuration is checked)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    if not args.verbose:  # the report says what matters; engine loading logs at info
        logging.getLogger().setLevel(logging.WARNING)
    path: Path = args.config or DEFAULT_CONFIG
    results = run_checks(path, required=args.config is not None)
    ok = healthy(results)
    if args.json:
        report = {"ok": ok, "config": str(path), "checks": [r.to_json() for r in results]}
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render(results, path))
    return 0 if ok else 1


def render(results: Sequence[CheckResult], config: Path) -> str:
    """The human report: a header, one line per check, its fix indented below, a summary."""
    lines = [f"edgeagent doctor on {machine_summary()}, config {config}", ""]
    width = max(len(r.name) for r in results)
    for r in results:
        mark = "!" if r.critical else " "
        first, *more = r.finding.splitlines() or [""]
        lines.append(f"[{_MARK[r.verdict]}]{mark} {r.name:<{width}}  {first}")
        indent = " " * (width + 10)
        lines += [f"{indent}{line.strip()}" for line in more]
        if r.verdict is not Verdict.OK and r.fix:
            lines.append(f"{indent}-> {r.fix}")
    counts = {v: sum(1 for r in results if r.verdict is v) for v in Verdict}
    blocking = [r.name for r in results if r.blocking]
    lines.append("")
    lines.append(
        f"{counts[Verdict.OK]} ok, {counts[Verdict.WARN]} warn, {counts[Verdict.FAIL]} fail, "
        f"{counts[Verdict.SKIP]} skip ('!' marks critical checks)"
    )
    unconfigured = any(r.name == "config" and r.verdict is Verdict.WARN for r in results)
    if blocking:
        lines.append(f"NOT READY: critical checks failed: {', '.join(blocking)}")
    elif unconfigured:
        lines.append(
            "no critical check failed, but without a configuration the broker, certificates "
            f"and pipelines were not checked (the service reads {DEFAULT_CONFIG})"
        )
    else:
        lines.append("ready: no critical check failed")
    return "\n".join(lines)
