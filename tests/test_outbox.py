"""The durable outbox: storage bounds and recovery, and draining through a real MqttLink
to a real mosquitto across outages and a kill -9."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from pydantic import ValidationError

from edgeagent.config import MqttConfig, OutboxConfig
from edgeagent.mqtt import MqttLink
from edgeagent.outbox import Outbox, OutboxPublisher
from tests.broker import Mosquitto, durable_subscriber, free_port
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
BIG = 1 << 30


def make_outbox(path: Path, **bounds: Any) -> Outbox:
    bounds.setdefault("max_bytes", BIG)
    return Outbox(path, **bounds)


def result(pipeline: str, seq: int) -> bytes:
    return json.dumps({"pipeline": pipeline, "seq": seq, "ts": time.time()}).encode()


# --- storage -----------------------------------------------------------------------------


def test_put_gives_rising_ids_and_pending_reads_them_in_order(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path / "state" / "outbox.db")
    ids = [outbox.put(f"t/{i}", b"%d" % i) for i in range(10)]

    assert ids == sorted(ids)
    assert len(set(ids)) == 10
    first = outbox.pending(0, 4)
    assert [e.topic for e in first] == ["t/0", "t/1", "t/2", "t/3"]
    rest = outbox.pending(first[-1].id, 100)
    assert [e.payload for e in rest] == [b"%d" % i for i in range(4, 10)]
    assert outbox.last_id == ids[-1]
    outbox.close()


def test_remove_deletes_entries_and_updates_the_stats(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path / "outbox.db")
    ids = [outbox.put("a/b", b"x" * 10) for _ in range(5)]
    assert outbox.stats().depth == 5
    assert outbox.stats().bytes == 5 * (3 + 10)

    assert outbox.remove([ids[0], ids[2], 10_000]) == 2

    stats = outbox.stats()
    assert (stats.depth, stats.bytes) == (3, 3 * 13)
    assert [e.id for e in outbox.pending(0, 10)] == [ids[1], ids[3], ids[4]]
    outbox.close()


def test_entries_survive_a_reopen_and_ids_keep_rising(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = make_outbox(path)
    for i in range(3):
        outbox.put("t", b"%d" % i, qos=0, retain=True)
    outbox.close()

    again = make_outbox(path)
    entries = again.pending(0, 10)
    assert [(e.payload, e.qos, e.retain) for e in entries] == [
        (b"0", 0, True),
        (b"1", 0, True),
        (b"2", 0, True),
    ]
    assert again.put("t", b"3") == entries[-1].id + 1
    again.close()


def test_max_rows_drops_the_oldest_first_and_counts_them(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path / "outbox.db", max_rows=5)
    for i in range(8):
        assert outbox.put("t", b"%d" % i) is not None

    assert [e.payload for e in outbox.pending(0, 10)] == [b"3", b"4", b"5", b"6", b"7"]
    stats = outbox.stats()
    assert (stats.depth, stats.dropped) == (5, 3)
    outbox.close()


def test_max_bytes_drops_the_oldest_first_and_counts_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = make_outbox(tmp_path / "outbox.db", max_bytes=1000)  # 10 entries of 100 bytes
    for i in range(12):
        outbox.put("t", b"%03d" % i + b"." * 96)

    kept = [e.payload[:3] for e in outbox.pending(0, 100)]
    assert kept == [b"%03d" % i for i in range(2, 12)]
    assert outbox.stats().bytes == 1000
    assert outbox.stats().dropped == 2
    assert "max_bytes (1000) reached" in caplog.text

    # An entry that can never fit is the one dropped; the stored ones stay.
    assert outbox.put("t", b"x" * 2000) is None
    assert outbox.stats().depth == 10
    assert outbox.stats().dropped == 3
    outbox.close()


def test_entries_older_than_max_age_are_dropped(tmp_path: Path) -> None:
    now = [1_000_000.0]
    outbox = Outbox(tmp_path / "outbox.db", max_bytes=BIG, max_age_s=60, clock=lambda: now[0])
    for i in range(5):
        outbox.put("t", b"old%d" % i)
        now[0] += 1
    assert outbox.stats().oldest_age_s == pytest.approx(5.0)

    now[0] += 57  # the first two are now older than 60 s
    outbox.put("t", b"new")

    assert [e.payload for e in outbox.pending(0, 10)] == [b"old2", b"old3", b"old4", b"new"]
    assert outbox.stats().dropped == 2

    now[0] += 120  # with nothing put, expire() (the publisher calls it) still drops them
    outbox.expire()
    assert outbox.stats().depth == 0
    assert outbox.stats().oldest_age_s is None
    outbox.close()


def test_a_corrupt_file_is_moved_aside_and_an_empty_outbox_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not an SQLite database" * 200)

    with caplog.at_level(logging.ERROR):
        outbox = make_outbox(path)

    moved = list(tmp_path.glob("outbox.db.corrupt-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes().startswith(b"this is not an SQLite database")
    assert "cannot be used" in caplog.text
    assert outbox.durable
    assert outbox.stats().depth == 0
    entry_id = outbox.put("t", b"fresh")
    assert [e.id for e in outbox.pending(0, 10)] == [entry_id]
    outbox.close()


def test_a_file_that_becomes_corrupt_while_running_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.db"
    outbox = make_outbox(path)
    for _ in range(2000):
        outbox.put("t", b"x" * 300)
    outbox.checkpoint()  # the entries are now in the database file, not only in the WAL
    size = path.stat().st_size
    with path.open("r+b") as f:  # everything after the first page becomes garbage
        f.seek(4096)
        f.write(bytes(range(256)) * ((size - 4096) // 256 + 1))

    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        outbox.pending(0, 5000)

    assert "became corrupt while in use" in caplog.text
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1
    assert outbox.stats().depth == 0
    entry_id = outbox.put("t", b"after")
    assert entry_id == 2001  # ids keep rising, so the publisher's cursors stay valid
    assert [e.payload for e in outbox.pending(0, 10)] == [b"after"]
    outbox.close()


def test_a_file_of_another_schema_version_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, body BLOB)")
        conn.execute("PRAGMA user_version=7")
    conn.close()

    outbox = make_outbox(path)

    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1
    assert outbox.put("t", b"x") is not None
    outbox.close()


def test_an_unusable_location_falls_back_to_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the outbox directory should be")

    outbox = make_outbox(blocker / "outbox.db")

    assert not outbox.durable
    assert "keeping results in memory" in caplog.text
    entry_id = outbox.put("t", b"x")
    assert [e.id for e in outbox.pending(0, 1)] == [entry_id]
    outbox.close()


def test_put_after_close_drops_and_counts_without_raising(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path / "outbox.db")
    outbox.close()

    assert outbox.put("t", b"x") is None
    assert outbox.stats().dropped_error == 1


def test_from_config_uses_the_configured_path_or_the_default(tmp_path: Path) -> None:
    default = Outbox.from_config(OutboxConfig(max_rows=3), tmp_path / "state" / "outbox.db")
    named = Outbox.from_config(OutboxConfig(path=tmp_path / "mine.db"), tmp_path / "unused.db")

    assert default.path == tmp_path / "state" / "outbox.db"
    assert default.path.exists()
    assert named.path == tmp_path / "mine.db"
    assert not (tmp_path / "unused.db").exists()
    for i in range(5):
        default.put("t", b"%d" % i)
    assert default.stats().depth == 3  # the configured bound applies
    default.close()
    named.close()


def test_config_has_the_documented_defaults_and_rejects_unknown_keys() -> None:
    config = OutboxConfig()
    assert config.path is None  # the agent's state directory decides (edgeagent/paths.py)
    assert config.max_bytes == 256 * 1024 * 1024
    assert config.max_rows is None
    assert config.max_age_s == 7 * 24 * 3600
    assert config.backlog_rate == 200
    assert config.enabled
    with pytest.raises(ValidationError, match="max_byte"):
        OutboxConfig.model_validate({"max_byte": 10})
    with pytest.raises(ValidationError, match="greater than 0"):
        OutboxConfig(backlog_rate=0)
    with pytest.raises(ValidationError, match="frozen"):
        config.enabled = False  # type: ignore[misc]


# --- publishing, against a fake link -----------------------------------------------------


class FakeTicket:
    def __init__(self) -> None:
        self.acked = threading.Event()
        self.failure: str | None = None


class FakeLink:
    """Records what it is asked to publish; acknowledges at once unless told otherwise."""

    def __init__(self, *, connected: bool = True, ack: bool = True) -> None:
        self.connected = connected
        self.ack = ack
        self.refuse = False
        self.lock = threading.Lock()
        self.sent: list[tuple[str, bytes]] = []
        self.tickets: list[FakeTicket] = []

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> FakeTicket:
        ticket = FakeTicket()
        if self.refuse:
            ticket.failure = "Not authorized"
        if self.ack or self.refuse:
            ticket.acked.set()
        with self.lock:
            self.sent.append((topic, payload))
            self.tickets.append(ticket)
        return ticket

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [payload for _topic, payload in self.sent]


@contextmanager
def publishing(outbox: Outbox, link: Any, **options: Any) -> Iterator[OutboxPublisher]:
    publisher = OutboxPublisher(outbox, link, **options)
    publisher.start()
    try:
        yield publisher
    finally:
        publisher.stop()


def test_nothing_is_published_while_the_link_is_down(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path / "outbox.db")
    link = FakeLink(connected=False)
    with publishing(outbox, link, backlog_rate=10_000) as publisher:
        for i in range(20):
            publisher.submit("t", b"%d" % i)
        assert not publisher.flush(0.3)
        assert link.payloads() == []

        link.connected = True
        publisher.on_reconnected()

        assert publisher.flush(10)
    assert link.payloads() == [b"%d" % i for i in range(20)]
    assert outbox.stats().depth == 0
    outbox.close()


def test_unacknowledged_messages_are_bounded_by_the_window(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path / "outbox.db")
    link = FakeLink(ack=False)
    with publishing(outbox, link, window=16) as publisher:
        for i in range(50):
            publisher.submit("t", b"%d" % i)
        wait_until(lambda: len(link.payloads()) == 16)
        time.sleep(0.2)  # lets time pass to show that no 17th is sent while none is acked
        assert len(link.payloads()) == 16
        assert publisher.in_flight == 16

        for ticket in list(link.tickets):
            ticket.acked.set()
        link.ack = True

        assert publisher.flush(10)
    assert sorted(link.payloads(), key=int) == [b"%d" % i for i in range(50)]
    outbox.close()


def test_messages_the_broker_refuses_are_removed_and_counted(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path / "outbox.db")
    link = FakeLink()
    link.refuse = True
    with publishing(outbox, link) as publisher:
        for i in range(3):
            publisher.submit("t", b"%d" % i)
        assert publisher.flush(10)
        assert publisher.refused == 3
    outbox.close()


def test_a_full_disk_drops_new_results_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = make_outbox(tmp_path / "outbox.db")
    link = FakeLink(connected=False)
    with publishing(outbox, link, backlog_rate=10_000) as publisher:
        publisher.submit("t", b"first")
        # SQLite reports "database or disk is full" once the file would grow past this.
        conn = outbox._writer
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages}")

        with caplog.at_level(logging.ERROR):
            ids = [publisher.submit("t", b"r" * 1000) for _ in range(100)]

        refused = ids.count(None)
        assert refused > 50
        assert outbox.stats().dropped_full == refused
        assert outbox.stats().depth == 1 + 100 - refused
        disk_full_lines = [r for r in caplog.records if "disk is full" in r.getMessage()]
        assert len(disk_full_lines) == 1  # reported, not once per result

        # Once the broker acknowledged the backlog, its pages are free for new results.
        link.connected = True
        publisher.on_reconnected()
        assert publisher.flush(10)
        assert publisher.submit("t", b"r" * 1000) is not None
    outbox.close()


# --- a real broker -----------------------------------------------------------------------


class Consumer:
    """A QoS 1 subscriber with a persistent session that decodes JSON results."""

    def __init__(self, broker: Mosquitto, topic_filter: str) -> None:
        self._cond = threading.Condition()
        self._received: list[dict[str, Any]] = []
        self._client = durable_subscriber(
            broker, topic_filter, self._on_message, client_id=f"consumer-{id(self):x}"
        )

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        payload = json.loads(message.payload)
        with self._cond:
            self._received.append(payload)
            self._cond.notify_all()

    @property
    def received(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._received)

    def wait_for_distinct(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Waits until `count` distinct (pipeline, seq) arrived; returns all received."""

        def distinct() -> int:
            return len({(r["pipeline"], r["seq"]) for r in self._received})

        with self._cond:
            if not self._cond.wait_for(lambda: distinct() >= count, timeout):
                raise AssertionError(f"{distinct()} of {count} results within {timeout} s")
            return list(self._received)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def durable_broker(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A broker with persistence, as in production: sessions and queued messages outlive a
    restart, so a consumer with a persistent session misses nothing across an outage."""
    return mosquitto_factory(persistence=True)


@pytest.fixture
def consumers() -> Iterator[Callable[[Mosquitto, str], Consumer]]:
    made: list[Consumer] = []

    def make(broker: Mosquitto, topic_filter: str) -> Consumer:
        made.append(Consumer(broker, topic_filter))
        return made[-1]

    yield make
    for consumer in made:
        consumer.close()


@contextmanager
def agent_link(
    outbox: Outbox, config: MqttConfig, **options: Any
) -> Iterator[tuple[MqttLink, OutboxPublisher]]:
    """A real MqttLink and a publisher wired as the agent wires them."""
    publisher: OutboxPublisher | None = None

    def on_connected() -> None:
        assert publisher is not None
        publisher.on_reconnected()

    link = MqttLink(config, "dev1", will_payload=b'{"state":"offline"}', on_connected=on_connected)
    publisher = OutboxPublisher(outbox, link, **options)
    publisher.start()
    link.start()
    try:
        yield link, publisher
    finally:
        publisher.stop()
        link.stop()


def first_arrivals(received: list[dict[str, Any]], pipeline: str) -> list[int]:
    """The seqs of `pipeline` in the order they first arrived (duplicates dropped)."""
    seen: set[int] = set()
    order = []
    for r in received:
        if r["pipeline"] == pipeline and r["seq"] not in seen:
            seen.add(r["seq"])
            order.append(r["seq"])
    return order


def longest_decreasing_run(values: list[int]) -> int:
    """The length of the longest strictly decreasing subsequence (patience sorting)."""
    import bisect

    tails: list[int] = []
    for value in values:
        i = bisect.bisect_left(tails, -value)
        tails[i : i + 1] = [-value]
    return len(tails)


def test_results_survive_a_broker_outage_exactly_once_after_dedup(
    durable_broker: Mosquitto,
    consumers: Callable[[Mosquitto, str], Consumer],
    tmp_path: Path,
) -> None:
    consumer = consumers(durable_broker, "edgeagent/dev1/results/#")
    outbox = make_outbox(tmp_path / "outbox.db")
    pipelines = ("cam", "vib")
    produced = dict.fromkeys(pipelines, 0)
    stop = threading.Event()

    with agent_link(outbox, durable_broker.mqtt_config()) as (link, publisher):

        def produce() -> None:  # 30 results/s, alternating between two pipelines
            while not stop.is_set():
                for pipeline in pipelines:
                    publisher.submit(
                        link.topics.results(pipeline), result(pipeline, produced[pipeline])
                    )
                    produced[pipeline] += 1
                stop.wait(2 / 30)

        wait_until(lambda: link.connected)
        producer = threading.Thread(target=produce, name="test-producer")
        producer.start()
        try:
            time.sleep(1.5)
            durable_broker.stop()
            time.sleep(5)
            backlog = outbox.stats().depth
            durable_broker.start()
            time.sleep(1.5)
        finally:
            stop.set()
            producer.join()
        assert publisher.flush(20)

    total = sum(produced.values())
    received = consumer.wait_for_distinct(total)
    assert backlog >= 100  # the outage really left a backlog to drain
    assert link.reconnects == 1
    assert outbox.stats().dropped == 0
    for pipeline in pipelines:
        order = first_arrivals(received, pipeline)
        assert sorted(order) == list(range(produced[pipeline]))  # every seq, no gaps
        # Arrivals are the live stream and, after the reconnect, the backlog merged into
        # it: two increasing runs interleaved, so no three arrive in decreasing order.
        assert longest_decreasing_run(order) <= 2
    outbox.close()


CRASHING_PRODUCER = """
import json, sys, time
from pathlib import Path
from edgeagent.config import MqttConfig
from edgeagent.mqtt import MqttLink
from edgeagent.outbox import Outbox, OutboxPublisher

path, port, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
outbox = Outbox(path, max_bytes=1 << 30)
config = MqttConfig(host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=0.5)
link = MqttLink(config, "dev1", will_payload=b"{}")
publisher = OutboxPublisher(outbox, link)
link.start()
publisher.start()
for seq in range(count):
    payload = {"pipeline": "cam", "seq": seq, "ts": time.time()}
    publisher.submit(link.topics.results("cam"), json.dumps(payload).encode())
print("stored", flush=True)
time.sleep(60)
"""


def test_a_backlog_left_by_kill_9_is_published_after_a_restart(
    mosquitto_factory: Callable[..., Mosquitto],
    consumers: Callable[[Mosquitto, str], Consumer],
    tmp_path: Path,
) -> None:
    broker = mosquitto_factory(port=free_port(), started=False)  # down while producing
    path = tmp_path / "outbox.db"
    count = 500
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PRODUCER, str(path), str(broker.port), str(count)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "stored"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert path.with_name("outbox.db-wal").exists()  # killed before any clean close

    broker.start()
    consumer = consumers(broker, "edgeagent/dev1/results/#")
    outbox = make_outbox(path)
    assert outbox.stats().depth == count
    with agent_link(outbox, broker.mqtt_config(), backlog_rate=2000) as (_link, publisher):
        received = consumer.wait_for_distinct(count)
        assert publisher.flush(10)
    assert first_arrivals(received, "cam") == list(range(count))
    outbox.close()


def test_live_results_overtake_a_backlog_that_drains_at_a_bounded_rate(
    mosquitto: Mosquitto,
    consumers: Callable[[Mosquitto, str], Consumer],
    tmp_path: Path,
) -> None:
    consumer = consumers(mosquitto, "edgeagent/dev1/results/#")
    outbox = make_outbox(tmp_path / "outbox.db")
    backlog, live, rate = 300, 20, 100.0
    topic = "edgeagent/dev1/results/cam"
    for seq in range(backlog):  # stored before the link ever connected
        outbox.put(topic, result("cam", seq))

    with agent_link(outbox, mosquitto.mqtt_config(), backlog_rate=rate) as (_link, publisher):
        consumer.wait_for_distinct(1)
        for seq in range(backlog, backlog + live):
            publisher.submit(topic, result("cam", seq))
        received = consumer.wait_for_distinct(backlog + live)
        assert publisher.flush(10)
    arrived_at: dict[int, int] = {}
    for i, r in enumerate(received):
        arrived_at.setdefault(r["seq"], i)

    last_backlog = max(arrived_at[s] for s in range(backlog))
    assert all(arrived_at[s] < last_backlog for s in range(backlog, backlog + live))
    backlog_order = [s for s in first_arrivals(received, "cam") if s < backlog]
    assert backlog_order == list(range(backlog))
    outbox.close()


def test_backlog_rate_is_a_ceiling(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path / "outbox.db")
    backlog, rate = 150, 100.0
    for seq in range(backlog):
        outbox.put("t", b"%d" % seq)
    link = FakeLink()
    started = time.monotonic()
    with publishing(outbox, link, backlog_rate=rate) as publisher:
        assert publisher.flush(10)
    took = time.monotonic() - started
    burst = rate * 0.1
    assert took >= (backlog - burst) / rate  # a lower bound: the limiter guarantees it
    assert len(link.payloads()) == backlog
    outbox.close()
