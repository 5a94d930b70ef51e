"""Model delivery benchmark: transfer throughput, the hot swap, and resuming after kill -9.

    python bench/delivery.py [--fps 30] [--chunk-rate 20] [--json FILE] [--keep]

Every number is measured in this run on this machine, against one loopback mosquitto, with
the real agent (`edgeagent run`) as a subprocess and the fleet side driven by the real CLI
(`edgeagent model keygen` / `model publish`, `edgeagent fleet deploy`); manifests are signed
and the agent runs with `allow_unsigned: false`. Each part starts its own agent with its
own state directory, one at a time (2 cores).

(1) transfer: a valid ~5 MiB model -- the bundled shapes detector with a metadata buffer of
    random bytes added, so it loads, runs and passes the gate like the original -- is
    published with 64 KiB and with 16 KiB chunks and deployed to an agent whose pipeline
    runs shapes-detector on a synthetic camera (it keeps inferring meanwhile). Time: from
    the desired state reaching a subscriber of the bench to the agent's `downloaded` event
    (it includes the manifest round trip, signature check, one fsync per chunk, assembly
    and the sha256). Baseline, same run: `mosquitto_sub -q 1 -C <chunks + 1>` reading the
    same retained manifest and chunks, spawn to exit. Three deliveries per chunk size, under
    fresh versions, each followed by one baseline read; medians. Reported: MB/s and the
    agent/mosquitto_sub throughput ratio (no target), and, for scale, the time the chunk
    writes alone take here (write, fsync, rename per chunk, as ChunkAssembler stores them).
(2) swap: an agent runs shapes-detector 1.0.0 at --fps; the shapes-detector-ssd network is
    delivered as shapes-detector 2.0.0. From the results stream: the longest gap between
    consecutive results' `captured_at` from the end of validation (the `validated` event)
    to 1 s after the `activated` event, in frame intervals (target <= 2); source frames
    missing in that window beyond the steady-state drop rate measured over the 5 s before
    the deploy (target 0); `seq` contiguous with one `run` id, the version switching once.
(3) resume: the signed manifest is published first, then the chunks one at a time at
    --chunk-rate while the agent fetches them; the agent is SIGKILLed once half of them
    are staged, then started again on the same state directory and left to finish.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
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
from typing import Any, TypeVar

import flatbuffers
import numpy as np
import paho.mqtt.client as mqtt
from ai_edge_litert import schema_py_generated as s

from edgeagent.delivery.signing import sign_manifest
from edgeagent.delivery.transfer import write_file_durably
from edgeagent.fleet.publish import build_manifest
from edgeagent.modelfile.manifest import load_manifest
from edgeagent.modelfile.tflite import read_model
from edgeagent.mqtt.topics import Topics
from tests.broker import Mosquitto, Publisher, find_mosquitto, subscriber

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "bundled"
AGENT = [sys.executable, "-m", "edgeagent.cli.main"]
PREFIX = "bench"
PIPELINE = "cam"
MODEL = "shapes-detector"
KIB, MIB = 1 << 10, 1 << 20
MODEL_BYTES = 5 * MIB
CHUNK_SIZES = (64 * KIB, 16 * KIB)
REPEATS = 3  # deliveries (and mosquitto_sub reads) per chunk size
STEADY_S = 5.0  # steady state measured before the swap
AFTER_ACTIVATION_S = 1.0  # the swap window ends this long after the `activated` event
FLEET = Topics(PREFIX, "fleet-cli")

T = TypeVar("T")


class BenchError(RuntimeError):
    """A step did not happen; the message says which and why."""


# --- the broker and what it sent -----------------------------------------------------------


class LoggingMosquitto(Mosquitto):
    """A mosquitto that also logs every PUBLISH it sends (`log_type debug`), so the bench
    can count which chunks a client was sent after a restart."""

    def _config_text(self) -> str:
        return super()._config_text() + "log_type debug\n"


_SENT = re.compile(r"Sending PUBLISH to (\S+) \(.*?'([^']*)', \.\.\. \((\d+) bytes\)\)")


def chunks_sent(log: str, client_id: str, name: str, version: str) -> dict[int, int]:
    """Chunk index -> times the broker sent it to `client_id`, from a debug log."""
    prefix = FLEET.model_chunk(name, version, 0)[:-1]
    sent: dict[int, int] = {}
    for client, topic, _size in _SENT.findall(log):
        if client == client_id and topic.startswith(prefix):
            index = int(topic[len(prefix) :])
            sent[index] = sent.get(index, 0) + 1
    return sent


# --- what the bench sees on MQTT -------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    arrived: float  # time.monotonic() in this process
    topic: str
    body: dict[str, Any]


class Watcher:
    """Subscribes to every device's events, desired state and results and keeps them."""

    def __init__(self, broker: Mosquitto) -> None:
        self.cond = threading.Condition()
        self.messages: list[Message] = []
        self.client = subscriber(
            broker,
            [(f"{PREFIX}/+/{kind}", 1) for kind in ("events", "desired", "results/+")],
            self._on_message,
            client_id=f"bench-watcher-{os.getpid()}",
            keepalive=30,
        )

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        received = Message(time.monotonic(), message.topic, json.loads(message.payload))
        with self.cond:
            self.messages.append(received)
            self.cond.notify_all()

    def of(self, device: str, kind: str) -> list[Message]:
        topic = f"{PREFIX}/{device}/{kind}"
        with self.cond:
            return [m for m in self.messages if m.topic == topic]

    def wait(self, find: Callable[[], T | None], what: str, timeout: float) -> T:
        with self.cond:
            found = self.cond.wait_for(find, timeout)
        if found is None:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        return found

    def event(self, device: str, kind: str, version: str, timeout: float = 120.0) -> Message:
        """The first `kind` event of `version`; BenchError when the version fails instead."""

        def find() -> Message | None:
            for m in self.of(device, "events"):
                if m.body.get("version") != version:
                    continue
                if m.body["type"] == kind:
                    return m
                if m.body["type"] in ("rejected", "rolled-back"):
                    raise BenchError(f"{device}: {version} {m.body['type']}: {m.body}")
            return None

        return self.wait(find, f"{device}: event {kind} of {version}", timeout)

    def desired(self, device: str, version: str, timeout: float = 30.0) -> Message:
        def find() -> Message | None:
            for m in self.of(device, "desired"):
                if m.body.get("pipelines", {}).get(PIPELINE, {}).get("version") == version:
                    return m
            return None

        return self.wait(find, f"{device}: desired state naming {version}", timeout)

    def results(self, device: str) -> list[dict[str, Any]]:
        return sorted((m.body for m in self.of(device, f"results/{PIPELINE}")), key=_seq)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _seq(result: dict[str, Any]) -> int:
    seq: int = result["seq"]
    return seq


