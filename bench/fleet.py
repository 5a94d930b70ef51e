"""Fleet benchmark: hundreds of simulated devices on one loopback mosquitto.

    python bench/fleet.py [--devices 100,300,1000] [--rate 0.2] [--model-mib 5] [--json FILE]

The devices are `edgeagent fleet simulate` (the agent's own code per device, with a
stand-in for inference and a parse-only gate; edgeagent/fleet/simulated_device.py), in its worker
processes; the operator side is the real CLI (`model keygen|publish`, `fleet
deploy|watch`) and a paho client sending group commands. The broker is mosquitto with
`max_queued_messages 100000` and `max_inflight_messages 0` (the defaults, 1,000 queued and
20 in flight, would drop chunks to slow devices), `sys_interval 1` (for `$SYS` byte
counters) and connection messages in its log. Its fd limit is the shell's `ulimit -n`
(each device is one connection). For each N, a fresh broker and simulation:

(a) rollout: the bundled shapes detector padded to --model-mib by a metadata buffer (as
    bench/delivery.py builds it), signed, published with 64 KiB chunks and deployed to the
    devices' group; `fleet watch --group --until-converged` measures the time from the
    deploy to "every device converged" (it exits then). Bytes the broker sent in that
    window (`$SYS/broker/bytes/sent`) against N x model size; the broker's peak RSS
    (VmHWM) against its RSS with N idle devices; the CPU of broker and simulator.
(d) `fleet watch` keeping up: did it see every device converge (device lines with
    `converged: true`), its own CPU seconds.
(c) group command: `ping` to the group with an MQTT 5 response topic, three times; p50 and
    p99 of the reply latency, replies received / devices.
(b) broker restart: SIGTERM, 5 s down, started again on the same port; the time from the
    new broker accepting connections to every device's `online` status, and connection
    attempts per second at the broker (its "New connection" log lines, 1 s bins): with the
    agent's full jitter, and, as the baseline in the same run, a second simulation with
    `--reconnect-jitter none` (paho's fixed doubling). Back-off 1-30 s.

Prints one table; numbers are this machine's (2 cores shared with other work: read the
ratios and growth with N, not the absolute times).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cpu import process_cpu_s
from bench.delivery import AGENT, PREFIX, BenchError, broker_options, cli, padded_model
from tests.broker import Mosquitto, find_mosquitto, subscriber

GROUP = "fleet"
PIPELINE = "detect"
MODEL = "shapes-detector"
MIB = 1 << 20
OUTAGE_S = 5.0


class FleetBroker(Mosquitto):
    """mosquitto with $SYS every second (bytes sent) on top of the test broker's config."""

    def _config_text(self) -> str:
        return super()._config_text() + "sys_interval 1\n"

    def proc_status(self, field: str) -> int:
        """A VmHWM/VmRSS line of /proc/<pid>/status, in KiB."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a live process (0 when gone)."""
    if pid is None:
        return 0.0
    try:
        return process_cpu_s(pid)
    except ProcessLookupError:
        return 0.0


