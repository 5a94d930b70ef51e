"""Events, not floods: tracking quality and message volume of `publish: {mode: events}`.

    python bench/events.py [--scene blinking|walkers] [--minutes 10] [--fps 30] [--shapes 4]
                           [--json FILE]

The scene gives the truth: each object has a stable `id`, and each interval in which it is
visible is one appearance. `blinking` is the synthetic camera's ShapeScene (its shapes
blink in and out every 2-13 s: a worst case for volume); `walkers` is a realistic one:
`--shapes` lanes in which a person walks across the frame in 20-60 s, sometimes stands
still for 15 s on the way, then the lane is empty for 10-90 s. Detections are the truth boxes
with a detector's faults added (seeded): box jitter, a missed detection in 5 % of frames,
scores between 0.5 and 0.95. They go through the real policy (norfair tracker, zones,
snapshots) at `--fps`, on the frames' capture clock, and the bench reports:

- MOTA and IDF1 (py-motmetrics) of the announced tracks against the truth ids;
- the fraction of appearances that got exactly one `new` and one `end` (target >= 0.95);
- frames from an appearance's first visible frame to its `new` (median, p95);
- messages and bytes per hour against `every` (one result message per frame), target
  >= 50x fewer.

It measures the tracker and the publish policy, not the detector: the detector's own
accuracy is docs/benchmarks.md's data-path section. Events through a 60 s broker
outage, with the real daemon: bench/events_outage.py. Needs the bench extra:
pip install 'edgeagent[bench]'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import motmetrics as mm
import numpy as np
from pydantic import TypeAdapter

from edgeagent.events.policy import make_policy
from edgeagent.events.settings import AnyPublish, PublishSettings
from edgeagent.events.tracks import TrackedObjects
from edgeagent.hal.camera.synthetic import ShapeScene
from edgeagent.mqtt.payload import to_json
from edgeagent.mqtt.topics import Topics

SETTINGS = {
    "mode": "events",
    "tracking": {"min_hits": 3, "max_misses": 15},
    "zones": [{"name": "left", "polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]}],
}


def _detections(truth: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    out = []
    for box in truth:
        if rng.random() < 0.05:
            continue
        jitter = rng.normal(0.0, 0.004, 4)
        x0, y0, x1, y1 = (np.asarray(box["box"]) + jitter).clip(0, 1).tolist()
        score = float(rng.uniform(0.5, 0.95))
        out.append(
            {"index": 0, "label": box["label"], "score": round(score, 4), "box": [x0, y0, x1, y1]}
        )
    return out


class WalkScene:
    """People walking past: per lane, walks of 20-60 s (30 % stop for 15 s midway) with
    10-90 s of empty lane between them; each walk is one id and one appearance."""

    def __init__(self, lanes: int, seed: int, fps: float, frames: int) -> None:
        rng = np.random.default_rng(seed + 7)
        self._fps = fps
        self._walks: list[tuple[int, float, float, float, float, float, float]] = []
        for lane in range(lanes):
            t = float(rng.uniform(0, 30))
            while t * fps < frames:
                walk, stop = float(rng.uniform(20, 60)), 15.0 if rng.random() < 0.3 else 0.0
                y = 0.1 + 0.6 * lane / max(1, lanes)
                rightward = bool(rng.random() < 0.5)
                self._walks.append((len(self._walks), t, walk, stop, y, 0.1, float(rightward)))
                t += walk + stop + float(rng.uniform(10, 90))
        self._background = rng.integers(40, 160, size=(120, 160, 3), dtype=np.uint8)

    def render(self, f: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        now = f / self._fps
        image = self._background.copy()
        boxes = []
        for wid, start, walk, stop, y, width, rightward in self._walks:
            if not start <= now < start + walk + stop:
                continue
            moving = now - start
            if stop and moving > walk / 2:
                moving = max(walk / 2, moving - stop)
            progress = moving / walk
            x = (1 - width) * (progress if rightward else 1 - progress)
            box = [x, y, x + width, y + 0.25]
            image[
                round(y * 120) : round((y + 0.25) * 120), round(x * 160) : round((x + width) * 160)
            ] = 220
            boxes.append({"id": wid, "label": "person", "box": box})
        return image, boxes


def run(minutes: float, fps: float, shapes: int, seed: int, scene_name: str) -> dict[str, Any]:
    frames = int(minutes * 60 * fps)
    scene: ShapeScene | WalkScene = (
        ShapeScene(160, 120, shapes=shapes, seed=seed)
        if scene_name == "blinking"
        else WalkScene(shapes, seed, fps, frames)
    )
    rng = np.random.default_rng(seed)
    sent: list[tuple[str, bytes]] = []
    settings: AnyPublish = TypeAdapter(PublishSettings).validate_python(SETTINGS)
    topics = Topics("edgeagent", "bench")
    policy = make_policy(
        "cam", settings, "detection", topics, lambda t, p, r: sent.append((t, p)), id_prefix="b"
    )
    assert isinstance(policy, TrackedObjects)
    acc = mm.MOTAccumulator(auto_id=True)
    every_bytes = 0
    visible_since: dict[int, int] = {}
    appearances: list[dict[str, Any]] = []  # id, start, end frame
    open_appearance: dict[int, dict[str, Any]] = {}
    new_frame: dict[str, int] = {}
    track_truth: dict[str, int] = {}
    events_seen = 0
    hyp_ids: dict[str, int] = {}  # motmetrics wants numeric hypothesis ids
    started = time.perf_counter()
    for f in range(frames):
        image, truth = scene.render(f)
        now = 1_000_000.0 + f / fps
        ids = {b["id"] for b in truth}
        for b in truth:
            if b["id"] not in open_appearance:
                open_appearance[b["id"]] = {"id": b["id"], "start": f, "end": None, "news": []}
                appearances.append(open_appearance[b["id"]])
        for gone in [i for i in open_appearance if i not in ids]:
            open_appearance.pop(gone)["end"] = f - 1
        visible_since.update({i: f for i in ids if i not in visible_since})
        payload = {
            "ts": now,
            "captured_at": now,
            "run": "0" * 16,
            "seq": f,
            "frame": f,
            "pipeline": "cam",
            "model": {"name": "shapes-detector", "version": "1.0.0"},
            "accelerator": "cpu",
            "latency_ms": {"capture": 1.0, "preprocess": 1.0, "invoke": 4.0, "postprocess": 0.2},
            "result": {"detections": _detections(truth, rng)},
        }
        every_bytes += len(to_json(payload)) + len(topics.results("cam"))
        policy.feed(payload, image)
        for topic, data in sent[events_seen:]:
            if "/tracks/" in topic:
                event = json.loads(data)
                if event["type"] == "new":
                    new_frame[event["id"]] = f
                    best = _best_truth(event["box"], truth)
                    if best is not None and best in open_appearance:
                        track_truth[event["id"]] = best
                        open_appearance[best]["news"].append(event["id"])
        events_seen = len(sent)
        hyps = [(t.id, t.box) for t in policy._tracker.announced() if t.last_seen == now]
        acc.update(
            [id(open_appearance[b["id"]]) for b in truth],  # one truth id per appearance
            [hyp_ids.setdefault(h[0], len(hyp_ids)) for h in hyps],
            _distances([b["box"] for b in truth], [h[1] for h in hyps]),
        )
    policy.close()
    elapsed = time.perf_counter() - started
    ends = {
        json.loads(d)["id"] for t, d in sent if "/tracks/" in t and json.loads(d)["type"] == "end"
    }
    good = sum(1 for a in appearances if len(a["news"]) == 1 and a["news"][0] in ends)
    delays = [new_frame[a["news"][0]] - a["start"] for a in appearances if a["news"]]
    metrics = mm.metrics.create().compute(
        acc, metrics=["mota", "idf1", "num_switches"], name="events"
    )
    hours = frames / fps / 3600
    events_bytes = sum(len(t) + len(d) for t, d in sent)
    every_messages = frames
    snapshots = sum(1 for t, _ in sent if "/snapshots/" in t)
    return {
        "scene": scene_name,
        "frames": frames,
        "fps": fps,
        "shapes": shapes,
        "seed": seed,
        "appearances": len(appearances),
        "mota": round(float(metrics["mota"].iloc[0]), 4),
        "idf1": round(float(metrics["idf1"].iloc[0]), 4),
        "id_switches": int(metrics["num_switches"].iloc[0]),
        "one_new_one_end": round(good / max(1, len(appearances)), 4),
        "frames_to_new_median": statistics.median(delays) if delays else None,
        "frames_to_new_p95": float(np.percentile(delays, 95)) if delays else None,
        "every_messages_per_hour": round(every_messages / hours),
        "every_bytes_per_hour": round(every_bytes / hours),
        "events_messages_per_hour": round(len(sent) / hours),
        "events_bytes_per_hour": round(events_bytes / hours),
        "messages_reduction": round(every_messages / max(1, len(sent)), 1),
        "messages_reduction_without_snapshots": round(
            every_messages / max(1, len(sent) - snapshots), 1
        ),
        "bytes_reduction": round(every_bytes / max(1, events_bytes), 1),
        "messages_per_hour_by_type": _by_type(sent, hours),
        "snapshot_bytes_per_hour": round(
            sum(len(d) for t, d in sent if "/snapshots/" in t) / hours
        ),
        "seconds": round(elapsed, 1),
    }


def _by_type(sent: list[tuple[str, bytes]], hours: float) -> dict[str, int]:
    """Messages per hour by kind: new/update/end, snapshot, summary."""
    kinds: dict[str, int] = {}
    for topic, data in sent:
        if "/tracks/" in topic:
            kind = json.loads(data)["type"]
        elif "/snapshots/" in topic:
            kind = "snapshot"
        else:
            kind = "summary"
        kinds[kind] = kinds.get(kind, 0) + 1
    return {k: round(n / hours) for k, n in sorted(kinds.items())}


def _distances(truth: list[list[float]], hyps: list[list[float]]) -> np.ndarray:
    """1 - IoU, NaN (no match) below IoU 0.5: motmetrics' iou_matrix, which uses
    np.asfarray, gone in NumPy 2."""
    out = np.full((len(truth), len(hyps)), np.nan)
    for i, t in enumerate(truth):
        for j, h in enumerate(hyps):
            iou = _iou(t, h)
            if iou >= 0.5:
                out[i, j] = 1.0 - iou
    return out


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _best_truth(box: list[float], truth: list[dict[str, Any]]) -> int | None:
    best, best_iou = None, 0.3
    for b in truth:
        iou = _iou(box, b["box"])
        if iou > best_iou:
            best, best_iou = b["id"], iou
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", choices=["blinking", "walkers"], default="blinking")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--shapes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = run(args.minutes, args.fps, args.shapes, args.seed, args.scene)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
