"""`publish: {mode: events}` across a broker outage: the real daemon, shapes detector and
mosquitto; every tracked object's events arrive, each `new` with its `end`.

What the agent stored is recorded by a trigger on its outbox (created before it starts),
which copies each inserted row to a table (tests/outbox_recording.py); bench/events_outage.py
does the same for a 60 s outage.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.agent_config import shapes_pipeline, write_agent_config
from tests.broker import Mosquitto, MqttReader
from tests.outbox_recording import Message, match, recording_outbox, stored_messages
from tests.waiting import wait_until

TRACKS = "edgeagent/eo/tracks/shapes"


def stored_events(path: Path) -> list[Message]:
    """Every track event the agent put in its outbox."""
    return [m for m in stored_messages(path) if m.topic == TRACKS]


def missing(stored: list[Message], reader: MqttReader) -> list[bytes]:
    """Stored events not received (a multiset: two keep-alives can be identical)."""
    firsts, _left_over = match(stored, reader.messages)
    return [m.payload for m, first in zip(stored, firsts, strict=True) if first is None]


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
            <= {json.loads(m.payload)["type"] for m in stored_events(outbox) if m.at > down_at}
        ),
        60,
        "a new and an end stored during the outage",
    )
    broker.start()
    up_at = time.time()
    wait_until(
        lambda: any(m.at > up_at for m in stored_events(outbox)),
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
    assert any(down_at < m.at < up_at for m in stored), "the outage left a backlog"
    sequences: dict[str, list[str]] = {}
    for message in stored:
        event = json.loads(message.payload)
        sequences.setdefault(event["id"], []).append(event["type"])
    received = [json.loads(m.payload) for m in reader.messages]
    received_news = {e["id"] for e in received if e["type"] == "new"}
    assert received_news == set(sequences)
    for track, kinds in sequences.items():
        assert kinds[0] == "new", (track, kinds)
        assert kinds[-1] == "end", (track, kinds)
        assert kinds.count("new") == kinds.count("end") == 1, (track, kinds)