# --- the agent and the fleet CLI ---------------------------------------------------------------


class Agent:
    """`edgeagent run` with one synthetic-camera pipeline on shapes-detector; its log is
    appended to `<workdir>/agent.log` across restarts."""

    def __init__(self, workdir: Path, broker: Mosquitto, device: str, key: Path, fps: float):
        self.workdir, self.device = workdir, device
        self.state = workdir / "state"
        self.log = workdir / "agent.log"
        self.config = workdir / "agent.yaml"
        self.client_id = f"edgeagent-{device}"
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True)
        self.config.write_text(
            f"device: {{id: {device}}}\n"
            f'state_dir: "{self.state}"\n'
            f'control_socket: "{workdir}/control.sock"\n'
            f"mqtt: {{host: {broker.host}, port: {broker.port}, prefix: {PREFIX}, qos: 1,"
            f" reconnect_min_s: 0.2, reconnect_max_s: 1}}\n"
            f"pipelines:\n"
            f"  - name: {PIPELINE}\n"
            f"    source: {{type: synthetic, width: 640, height: 480, fps: {fps}}}\n"
            f"    model: {MODEL}\n"
            f"    accelerator: cpu\n"
            f"    threads: 1\n"
            f"models:\n"
            f'  trusted_keys: ["{key}"]\n'
            f"  allow_unsigned: false\n"
            f"  probation_s: 1.0\n"
            f"  probation_min_results: 5\n"
            f"  chunk_timeout_s: 60\n",
            encoding="utf-8",
        )

    @property
    def staging(self) -> Path:
        return self.state / "models" / "staging"

    def staged_chunks(self) -> set[int]:
        return {int(p.name.split("-")[1]) for p in self.staging.glob("*/chunk-*")}

    def start(self, watcher: Watcher) -> None:
        """Starts the agent and waits for a result from it."""
        seen = len(watcher.of(self.device, f"results/{PIPELINE}"))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*AGENT, "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        watcher.wait(
            lambda: len(watcher.of(self.device, f"results/{PIPELINE}")) > seen or None,
            f"{self.device}: a result after start",
            60.0,
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)

    def downloaded_log(self, version: str) -> tuple[int, int]:
        """(bytes fetched, bytes resumed from disk) of the last transfer of `version`, as
        the agent logs them from `ModelDelivery.last_transfer` (TransferStats)."""
        pattern = rf"downloaded {MODEL} {re.escape(version)}: (\d+) bytes fetched, (\d+) resumed"
        found = re.findall(pattern, self.log.read_text(errors="replace"))
        if not found:
            raise BenchError(f"{self.device}: no 'downloaded {version}' line in {self.log}")
        fetched, resumed = found[-1]
        return int(fetched), int(resumed)


