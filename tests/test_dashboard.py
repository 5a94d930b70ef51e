"""`edgeagent fleet dashboard` at the HTTP and WebSocket level: who may use it, what a
foreign page cannot forge, commands and deploys against a real agent, and the bounds of
the fleet state. The browser itself is tests/test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeagent.fleet.dashboard import fleet_state
from edgeagent.fleet.dashboard.fleet_state import FleetState
from edgeagent.fleet.dashboard.security import Guard
from tests.agent_config import shapes_pipeline, write_agent_config
from tests.broker import Mosquitto, MqttReader, Publisher, body
from tests.dashboard_e2e import CLI, get_json, http, post_json, running_dashboard
from tests.delivery_e2e import Agent
from tests.waiting import wait_until

DEVICE = "pi-dash"
TOKEN = "s3cret-token-for-tests-0123456789"  # noqa: S105 - the test's own token


def _agent_config(tmp_path: Path, broker: Mosquitto, **overrides: Any) -> Path:
    return write_agent_config(
        tmp_path,
        broker,
        device=DEVICE,
        pipelines=[shapes_pipeline(fps=10)],
        **overrides,
    )


def _csrf(url: str, headers: dict[str, str] | None = None) -> str:
    token = get_json(f"{url}api/session", headers)["csrf"]
    assert isinstance(token, str)
    assert len(token) >= 16
    return token


def _online(url: str, device: str, headers: dict[str, str] | None = None) -> bool:
    rows = get_json(f"{url}api/fleet", headers)["rows"]
    return any(r["id"] == device and r["online"] is True for r in rows)


# --- listening and logging in ------------------------------------------------------------


def test_a_non_loopback_address_without_a_token_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "fleet", "dashboard", "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=180,  # a Python start-up: generous on a loaded machine
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "without authentication" in done.stderr
    assert "--token-file" in done.stderr


def test_a_short_token_is_refused_with_the_fix(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("short\n", encoding="utf-8")
    done = subprocess.run(
        [*CLI, "fleet", "dashboard", "--listen", "127.0.0.1:0", "--token-file", str(token)],
        capture_output=True,
        text=True,
        timeout=180,  # a Python start-up: generous on a loaded machine
        check=False,
    )
    assert done.returncode == 2
    assert "at least 16" in done.stderr


def test_with_a_token_nothing_is_served_without_logging_in(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    with running_dashboard(
        mosquitto, tmp_path / "dash.log", "--token-file", str(token_file)
    ) as dash:
        assert http(f"{dash.url}api/fleet")[0] == 401
        assert http(f"{dash.url}api/session")[0] == 401
        status, headers, _ = http(dash.url)
        assert (status, headers["Location"]) == (303, "/login")
        assert http(f"{dash.url}login")[0] == 200

        form = {"Content-Type": "application/x-www-form-urlencoded"}
        wrong = http(f"{dash.url}login", method="POST", body=b"token=not-the-token", headers=form)
        assert wrong[0] == 401
        assert "Set-Cookie" not in wrong[1]

        status, headers, _ = http(
            f"{dash.url}login", method="POST", body=f"token={TOKEN}".encode(), headers=form
        )
        assert status == 303
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        session = {"Cookie": cookie.split(";")[0]}
        assert get_json(f"{dash.url}api/fleet", session) == {
            "rows": [],
            "models": [],
            "groups": [],
            "tracks": [],
        }
        forged = {"Cookie": "edgeagent_session=forged-session-id"}
        assert http(f"{dash.url}api/fleet", headers=forged)[0] == 401

        # A command post needs the session's CSRF token too.
        ping = {"device": DEVICE, "command": "ping"}
        assert post_json(f"{dash.url}api/command", ping, session)[0] == 403
        csrf = _csrf(dash.url, session)
        other_session_csrf = _csrf(dash.url, _login(dash.url))
        assert other_session_csrf != csrf
        refused = post_json(
            f"{dash.url}api/command", ping, {**session, "X-CSRF-Token": other_session_csrf}
        )
        assert refused[0] == 403


def _login(url: str) -> dict[str, str]:
    _, headers, _ = http(
        f"{url}login",
        method="POST",
        body=f"token={TOKEN}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    return {"Cookie": headers["Set-Cookie"].split(";")[0]}


def test_forged_requests_are_refused_and_send_nothing(
    tmp_path: Path, mosquitto: Mosquitto, mqtt_reader: Callable[..., MqttReader]
) -> None:
    commands = mqtt_reader(mosquitto, "edgeagent/+/cmd/#")
    with running_dashboard(mosquitto, tmp_path / "dash.log") as dash:
        csrf = _csrf(dash.url)
        ping = {"device": DEVICE, "command": "ping"}
        no_header = post_json(f"{dash.url}api/command", ping)
        wrong = post_json(f"{dash.url}api/command", ping, {"X-CSRF-Token": "guess"})
        foreign = post_json(
            f"{dash.url}api/command",
            ping,
            {"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
        )
        deploy = post_json(
            f"{dash.url}api/deploy",
            {"device": DEVICE, "pipeline": "shapes", "model": "m", "version": "1.0.0"},
            {"Origin": "http://evil.example"},
        )
        rebinding = http(dash.url, headers={"Host": "evil.example"})
        cross_site = {"Sec-Fetch-Site": "cross-site"}
        embedded = http(f"{dash.url}api/live/{DEVICE}/shapes", headers=cross_site)
        assert embedded[0] == 403, "a foreign <img> cannot make it ask for snapshots"
        assert http(f"{dash.url}api/fleet", headers=cross_site)[0] == 403
        page = http(dash.url)
        assert page[0] == 200
        assert page[1]["X-Frame-Options"] == "DENY", "no framing: no clickjacking"
        assert "frame-ancestors 'none'" in page[1]["Content-Security-Policy"]
        assert [no_header[0], wrong[0], foreign[0], deploy[0]] == [403, 403, 403, 403]
        assert rebinding[0] == 421, "a DNS-rebinding page gets nothing"
        # The control: the same request with the token and its own origin is sent.
        origin = dash.url.rstrip("/")
        sent = post_json(
            f"{dash.url}api/command",
            {**ping, "args": {}},
            {"X-CSRF-Token": csrf, "Origin": origin},
        )
        assert sent[0] == 504, sent  # no such device answers, but the request went out
        assert "did not answer ping" in sent[1]["error"]
        commands.wait_for(lambda m: m.topic == f"edgeagent/{DEVICE}/cmd/ping")
        assert len(commands.messages) == 1, "only the genuine request reached the broker"

        async def websocket(origin_header: str) -> Any:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(f"{dash.url}ws", headers={"Origin": origin_header}) as ws,
            ):
                return json.loads((await ws.receive(timeout=30)).data)

        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            asyncio.run(websocket("http://evil.example"))
        assert refused.value.status == 403
        assert asyncio.run(websocket(origin))["type"] == "fleet"


# --- commands, deploys and live updates against a real agent ----------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_commands_round_trip_and_a_snapshot_comes_back_as_an_image(
    tmp_path: Path, mosquitto: Mosquitto, agents: Callable[[Path], Agent], protocol: str
) -> None:
    """MQTT 5: replies on the dashboard's response topic; 3.1.1: on the device's `reply`
    topic, matched by request id (and the image by its sha256)."""
    agents(_agent_config(tmp_path, mosquitto))
    with running_dashboard(mosquitto, tmp_path / "dash.log", "--protocol", protocol) as dash:
        wait_until(lambda: _online(dash.url, DEVICE), 60, f"{DEVICE} online on the dashboard")
        headers = {"X-CSRF-Token": _csrf(dash.url)}
        status, answer = post_json(
            f"{dash.url}api/command", {"device": DEVICE, "command": "ping"}, headers
        )
        assert status == 200, answer
        assert answer["reply"]["stage"] == "succeeded"
        assert answer["reply"]["result"]["pong"] is True

        def snapshot() -> Any:
            _, found = post_json(
                f"{dash.url}api/command",
                {"device": DEVICE, "command": "snapshot", "args": {"pipeline": "shapes"}},
                headers,
            )
            return found if found["reply"]["stage"] == "succeeded" else None

        found = wait_until(snapshot, 30, "a snapshot (the pipeline needs a first result)")
        header, encoded = found["image"].split(",", 1)
        assert header == "data:image/jpeg;base64"
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert image.format == "JPEG"
        assert image.width > 0
        assert found["reply"]["result"]["bytes"] == len(base64.b64decode(encoded))

        refused = post_json(
            f"{dash.url}api/command", {"device": DEVICE, "command": "config.set"}, headers
        )
        assert refused[0] == 400, "config.set stays with the command line"
        bad = post_json(
            f"{dash.url}api/command",
            {"device": "a/b", "command": "ping"},
            headers,
        )
        assert bad[0] == 400
        assert "cannot be in an MQTT topic level" in bad[1]

        live = http(f"{dash.url}api/live/{DEVICE}/shapes")
        assert live[0] == 200
        assert live[1]["Content-Type"] == "image/jpeg"
        assert Image.open(io.BytesIO(live[2])).format == "JPEG"


def test_deploy_keeps_the_other_pipelines_of_the_retained_desired_state(
    tmp_path: Path, mosquitto: Mosquitto, mqtt_reader: Callable[..., MqttReader]
) -> None:
    topic = f"edgeagent/{DEVICE}/desired"
    before = {"pipelines": {"door": {"model": "digits", "version": "1.0.0"}}, "ts": 1.0, "x": 7}
    publisher = Publisher(mosquitto)
    try:
        publisher.publish(topic, json.dumps(before).encode(), retain=True)
    finally:
        publisher.close()
    with running_dashboard(mosquitto, tmp_path / "dash.log") as dash:
        headers = {"X-CSRF-Token": _csrf(dash.url)}
        wait_until(
            lambda: (
                get_json(f"{dash.url}api/device/{DEVICE}")["desired"] is not None
                if http(f"{dash.url}api/device/{DEVICE}")[0] == 200
                else None
            ),
            30,
            "the retained desired state read by the dashboard",
        )
        status, answer = post_json(
            f"{dash.url}api/deploy",
            {"device": DEVICE, "pipeline": "shapes", "model": "shapes-detector",
             "version": "1.1.0"},
            headers,
        )  # fmt: skip
        assert status == 200, answer
        bad = post_json(
            f"{dash.url}api/deploy",
            {"device": DEVICE, "pipeline": "shapes", "model": "m", "version": "latest"},
            headers,
        )
        assert bad[0] == 400
        assert "version" in bad[1]
    reader = mqtt_reader(mosquitto, topic)
    retained = body(reader.wait_for(lambda m: m.retain))
    assert retained["pipelines"] == {
        "door": {"model": "digits", "version": "1.0.0"},
        "shapes": {"model": "shapes-detector", "version": "1.1.0"},
    }
    assert retained["x"] == 7, "members the dashboard does not know are kept"
    assert "(dashboard)" in retained["by"]


def test_malformed_messages_are_ignored_and_the_dashboard_keeps_serving(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    with running_dashboard(mosquitto, tmp_path / "dash.log") as dash:
        publisher = Publisher(mosquitto)
        try:
            for kind in ("status", "telemetry", "results/shapes", "events", "reported"):
                publisher.publish(f"edgeagent/junk/{kind}", b"\xff not json {")
            publisher.publish("edgeagent/junk/telemetry", b'{"system": 5, "pipelines": []}')
            publisher.publish("edgeagent/junk/status", b'{"state": "online", "pipelines": 3}')
        finally:
            publisher.close()
        row = wait_until(
            lambda: next(
                (
                    r
                    for r in get_json(f"{dash.url}api/fleet")["rows"]
                    if r["id"] == "junk" and r["online"] is True
                ),
                None,
            ),
            30,
            "the junk device's row, online after the last status",
        )
        assert row["pipelines"] == []
        assert dash.process.poll() is None
    assert "Traceback" not in dash.stderr()


# --- the fleet state's bounds ------------------------------------------------------------


def test_every_buffer_of_the_fleet_state_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    state = FleetState("edgeagent", clock=lambda: now[0])
    for seq in range(fleet_state.RESULTS_KEPT * 5):
        state.feed("edgeagent/d/results/p", json.dumps({"seq": seq}).encode())
    for i in range(fleet_state.EVENTS_KEPT * 3):
        state.feed("edgeagent/d/events", json.dumps({"type": "x", "n": i}).encode())
    for i in range(fleet_state.TRACKS_KEPT * 2):
        state.feed("edgeagent/d/tracks/p", json.dumps({"type": "new", "id": str(i)}).encode())
    for minute in range(120):  # two hours of telemetry, one a minute
        ts = now[0] + minute * 60
        state.feed("edgeagent/d/telemetry", json.dumps({"ts": ts}).encode())
    record = state.devices["d"]
    assert [r["seq"] for r in record.results["p"]] == list(range(80, 100))
    assert record.results_seen["p"] == 100
    assert len(record.events) == fleet_state.EVENTS_KEPT
    assert record.events[-1]["n"] == fleet_state.EVENTS_KEPT * 3 - 1
    assert len(state.tracks) == fleet_state.TRACKS_KEPT
    span = record.history[-1]["ts"] - record.history[0]["ts"]
    assert span <= fleet_state.HISTORY_S
    assert len(record.history) == 61

    monkeypatch.setattr(fleet_state, "MAX_DEVICES", 3)
    for i in range(10):
        state.feed(f"edgeagent/extra-{i}/status", b'{"state": "online"}')
    assert len(state.devices) == 3
    assert state.ignored_devices == 8


def test_the_group_list_is_pushed_again_when_a_device_s_groups_change_not_on_tracks() -> None:
    state = FleetState("edgeagent")
    online = {"state": "online", "groups": ["lab"]}
    state.feed("edgeagent/d/status", json.dumps(online).encode())
    assert state.take_dirty() == ({"d"}, True)
    assert state.group_names() == ["lab"]
    state.feed("edgeagent/d/status", json.dumps(online).encode())
    state.feed("edgeagent/d/tracks/p", json.dumps({"type": "new", "id": "1"}).encode())
    assert state.take_dirty() == ({"d"}, False)
    assert [t["serial"] for t in state.tracks_since(0)] == [1]
    state.feed("edgeagent/d/status", json.dumps({**online, "groups": ["lab", "yard"]}).encode())
    assert state.take_dirty() == ({"d"}, True)
    assert state.group_names() == ["lab", "yard"]


def test_the_device_page_gets_each_event_marked_failed_or_not() -> None:
    state = FleetState("edgeagent")
    for kind in ("downloaded", "rolled-back", "source-error", ["rejected"]):
        state.feed("edgeagent/d/events", json.dumps({"type": kind}).encode())
    detail = state.detail("d")
    assert detail is not None
    assert [e["failed"] for e in detail["events"]] == [False, True, True, False]


def test_the_demo_starts_the_dashboard_and_shows_its_camera(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with log.open("w") as err:
        demo = subprocess.Popen(
            [*CLI, "demo", "--duration", "90", "--dashboard-port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        assert demo.stdout is not None
        first = demo.stdout.readline()  # the URL comes first, before the console view
        found = re.match(r"dashboard: (http://127\.0\.0\.1:\d+/)", first)
        assert found, first
        url = found.group(1)
        wait_until(lambda: _online(url, "demo"), 120, "the demo device online on its dashboard")

        def live() -> bytes | None:
            status, headers, image = http(f"{url}api/live/demo/shapes")
            return image if status == 200 and headers["Content-Type"] == "image/jpeg" else None

        frame = Image.open(io.BytesIO(wait_until(live, 60, "the demo camera's live view")))
        assert frame.size == (640, 480)
    finally:
        demo.send_signal(signal.SIGINT)
        demo.communicate(timeout=120)
    assert demo.returncode == 0
    assert "Traceback" not in log.read_text()


_KEYS = ["state", "pipelines", "system", "mqtt", "model", "version", "latency_ms", "invoke",
         "p95", "fps", "groups", "accelerators", "name", "ts", "type", "pipeline", "staged",
         "last_failure", "progress", "fallbacks", "seq", "result"]  # fmt: skip
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=6)
    ),
    max_leaves=20,
)
_KINDS = ["status", "telemetry", "events", "reported", "desired", "results/p", "tracks/p",
          "state/p", "reply", "cmd/ping"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    messages=st.lists(
        st.tuples(st.sampled_from(_KINDS), _JSON | st.binary(max_size=20)), max_size=12
    )
)
def test_the_fleet_state_reads_any_payload_without_failing(
    messages: list[tuple[str, Any]],
) -> None:
    state = FleetState("edgeagent")
    for kind, payload in messages:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        state.feed(f"edgeagent/dev/{kind}", raw)
        state.feed(f"edgeagent/group/lab/{kind}", raw)
        state.feed("edgeagent/models/m/1.0.0/manifest", raw)
    json.dumps(state.fleet_json())
    for name in state.devices:
        json.dumps(state.detail(name))


def test_beyond_loopback_the_origin_must_match_the_host_the_browser_asked_for() -> None:
    """The listen address is a wildcard there, so the page's own origin is the Host it
    used; the requests are aiohttp's test requests (no socket beyond loopback is opened)."""
    guard = Guard("a-token-of-more-than-16-chars", loopback=False)
    guard.serve_on("0.0.0.0", 8080)
    host = {"Host": "dash.example:8080"}
    own = make_mocked_request(
        "POST", "/api/command", {**host, "Origin": "http://dash.example:8080"}
    )
    foreign = make_mocked_request("POST", "/api/command", {**host, "Origin": "http://evil.example"})
    plain = make_mocked_request("POST", "/api/command", host)
    assert guard.same_origin(own)
    assert not guard.same_origin(foreign)
    assert guard.same_origin(plain), "no Origin: not a browser's cross-site request"

    loopback = Guard(None, loopback=True)
    loopback.serve_on("127.0.0.1", 8080)
    rebound = make_mocked_request(
        "POST", "/api/command", {"Host": "evil.example:8080", "Origin": "http://evil.example:8080"}
    )
    assert not loopback.same_origin(rebound)


