"""`edgeagent status`: what the running daemon is doing, asked over its control socket
(so it works while the broker is down)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgeagent.config import load_config
from edgeagent.control import ask
from edgeagent.paths import control_socket

DEFAULT_CONFIG = Path("/etc/edgeagent/config.yaml")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "status",
        description="Ask the running agent over its local control socket: pipelines, fps, "
        "latency, accelerator, model versions, broker connection, outbox depth, last errors.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--config", "-c", type=Path, help=f"config file (default {DEFAULT_CONFIG})")
    parser.add_argument("--socket", type=Path, help="control socket (default: from the config)")
    parser.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    path = args.socket
    if path is None:
        config_path = args.config or DEFAULT_CONFIG
        config = load_config(config_path) if args.config or config_path.exists() else None
        path = control_socket(config)
    status = ask(path, "status")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    return 0


def render(status: dict[str, Any]) -> str:
    mqtt = status["mqtt"]
    lines = [
        f"edgeagent {status['version']} on {status['device']} (pid {status['pid']}, "
        f"up {status['uptime_s']:.0f} s)",
        f"broker {mqtt['broker']}: {'connected' if mqtt['connected'] else 'DISCONNECTED'}"
        f", {mqtt['reconnects']} reconnect(s)"
        + (f", last error: {mqtt['last_error']}" if mqtt.get("last_error") else ""),
    ]
    outbox = status.get("outbox")
    if outbox:
        age = outbox["oldest_age_s"]
        lines.append(
            f"outbox: {outbox['depth']} waiting"
            + (f", oldest {age:.0f} s" if age is not None else "")
            + (f", {outbox['dropped']} dropped" if outbox["dropped"] else "")
        )
    lines.append("")
    for p in status["pipelines"]:
        model = p.get("model", {})
        head = (
            f"{p['name']:<14} {p['state']:<8} {model.get('name', '-')} {model.get('version', '')}"
        )
        if p["state"] == "failed":
            lines.append(f"{head}\n    error: {p.get('error')}")
            continue
        invoke = p.get("latency_ms", {}).get("invoke", {})
        lines.append(
            f"{head} on {p.get('accelerator', '-')}: {p.get('fps', 0):.1f} fps, invoke p50 "
            f"{invoke.get('p50') or 0:.2f} ms p95 {invoke.get('p95') or 0:.2f} ms, "
            f"{p.get('results_out', 0)} results, {p.get('frames_dropped', 0)} dropped"
        )
        if p.get("last_error"):
            lines.append(f"    last error: {p['last_error']}")
    if status.get("last_errors"):
        lines += ["", "recent errors:", *(f"  {line}" for line in status["last_errors"])]
    return "\n".join(lines)
