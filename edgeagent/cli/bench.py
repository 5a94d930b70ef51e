"""`edgeagent bench`: how fast a model runs on this device, per accelerator and threads."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any, TextIO

from edgeagent.errors import AcceleratorError, EdgeAgentError
from edgeagent.hal.accel import AUTO_ORDER, probe_accelerators
from edgeagent.hal.accel.base import ProbeState
from edgeagent.inference import benchmark


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        description="Load MODEL on each available accelerator with each thread count, and "
        "measure load time and invoke latency (median, p95) on random inputs.",
    )
    parser.add_argument("model", help="bundled model name or path to a .tflite file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=50, help="timed invokes per setting")
    parser.add_argument(
        "--threads", default="1,2,4", help="comma-separated thread counts (default 1,2,4)"
    )
    parser.add_argument(
        "--accelerator",
        default="all",
        choices=["all", *AUTO_ORDER],
        help="one accelerator, or every one present (default)",
    )
    parser.set_defaults(handler=execute)


class ProgressBar:
    """A one-line progress bar on a terminal; silent when stderr is not one."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        # sys.stderr as it is now, not as it was when this module was imported.
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.label = total, label
        self.enabled = self.stream.isatty()

    def update(self, done: int) -> None:
        if self.enabled:
            filled = int(30 * done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r{self.label:<16} [{bar}] {done}/{self.total}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()


def measure(model: str, accelerator: str, threads: int, runs: int) -> dict[str, Any]:
    bar = ProgressBar(runs, f"{accelerator} x{threads}")
    try:
        return benchmark.measure(model, accelerator, threads, runs, on_progress=bar.update)
    finally:
        bar.close()


def execute(args: argparse.Namespace) -> int:
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        raise EdgeAgentError(f"--threads takes numbers like 1,2,4, not {args.threads!r}") from None
    if args.runs < 1 or not threads or min(threads) < 1:
        raise EdgeAgentError("--runs and every --threads value must be at least 1")
    probes = {p.name: p for p in probe_accelerators()}
    names = AUTO_ORDER if args.accelerator == "all" else (args.accelerator,)
    results, skipped = [], []
    for name in names:
        if args.accelerator == "all" and probes[name].state is not ProbeState.PRESENT:
            skipped.append(
                {
                    "accelerator": name,
                    "state": str(probes[name].state),
                    "reason": probes[name].reason,
                }
            )
            continue
        for count in threads:
            try:
                results.append(measure(args.model, name, count, args.runs))
            except AcceleratorError as exc:
                skipped.append({"accelerator": name, "state": "failed", "reason": str(exc)})
                break
    report = {
        "model": args.model,
        "machine": platform.machine(),
        "results": results,
        "skipped": skipped,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model} on {platform.machine()}")
    print(f"{'accelerator':<12}{'threads':>8}{'load ms':>10}{'median ms':>11}{'p95 ms':>9}")
    for r in results:
        inv = r["invoke_ms"]
        print(
            f"{r['accelerator']:<12}{r['threads']:>8}{r['load_ms']:>10.1f}{inv['median']:>11.3f}{inv['p95']:>9.3f}"
        )
    for s in skipped:
        print(f"{s['accelerator']:<12} skipped: {s['state']}: {s['reason']}")
    return 0
