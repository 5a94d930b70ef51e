"""Fleet dashboard benchmark: is the fleet table as fluid with 1,000 devices as with 100?

    python bench/dashboard.py [--devices 100 1000] [--seconds 10] [--json FILE]

For each fleet size N, in this run on this machine: a loopback mosquitto, a synthetic
fleet of N device ids (a retained `online` status with two pipelines each, and telemetry
as docs/protocol.md words it, published by one paho client of this script: no agents, so
the numbers are the dashboard's), `edgeagent fleet dashboard` as a subprocess, and the
page in headless Chromium (Debian's, driven by Playwright). The page's own timings
(`window.edgeagentStats`: JSON parse + apply of each pushed `rows` message, and each render
of the table) and a requestAnimationFrame sampler give:

(1) one device: one device's telemetry 5 times a second; per update, apply + render, ms.
(2) whole fleet: every device's telemetry once a second (N messages/s); per push, apply +
    render, ms, rows per push, and the longest gap between animation frames (a gap far
    above 16.7 ms is a visible stutter); the dashboard process's CPU time per second.

The baseline is N=100 measured in the same run; the ratios 1000/100 are printed (with
rendering only the rows in view, (1) should stay near 1, and (2) grow with the rows per
push, not with the rows in the table).
"""

from __future__ import annotations

import argparse
import json
import re
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cpu import process_cpu_s  # bench/cpu.py: this script's directory is on sys.path
from playwright.sync_api import Browser, sync_playwright

from edgeagent.config import MqttConfig
from edgeagent.mqtt.broker import LOOPBACK, LocalBroker
from edgeagent.mqtt.client import make_client

CHROMIUM = "/usr/bin/chromium"
PIPELINES = ("shapes", "door")


def status(device: str) -> bytes:
    pipelines = [
        {
            "name": name,
            "source": "synthetic",
            "state": "running",
            "model": {"name": f"{name}-model", "version": "1.0.0"},
            "accelerator": "cpu",
        }
        for name in PIPELINES
    ]
    body = {"state": "online", "device": device, "ts": time.time(), "version": "0.1.0",
            "groups": [f"group-{int(device[-4:]) % 7}"], "pipelines": pipelines}  # fmt: skip
    return json.dumps(body).encode()


def telemetry(device: str, tick: int) -> bytes:
    pipelines = {
        name: {"state": "running", "fps": 10 + (tick % 5), "accelerator": "cpu", "fallbacks": 0,
               "latency_ms": {"invoke": {"p50": 4.0, "p95": 5.0 + (tick % 3), "p99": 6.0}},
               "model": {"name": f"{name}-model", "version": "1.0.0"}}
        for name in PIPELINES
    }  # fmt: skip
    system = {"cpu_percent": 20.0 + tick % 10, "cpu_temp_c": 45.0 + (tick % 20) / 2}
    mqtt = {"connected": True, "outbox_depth": tick % 4}
    body = {"device": device, "ts": time.time(), "version": "0.1.0", "system": system,
            "pipelines": pipelines, "mqtt": mqtt}  # fmt: skip
    return json.dumps(body).encode()


def start_dashboard(port: int) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeagent.cli.main", "fleet", "dashboard",
         "--listen", "127.0.0.1:0", "--host", LOOPBACK, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 0.5)[0]:
            found = re.search(r"dashboard: (http://\S+/)", process.stdout.readline())
            if found:
                return process, found.group(1)
    process.kill()
    raise SystemExit("the dashboard did not start")


SAMPLER = """() => {
  window.frameGaps = [];
  let last = performance.now();
  const tick = (now) => {
    window.frameGaps.push(now - last); last = now; requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
  window.edgeagentStats.apply.length = 0;
  window.edgeagentStats.render.length = 0;
}"""
READ = """() => ({apply: window.edgeagentStats.apply.slice(),
  render: window.edgeagentStats.render.slice(), gaps: window.frameGaps.slice()})"""


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else (values or [0.0])[0]


