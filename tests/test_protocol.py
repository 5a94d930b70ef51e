"""The typed protocol module and the topic layout: what is built parses back to the same
thing, a malformed desired state gives the reasons it always gave, and the fleet side
predicts the device's device-over-group merge."""

from __future__ import annotations

import json

import pytest

from edgeagent.fleet.rollout import Rollout, parse_desired
from edgeagent.mqtt.payload import to_json
from edgeagent.mqtt.protocol import (
    DesiredEntry,
    DesiredState,
    DesiredStateError,
    ReportedPipeline,
    ResultEnvelope,
    desired_payload,
    effective_desired,
    event_message,
    failure_record,
    merge_desired,
    reply_message,
    reported_message,
    status_message,
    status_online,
)
from edgeagent.mqtt.topics import (
    DeviceTopic,
    FleetTopics,
    GroupTopic,
    ModelTopic,
    Topics,
    discovery_birth,
    discovery_config,
)

# --- desired state -----------------------------------------------------------------------


def test_a_desired_state_built_by_the_fleet_parses_back_on_the_device() -> None:
    state = merge_desired(None, "cam", ("m", "1.2.0"), by="ops@ws", ts=5.0)
    state = merge_desired(state, "door", ("d", "2.0.0"), by="ops@ws", ts=6.0, allow_downgrade=True)
    payload = desired_payload(state)
    assert payload == (
        b'{"by":"ops@ws","pipelines":{"cam":{"model":"m","version":"1.2.0"},'
        b'"door":{"allow_downgrade":true,"model":"d","version":"2.0.0"}},"ts":6.0}'
    )
    parsed = DesiredState.parse(payload)
    assert parsed is not None
    assert parsed.pipelines == {
        "cam": DesiredEntry("m", "1.2.0"),
        "door": DesiredEntry("d", "2.0.0", allow_downgrade=True),
    }
    assert (parsed.ts, parsed.by) == (6.0, "ops@ws")
    # Updating the parsed state keeps what this version does not know.
    foreign = DesiredState.parse(
        b'{"pipelines": {"x": {"model": "x", "version": "1", "k": 1}}, "z": 2}'
    )
    merged = merge_desired(foreign, "cam", ("m", "1"), by="a@b", ts=1.0)
    assert merged["z"] == 2
    assert merged["pipelines"]["x"] == {"model": "x", "version": "1", "k": 1}


@pytest.mark.parametrize("payload", [b"", b"  \n"])
def test_an_empty_desired_state_is_cleared(payload: bytes) -> None:
    assert DesiredState.parse(payload) is None
    assert parse_desired(payload, "t") is None


@pytest.mark.parametrize(
    ("payload", "problem", "fleet_message"),
    [
        (b"{not json", "not-json", "the retained desired state on t is not JSON ("),
        (b"[1, 2]", "not-object", "the retained desired state on t is a JSON list, not an object"),
        (
            b'{"pipelines": 3}',
            "pipelines-not-object",
            "the existing desired state's 'pipelines' is a int",
        ),
    ],
)
def test_a_malformed_desired_state_is_refused_with_the_same_reasons(
    payload: bytes, problem: str, fleet_message: str
) -> None:
    with pytest.raises(DesiredStateError) as device:
        DesiredState.parse(payload)
    assert device.value.problem == problem
    with pytest.raises(DesiredStateError) as fleet:
        parse_desired(payload, "t")
    assert str(fleet.value).startswith(fleet_message)


def test_a_malformed_entry_is_kept_with_the_reason_the_device_reports() -> None:
    state = DesiredState.parse(
        b'{"pipelines": {"cam": {"model": "m"}, "ok": {"model": "m", "version": "1"},'
        b' "dg": {"model": "m", "version": "1", "allow_downgrade": "yes"}}}',
        where="group lab",
    )
    assert state is not None
    assert state.pipelines["ok"] == DesiredEntry("m", "1")
    cam = state.pipelines["cam"]
    assert (cam.model, cam.version) == ("m", "")
    assert cam.error == (
        'the group lab desired state of pipeline cam must be {"model": "<name>", "version": '
        "\"<version>\"} (and optionally \"allow_downgrade\": true or false), got {'model': 'm'}"
    )
    assert state.pipelines["dg"].error is not None
    assert {name for name, entry in state.pipelines.items() if entry.error is None} == {"ok"}


def test_the_device_entry_wins_over_the_first_group_that_names_the_pipeline() -> None:
    def state(ts: float, **entries: str) -> DesiredState:
        doc = {"ts": ts, "pipelines": {p: {"model": "m", "version": v} for p, v in entries.items()}}
        parsed = DesiredState.parse(json.dumps(doc).encode())
        assert parsed is not None
        return parsed

    device = state(3.0, cam="3")
    lab = state(1.0, cam="1", door="1")
    site = state(2.0, door="2", gate="2")
    found = effective_desired(device, [lab, None, site])
    assert {n: (e.version, ts) for n, (e, ts) in found.items()} == {
        "cam": ("3", 3.0),
        "door": ("1", 1.0),
        "gate": ("2", 2.0),
    }
    assert effective_desired(None, []) == {}