def test_a_pipeline_whose_status_names_no_model_yet_shows_its_telemetry_model() -> None:
    state = FleetState("edgeagent")
    starting = {"state": "online", "pipelines": [{"name": "p", "state": "starting"}]}
    state.feed("edgeagent/d/status", json.dumps(starting).encode())
    assert state.row("d")["pipelines"][0]["model"] is None
    figures = {"state": "running", "fps": 9.5, "model": {"name": "m", "version": "1.2.0"}}
    state.feed("edgeagent/d/telemetry", json.dumps({"pipelines": {"p": figures}}).encode())
    pipeline = state.row("d")["pipelines"][0]
    assert (pipeline["model"], pipeline["version"], pipeline["state"]) == ("m", "1.2.0", "running")


def test_failovers_count_only_those_while_running_not_accelerators_absent_at_start() -> None:
    state = FleetState("edgeagent")
    running = {"state": "online", "pipelines": [{"name": "p", "state": "running"}]}
    state.feed("edgeagent/d/status", json.dumps(running).encode())
    # No Coral and no GPU on this device (2 fallbacks at start), one failover since.
    figures = {"accelerator": "cpu", "fallbacks": 3, "failovers": 1}
    state.feed("edgeagent/d/telemetry", json.dumps({"pipelines": {"p": figures}}).encode())
    assert state.row("d")["pipelines"][0]["failovers"] == 1
