"""Takes the dashboard screenshots in docs/img/ with the real thing.

    python docs/screenshots.py [--out docs/img] [--devices 30]

Starts `edgeagent demo` (its broker, the demo agent and the dashboard it serves), a
simulated fleet next to the demo device (`edgeagent fleet simulate --group lab`, trusting
a fresh signing key), publishes the bundled detector signed as shapes-detector 1.1.0, and
drives headless Chromium (Debian's `chromium`, through Playwright) over the pages: the
fleet, the demo camera's device page (live view with its boxes, telemetry plots), a
snapshot command's reply, and the rollouts page during a group deploy made from the page.
"""

from __future__ import annotations

import argparse
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "edgeagent.cli.main"]
CHROMIUM = "/usr/bin/chromium"


def read_demo(process: subprocess.Popen[str], timeout: float = 60) -> tuple[str, int]:
    """The dashboard URL and the broker port the demo prints."""
    assert process.stdout is not None
    url = port = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (url is None or port is None):
        if select.select([process.stdout], [], [], 0.5)[0]:
            line = process.stdout.readline()
            url = url or _group(r"dashboard: (http://\S+?/)", line)
            found = _group(r"mosquitto_sub -h \S+ -p (\d+)", line)
            port = port or (int(found) if found else None)
    if url is None or port is None:
        raise SystemExit("the demo did not print its dashboard URL and broker port")
    return url, port


def _group(pattern: str, text: str) -> str | None:
    found = re.search(pattern, text)
    return found.group(1) if found else None


def run(*args: str) -> None:
    subprocess.run([*CLI, *args], check=True, capture_output=True, text=True, timeout=120)


def confirm(page: Page) -> None:
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm-ok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--devices", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    total = args.devices + 1
    with tempfile.TemporaryDirectory(prefix="edgeagent-shots-") as tmp:
        folder = Path(tmp)
        demo = subprocess.Popen(
            [*CLI, "demo", "--dashboard-port", "0"], stdout=subprocess.PIPE, text=True
        )
        simulation = None
        try:
            url, port = read_demo(demo)
            broker = ["--host", "127.0.0.1", "--port", str(port)]
            run("model", "keygen", "-o", str(folder))
            key, public = folder / "edgeagent-signing.key", folder / "edgeagent-signing.pub"
            detector = REPO / "models" / "bundled" / "shapes-detector.tflite"
            run("model", "publish", str(detector), "--name", "shapes-detector",
                "--version", "1.1.0", "--key", str(key), *broker)  # fmt: skip
            simulation = subprocess.Popen(
                [*CLI, "fleet", "simulate", "--devices", str(args.devices), "--group", "lab",
                 "--pipeline", "detect", "--trusted-key", str(public), "--probation-s", "5",
                 "--id-prefix", "pi-lab", *broker],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            with sync_playwright() as driver:
                browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(url)
                expect(page.locator("#summary")).to_have_text(
                    f"{total} devices, {total} online", timeout=120_000
                )
                # Telemetry comes every 30 s: wait for every row's figures.
                page.wait_for_timeout(35_000)
                page.screenshot(path=args.out / "dashboard-fleet.png")

                page.goto(f"{url}#/device/demo")
                page.wait_for_function(
                    "() => document.querySelector('[data-pipeline=\"shapes\"] img.live')"
                    "?.naturalWidth > 0",
                    timeout=60_000,
                )
                page.wait_for_timeout(2_000)
                page.screenshot(path=args.out / "dashboard-device.png", full_page=True)
                page.click('button[data-cmd="snapshot"][data-pipeline="shapes"]')
                confirm(page)
                expect(page.locator("#reply-image")).to_be_visible(timeout=30_000)
                page.locator("#reply-panel").screenshot(path=args.out / "dashboard-snapshot.png")

                page.goto(f"{url}#/rollouts")
                page.select_option("#deploy-kind", "group")
                page.fill("#deploy-target", "lab")
                page.fill("#deploy-pipeline", "detect")
                expect(page.locator("#deploy-model option")).to_have_count(1, timeout=30_000)
                page.click("#deploy button[type=submit]")
                confirm(page)
                expect(page.locator("#rollouts-body td.status.converged").first).to_be_visible(
                    timeout=120_000
                )
                page.screenshot(path=args.out / "dashboard-rollouts.png")
                browser.close()
        finally:
            if simulation is not None:
                simulation.send_signal(signal.SIGTERM)
                simulation.wait(120)
            demo.send_signal(signal.SIGINT)
            demo.communicate(timeout=60)
    for name in ("fleet", "device", "snapshot", "rollouts"):
        print(args.out / f"dashboard-{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