class Simulation:
    """`edgeagent fleet simulate` and its latest JSON summary line."""

    def __init__(self, broker: Mosquitto, n: int, args: argparse.Namespace, *extra: str) -> None:
        self.n = n
        self.proc = subprocess.Popen(
            [
                *AGENT, "fleet", "simulate", "--devices", str(n), "--group", GROUP,
                "--pipeline", PIPELINE, "--rate", str(args.rate), "--trusted-key",
                str(args.public_key), "--probation-s", "5", "--reconnect-min-s", "1",
                "--reconnect-max-s", "30", "--report-every", "1", "--json", "--log-level",
                "error", *extra, *broker_options(broker),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.last: dict[str, Any] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                with self._cond:
                    self.last = json.loads(line)
                    self._cond.notify_all()

    def wait_online(self, timeout: float) -> float:
        started = time.monotonic()
        with self._cond:
            ok = self._cond.wait_for(lambda: self.last.get("online") == self.n, timeout)
        if not ok:
            raise BenchError(f"{self.n} devices not online after {timeout:g} s: {self.last}")
        return time.monotonic() - started

    def cpu_s(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.last.get("workers", []))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Sys:
    """The broker's $SYS byte counter, as published every second."""

    def __init__(self, broker: Mosquitto) -> None:
        self.sent: list[tuple[float, int]] = []
        self.client = subscriber(
            broker, [("$SYS/broker/bytes/sent", 0)], self._on, client_id="bench-sys"
        )

    def _on(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.sent.append((time.monotonic(), int(msg.payload)))

    def latest_after(self, t: float, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [v for at, v in self.sent if at > t]
            if later:
                return later[0]
            time.sleep(0.1)
        raise BenchError("no $SYS/broker/bytes/sent from the broker")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def rollout(broker: FleetBroker, sim: Simulation, args: argparse.Namespace) -> dict[str, Any]:
    cli(
        "model", "publish", str(args.model_file), "--name", MODEL, "--version", "1.1.0",
        "--key", str(args.private_key), *broker_options(broker),
    )  # fmt: skip
    size = args.model_file.stat().st_size
    counter = Sys(broker)
    try:
        time.sleep(1.5)
        rss_idle = broker.proc_status("VmRSS")
        before_t = time.monotonic()
        before = counter.latest_after(before_t)
        cpu_broker, cpu_sim = broker.cpu_s(), sim.cpu_s()
        watch = subprocess.Popen(
            [*AGENT, "fleet", "watch", "--group", GROUP, "--until-converged", "--json",
             "--timeout", str(args.timeout), *broker_options(broker)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        watch_cpu = [0.0]

        def follow_cpu() -> None:  # the last reading before it exits
            while watch.poll() is None:
                watch_cpu[0] = max(watch_cpu[0], cpu_seconds(watch.pid))
                time.sleep(0.2)

        threading.Thread(target=follow_cpu, daemon=True).start()
        time.sleep(1.0)  # watch subscribed and read the retained states
        cli(
            "fleet", "deploy", "--group", GROUP, "--pipeline", PIPELINE, "--model", MODEL,
            "--version", "1.1.0", *broker_options(broker),
        )  # fmt: skip
        deployed = time.monotonic()
        out, _ = watch.communicate()
        converged_s = time.monotonic() - deployed
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        seen = {line["device"] for line in lines if line["type"] == "device" and line["converged"]}
        after_t = time.monotonic()
        after = counter.latest_after(after_t)
        return {
            "model_bytes": size,
            "outcome": lines[-1].get("outcome") if lines else None,
            "converged_s": round(converged_s, 2),
            "bytes_sent": after - before,
            "bytes_sent_per_device_model": round((after - before) / (sim.n * size), 3),
            "broker_rss_idle_mib": round(rss_idle / 1024, 1),
            "broker_peak_rss_mib": round(broker.proc_status("VmHWM") / 1024, 1),
            "broker_cpu_s": round(broker.cpu_s() - cpu_broker, 1),
            "simulator_cpu_s": round(sim.cpu_s() - cpu_sim, 1),
            "watch_saw_converged": len(seen),
            "watch_cpu_s": round(watch_cpu[0], 2),
            "watch_lines": len(lines),
        }
    finally:
        counter.close()


def group_ping(broker: Mosquitto, n: int, rounds: int = 3) -> dict[str, Any]:
    arrivals: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
    response = "bench/ping-replies"

    def on(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        arrivals.put((time.monotonic(), json.loads(msg.payload)))

    client = subscriber(broker, [(response, 1)], on, client_id="bench-ping")
    latencies: list[float] = []
    received = 0
    try:
        for r in range(rounds):
            request = f"ping-{r}-{os.urandom(3).hex()}"
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = response
            sent = time.monotonic()
            client.publish(
                f"{PREFIX}/group/{GROUP}/cmd/ping",
                json.dumps({"id": request}).encode(),
                qos=1,
                properties=props,
            )
            got = 0
            deadline = sent + 60
            while got < n and time.monotonic() < deadline:
                try:
                    at, body = arrivals.get(timeout=0.5)
                except queue.Empty:
                    continue
                if body.get("id") == request and body.get("stage") == "succeeded":
                    got += 1
                    latencies.append((at - sent) * 1000)
            received += got
    finally:
        client.disconnect()
        client.loop_stop()
    latencies.sort()
    return {
        "replies": received,
        "sent": rounds * n,
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)
        if latencies
        else None,
    }


_NEW = re.compile(r"^(\d+): New connection from", re.M)


def restart(broker: FleetBroker, sim: Simulation) -> dict[str, Any]:
    """Broker down OUTAGE_S, then up; time until all N online again, attempts/s."""
    log_before = len(broker.log_text())
    broker.stop()
    time.sleep(OUTAGE_S)
    broker.start()
    up = time.monotonic()
    up_wall = int(time.time())
    online: dict[str, float] = {}
    done = threading.Event()

    def on(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload and json.loads(msg.payload).get("state") == "online":
            online.setdefault(msg.topic.split("/")[1], time.monotonic() - up)
            if len(online) >= sim.n:
                done.set()

    client = subscriber(broker, [(f"{PREFIX}/+/status", 1)], on, client_id="bench-restart")
    try:
        done.wait(240)
    finally:
        client.disconnect()
        client.loop_stop()
    text = broker.log_text()[log_before:]
    per_s = collections.Counter(int(m) for m in _NEW.findall(text) if int(m) >= up_wall - 1)
    span = sorted(per_s)
    times = sorted(online.values())
    return {
        "online_again": len(online),
        "half_online_s": round(times[len(times) // 2], 2) if times else None,
        "p90_online_s": round(times[int(0.9 * (len(times) - 1))], 2) if times else None,
        "all_online_s": round(times[-1], 2) if done.is_set() else None,
        "attempts": sum(per_s.values()),
        "peak_attempts_per_s": max(per_s.values()) if per_s else 0,
        "seconds_with_attempts": len(span),
        "attempts_per_s": [per_s.get(s, 0) for s in range(span[0], span[-1] + 1)] if span else [],
    }


def run_n(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"devices": n}
    broker = FleetBroker(workdir / f"broker-{n}", binary=args.mosquitto)
    broker.start()
    try:
        sim = Simulation(broker, n, args)
        try:
            result["start_s"] = round(sim.wait_online(args.timeout), 1)
            result["threads"] = sim.last.get("threads")
            if "rollout" in args.parts:
                result["rollout"] = rollout(broker, sim, args)
                print(f"N={n} rollout: {result['rollout']}", flush=True)
            if "ping" in args.parts:
                result["ping"] = group_ping(broker, n)
                print(f"N={n} ping: {result['ping']}", flush=True)
            result["restart_full_jitter"] = restart(broker, sim)
            print(f"N={n} restart (full jitter): {result['restart_full_jitter']}", flush=True)
        finally:
            sim.stop()
        sim = Simulation(broker, n, args, "--reconnect-jitter", "none", "--id-prefix", "nj")
        try:
            sim.wait_online(args.timeout)
            result["restart_no_jitter"] = restart(broker, sim)
            print(f"N={n} restart (no jitter): {result['restart_no_jitter']}", flush=True)
        finally:
            sim.stop()
    finally:
        broker.stop()
    return result


def report(results: list[dict[str, Any]]) -> None:
    print()
    print("| N | start s | converged s | broker sent / (N x model) | broker peak RSS MiB (idle) "
          "| CPU s broker / sim | watch saw / CPU s | ping p50 / p99 ms (replies) "
          "| restart: half/all online s, peak connects/s: full jitter vs none |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    none_ro = dict.fromkeys(("converged_s", "outcome", "bytes_sent_per_device_model"), "-")
    none_ro |= dict.fromkeys(("broker_peak_rss_mib", "broker_rss_idle_mib", "broker_cpu_s"), "-")
    none_ro |= {"bytes_sent": 0, "simulator_cpu_s": "-", "watch_saw_converged": "-"}
    none_ro |= {"watch_cpu_s": "-"}
    for r in results:
        ro = r.get("rollout", none_ro)
        pi = r.get("ping", {"p50_ms": "-", "p99_ms": "-", "replies": "-", "sent": "-"})
        full, none = r["restart_full_jitter"], r["restart_no_jitter"]
        print(
            f"| {r['devices']} | {r['start_s']} | {ro['converged_s']} ({ro['outcome']}) "
            f"| {ro['bytes_sent'] / MIB:.0f} MiB ({ro['bytes_sent_per_device_model']}) "
            f"| {ro['broker_peak_rss_mib']} ({ro['broker_rss_idle_mib']}) "
            f"| {ro['broker_cpu_s']} / {ro['simulator_cpu_s']} "
            f"| {ro['watch_saw_converged']}/{r['devices']} / {ro['watch_cpu_s']} "
            f"| {pi['p50_ms']} / {pi['p99_ms']} ({pi['replies']}/{pi['sent']}) "
            f"| {full['half_online_s']}/{full['all_online_s']} s, "
            f"{full['peak_attempts_per_s']}/s vs {none['half_online_s']}/{none['all_online_s']} s, "
            f"{none['peak_attempts_per_s']}/s |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="100,300,1000")
    parser.add_argument("--rate", type=float, default=0.2, help="results/s per device")
    parser.add_argument("--model-mib", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument(
        "--parts", default="rollout,ping,restart", help="which parts (restart is always run)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    args.mosquitto = find_mosquitto()
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-bench-fleet-"))
    results = []
    try:
        cli("model", "keygen", "-o", str(workdir / "keys"))
        args.private_key = workdir / "keys" / "edgeagent-signing.key"
        args.public_key = workdir / "keys" / "edgeagent-signing.pub"
        args.model_file = padded_model(workdir / "model", int(args.model_mib * MIB))
        for n in (int(v) for v in args.devices.split(",")):
            results.append(run_n(n, args, workdir))
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    finally:
        if results:
            report(results)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
