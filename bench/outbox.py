"""Durable outbox benchmark: a broker outage, a kill -9, and the outbox's overhead.

    python bench/outbox.py [--outage-s 60] [--rate 30] [--json FILE]

(a) outage: results at --rate/s through a real MqttLink + OutboxPublisher to a loopback
    mosquitto, which is stopped for --outage-s and started again. A consumer with a
    persistent session counts what arrives. Targets: received/produced 1.0, nothing out of
    order, no gaps; the time to drain the backlog is reported.
(b) crash: a producer process stores results (broker down, then broker up) and is killed
    with SIGKILL; a new publisher drains what it left. Target: 0 results lost.
(c) overhead: results/s acknowledged by the broker when a producer publishes through the
    outbox against publishing with MqttLink.publish directly, in the same run: as fast as
    possible, and paced by a simulated 3.5 ms invoke (what bounds the real agent). Target
    >= 0.97. Also the cost of one put() in microseconds.

The broker uses persistence (as production brokers do) so that the consumer's session and
its queued messages outlive the restart; with `persistence false` a restarted broker drops
everything published before the consumer subscribes again, which is no fault of the agent.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgeagent.config import MqttConfig
from edgeagent.mqtt import MqttLink
from edgeagent.outbox import Outbox, OutboxPublisher
from tests.broker import Mosquitto, durable_subscriber, find_mosquitto

REPO = Path(__file__).resolve().parents[1]
TOPIC_FILTER = "edgeagent/bench/results/#"
BIG = 1 << 30
INVOKE_S = 0.0035  # what one result costs the real agent, mostly in invoke()


class Consumer:
    """A QoS 1 subscriber with a persistent session; keeps (seq, arrival time) in order."""

    def __init__(self, broker: Mosquitto) -> None:
        self.cond = threading.Condition()
        self.arrivals: list[tuple[int, float, float]] = []  # seq, ts in payload, arrived
        self.client = durable_subscriber(
            broker,
            TOPIC_FILTER,
            self._on_message,
            client_id=f"bench-consumer-{time.monotonic_ns():x}",
        )

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        payload = json.loads(message.payload)
        with self.cond:
            self.arrivals.append((payload["seq"], payload["ts"], time.time()))
            self.cond.notify_all()

    def distinct(self) -> set[int]:
        with self.cond:
            return {seq for seq, _ts, _at in self.arrivals}

    def wait_for(self, seqs: set[int], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(
                lambda: seqs <= {seq for seq, _ts, _at in self.arrivals}, timeout
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def link_and_publisher(
    broker: Mosquitto, outbox: Outbox, **options: Any
) -> tuple[MqttLink, OutboxPublisher]:
    """Wired as the agent wires them: on_connected -> on_reconnected()."""
    holder: list[OutboxPublisher] = []
    link = MqttLink(
        broker.mqtt_config(),
        "bench",
        will_payload=b"{}",
        on_connected=lambda: holder[0].on_reconnected(),  # noqa: PLW0108 (not yet made)
    )
    holder.append(OutboxPublisher(outbox, link, **options))
    holder[0].start()
    link.start()
    return link, holder[0]


def longest_decreasing(values: list[int]) -> int:
    tails: list[int] = []
    for value in values:
        i = bisect.bisect_left(tails, -value)
        tails[i : i + 1] = [-value]
    return len(tails)


def payload(seq: int) -> bytes:
    return json.dumps({"pipeline": "cam", "seq": seq, "ts": time.time(), "pad": "x" * 200}).encode()


# --- (a) outage --------------------------------------------------------------------------


def outage(workdir: Path, binary: str, outage_s: float, rate: float) -> dict[str, Any]:
    broker = Mosquitto(workdir / "broker-a", binary=binary, persistence=True)
    broker.start()
    consumer = Consumer(broker)
    outbox = Outbox(workdir / "a" / "outbox.db", max_bytes=BIG)
    link, publisher = link_and_publisher(broker, outbox)
    topic = link.topics.results("cam")
    produced = 0
    stop = threading.Event()

    def produce() -> None:
        nonlocal produced
        next_at = time.monotonic()
        while not stop.is_set():
            publisher.submit(topic, payload(produced))
            produced += 1
            next_at += 1 / rate
            stop.wait(max(0.0, next_at - time.monotonic()))

    producer = threading.Thread(target=produce, name="bench-producer")
    try:
        while not link.connected:
            time.sleep(0.05)
        producer.start()
        time.sleep(5)
        print(f"  stopping the broker for {outage_s:g} s ...", flush=True)
        broker.stop()
        time.sleep(outage_s)
        backlog = outbox.stats().depth
        before_restart = set(range(produced))
        broker.start()
        restarted = time.time()
        drained = consumer.wait_for(before_restart, timeout=outage_s * 2 + 60)
        drain_s = time.time() - restarted
        time.sleep(3)
    finally:
        stop.set()
        if producer.is_alive():
            producer.join()
        flushed = publisher.flush(60)
        publisher.stop()
        link.stop()
    complete = consumer.wait_for(set(range(produced)), timeout=30)
    consumer.close()
    broker.stop()
    stats = outbox.stats()
    outbox.close()

    with consumer.cond:
        arrivals = list(consumer.arrivals)
    seen: set[int] = set()
    first: list[int] = []
    for seq, _ts, _at in arrivals:
        if seq not in seen:
            seen.add(seq)
            first.append(seq)
    # Live results that arrived while the backlog drained: how long they took.
    live_latency = [
        at - ts
        for seq, ts, at in arrivals
        if seq not in before_restart and at <= restarted + drain_s
    ]
    return {
        "produced": produced,
        "received_distinct": len(seen),
        "received_ratio": len(seen) / produced,
        "missing": len(set(range(produced)) - seen),
        "duplicates": len(arrivals) - len(seen),
        "order_ok": longest_decreasing(first) <= 2,  # live + backlog, each in order
        "backlog_at_restart": backlog,
        "drain_s": round(drain_s, 2) if drained else None,
        "live_during_drain": len(live_latency),
        "live_latency_ms_median": (
            round(statistics.median(live_latency) * 1000, 1) if live_latency else None
        ),
        "live_latency_ms_max": round(max(live_latency) * 1000, 1) if live_latency else None,
        "dropped": stats.dropped + stats.dropped_full + stats.dropped_error,
        "flushed": flushed and complete,
    }


# --- (b) crash ---------------------------------------------------------------------------

PRODUCER = """
import json, sys, time
from pathlib import Path
from edgeagent.config import MqttConfig
from edgeagent.mqtt import MqttLink
from edgeagent.outbox import Outbox, OutboxPublisher