def measure(n: int, seconds: float, browser: Browser) -> dict[str, Any]:
    devices = [f"bench-{i:04d}" for i in range(n)]
    with LocalBroker() as broker:
        client = make_client(MqttConfig(host=LOOPBACK, port=broker.port), client_id="bench-fleet")
        client.reconnect()
        client.loop_start()
        try:
            infos = [client.publish(f"edgeagent/{d}/status", status(d), qos=1, retain=True)
                     for d in devices]  # fmt: skip
            for info in infos:
                info.wait_for_publish(30)
            dashboard, url = start_dashboard(broker.port)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url)
                page.wait_for_function(
                    f"() => document.querySelector('#summary').textContent"
                    f".startsWith('{n} devices')",
                    timeout=120_000,
                )
                for d in devices:  # every row gets its figures once
                    client.publish(f"edgeagent/{d}/telemetry", telemetry(d, 0), qos=0)
                time.sleep(2)

                page.evaluate(SAMPLER)
                end = time.monotonic() + seconds
                tick = 0
                while time.monotonic() < end:
                    tick += 1
                    client.publish(
                        f"edgeagent/{devices[0]}/telemetry", telemetry(devices[0], tick), qos=0
                    )
                    time.sleep(0.2)
                time.sleep(1)
                one = page.evaluate(READ)

                page.evaluate(SAMPLER)
                cpu0, wall0 = process_cpu_s(dashboard.pid), time.monotonic()
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    tick += 1
                    second = time.monotonic()
                    for i, d in enumerate(devices):
                        client.publish(f"edgeagent/{d}/telemetry", telemetry(d, tick), qos=0)
                        if i % 50 == 49:  # spread over the second, as real devices are
                            time.sleep(max(0.0, second + (i + 1) / n - time.monotonic()))
                    time.sleep(max(0.0, second + 1 - time.monotonic()))
                cpu = (process_cpu_s(dashboard.pid) - cpu0) / (time.monotonic() - wall0)
                time.sleep(1)
                fleet = page.evaluate(READ)
                rows = page.evaluate(
                    "document.querySelectorAll('#fleet-body tr[data-device]').length"
                )
                page.close()
            finally:
                dashboard.terminate()
                dashboard.wait(30)
        finally:
            client.disconnect()
            client.loop_stop()

    def cost(stats: dict[str, list[float]]) -> list[float]:
        # One update = one pushed message applied + the render it caused (coalesced per
        # animation frame, so pair them up in order).
        return [a + r for a, r in zip(stats["apply"], stats["render"], strict=False)]

    one_cost, fleet_cost = cost(one), cost(fleet)
    return {
        "devices": n,
        "rows_in_dom": rows,
        "one_device": {"updates": len(one_cost), "median_ms": statistics.median(one_cost),
                       "p95_ms": p95(one_cost), "max_frame_gap_ms": max(one["gaps"])},
        "whole_fleet": {"pushes": len(fleet_cost), "median_ms": statistics.median(fleet_cost),
                        "p95_ms": p95(fleet_cost), "frame_gap_p95_ms": p95(fleet["gaps"]),
                        "apply_median_ms": statistics.median(fleet["apply"]),
                        "render_median_ms": statistics.median(fleet["render"]),
                        "max_frame_gap_ms": max(fleet["gaps"]),
                        "dashboard_cpu_s_per_s": cpu},
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            results = [measure(n, args.seconds, browser) for n in args.devices]
        finally:
            browser.close()
    base = results[0]
    for r in results:
        o, f = r["one_device"], r["whole_fleet"]
        print(f"{r['devices']:5d} devices ({r['rows_in_dom']} rows in the DOM)")
        print(f"  one device, 5 updates/s: {o['updates']} updates, apply+render median "
              f"{o['median_ms']:.2f} ms, p95 {o['p95_ms']:.2f} ms; longest frame gap "
              f"{o['max_frame_gap_ms']:.1f} ms")  # fmt: skip
        print(f"  whole fleet, {r['devices']} msg/s: {f['pushes']} pushes, apply+render median "
              f"{f['median_ms']:.2f} ms (apply {f['apply_median_ms']:.2f}, render "
              f"{f['render_median_ms']:.2f}), p95 {f['p95_ms']:.2f} ms; frame gap p95 "
              f"{f['frame_gap_p95_ms']:.1f} ms, max {f['max_frame_gap_ms']:.1f} ms; dashboard "
              f"CPU {f['dashboard_cpu_s_per_s']:.2f} s/s")  # fmt: skip
        if r is not base:
            ratio_one = o["median_ms"] / base["one_device"]["median_ms"]
            ratio_fleet = f["median_ms"] / base["whole_fleet"]["median_ms"]
            times = r["devices"] / base["devices"]
            print(f"  ratio to {base['devices']} devices: one device x{ratio_one:.2f}, "
                  f"whole fleet x{ratio_fleet:.2f} (devices x{times:g})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
