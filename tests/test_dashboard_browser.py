"""The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright; never a downloaded browser build) against a real mosquitto, real `edgeagent
run` agents and `edgeagent fleet dashboard`. A device appears online, its results update
live, commands round-trip (the snapshot's image shown), a deploy shows its progress to
converged, and a killed agent turns offline by its last will."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_config import shapes_pipeline, write_agent_config
from tests.broker import Mosquitto
from tests.dashboard_e2e import running_dashboard
from tests.delivery_e2e import (
    BUNDLED,
    CLI,
    DETECTOR,
    SSD,
    VIBRATION,
    Agent,
    keygen,
    on,
    publish,
    write_config,
)
from tests.delivery_e2e import (
    DEVICE as DELIVERY_DEVICE,
)

CHROMIUM = Path("/usr/bin/chromium")
DEVICE = "pi-browser"
pytestmark = pytest.mark.broker

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need the playwright package (.[dev])"
)


@pytest.fixture
def page() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (.ci/run does)")
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            tab = context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            yield tab
            assert errors == [], f"the page's script failed: {errors}"
        finally:
            browser.close()


def _agent(tmp_path: Path, broker: Mosquitto) -> Path:
    return write_agent_config(
        tmp_path,
        broker,
        device=DEVICE,
        pipelines=[shapes_pipeline(fps=10)],
        delivery={"groups": ["lab"]},
    )


def _confirm(page: Any) -> None:
    dialog = page.locator("#confirm")
    playwright_api.expect(dialog).to_be_visible()
    page.click("#confirm-ok")
    playwright_api.expect(dialog).to_be_hidden()


def test_a_device_appears_online_its_results_update_live_and_commands_round_trip(
    tmp_path: Path, mosquitto: Mosquitto, agents: Callable[[Path], Agent], page: Any
) -> None:
    expect = playwright_api.expect
    agents(_agent(tmp_path, mosquitto))
    with running_dashboard(mosquitto, tmp_path / "dash.log") as dash:
        page.goto(dash.url)
        row = page.locator(f'tr[data-device="{DEVICE}"]')
        expect(row.locator("td.state")).to_have_text("online", timeout=60_000)
        expect(row.locator("td").nth(3)).to_have_text("lab")  # the group, from its status
        expect(row).to_contain_text("shapes: shapes-detector 1.0.0 running")

        row.click()
        expect(page.locator("#dev-name")).to_have_text(DEVICE)
        results = page.locator("#results-shapes")
        expect(results).to_have_attribute("data-seq", re.compile(r"^\d+$"), timeout=30_000)
        first = int(results.get_attribute("data-seq"))
        page.wait_for_function(
            f"() => Number(document.querySelector('#results-shapes').dataset.seq) > {first + 5}",
            timeout=30_000,
        )  # pushed over the WebSocket: nothing reloads the page
        live = page.locator('[data-pipeline="shapes"] img.live')
        page.wait_for_function(
            "() => document.querySelector('[data-pipeline=\"shapes\"] img.live').naturalWidth > 0",
            timeout=30_000,
        )
        expect(live).to_be_visible()

        page.click('#dev-commands button[data-cmd="ping"]')
        _confirm(page)
        expect(page.locator("#reply-title")).to_contain_text("ping to pi-browser: succeeded")
        expect(page.locator("#reply")).to_contain_text('"pong": true')

        page.click('button[data-cmd="snapshot"][data-pipeline="shapes"]')
        _confirm(page)
        expect(page.locator("#reply-title")).to_contain_text(
            "snapshot shapes to pi-browser: succeeded"
        )
        image = page.locator("#reply-image")
        expect(image).to_be_visible()
        assert page.evaluate("document.querySelector('#reply-image').naturalWidth") > 0

        page.click('button[data-cmd="pipeline.stop"][data-pipeline="shapes"]')
        page.click("#confirm-cancel")  # a command not confirmed is not sent
        expect(page.locator("#reply-title")).to_contain_text("snapshot shapes")
        page.click('button[data-cmd="pipeline.stop"][data-pipeline="shapes"]')
        _confirm(page)
        expect(page.locator("#reply")).to_contain_text('"state": "stopped"')
        expect(page.locator('[data-pipeline="shapes"] .head')).to_contain_text(
            "stopped", timeout=30_000
        )


def test_a_killed_agent_turns_offline_by_its_last_will(
    tmp_path: Path, mosquitto: Mosquitto, agents: Callable[[Path], Agent], page: Any
) -> None:
    expect = playwright_api.expect
    agent = agents(_agent(tmp_path, mosquitto))
    with running_dashboard(mosquitto, tmp_path / "dash.log") as dash:
        page.goto(dash.url)
        state = page.locator(f'tr[data-device="{DEVICE}"] td.state')
        expect(state).to_have_text("online", timeout=60_000)
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(30)
        expect(state).to_have_text("offline", timeout=30_000)
        page.select_option("#state-filter", "offline")
        expect(page.locator("#count")).to_have_text("1 shown")
        page.select_option("#state-filter", "online")
        expect(page.locator("#count")).to_have_text("0 shown")


def test_a_deploy_from_the_page_shows_its_progress_to_converged(
    tmp_path: Path,
    mosquitto: Mosquitto,
    agents: Callable[[Path], Agent],
    page: Any,
) -> None:
    expect = playwright_api.expect
    key, public = keygen(tmp_path / "keys")
    config = write_config(
        tmp_path,
        mosquitto,
        public,
        probation_s=3,
        probation_min_results=10,
        chunk_timeout_s=10,
        latency_factor=50,
    )
    agents(config)
    # Small chunks: the download takes several steps, which the page shows as they come.
    publish(mosquitto, key, SSD, "2.0.0", BUNDLED / "shapes-detector-ssd.yaml", 4096)
    with running_dashboard(mosquitto, tmp_path / "dash.log") as dash:
        page.goto(f"{dash.url}#/rollouts")
        expect(page.locator("#deploy-model option")).to_have_text(
            ["shapes-detector 2.0.0"], timeout=30_000
        )
        expect(page.locator("#summary")).to_have_text("1 devices, 1 online", timeout=60_000)
        page.evaluate(
            """() => {
              window.seen = [];
              new MutationObserver(() => {
                for (const tr of document.querySelectorAll('#rollouts-body tr')) {
                  window.seen.push(tr.querySelector('td.status').textContent + ' ' +
                                   tr.querySelector('.pct').textContent.trim());
                }
              }).observe(document.querySelector('#rollouts-body'), {childList: true});
            }"""
        )
        page.fill("#deploy-target", DELIVERY_DEVICE)
        page.fill("#deploy-pipeline", "shapes")
        page.click("#deploy button[type=submit]")
        expect(page.locator("#confirm-text")).to_have_text(
            f"Deploy shapes-detector 2.0.0 to pipeline shapes of device {DELIVERY_DEVICE}?"
        )
        _confirm(page)
        expect(page.locator("#deploy-result")).to_contain_text(
            f"published on edgeagent/{DELIVERY_DEVICE}/desired"
        )
        row = page.locator(f'tr[data-rollout="{DELIVERY_DEVICE}/shapes"]')
        expect(row.locator("td.status")).to_have_text("converged", timeout=120_000)
        expect(row.locator(".pct")).to_have_text("100%")
        expect(row).to_contain_text("shapes-detector 2.0.0 (running)")
        expect(page.locator("#rollout-summary")).to_contain_text("1 of 1")
        seen = page.evaluate("window.seen")
        assert any(s.startswith("waiting") for s in seen), seen
        assert seen[-1] == "converged 100%"

        # A version the device refuses: the page shows the failure with its reason code.
        # (The vibration model takes sensor windows, not frames: the gate rejects it.)
        publish(mosquitto, key, VIBRATION, "3.0.0", BUNDLED / "vibration-anomaly.yaml", 16384)
        expect(page.locator("#deploy-model option")).to_have_count(2, timeout=30_000)
        page.select_option("#deploy-model", "shapes-detector 3.0.0")
        page.click("#deploy button[type=submit]")
        _confirm(page)
        expect(row.locator("td.status")).to_have_text("failed", timeout=120_000)
        expect(row.locator("td").last).to_contain_text("input-mismatch: ")
        expect(row).to_contain_text("shapes-detector 2.0.0 (running)")
        expect(page.locator("#rollout-summary")).to_contain_text("1 failed")


def test_a_simulated_fleet_is_listed_filtered_sorted_and_converges_on_a_group_deploy(
    tmp_path: Path, mosquitto: Mosquitto, page: Any
) -> None:
    expect = playwright_api.expect
    count = 20
    key, public = keygen(tmp_path / "keys")
    publish(mosquitto, key, DETECTOR, "1.1.0", BUNDLED / "shapes-detector.yaml", 16384)
    with (
        (tmp_path / "sim.out").open("w") as out,
        (tmp_path / "sim.err").open("w") as err,
    ):
        simulation = subprocess.Popen(
            [
                *CLI,
                "fleet",
                "simulate",
                "--devices",
                str(count),
                "--group",
                "lab",
                "--pipeline",
                "detect",
                "--trusted-key",
                str(public),
                "--probation-s",
                "1",
                "--state-dir",
                str(tmp_path / "sim-state"),
                *on(mosquitto),
            ],
            stdout=out,
            stderr=err,
            text=True,
        )
    try:
        with running_dashboard(mosquitto, tmp_path / "dash.log") as dash:
            page.goto(dash.url)
            summary = page.locator("#summary")
            expect(summary).to_have_text(f"{count} devices, {count} online", timeout=120_000)
            page.fill("#filter", "sim-0007")
            expect(page.locator("#count")).to_have_text("1 shown")
            page.fill("#filter", "lab")  # the group column is filtered on too
            expect(page.locator("#count")).to_have_text(f"{count} shown")
            page.fill("#filter", "")
            page.click('th[data-sort="id"]')  # ascending already: now descending
            expect(page.locator("#fleet-body tr[data-device]").first).to_have_attribute(
                "data-device", f"sim-{count:04d}"
            )

            page.goto(f"{dash.url}#/rollouts")
            page.select_option("#deploy-kind", "group")
            page.fill("#deploy-target", "lab")
            page.fill("#deploy-pipeline", "detect")
            expect(page.locator("#deploy-model option")).to_have_text(["shapes-detector 1.1.0"])
            page.click("#deploy button[type=submit]")
            _confirm(page)
            expect(page.locator("#deploy-result")).to_contain_text(
                "published on edgeagent/group/lab/desired"
            )
            expect(page.locator("#rollout-summary")).to_contain_text(
                f"{count} of {count} pipelines converged", timeout=180_000
            )
            expect(page.locator("#rollouts-body td.status.converged")).to_have_count(count)

            simulation.send_signal(signal.SIGTERM)
            simulation.wait(120)
            expect(summary).to_have_text(f"{count} devices, 0 online", timeout=60_000)
    finally:
        if simulation.poll() is None:
            simulation.kill()
        simulation.wait(60)


def test_tracked_objects_of_the_fleet_are_listed_as_they_come(
    tmp_path: Path, mosquitto: Mosquitto, agents: Callable[[Path], Agent], page: Any
) -> None:
    expect = playwright_api.expect
    pipeline = shapes_pipeline(width=320, height=240, fps=15)
    pipeline["publish"] = {
        "mode": "events",
        "tracking": {"min_hits": 2, "max_misses": 10},
        "summary_s": 0.5,
        "zones": [{"name": "all", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]]}],
    }
    config = write_agent_config(tmp_path, mosquitto, device=DEVICE, pipelines=[pipeline])
    agents(config)
    with running_dashboard(mosquitto, tmp_path / "dash.log") as dash:
        page.goto(f"{dash.url}#/events")
        first = page.locator("#tracks-body tr").first
        expect(first).to_contain_text(DEVICE, timeout=60_000)
        expect(first.locator("td").nth(2)).to_have_text("shapes")
        expect(first.locator("td").nth(3)).to_have_text(re.compile(r"^(new|update|end)$"))
        expect(first.locator("td").nth(4)).to_have_text(re.compile(r"^(circle|square|triangle)$"))
        expect(page.locator("#tracks-body td", has_text="all").first).to_be_visible()

        first.locator("a").click()  # to the device page: its summary counts by label
        expect(page.locator('[data-pipeline="shapes"] .summary')).to_contain_text(
            "now: {", timeout=30_000
        )


def test_with_a_token_the_page_asks_for_it_then_works(
    tmp_path: Path, mosquitto: Mosquitto, page: Any
) -> None:
    expect = playwright_api.expect
    token = tmp_path / "token"
    token.write_text("browser-test-token-0123456789\n", encoding="utf-8")
    with running_dashboard(mosquitto, tmp_path / "dash.log", "--token-file", str(token)) as dash:
        page.goto(dash.url)
        expect(page).to_have_url(f"{dash.url}login")
        page.fill("input[name=token]", "not the token")
        page.click("form button")
        expect(page.locator("body")).to_contain_text("wrong token")
        page.goto(f"{dash.url}login")
        page.fill("input[name=token]", "browser-test-token-0123456789")
        page.click("form button")
        expect(page).to_have_url(dash.url)
        expect(page.locator("#link")).to_have_text("live", timeout=30_000)  # the WebSocket
        cookie = next(c for c in page.context.cookies() if c["name"] == "edgeagent_session")
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        expect(page.locator("#logout")).to_be_visible()