def test_the_rollout_reads_a_malformed_device_entry_as_the_device_does() -> None:
    # The device applies its own entry even when it is malformed (and fails it with
    # malformed-desired); the rollout must not predict the group's version instead.
    rollout = Rollout("edgeagent", ["pi-1"], group="lab")
    group = {"pipelines": {"cam": {"model": "m", "version": "1"}}}
    rollout.feed("edgeagent/group/lab/desired", json.dumps(group).encode())
    own = {"pipelines": {"cam": {"model": "m", "version": 2}}}
    rollout.feed("edgeagent/pi-1/desired", json.dumps(own).encode())
    reported = {"pipelines": {"cam": {"model": "m", "version": "1", "state": "running"}}}
    rollout.feed("edgeagent/pi-1/reported", json.dumps(reported).encode())
    assert rollout.effective_desired(rollout.devices["pi-1"]) == {}
    assert not rollout.verdict().converged


# --- what the device publishes -----------------------------------------------------------


def test_status_event_reply_and_reported_round_trip() -> None:
    offline = json.loads(to_json(status_message("offline", "pi-1")))
    assert set(offline) == {"state", "device", "ts"}
    assert status_online(offline) is False
    online = json.loads(to_json(status_message("online", "pi-1", run="r1", pipelines=[])))
    assert (online["state"], online["run"], status_online(online)) == ("online", "r1", True)
    assert status_online({"device": "pi-1"}) is None

    event = json.loads(to_json(event_message("rejected", "cam", model="m", version="1", code="x")))
    assert {k: v for k, v in event.items() if k != "ts"} == {
        "type": "rejected",
        "pipeline": "cam",
        "model": "m",
        "version": "1",
        "code": "x",
    }

    reply = json.loads(to_json(reply_message("id-1", "ping", "pi-1", "succeeded", result={})))
    assert list(reply) == ["id", "command", "device", "stage", "ts", "result"]

    failure = failure_record("2.0.0", "downgrade", "older")
    entry = ReportedPipeline("m", "1.0.0", "running", None, failure)
    reported = json.loads(to_json(reported_message({"cam": entry})))
    assert reported["pipelines"]["cam"] == {
        "model": "m",
        "version": "1.0.0",
        "state": "running",
        "staged": None,
        "last_failure": failure,
    }


def test_the_result_envelope_carries_every_common_member() -> None:
    envelope = ResultEnvelope(
        captured_at=1.5,
        run="00ff",
        seq=7,
        frame=3,
        pipeline="cam",
        model="m",
        version="1",
        accelerator="cpu",
        latency_ms={"invoke": 1.0},
    )
    doc = json.loads(to_json(envelope.to_json({"label": "x"}, truth="x")))
    assert {k: v for k, v in doc.items() if k != "ts"} == {
        "captured_at": 1.5,
        "run": "00ff",
        "seq": 7,
        "frame": 3,
        "pipeline": "cam",
        "model": {"name": "m", "version": "1"},
        "accelerator": "cpu",
        "latency_ms": {"invoke": 1.0},
        "result": {"label": "x"},
        "truth": "x",
    }


# --- topics ------------------------------------------------------------------------------


def test_every_topic_built_parses_back() -> None:
    fleet = FleetTopics("site/edge/")
    device = Topics("site/edge/", "pi-1")
    assert fleet.parse_device(device.status) == DeviceTopic("pi-1", "status", "")
    assert fleet.parse_device(device.results("cam")) == DeviceTopic("pi-1", "results", "cam")
    assert fleet.parse_device(device.cmd("model.rollback")) == DeviceTopic(
        "pi-1", "cmd", "model.rollback"
    )
    assert fleet.desired("pi-1") == device.desired == "site/edge/pi-1/desired"
    assert fleet.parse_group(fleet.group_cmd("lab", "ping")) == GroupTopic("lab", "cmd", "ping")
    assert fleet.parse_group(device.group_desired("lab")) == GroupTopic("lab", "desired", "")
    assert fleet.parse_model(fleet.model_manifest("m", "1.0.0")) == ModelTopic("m", "1.0.0", None)
    assert fleet.parse_model(fleet.model_chunk("m", "1.0.0", 12)) == ModelTopic("m", "1.0.0", 12)
    assert fleet.model_chunk_pattern("m", "1") == "site/edge/models/m/1/chunk/<i>"
    assert fleet.every_device("reported") == "site/edge/+/reported"
    assert fleet.device_filter("pi-1") == "site/edge/pi-1/#"
    # What is not such a topic parses to None.
    assert fleet.parse_device("site/edge/group/lab/desired") is None
    assert fleet.parse_device("site/edge/models/m/1/manifest") is None
    assert fleet.parse_device("other/pi-1/status") is None
    assert fleet.parse_device("site/edge/pi-1/unknown") is None
    assert fleet.parse_model("site/edge/models/m/1/chunk/x") is None
    assert fleet.parse_group("site/edge/pi-1/desired") is None
    assert device.cmd_name(fleet.group_cmd("lab", "ping")) == "ping"
    assert device.cmd_name("site/edge/pi-2/cmd/ping") is None
    assert device.result_pipeline(device.results("cam")) == "cam"
    assert device.result_pipeline("site/edge/pi-2/results/cam") is None
    assert (
        discovery_config("homeassistant", "pi_1", "cpu") == "homeassistant/sensor/pi_1/cpu/config"
    )
    assert discovery_birth("homeassistant") == "homeassistant/status"


@pytest.mark.parametrize("device", ["group", "models", "a/b", "a+", ""])
def test_a_device_id_that_cannot_be_a_topic_level_is_refused(device: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        FleetTopics("edgeagent").desired(device)
    with pytest.raises(ValueError, match="device id"):
        Topics("edgeagent", device)
