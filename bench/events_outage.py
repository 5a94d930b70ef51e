"""Events across a broker outage: no tracked object's events lost (issue 11).

    PYTHONPATH=. python bench/events_outage.py [--outage-s 60] [--before-s 60] [--after-s 60]
                                               [--fps 30] [--shapes 6] [--json FILE]

The real agent (`edgeagent run`) runs the bundled shapes detector on the synthetic camera
with `publish: {mode: events}`, against a loopback mosquitto with persistence (as production
brokers have). A consumer with a persistent session (QoS 1) collects the device's messages.
--before-s after the first `new`, the broker is stopped for --outage-s and started again;
--after-s later the agent gets SIGTERM, which ends the tracks still open, and the consumer
waits for what the agent stored.

What the agent stored is recorded beside its outbox (tests/outbox_recording.py, as
tests/test_events_outage.py does): the bench creates the outbox file with edgeagent's own
`Outbox` before the agent starts and adds a trigger that copies each row the agent inserts
to a `recorded` table, in the same transaction. The agent accepts the file (the schema
version and the `outbox` table are its own) and deletes acknowledged rows as usual;
`recorded` keeps them. Each stored track event and snapshot is matched with what the
consumer received. Events carry no sequence number and two keep-alives of a stationary
object can be byte-identical, so received messages are matched as a multiset: a stored one
never received is lost, a received one left over is a duplicate. An object whose received
events are not its stored `new` -> `update`* -> `end` has a gap.

Phases go by when the agent stored an event: before the broker stopped, during the outage
(delivered after the reconnect, from the outbox backlog) and after the restart. Exits 1 if
anything stored was not received or an object lacks its `new` or `end`; 2 without mosquitto.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.agent_config import shapes_pipeline, write_agent_config
from tests.broker import Mosquitto, durable_subscriber, find_mosquitto
from tests.outbox_recording import Message, match, recording_outbox, stored_messages

AGENT = [sys.executable, "-m", "edgeagent.cli.main"]
PREFIX = "bench"
DEVICE = "outage"
PIPELINE = "shapes"  # tests/agent_config.py's shapes_pipeline
ROOT = f"{PREFIX}/{DEVICE}"
TRACKS = f"{ROOT}/tracks/{PIPELINE}"
SNAPSHOTS = f"{ROOT}/snapshots/{PIPELINE}/"
PHASES = ("before", "during", "after")


def read_outbox(path: Path) -> tuple[list[Message], int]:
    """Every track event and snapshot the agent stored, in order, and the rows still
    waiting in its outbox."""
    stored = [m for m in stored_messages(path) if _counted(m.topic)]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (left,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return stored, int(left)


def _counted(topic: str) -> bool:
    return topic == TRACKS or topic.startswith(SNAPSHOTS)


class Consumer:
    """A QoS 1 subscriber to the device's topics with a persistent session; keeps every
    track event and snapshot with its arrival time."""

    def __init__(self, broker: Mosquitto) -> None:
        self.cond = threading.Condition()
        self.received: list[Message] = []
        self.client = durable_subscriber(
            broker, f"{ROOT}/#", self._on_message, client_id=f"bench-events-{time.time_ns():x}"
        )

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if not _counted(message.topic):
            return
        with self.cond:
            self.received.append(Message(message.topic, bytes(message.payload), time.time()))
            self.cond.notify_all()

    def wait(self, predicate: Any, timeout: float) -> bool:
        with self.cond:
            return bool(self.cond.wait_for(lambda: predicate(self.received), timeout))

    def messages(self) -> list[Message]:
        with self.cond:
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def arrivals(
    stored: list[Message], received: list[Message]
) -> tuple[list[float | None], list[Message]]:
    """For each stored message, when its first copy arrived (None: never); and the
    received messages left over (duplicates, or anything the agent did not store)."""
    firsts, extra = match(stored, received)
    return [None if first is None else first.at for first in firsts], extra


def analyse(
    stored: list[Message], received: list[Message], down_at: float, up_at: float, stop_at: float
) -> dict[str, Any]:
    """The report: counts by phase, lost and duplicate messages, and per object whether its
    received events are its stored new -> update* -> end."""

    def phase(at: float) -> str:
        return PHASES[0] if at < down_at else PHASES[1] if at < up_at else PHASES[2]

    got, extra = arrivals(stored, received)
    by_kind: dict[str, dict[str, dict[str, int]]] = {
        kind: {p: {"stored": 0, "received": 0, "after_reconnect": 0} for p in PHASES}
        for kind in ("new", "update", "end", "snapshot")
    }
    objects: dict[str, list[tuple[str, float, float | None]]] = defaultdict(list)
    for message, at in zip(stored, got, strict=True):
        if message.topic == TRACKS:
            event = json.loads(message.payload)
            kind = event["type"]
            objects[event["id"]].append((kind, message.at, at))
        else:
            kind = "snapshot"
        row = by_kind[kind][phase(message.at)]
        row["stored"] += 1
        row["received"] += at is not None
        row["after_reconnect"] += at is not None and at >= up_at

    def received_kinds(events: list[tuple[str, float, float | None]]) -> list[str]:
        return [kind for kind, _s, at in events if at is not None]

    announced = [i for i, ev in objects.items() if "new" in received_kinds(ev)]
    with_end = [i for i in announced if "end" in received_kinds(objects[i])]
    gaps = [
        i
        for i, ev in objects.items()
        if [k for k, _s, _a in ev if k in ("new", "end")] != ["new", "end"]
        or ev[0][0] != "new"
        or ev[-1][0] != "end"
        or any(at is None for _k, _s, at in ev)
    ]
    arrived = {i: [at for _k, _s, at in ev if at is not None] for i, ev in objects.items()}
    only_after = [i for i, ats in arrived.items() if ats and min(ats) >= up_at]
    out_of_order = [
        i
        for i, ev in objects.items()
        if [at for _k, _s, at in ev if at is not None]
        != sorted(at for _k, _s, at in ev if at is not None)
    ]
    backlog = [at for m, at in zip(stored, got, strict=True) if phase(m.at) == PHASES[1]]
    drained = [at for at in backlog if at is not None]
    track_lost = sum(
        1 for m, at in zip(stored, got, strict=True) if at is None and m.topic == TRACKS
    )
    return {
        "by_kind": by_kind,
        "objects": len(objects),
        "announced": len(announced),
        "announced_with_end": len(with_end),
        "objects_with_gap": sorted(gaps),
        "open_across_outage": sum(
            1
            for ev in objects.values()
            if ev[0][1] < down_at and any(k == "end" and s >= down_at for k, s, _a in ev)
        ),
        "seen_only_after_reconnect": len(only_after),
        "seen_only_after_reconnect_born_during": sum(
            1 for i in only_after if objects[i][0][1] >= down_at and objects[i][0][1] < up_at
        ),
        "ended_at_stop": sum(
            1 for ev in objects.values() for k, s, _a in ev if k == "end" and s >= stop_at
        ),
        "out_of_order": {  # per object: (kind, phase stored) in the order received
            i: [
                (k, phase(s)) for k, s, _a in sorted(objects[i], key=lambda e: e[2] or float("inf"))
            ]
            for i in out_of_order
        },
        "stored": len(stored),
        "received": len(received),
        "duplicates_removed": sum(1 for m in extra if m.topic == TRACKS),
        "snapshot_duplicates_removed": sum(1 for m in extra if m.topic != TRACKS),
        "lost_track_events": track_lost,
        "lost_snapshots": sum(1 for at in got if at is None) - track_lost,
        "backlog_at_reconnect": len(backlog),
        "backlog_drain_s": (
            round(max(drained) - up_at, 2) if drained and len(drained) == len(backlog) else None
        ),
    }


def complete(stored: list[Message]) -> Any:
    """A consumer predicate: every stored message has arrived."""

    def check(received: list[Message]) -> bool:
        got, _extra = arrivals(stored, received)
        return None not in got

    return check


def run(workdir: Path, binary: str, args: argparse.Namespace) -> dict[str, Any]:
    broker = Mosquitto(workdir / "broker", binary=binary, persistence=True)
    broker.start()
    consumer = Consumer(broker)
    outbox = workdir / "outbox.db"
    recording_outbox(outbox)
    pipeline = {
        **shapes_pipeline(width=320, height=240, fps=args.fps, shapes=args.shapes, seed=args.seed),
        "publish": {"mode": "events", "tracking": {"min_hits": 3, "max_misses": 15}},
    }
    config = write_agent_config(
        workdir,
        broker,
        device=DEVICE,
        pipelines=[pipeline],
        mqtt={"prefix": PREFIX, "qos": 1},
        outbox={"path": str(outbox)},
    )
    log_path = workdir / "agent.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            [*AGENT, "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        first_new = consumer.wait(lambda got: any(m.topic == TRACKS for m in got), 90)
        if not first_new:
            raise RuntimeError(f"no track event within 90 s; the agent's log: {log_path}")
        print(f"  tracking; broker stops in {args.before_s:g} s", flush=True)
        time.sleep(args.before_s)
        broker.stop()
        down_at = time.time()  # what was stored while it stopped may have gone out
        print(f"  broker stopped for {args.outage_s:g} s", flush=True)
        time.sleep(args.outage_s)
        broker.start()
        up_at = time.time()
        print(f"  broker back; agent stops in {args.after_s:g} s", flush=True)
        time.sleep(args.after_s)
        stop_at = time.time()
        agent.send_signal(signal.SIGTERM)
        returncode = agent.wait(60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
    stored, left = read_outbox(outbox)
    consumer.wait(complete(stored), 60)
    received = consumer.messages()
    consumer.close()
    broker.stop()
    report = analyse(stored, received, down_at, up_at, stop_at)
    report.update(
        agent_exit=returncode,
        left_in_outbox=left,
        seconds={"before": args.before_s, "outage": args.outage_s, "after": args.after_s},
    )
    if returncode != 0:
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
    return report


def print_report(r: dict[str, Any]) -> None:
    k = r["by_kind"]

    def cell(kind: str, phase: str) -> str:
        row = k[kind][phase]
        return f"{row['received']}/{row['stored']}"

    rows = [
        (
            f"{kind} received/stored: before / during / after",
            " / ".join(cell(kind, p) for p in PHASES),
        )
        for kind in ("new", "update", "end", "snapshot")
    ]
    during = k["new"]["during"], k["end"]["during"]
    rows += [
        (
            "during: new / end received after the reconnect",
            f"{during[0]['after_reconnect']} / {during[1]['after_reconnect']}",
        ),
        ("objects announced (new) with their end", f"{r['announced_with_end']}/{r['announced']}"),
        ("objects open across the outage", r["open_across_outage"]),
        (
            "objects seen only after the reconnect (born during)",
            f"{r['seen_only_after_reconnect']} ({r['seen_only_after_reconnect_born_during']})",
        ),
        ("objects ended by SIGTERM", r["ended_at_stop"]),
        ("objects whose events arrived out of order", len(r["out_of_order"])),
        (
            "duplicates removed (track events / snapshots)",
            f"{r['duplicates_removed']} / {r['snapshot_duplicates_removed']}",
        ),
        (
            "backlog at the reconnect, drained in s",
            f"{r['backlog_at_reconnect']}, {r['backlog_drain_s']}",
        ),
        ("lost track events / snapshots", f"{r['lost_track_events']} / {r['lost_snapshots']}"),
        ("objects with a gap", len(r["objects_with_gap"])),
        ("agent exit code, rows left in its outbox", f"{r['agent_exit']}, {r['left_in_outbox']}"),
    ]
    width = max(len(name) for name, _v in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--before-s", type=float, default=60.0, help="tracking before it")
    parser.add_argument("--after-s", type=float, default=60.0, help="tracking after it")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--shapes", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto is not installed (apt install mosquitto)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edgeagent-bench-events-outage-") as tmp:
        report = run(Path(tmp), binary, args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lost = report["lost_track_events"] + report["lost_snapshots"]
    return 1 if lost or report["objects_with_gap"] or report["agent_exit"] != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
