"""`edgeagent fleet simulate`: N simulated devices that speak the real device protocol, to
load-test a broker and a rollout before touching hardware.

The devices are edgeagent/fleet/simulated_device.py's: each the agent's own `Agent` with a
stand-in for LiteRT (its docstring says what is real and what is not). This module is the
CLI process: `run_simulation` starts `--processes` workers (`python -m
edgeagent.fleet.simulated_device`, each in its own session), hands each its slice of the
devices as one JSON line on stdin, and prints a summary of their JSON stats lines every
few seconds. SIGINT or SIGTERM (or `--duration`) makes it send SIGTERM to every worker and
wait up to `STOP_TIMEOUT_S` for them to stop their devices.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from edgeagent.fleet.simulated_device import (
    DEVICES_PER_PROCESS,
    MAX_DEVICES_PER_PROCESS,
    STOP_TIMEOUT_S,
    SimulationSettings,
    WorkerSpec,
)

__all__ = ["MAX_DEVICES_PER_PROCESS", "SimulationSettings", "default_processes", "run_simulation"]


def default_processes(devices: int) -> int:
    return max(1, math.ceil(devices / DEVICES_PER_PROCESS))


def split(devices: int, processes: int) -> list[tuple[int, int]]:
    """(first, count) per worker, devices numbered from 1, as even as can be."""
    base, extra = divmod(devices, processes)
    slices, first = [], 1
    for k in range(processes):
        count = base + (1 if k < extra else 0)
        if count:
            slices.append((first, count))
        first += count
    return slices


@dataclass(slots=True)
class _Worker:
    proc: subprocess.Popen[str]
    first: int
    count: int
    last: dict[str, Any] | None = None
    done: bool = False


def summary(workers: Sequence[_Worker], devices: int) -> dict[str, Any]:
    """The sum of the workers' last stats lines, and the workers' process ids."""
    seen = [w.last for w in workers if w.last is not None]
    total = {
        key: sum(int(w.get(key, 0)) for w in seen)
        for key in ("online", "results", "backlog", "reconnects", "late", "threads")
    }
    return {
        "type": "summary",
        "ts": round(time.time(), 3),
        "devices": devices,
        **total,
        "workers": [w.proc.pid for w in workers],
    }


def run_simulation(
    settings: SimulationSettings,
    *,
    devices: int,
    processes: int,
    report_every_s: float = 5.0,
    duration_s: float | None = None,
    out: IO[str] | None = None,
    as_json: bool = False,
) -> int:
    """Starts the workers and prints a summary every `report_every_s` until SIGINT/SIGTERM
    or `duration_s`; then stops every worker. 0 when all stopped cleanly."""
    out = out or sys.stdout
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda _s, _f: stop.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    workers: list[_Worker] = []
    try:
        for first, count in split(devices, processes):
            spec = WorkerSpec(settings, first, count, report_every_s)
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgeagent.fleet.simulated_device"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,  # a Ctrl-C reaches only us; we forward SIGTERM
            )
            assert proc.stdin is not None
            proc.stdin.write(spec.to_json() + "\n")
            proc.stdin.flush()
            workers.append(_Worker(proc, first, count))
        started = time.monotonic()
        rate_from: tuple[float, int] | None = None
        with _lines(workers) as lines:
            next_report = time.monotonic() + report_every_s
            while not stop.is_set():
                if duration_s is not None and time.monotonic() - started >= duration_s:
                    break
                if all(w.done for w in workers):
                    out.write("every simulation worker ended\n")
                    return 1
                for worker, text in lines(0.2):
                    _take(worker, text, out, as_json)
                if time.monotonic() >= next_report:
                    next_report += report_every_s
                    line = summary(workers, devices)
                    now = time.monotonic()
                    if rate_from is not None:
                        line["results_per_s"] = round(
                            (line["results"] - line["backlog"] - rate_from[1])
                            / max(now - rate_from[0], 1e-6),
                            1,
                        )
                    rate_from = (now, line["results"] - line["backlog"])
                    _print_summary(line, out, as_json)
            for worker in workers:
                _signal(worker.proc, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while not all(w.done for w in workers) and time.monotonic() < deadline:
                for worker, text in lines(0.2):
                    _take(worker, text, out, as_json)
        clean = True
        for worker in workers:
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                clean = False
                _signal(worker.proc, signal.SIGKILL)
                worker.proc.wait()
            clean = clean and worker.proc.returncode == 0
        final = summary(workers, devices)
        final["type"] = "stopped"
        _print_summary(final, out, as_json)
        return 0 if clean else 1
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                _signal(worker.proc, signal.SIGKILL)
                worker.proc.wait()
            for stream in (worker.proc.stdin, worker.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal(proc: subprocess.Popen[str], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)


def _take(worker: _Worker, line: str | None, out: IO[str], as_json: bool) -> None:
    if line is None:
        worker.done = True
        return
    try:
        data = json.loads(line)
    except ValueError:
        return
    if data.get("type") == "error":
        out.write(
            json.dumps(data) + "\n"
            if as_json
            else f"device {data.get('device')} did not start: {data.get('error')}\n"
        )
        out.flush()
        return
    worker.last = data


def _print_summary(line: dict[str, Any], out: IO[str], as_json: bool) -> None:
    if as_json:
        out.write(json.dumps(line) + "\n")
    else:
        rate = line.get("results_per_s")
        out.write(
            f"{time.strftime('%H:%M:%S')} {line['type']}: {line['online']}/{line['devices']} "
            f"online, {'-' if rate is None else rate} results/s published, backlog "
            f"{line['backlog']}, reconnects {line['reconnects']}, threads {line['threads']}\n"
        )
    out.flush()


@contextlib.contextmanager
def _lines(
    workers: Sequence[_Worker],
) -> Iterator[Callable[[float], list[tuple[_Worker, str | None]]]]:
    """A reader of the workers' stdout lines, one thread per worker (None: that worker's
    stdout ended)."""
    lines: queue.Queue[tuple[_Worker, str | None]] = queue.Queue()

    def pump(worker: _Worker) -> None:
        stream = worker.proc.stdout
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                for line in stream:
                    lines.put((worker, line))
        lines.put((worker, None))

    readers = [
        threading.Thread(target=pump, args=(w,), name=f"edgeagent-sim-read-{w.first}", daemon=True)
        for w in workers
    ]
    for reader in readers:
        reader.start()

    def read(timeout: float) -> list[tuple[_Worker, str | None]]:
        got: list[tuple[_Worker, str | None]] = []
        try:
            got.append(lines.get(timeout=timeout))
            while True:
                got.append(lines.get_nowait())
        except queue.Empty:
            pass
        return got

    try:
        yield read
    finally:
        for reader in readers:
            reader.join(STOP_TIMEOUT_S)