def cli(*args: str) -> str:
    """Runs an edgeagent command; its stdout, or BenchError with its stderr's last 2000
    characters (the traceback's end)."""
    done = subprocess.run([*AGENT, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"edgeagent {' '.join(args[:2])} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def broker_options(broker: Mosquitto) -> list[str]:
    return ["--host", broker.host, "--port", str(broker.port), "--prefix", PREFIX]


def publish(broker: Mosquitto, file: Path, version: str, key: Path, chunk_size: int) -> Any:
    out = cli(
        "model", "publish", str(file), "--name", MODEL, "--version", version,
        "--key", str(key), "--chunk-size", str(chunk_size), "--json",
        *broker_options(broker),
    )  # fmt: skip
    return json.loads(out)


def deploy(broker: Mosquitto, device: str, version: str) -> None:
    cli(
        "fleet", "deploy", "--device", device, "--pipeline", PIPELINE,
        "--model", MODEL, "--version", version, "--read-timeout", "0.2",
        *broker_options(broker),
    )  # fmt: skip


def durable_writes_seconds(directory: Path, data: bytes, chunk_size: int) -> float:
    """Time to store `data` as chunk files the way ChunkAssembler does (write, fsync,
    rename per chunk) on the agent's file system, and nothing else: the disk's share."""
    directory.mkdir(parents=True)
    started = time.perf_counter()
    for index, offset in enumerate(range(0, len(data), chunk_size)):
        write_file_durably(directory / f"chunk-{index:06d}", data[offset : offset + chunk_size])
    seconds = time.perf_counter() - started
    shutil.rmtree(directory)
    return seconds


def mosquitto_sub_seconds(broker: Mosquitto, version: str, messages: int) -> float:
    """Spawn to exit of mosquitto_sub reading `messages` retained messages of `version`."""
    binary = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    topic = FLEET.model_manifest(MODEL, version).rsplit("/", 1)[0] + "/#"
    started = time.perf_counter()
    subprocess.run(
        [binary, "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic,
         "-C", str(messages), "-W", "60"],
        stdout=subprocess.DEVNULL,
        check=True,
    )  # fmt: skip
    return time.perf_counter() - started


# --- the models ----------------------------------------------------------------------------------


def padded_model(directory: Path, size: int) -> Path:
    """The bundled shapes detector grown to about `size` bytes by a metadata buffer of
    random bytes: the same network and reference, so it passes the gate. Its YAML manifest
    and reference arrays are copied beside it, where `model publish` looks."""
    source = BUNDLED / f"{MODEL}.tflite"
    original = source.read_bytes()
    pad = size - len(original)
    for _attempt in range(2):  # the second pass absorbs the flatbuffer's own overhead
        model = s.ModelT.InitFromPackedBuf(bytearray(original), 0)
        buffer = s.BufferT()
        buffer.data = np.random.default_rng(0).integers(0, 256, pad, dtype=np.uint8)
        model.buffers.append(buffer)
        entry = s.MetadataT()
        entry.name, entry.buffer = "bench_padding", len(model.buffers) - 1
        model.metadata = [*(model.metadata or []), entry]
        builder = flatbuffers.Builder(size + 4096)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        data = bytes(builder.Output())
        pad -= len(data) - size
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{MODEL}-5mib.tflite"
    path.write_bytes(data)
    shutil.copy(BUNDLED / f"{MODEL}.yaml", path.with_suffix(".yaml"))
    for ref in BUNDLED.glob(f"{MODEL}.ref-*.npy"):
        shutil.copy(ref, directory / ref.name)
    return path


@dataclass(frozen=True)
class Bench:
    """What every part shares: the work directory, the broker, the bench's subscriber,
    the signing key pair, the 5 MiB model and the camera rate."""

    work: Path
    broker: Mosquitto
    watcher: Watcher
    key: Path  # private, for publishing
    pub: Path  # public, trusted by the agents
    model: Path
    fps: float

    def agent(self, part: str) -> Agent:
        return Agent(self.work / part, self.broker, f"pi-{part}", self.pub, self.fps)


# --- (1) transfer ----------------------------------------------------------------------------


def transfer(bench: Bench) -> list[dict[str, Any]]:
    """Per chunk size, REPEATS deliveries of the model under fresh versions, each followed
    by one mosquitto_sub read of the same retained messages; medians are reported."""
    broker, watcher, key, model = bench.broker, bench.watcher, bench.key, bench.model
    agent = bench.agent("transfer")
    rows = []
    try:
        agent.start(watcher)
        for chunk_size in CHUNK_SIZES:
            runs: list[dict[str, Any]] = []
            for repeat in range(REPEATS):
                version = f"5.0.0-c{chunk_size // KIB}k.{repeat}"
                started = time.perf_counter()
                info = publish(broker, model, version, key, chunk_size)
                publish_s = time.perf_counter() - started
                baseline = mosquitto_sub_seconds(broker, version, info["chunks"] + 1)
                deploy(broker, agent.device, version)
                desired = watcher.desired(agent.device, version)
                downloaded = watcher.event(agent.device, "downloaded", version)
                activated = watcher.event(agent.device, "activated", version)
                watcher.event(agent.device, "probation-passed", version)
                fetched, _resumed = agent.downloaded_log(version)
                disk = durable_writes_seconds(
                    agent.workdir / f"disk-{version}", model.read_bytes(), chunk_size
                )
                runs.append({
                    "publish_s": publish_s,
                    "agent_s": downloaded.arrived - desired.arrived,
                    "mosquitto_sub_s": baseline,
                    "durable_writes_s": disk,
                    "gate_install_swap_s": activated.arrived - downloaded.arrived,
                    "fetched_bytes": fetched,
                })  # fmt: skip
            size = info["size"]
            agent_s = statistics.median(r["agent_s"] for r in runs)
            baseline_s = statistics.median(r["mosquitto_sub_s"] for r in runs)
            rows.append({
                "chunk_size": chunk_size,
                "chunks": info["chunks"],
                "size": size,
                "runs": REPEATS,
                "publish_s": round(statistics.median(r["publish_s"] for r in runs), 3),
                "agent_s": round(agent_s, 3),
                "agent_s_each": [round(r["agent_s"], 3) for r in runs],
                "agent_mb_s": round(size / agent_s / 1e6, 2),
                "mosquitto_sub_s": round(baseline_s, 4),
                "mosquitto_sub_s_each": [round(r["mosquitto_sub_s"], 4) for r in runs],
                "mosquitto_sub_mb_s": round(size / baseline_s / 1e6, 1),
                "agent_vs_mosquitto_sub": round(baseline_s / agent_s, 3),
                "durable_writes_s": round(
                    statistics.median(r["durable_writes_s"] for r in runs), 4
                ),
                "gate_install_swap_s": round(
                    statistics.median(r["gate_install_swap_s"] for r in runs), 3
                ),
                "fetched_bytes": [r["fetched_bytes"] for r in runs],
            })  # fmt: skip
            print(json.dumps({"transfer": rows[-1]}), flush=True)
    finally:
        agent.stop()
    return rows


# --- (2) swap --------------------------------------------------------------------------------


def frame_gaps(results: list[dict[str, Any]]) -> int:
    """Source frames between consecutive results that produced no result."""
    return sum(max(0, b["frame"] - a["frame"] - 1) for a, b in itertools.pairwise(results))


def longest_gap(results: list[dict[str, Any]]) -> float:
    return max(
        (b["captured_at"] - a["captured_at"] for a, b in itertools.pairwise(results)),
        default=math.nan,
    )


def between(results: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """The results captured in [start, end], with the one before and the one after, so
    that gaps crossing the window's edges count."""
    inside = [i for i, r in enumerate(results) if start <= r["captured_at"] <= end]
    if not inside:
        return []
    return results[max(0, inside[0] - 1) : inside[-1] + 2]


def swap(bench: Bench) -> dict[str, Any]:
    broker, watcher, key, fps = bench.broker, bench.watcher, bench.key, bench.fps
    agent = bench.agent("swap")
    version = "2.0.0"
    try:
        agent.start(watcher)
        publish(broker, BUNDLED / "shapes-detector-ssd.tflite", version, key, CHUNK_SIZES[0])
        time.sleep(1.0)  # the publisher's CPU use is over before the steady state is measured
        steady_from = time.time()
        time.sleep(STEADY_S)
        steady_to = time.time()
        deploy(broker, agent.device, version)
        desired = watcher.desired(agent.device, version)
        validated = watcher.event(agent.device, "validated", version)
        activated = watcher.event(agent.device, "activated", version)
        passed = watcher.event(agent.device, "probation-passed", version)
        time.sleep(AFTER_ACTIVATION_S + 0.5)  # results captured in the window have arrived
    finally:
        agent.stop()
    results = watcher.results(agent.device)
    interval = 1.0 / fps

    steady = between(results, steady_from, steady_to)[1:-1]
    steady_span = steady[-1]["frame"] - steady[0]["frame"]
    steady_rate = frame_gaps(steady) / steady_span  # frames dropped per source frame

    window = between(results, validated.body["ts"], activated.body["ts"] + AFTER_ACTIVATION_S)
    span = window[-1]["frame"] - window[0]["frame"]
    expected = steady_rate * span
    gaps = frame_gaps(window)
    delivery = between(results, desired.body["ts"], passed.body["ts"])

    seqs = [r["seq"] for r in results]
    versions = [r["model"]["version"] for r in results]
    switch = versions.index(version) if version in versions else len(versions)
    return {
        "fps": fps,
        "results": len(results),
        "steady_results": len(steady),
        "steady_drop_rate": round(steady_rate, 4),
        "steady_longest_gap_frames": round(longest_gap(steady) / interval, 2),
        "swap_window_s": round(window[-1]["captured_at"] - window[0]["captured_at"], 3),
        "swap_longest_gap_frames": round(longest_gap(window) / interval, 2),
        "swap_frame_gaps": gaps,
        "swap_expected_drops": round(expected, 2),
        "frames_lost": max(0, gaps - round(expected)),
        "delivery_longest_gap_frames": round(longest_gap(delivery) / interval, 2),
        "delivery_frame_gaps": frame_gaps(delivery),
        "seq_contiguous": seqs == list(range(seqs[0], seqs[0] + len(seqs))),
        "one_run_id": len({r["run"] for r in results}) == 1,
        "switched_once": set(versions[:switch]) == {"1.0.0"}
        and set(versions[switch:]) == {version},
        "validated_to_activated_s": round(activated.body["ts"] - validated.body["ts"], 3),
    }  # fmt: skip


# --- (3) resume ------------------------------------------------------------------------------


def resume(bench: Bench, chunk_rate: float) -> dict[str, Any]:
    """How "fetched again" is counted: the staging directory is listed right after the
    SIGKILL (a chunk file exists only once it was fsynced and renamed, so the listing is
    what the restarted agent will find). Then two counts after the restart:

    - written again: the agent's own TransferStats (logged as "downloaded ...: N bytes
      fetched, R resumed from disk"; fetched counts chunks it stored, duplicates ignored)
      minus the bytes of the chunks that were missing at the kill. 0 means no staged chunk
      was stored twice.
    - sent again: chunks that were staged at the kill and that the broker sent to the
      restarted agent anyway, read from the broker's debug log (every PUBLISH sent, with
      client id and topic). That is what crosses the device's link a second time.
    """
    broker, watcher, key, model = bench.broker, bench.watcher, bench.key, bench.model
    agent = bench.agent("resume")
    version = "5.0.0-resume"
    chunk_size = CHUNK_SIZES[0]
    data = model.read_bytes()
    manifest = build_manifest(
        model,
        read_model(model),
        data,
        name=MODEL,
        version=version,
        chunk_size=chunk_size,
        spec=load_manifest(model),
        spec_dir=model.parent,
    )
    signed = sign_manifest(manifest, key.read_bytes()).to_json_bytes()
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    half = len(chunks) // 2
    fleet = Publisher(broker, client_id=f"bench-publisher-{os.getpid()}")
    try:
        agent.start(watcher)
        # Manifest first, chunks later: the agent subscribes to them and receives each one
        # as it is published, as over a slow link.
        fleet.publish(FLEET.model_manifest(MODEL, version), signed)
        deploy(broker, agent.device, version)

        def trickle() -> None:
            for index, chunk in enumerate(chunks):
                fleet.publish(FLEET.model_chunk(MODEL, version, index), chunk)
                time.sleep(1.0 / chunk_rate)

        publisher = threading.Thread(target=trickle, name="bench-trickle")
        publisher.start()
        deadline = time.monotonic() + len(chunks) / chunk_rate + 30
        while len(agent.staged_chunks()) < half:
            if time.monotonic() > deadline or not publisher.is_alive():
                raise BenchError("the agent did not stage half the chunks while they trickled")
            time.sleep(0.005)
        agent.kill()
        staged = agent.staged_chunks()
        publisher.join()  # the rest are published (retained) while the agent is down

        log_offset = broker.log_file.stat().st_size
        restarted = time.monotonic()
        agent.start(watcher)
        downloaded = watcher.event(agent.device, "downloaded", version)
        watcher.event(agent.device, "probation-passed", version)
        fetched, resumed = agent.downloaded_log(version)
    finally:
        fleet.close()
        agent.stop()
    with broker.log_file.open("rb") as log:
        log.seek(log_offset)
        after = chunks_sent(log.read().decode(errors="replace"), agent.client_id, MODEL, version)
    missing = set(range(len(chunks))) - staged
    missing_bytes = sum(len(chunks[i]) for i in missing)
    staged_bytes = sum(len(chunks[i]) for i in staged)
    sent_again = [i for i in staged if i in after]
    return {
        "size": len(data),
        "chunk_size": chunk_size,
        "chunks": len(chunks),
        "chunk_rate": chunk_rate,
        "staged_at_kill": len(staged),
        "staged_bytes_at_kill": staged_bytes,
        "resumed_bytes": resumed,
        "fetched_bytes_after_restart": fetched,
        "written_again_bytes": fetched - missing_bytes,
        "chunks_sent_after_restart": sum(after.values()),
        "sent_again_chunks": len(sent_again),
        "sent_again_bytes": sum(len(chunks[i]) for i in sent_again),
        "restart_to_downloaded_s": round(downloaded.arrived - restarted, 3),
    }


# --- the report ------------------------------------------------------------------------------


def report(transfers: list[dict[str, Any]], sw: dict[str, Any], rs: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str]] = []
    for t in transfers:
        k = t["chunk_size"] // KIB
        rows += [
            (
                f"transfer {k} KiB x {t['chunks']}: agent MB/s (median of {t['runs']})",
                f"{t['agent_mb_s']} ({t['agent_s']} s)",
                "-",
                "",
            ),
            (
                "  mosquitto_sub MB/s",
                f"{t['mosquitto_sub_mb_s']} ({t['mosquitto_sub_s']} s)",
                "-",
                "",
            ),
            ("  agent / mosquitto_sub", f"{t['agent_vs_mosquitto_sub']}", "-", ""),
            ("  chunk writes + fsync alone (s)", f"{t['durable_writes_s']}", "-", ""),
            (
                "  fetched bytes (TransferStats), each run",
                f"{'/'.join(str(b) for b in t['fetched_bytes'])} of {t['size']}",
                "-",
                "",
            ),
        ]
    ok_gap = sw["swap_longest_gap_frames"] <= 2
    rows += [
        (
            f"swap: steady-state drop rate ({STEADY_S:g} s)",
            f"{sw['steady_drop_rate']}",
            "-",
            "",
        ),
        (
            "  longest result gap, swap window (frames)",
            f"{sw['swap_longest_gap_frames']}",
            "<= 2",
            "ok" if ok_gap else "MISSED",
        ),
        (
            "  frames lost beyond steady state",
            f"{sw['frames_lost']} ({sw['swap_frame_gaps']} gaps, {sw['swap_expected_drops']} exp.)",
            "0",
            "ok" if sw["frames_lost"] == 0 else "MISSED",
        ),
        (
            "  seq contiguous, one run, one switch",
            f"{sw['seq_contiguous']}, {sw['one_run_id']}, {sw['switched_once']}",
            "True",
            "ok" if sw["seq_contiguous"] and sw["one_run_id"] and sw["switched_once"] else "MISSED",
        ),
        (
            "  (whole delivery: longest gap, gaps)",
            f"{sw['delivery_longest_gap_frames']}, {sw['delivery_frame_gaps']}",
            "-",
            "",
        ),
        (
            f"resume: staged at kill -9 (of {rs['chunks']})",
            f"{rs['staged_at_kill']}",
            "-",
            "",
        ),
        (
            "  written again after restart (bytes)",
            f"{rs['written_again_bytes']}",
            f"<= {rs['chunk_size']}",
            "ok" if rs["written_again_bytes"] <= rs["chunk_size"] else "MISSED",
        ),
        (
            "  sent again by the broker (bytes)",
            f"{rs['sent_again_bytes']} ({rs['sent_again_chunks']} chunks; "
            f"{rs['chunks_sent_after_restart']} sent in all)",
            f"<= {rs['chunk_size']}",
            "ok" if rs["sent_again_bytes"] <= rs["chunk_size"] else "MISSED",
        ),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"{'measure':<{width}}{'value':<44}{'target':<10}")
    for measure, value, target, verdict in rows:
        print(f"{measure:<{width}}{value:<44}{target:<10}{verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fps", type=float, default=30.0, help="synthetic camera rate")
    parser.add_argument(
        "--chunk-rate", type=float, default=20.0, help="chunks/s published in the resume part"
    )
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    args = parser.parse_args()
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto is not installed (apt install mosquitto mosquitto-clients)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="edgeagent-bench-delivery-"))
    keys = work / "keys"
    cli("model", "keygen", "-o", str(keys))
    key, pub = keys / "edgeagent-signing.key", keys / "edgeagent-signing.pub"
    model = padded_model(work / "model", MODEL_BYTES)
    broker = LoggingMosquitto(work / "broker", binary=binary)
    broker.start()
    watcher = Watcher(broker)
    bench = Bench(work, broker, watcher, key, pub, model, args.fps)
    try:
        transfers = transfer(bench)
        sw = swap(bench)
        print(json.dumps({"swap": sw}), flush=True)
        rs = resume(bench, args.chunk_rate)
        print(json.dumps({"resume": rs}), flush=True)
    finally:
        watcher.close()
        broker.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(transfers, sw, rs)
    cpus = len(os.sched_getaffinity(0))
    kept = f"; work dir {work}" if args.keep else ""
    print(f"\n{cpus} CPU(s); every number measured in this run{kept}")
    if args.json:
        numbers = {"transfer": transfers, "swap": sw, "resume": rs}
        args.json.write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