path, port = Path(sys.argv[1]), int(sys.argv[2])
outbox = Outbox(path, max_bytes=1 << 30)
config = MqttConfig(host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=0.5)
holder = []
link = MqttLink(
    config, "bench", will_payload=b"{}", on_connected=lambda: holder[0].on_reconnected()
)
holder.append(OutboxPublisher(outbox, link))
holder[0].start()
link.start()
topic = link.topics.results("cam")
seq = 0
while True:
    body = {"pipeline": "cam", "seq": seq, "ts": time.time(), "pad": "x" * 200}
    holder[0].submit(topic, json.dumps(body).encode())
    print(seq, flush=True)  # stored: put() returned
    seq += 1
    time.sleep(0.001)
"""


def crash(workdir: Path, binary: str, broker_up: bool, kill_after: int) -> dict[str, Any]:
    name = "up" if broker_up else "down"
    broker = Mosquitto(workdir / f"broker-b-{name}", binary=binary, persistence=True)
    broker.start()  # picks the port
    consumer = Consumer(broker)
    if not broker_up:
        broker.stop()
    path = workdir / f"b-{name}" / "outbox.db"
    child = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, str(path), str(broker.port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    stored: set[int] = set()
    for line in child.stdout:
        stored.add(int(line))
        if len(stored) >= kill_after:
            child.send_signal(signal.SIGKILL)
            break
    stored.update(int(line) for line in child.stdout if line.strip())  # still in the pipe
    child.wait()
    child.stdout.close()
    received_before = consumer.distinct()

    broker.start()
    outbox = Outbox(path, max_bytes=BIG)
    left_on_disk = outbox.stats().depth
    link, publisher = link_and_publisher(broker, outbox, backlog_rate=1000)
    consumer.wait_for(stored, timeout=60)
    publisher.flush(30)
    publisher.stop()
    link.stop()
    outbox.close()
    with consumer.cond:
        total = len(consumer.arrivals)
    received = consumer.distinct()
    consumer.close()
    broker.stop()
    return {
        "broker": name,
        "stored_before_kill": len(stored),
        "delivered_before_kill": len(received_before),
        "left_on_disk": left_on_disk,
        "lost": len(stored - received),
        "duplicates": total - len(received),
    }


# --- (c) overhead ------------------------------------------------------------------------


def invoke_like(tensor: memoryview) -> None:
    """Stands in for LiteRT invoke(): CPU work that releases the GIL (hashlib does for
    more than 2 KiB)."""
    hashlib.sha256(tensor).digest()


def calibrate_invoke(target_s: float) -> memoryview:
    """A buffer whose hashing takes about `target_s` seconds here."""
    probe = memoryview(bytes(4 << 20))
    invoke_like(probe)  # warm up
    started = time.perf_counter()
    for _ in range(10):
        invoke_like(probe)
    per_byte = (time.perf_counter() - started) / 10 / len(probe)
    return memoryview(bytes(int(target_s / per_byte)))


@dataclass
class Run:
    """One producer run: results acknowledged per second, and the mean time of one
    publish call (MqttLink.publish or OutboxPublisher.submit) in the producer."""

    per_s: float
    send_us: float


Produce = Callable[[Callable[[], object]], tuple[int, float]]


def overhead(workdir: Path, binary: str, count: int, paced_s: float) -> dict[str, Any]:
    broker = Mosquitto(workdir / "broker-c", binary=binary)
    broker.start()
    config: MqttConfig = broker.mqtt_config()
    tensor = calibrate_invoke(INVOKE_S)
    body = payload(0)

    def direct(produce: Produce) -> Run:
        link = MqttLink(config, "bench", will_payload=b"{}")
        link.start()
        while not link.connected:
            time.sleep(0.01)
        topic = link.topics.results("cam")
        started = time.perf_counter()
        n, send_s = produce(lambda: link.publish(topic, body, qos=1))
        if not link.wait_acked(120):
            raise RuntimeError("the broker did not acknowledge the direct run")
        took = time.perf_counter() - started
        link.stop()
        return Run(n / took, send_s / n * 1e6)

    def via_outbox(produce: Produce, name: str) -> Run:
        outbox = Outbox(workdir / "c" / f"{name}.db", max_bytes=BIG)
        link, publisher = link_and_publisher(broker, outbox)
        while not link.connected:
            time.sleep(0.01)
        time.sleep(0.1)  # on_reconnected has run
        topic = link.topics.results("cam")
        started = time.perf_counter()
        n, send_s = produce(lambda: publisher.submit(topic, body))
        if not publisher.flush(120):
            raise RuntimeError("the outbox did not drain")
        took = time.perf_counter() - started
        publisher.stop()
        link.stop()
        outbox.close()
        return Run(n / took, send_s / n * 1e6)

    def fast(send: Callable[[], object]) -> tuple[int, float]:
        started = time.perf_counter()
        for _ in range(count):
            send()
        return count, time.perf_counter() - started

    def paced(send: Callable[[], object]) -> tuple[int, float]:
        n, send_s = 0, 0.0
        deadline = time.perf_counter() + paced_s
        while time.perf_counter() < deadline:
            invoke_like(tensor)
            started = time.perf_counter()
            send()
            send_s += time.perf_counter() - started
            n += 1
        return n, send_s

    out: dict[str, Any] = {}
    for mode, produce, pairs in (("fast", fast, 3), ("paced", paced, 9)):
        runs: list[tuple[Run, Run]] = []
        for i in range(pairs):  # adjacent runs share the machine's load of the moment
            runs.append((direct(produce), via_outbox(produce, f"{mode}-{i}")))
        out[mode] = {
            "direct_per_s": round(statistics.median(d.per_s for d, _o in runs), 1),
            "outbox_per_s": round(statistics.median(o.per_s for _d, o in runs), 1),
            "ratio": statistics.median(o.per_s / d.per_s for d, o in runs),
            "pair_ratios": [round(o.per_s / d.per_s, 3) for d, o in runs],
            "direct_send_us": round(statistics.median(d.send_us for d, _o in runs), 1),
            "outbox_send_us": round(statistics.median(o.send_us for _d, o in runs), 1),
        }
    broker.stop()
    out["put_us_mean"], out["put_us_p99"] = put_cost(workdir / "c" / "put.db", count)
    return out


def put_cost(path: Path, count: int) -> tuple[float, float]:
    outbox = Outbox(path, max_bytes=BIG)
    body = payload(0)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        outbox.put("edgeagent/bench/results/cam", body)
        times.append(time.perf_counter() - started)
    outbox.close()
    times.sort()
    return round(statistics.fmean(times) * 1e6, 1), round(times[int(len(times) * 0.99)] * 1e6, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--outage-s", type=float, default=60.0, help="broker outage (a)")
    parser.add_argument("--rate", type=float, default=30.0, help="results/s during (a)")
    parser.add_argument("--count", type=int, default=10_000, help="messages per fast run (c)")
    parser.add_argument("--paced-s", type=float, default=2.0, help="seconds per paced run (c)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto is not installed (apt install mosquitto)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="edgeagent-bench-outbox-") as tmp:
        workdir = Path(tmp)
        print(f"(a) outage: {args.rate:g} results/s, broker down for {args.outage_s:g} s")
        a = outage(workdir, binary, args.outage_s, args.rate)
        print("(b) crash: kill -9 of a producer with a backlog on disk")
        b = [crash(workdir, binary, broker_up, kill_after=2000) for broker_up in (False, True)]
        print("(c) overhead: outbox against direct MqttLink.publish")
        c = overhead(workdir, binary, args.count, args.paced_s)

    rows = [
        ("(a) received / produced", f"{a['received_distinct']}/{a['produced']}", "1.0"),
        ("(a) missing seqs", a["missing"], "0"),
        ("(a) duplicates (removed by de-dup)", a["duplicates"], "few"),
        ("(a) in order (live + backlog runs)", a["order_ok"], "True"),
        ("(a) backlog at restart", a["backlog_at_restart"], ""),
        ("(a) backlog drain time s", a["drain_s"], "~backlog/200"),
        (
            "(a) live latency during drain ms",
            f"median {a['live_latency_ms_median']}, max {a['live_latency_ms_max']}",
            "small",
        ),
        ("(a) dropped by bounds/disk", a["dropped"], "0"),
    ]
    for run in b:
        rows += [
            (
                f"(b) broker {run['broker']}: stored / left on disk",
                f"{run['stored_before_kill']} / {run['left_on_disk']}",
                "",
            ),
            (f"(b) broker {run['broker']}: lost", run["lost"], "0"),
            (f"(b) broker {run['broker']}: duplicates", run["duplicates"], "few"),
        ]
    for mode, what in (("fast", "as fast as possible"), ("paced", "3.5 ms invoke")):
        r = c[mode]
        rows += [
            (
                f"(c) {what}: outbox/direct results/s",
                f"{r['outbox_per_s']:.0f}/{r['direct_per_s']:.0f} = {r['ratio']:.3f}",
                ">= 0.97",
            ),
            (f"(c) {what}: ratio of each pair", " ".join(map(str, r["pair_ratios"])), ""),
            (
                f"(c) {what}: us per submit / publish",
                f"{r['outbox_send_us']} / {r['direct_send_us']}",
                "",
            ),
        ]
    rows.append(
        ("(c) put() us mean / p99, alone", f"{c['put_us_mean']} / {c['put_us_p99']}", "<< 100")
    )
    width = max(len(name) for name, _v, _t in rows)
    print()
    print(f"{'measure':<{width}}  {'value':>28}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value!s:>28}  {target}")
    if args.json:
        args.json.write_text(json.dumps({"outage": a, "crash": b, "overhead": c}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
