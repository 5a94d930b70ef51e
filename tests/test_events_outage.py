"""`publish: {mode: events}` across a broker outage: the real daemon, shapes detector and
mosquitto; every tracked object's events arrive, each `new` with its `end`.

What the agent stored is recorded by a trigger on its outbox (created before it starts),
which copies each inserted row to `test_stored`; bench/events_outage.py does the same for
a 60 s outage.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from edgeagent.outbox import Outbox
from tests.agent_config import shapes_pipeline, write_agent_config
from tests.broker import Mosquitto, MqttReader
from tests.waiting import wait_until

TRACKS = "edgeagent/eo/tracks/shapes"

_RECORDER = """
CREATE TABLE test_stored (created REAL NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TRIGGER test_stored AFTER INSERT ON outbox BEGIN
    INSERT INTO test_stored VALUES (NEW.created, NEW.topic, NEW.payload);
END;
"""


def recording_outbox(path: Path) -> Path:
    Outbox(path, max_bytes=1 << 20).close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(_RECORDER)
    return path


def stored_events(path: Path) -> list[tuple[float, bytes]]:
    """(time stored, payload) of every track event the agent put in its outbox."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        rows = conn.execute(
            "SELECT created, payload FROM test_stored WHERE topic = ? ORDER BY rowid", (TRACKS,)
        ).fetchall()
    return [(created, bytes(payload)) for created, payload in rows]


def missing(stored: list[tuple[float, bytes]], reader: MqttReader) -> Counter[bytes]:
    """Stored events not received (a multiset: two keep-alives can be identical)."""
    received = Counter(m.payload for m in reader.messages)
    return Counter(payload for _at, payload in stored) - received


def test_no_track_event_lost_across_a_broker_outage(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    mqtt_reader: Callable[..., MqttReader],
    agent_process: Callable[..., subprocess.Popen[str]],
) -> None:
    broker = mosquitto_factory(persistence=True)  # sessions outlive the restart
    outbox = recording_outbox(tmp_path / "outbox.db")
    pipeline = {
        **shapes_pipeline(width=320, height=240, fps=15, shapes=6, seed=1),
        "publish": {"mode": "events", "tracking": {"min_hits": 2, "max_misses": 10}},
    }
    config = write_agent_config(
        tmp_path, broker, device="eo", pipelines=[pipeline], outbox={"path": str(outbox)}
    )
    reader = mqtt_reader(broker, TRACKS, session="eo-consumer")
    process = agent_process(config)
    reader.wait_for(lambda m: json.loads(m.payload)["type"] == "new", timeout=60)

    broker.stop()
    down_at = time.time()
    # The outage lasts until the agent has stored a `new` and an `end` while it is down.
    wait_until(
        lambda: (
            {"new", "end"}
            <= {json.loads(p)["type"] for at, p in stored_events(outbox) if at > down_at}
        ),
        60,
        "a new and an end stored during the outage",
    )
    broker.start()
    up_at = time.time()
    wait_until(
        lambda: any(at > up_at for at, _p in stored_events(outbox)),
        60,
        "a track event stored after the reconnect",
    )
    process.send_signal(signal.SIGTERM)  # ends the open tracks
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr

    stored = stored_events(outbox)
    wait_until(
        lambda: not missing(stored, reader),
        30,
        lambda: f"the stored events never received: {missing(stored, reader)}",
    )
    assert any(down_at < at < up_at for at, _p in stored), "the outage left a backlog"
    sequences: dict[str, list[str]] = {}
    for _at, payload in stored:
        event = json.loads(payload)
        sequences.setdefault(event["id"], []).append(event["type"])
    received = [json.loads(m.payload) for m in reader.messages]
    received_news = {e["id"] for e in received if e["type"] == "new"}
    assert received_news == set(sequences)
    for track, kinds in sequences.items():
        assert kinds[0] == "new", (track, kinds)
        assert kinds[-1] == "end", (track, kinds)
        assert kinds.count("new") == kinds.count("end") == 1, (track, kinds)
