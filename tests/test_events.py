"""Publish policies with scripted results: tracker hits and misses, stationary
keep-alives, zones and label filters, anomaly hysteresis, label dwell, change, interval
and the retained summary (edgeagent/events/)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import TypeAdapter

from edgeagent.config import parse_config
from edgeagent.errors import ConfigError
from edgeagent.events.policy import ResultPolicy, make_policy
from edgeagent.events.settings import AnyPublish, PublishSettings
from edgeagent.mqtt.topics import Topics

TOPICS = Topics("edgeagent", "dev")
FPS = 10.0


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.sent.append((topic, payload, retain))

    def json(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in self.sent if f"/{kind}/" in t]

    def tracks(self) -> list[dict[str, Any]]:
        return self.json("tracks")


def policy(settings: dict[str, Any], task: str = "detection") -> tuple[ResultPolicy, Recorder]:
    parsed: AnyPublish = TypeAdapter(PublishSettings).validate_python(settings)
    recorder = Recorder()
    return make_policy("cam", parsed, task, TOPICS, recorder, id_prefix="t"), recorder


def det(box: list[float], label: str = "circle", score: float = 0.9) -> dict[str, Any]:
    return {"index": 0, "label": label, "score": score, "box": box}


def frame(t: int, *detections: dict[str, Any]) -> dict[str, Any]:
    return {"captured_at": 1000.0 + t / FPS, "result": {"detections": list(detections)}}


def moving(t: int, x: float = 0.1, step: float = 0.01) -> list[float]:
    left = x + step * t
    return [left, 0.4, left + 0.2, 0.6]


EVENTS = {"mode": "events", "tracking": {"min_hits": 3, "max_misses": 4}}
FIELDS = {"type", "id", "label", "score", "box", "zones", "entered_zones", "start", "stationary"}


def test_new_after_min_hits_and_end_after_misses_once_each() -> None:
    p, rec = policy(EVENTS)
    for t in range(2):
        p.feed(frame(t, det(moving(t))))
    assert rec.tracks() == [], "two hits are fewer than min_hits"
    for t in range(2, 20):
        p.feed(frame(t, det(moving(t))))
    new = [e for e in rec.tracks() if e["type"] == "new"]
    assert len(new) == 1
    assert set(new[0]) == FIELDS
    assert new[0]["start"] == pytest.approx(1000.0, abs=0.01), "start is the first sighting"
    for t in range(20, 24):
        p.feed(frame(t))
    assert not [e for e in rec.tracks() if e["type"] == "end"], "4 misses do not end it yet"
    for t in range(24, 30):
        p.feed(frame(t))
    ends = [e for e in rec.tracks() if e["type"] == "end"]
    assert len(ends) == 1
    assert ends[0]["id"] == new[0]["id"]
    assert ends[0]["end"] == pytest.approx(1000.0 + 19 / FPS, abs=0.01), "last seen"
    assert set(ends[0]) == FIELDS | {"end"}


def test_a_moving_object_sends_no_update_without_a_reason() -> None:
    p, rec = policy({**EVENTS, "tracking": {"min_hits": 3, "max_misses": 4, "score_update_s": 2}})
    for t in range(40):
        p.feed(frame(t, det(moving(t), score=0.8)))
    assert [e["type"] for e in rec.tracks()] == ["new"]
    p.feed(frame(40, det(moving(40), score=0.95)))
    updates = [e for e in rec.tracks() if e["type"] == "update"]
    assert len(updates) == 1, "a better score is a reason"
    assert updates[0]["score"] == 0.95


def test_a_wandering_score_gives_few_updates_rate_limited_per_object() -> None:
    # A detector's score wanders each frame; only a marked gain, at most once per
    # score_update_s (2 s = 20 frames here), is worth an update.
    p, rec = policy(
        {
            "mode": "events",
            "tracking": {"min_hits": 1, "max_misses": 4, "score_update_s": 2},
        }
    )
    scores = [0.50, 0.55, 0.58, 0.62, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95] + [0.6] * 50
    for t, score in enumerate(scores):
        p.feed(frame(t, det(moving(t, step=0.001), score=score)))
    updates = [e for e in rec.tracks() if e["type"] == "update"]
    # 0.95 (t=9) beat the 0.50 sent by `new` by 0.1, but the first update waits for t=20.
    assert [u["score"] for u in updates] == [0.95]
    assert [e["type"] for e in rec.tracks()] == ["new", "update"]


def test_a_box_jittering_on_a_zone_edge_enters_once() -> None:
    # The anchor (bottom middle) alternates 0.49 / 0.51 around the edge x = 0.5 each frame,
    # then stays inside: one entry after `inertia` frames, not a flip per frame.
    p, rec = policy(
        {
            "mode": "events",
            "tracking": {"min_hits": 1, "max_misses": 4},
            "zones": [{"name": "right", "polygon": [[0.5, 0], [1, 0], [1, 1], [0.5, 1]]}],
        }
    )
    for t in range(30):
        x = 0.39 if t % 2 == 0 or t < 3 else 0.41
        p.feed(frame(t, det([x, 0.4, x + 0.2, 0.6], score=0.9)))
    for t in range(30, 40):
        p.feed(frame(t, det([0.41, 0.4, 0.61, 0.6], score=0.9)))
    events = rec.tracks()
    assert [(e["type"], e["zones"]) for e in events] == [("new", []), ("update", ["right"])]


def test_stationary_object_only_keeps_alive() -> None:
    settings = {
        "mode": "events",
        "tracking": {"min_hits": 2, "stationary_s": 1.0, "keepalive_s": 5.0},
    }
    p, rec = policy(settings)
    box = [0.3, 0.3, 0.5, 0.5]
    scores = [0.5 + 0.4 * (t % 2) for t in range(300)]  # flickers, but stands still
    for t in range(300):  # 30 s
        p.feed(frame(t, det(box, score=scores[t])))
    events = rec.tracks()
    updates = [e for e in events if e["type"] == "update"]
    assert events[0]["type"] == "new"
    assert 4 <= len(updates) <= 6, f"one keep-alive per 5 s over 30 s, got {len(updates)}"
    assert all(e["stationary"] for e in updates)


def test_zone_enter_and_leave_with_label_filter() -> None:
    door = {"name": "door", "polygon": [[0.4, 0.0], [0.7, 0.0], [0.7, 1.0], [0.4, 1.0]]}
    only_squares = {**door, "name": "mat", "labels": ["square"]}
    p, rec = policy({**EVENTS, "zones": [door, only_squares]})
    for t in range(70):  # anchor x: 0.2 -> 0.89
        p.feed(frame(t, det(moving(t))))
    events = rec.tracks()
    zone_updates = [e for e in events if e["type"] == "update"]
    assert [e["zones"] for e in zone_updates] == [["door"], []]
    assert zone_updates[-1]["entered_zones"] == ["door"], "entered zones stay listed"
    assert all("mat" not in e["zones"] for e in events), "a circle never enters a squares zone"


def test_label_filters_drop_small_and_weak_detections() -> None:
    settings = {**EVENTS, "filters": {"circle": {"min_score": 0.6, "min_area": 0.01}}}
    p, rec = policy(settings)
    for t in range(20):
        p.feed(
            frame(
                t,
                det(moving(t), score=0.5),  # too weak
                det([0.8, 0.8, 0.85, 0.85]),  # too small: 0.0025
                det([0.1, 0.1, 0.3, 0.3], label="square", score=0.5),  # no rule for squares
            )
        )
    assert [e["label"] for e in rec.tracks()] == ["square"]


def test_summary_is_retained_with_counts_by_label_and_zone() -> None:
    left = {"name": "left", "polygon": [[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]]}
    p, rec = policy({**EVENTS, "zones": [left], "summary_s": 1.0})
    for t in range(20):
        p.feed(frame(t, det([0.1, 0.1, 0.2, 0.3]), det([0.7, 0.1, 0.8, 0.3], label="square")))
    states = [(t, json.loads(b), r) for t, b, r in rec.sent if "/state/" in t]
    assert states
    assert all(r for _, _, r in states), "the summary is retained"
    assert states[0][0] == "edgeagent/dev/state/cam"
    last = states[-1][1]
    assert last["counts"] == {"circle": 1, "square": 1}
    assert last["zones"] == {"left": {"circle": 1}}
    assert len(states) <= 3, "the summary is rate-limited, not per frame"


def test_stop_ends_every_object_and_sends_its_snapshot() -> None:
    p, rec = policy(EVENTS)
    image = np.zeros((240, 320, 3), np.uint8)
    for t in range(10):
        p.feed(frame(t, det(moving(t))), image)
    p.close()
    assert [e["type"] for e in rec.tracks()] == ["new", "end"]
    snapshots = [(t, b) for t, b, _ in rec.sent if "/snapshots/" in t]
    assert len(snapshots) == 1
    topic, jpeg = snapshots[0]
    assert topic == f"edgeagent/dev/snapshots/cam/{rec.tracks()[0]['id']}"
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    assert len(jpeg) <= 100_000


def snapshot_of(settings: dict[str, Any], image: np.ndarray) -> Image.Image:
    p, rec = policy({**EVENTS, "snapshots": settings})
    for t in range(10):
        p.feed(frame(t, det([0.7, 0.7, 0.8, 0.8])), image)
    p.close()
    (jpeg,) = [b for t, b, _ in rec.sent if "/snapshots/" in t]
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def test_snapshot_is_a_small_crop_around_the_object_by_default() -> None:
    # A 640x480 frame, dark; the object's box (0.7..0.8 of each side) is bright green.
    image = np.zeros((480, 640, 3), np.uint8)
    image[int(0.7 * 480) : int(0.8 * 480), int(0.7 * 640) : int(0.8 * 640)] = (0, 255, 0)
    cropped = snapshot_of({}, image)
    assert max(cropped.size) <= 320
    assert cropped.width == cropped.height, "a square region, as Frigate's MQTT snapshots"
    pixels = np.asarray(cropped, np.int32)
    green = (pixels[..., 1] > 200) & (pixels[..., 0] < 80)
    # The object fills a far larger share of the crop than of the frame (1%), all of it.
    assert 0.03 < green.mean() < 0.5
    whole = snapshot_of({"crop": False, "max_side": 640}, image)
    assert whole.size == (640, 480)


def anomaly(t: int, bad: bool) -> dict[str, Any]:
    return {
        "captured_at": 1000.0 + t / FPS,
        "result": {"score": 0.9 if bad else 0.1, "anomaly": bad},
    }


def test_anomaly_hysteresis() -> None:
    settings = {"mode": "events", "anomaly_min_s": 1.0, "anomaly_cooldown_s": 2.0}
    p, rec = policy(settings, task="anomaly")
    pattern = [False] * 10 + [True] * 5 + [False] * 10  # a 0.5 s spike: no episode
    pattern += [True] * 30 + [False] * 10 + [True] * 5  # a 1 s gap: within the cool-down
    pattern += [False] * 30
    for t, bad in enumerate(pattern):
        p.feed(anomaly(t, bad))
    events = rec.tracks()
    assert [e["type"] for e in events] == ["new", "end"]
    assert events[0]["start"] == pytest.approx(1000.0 + 25 / FPS)
    assert events[1]["end"] == pytest.approx(1000.0 + 69 / FPS)


def classified(t: int, label: str) -> dict[str, Any]:
    return {
        "captured_at": 1000.0 + t / FPS,
        "result": {"classes": [{"index": 0, "label": label, "score": 0.9}]},
    }


def test_classification_label_needs_its_dwell() -> None:
    p, rec = policy({"mode": "events", "dwell_s": 1.0}, task="classification")
    labels = ["cat"] * 20 + ["dog"] * 5 + ["cat"] * 5 + ["dog"] * 20
    for t, label in enumerate(labels):
        p.feed(classified(t, label))
    events = rec.tracks()
    assert [(e["type"], e["label"]) for e in events] == [
        ("new", "cat"),
        ("end", "cat"),
        ("new", "dog"),
    ]


def test_change_mode_publishes_label_set_changes_after_dwell() -> None:
    p, rec = policy({"mode": "change", "dwell_s": 0.5})
    frames = [frame(t) for t in range(10)]
    frames += [frame(t, det(moving(t))) for t in range(10, 12)]  # too short
    frames += [frame(t) for t in range(12, 20)]
    frames += [frame(t, det(moving(t))) for t in range(20, 40)]
    for f in frames:
        p.feed(f)
    changes = [m["change"] for m in rec.json("results")]
    assert changes == [{"from": None, "to": []}, {"from": [], "to": ["circle"]}]


def test_interval_mode_aggregates() -> None:
    p, rec = policy({"mode": "interval", "interval_s": 1.0})
    for t in range(25):
        p.feed(frame(t, det(moving(t), score=0.5 + 0.01 * (t % 10))))
    p.close()
    messages = rec.json("results")
    assert len(messages) == 3
    first = messages[0]
    assert first["type"] == "interval"
    assert first["frames"] == 10
    assert first["labels"]["circle"]["count"] == 10
    assert first["labels"]["circle"]["max_score"] == pytest.approx(0.59)
    assert first["labels"]["circle"]["mean_score"] == pytest.approx(0.545)
    assert first["anomaly_rate"] is None


def test_events_mode_rejects_a_task_it_cannot_follow() -> None:
    with pytest.raises(ConfigError, match="segmentation"):
        policy({"mode": "events"}, task="segmentation")


def test_publish_section_errors_name_the_line() -> None:
    text = """\
pipelines:
  - name: cam
    source: {type: synthetic}
    model: shapes-detector
    publish:
      mode: events
      zones:
        - name: door
          polygon: [[0, 0], [2, 0], [1, 1]]
"""
    with pytest.raises(ConfigError, match=r":9: pipelines\.0\.publish\.zones\.0\.polygon"):
        parse_config(text)
    with pytest.raises(ConfigError, match=r":5: .*publish.*'mode:'"):
        parse_config(text.replace("      mode: events\n", "      interval_s: 3\n"))
    assert parse_config(text.replace("[2, 0]", "[1, 0]")).pipelines[0].publish.mode == "events"
    default = parse_config(text.split("    publish:", maxsplit=1)[0])
    assert default.pipelines[0].publish.mode == "every"
