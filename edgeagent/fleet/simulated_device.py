"""The devices of `edgeagent fleet simulate` (edgeagent/fleet/simulate.py starts this module
as its worker processes): simulated devices that speak the real device protocol.

Each simulated device is the agent's own `Agent` (edgeagent/service.py) with its own
state directory: the `MqttLink` with its last will and jittered reconnect back-off, the
retained status, the desired state (device and `--group`) and `reported`, model delivery
(signed manifest, chunk staging, `ModelStore` install, swap, probation, activation,
rollback), the command router with every built-in command, the durable SQLite outbox,
telemetry and its control socket. Two things are stand-ins, both for LiteRT only:

- inference: `SimulatedPipeline` runs no model. One thread per worker process
  (`InferenceStandIn`) produces each device's results at `--rate` per second: a detection
  result with the running model's name and version and a few fake boxes, through the
  pipeline's real publish policy into the device's outbox.
- the validation gate: `parse_only_gate` checks that a delivered file parses as TFLite
  (`not-tflite` otherwise) instead of loading and running it in a LiteRT child. The
  signature, size and sha256 checks before it are the real ones.

A worker process (`python -m edgeagent.fleet.simulated_device`) reads its slice of the
devices (`WorkerSpec`) as one JSON line on stdin, starts them, prints a JSON stats line
every few seconds, and on SIGTERM or SIGINT stops its devices the way `edgeagent run` does
(the retained `offline` status is published) and exits; a worker whose stdin closes (its
parent died) stops as well.

Threads per simulated device (docs/architecture.md): paho's network thread, the link's
dispatcher, the outbox, delivery, telemetry and the control socket, plus up to two
command workers once a command arrived: 6 to 8. The pipeline's three threads are replaced
by the worker's one `InferenceStandIn` thread.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgeagent.config import AgentConfig, MqttConfig
from edgeagent.delivery.gate import GateReport, SourceKind
from edgeagent.delivery.signing import DeliveryError, DeliveryManifest
from edgeagent.errors import EdgeAgentError, ModelError
from edgeagent.inference import Prepared
from edgeagent.inference.engine import Engine
from edgeagent.modelfile.catalog import ModelDescription, describe_model
from edgeagent.modelfile.tflite import read_model
from edgeagent.pipeline import Pipeline, Runner
from edgeagent.service import Agent

log = logging.getLogger(__name__)

FDS_PER_DEVICE: Final = 9
"""File descriptors one simulated device holds: its MQTT socket and paho's socket pair, its
control socket, and the outbox's SQLite files (two connections to the database and its WAL,
one shared-memory file)."""
MAX_DEVICES_PER_PROCESS: Final = 110
"""paho's network loop waits with select(), which cannot watch a descriptor numbered 1024
or more: a client whose socket gets such a number never connects (paho drops it silently).
At `FDS_PER_DEVICE` each, about 110 devices fit under 1024 in one process."""
DEVICES_PER_PROCESS: Final = 100
"""Default devices per worker process (about 900 descriptors and 600 threads)."""
STOP_TIMEOUT_S: Final = 120.0  # a worker stopping its devices (each waits for its acks)
_PARALLEL_STARTS: Final = 8  # devices started at once within a worker
_PARALLEL_STOPS: Final = 32  # devices stopped at once (each may wait 5 s for its acks)
_FAKE_LATENCY_MS: Final = {"capture": 0.0, "preprocess": 0.1, "invoke": 1.0, "postprocess": 0.1}


class SimulationSettings(BaseModel):
    """What every simulated device of one run shares (the CLI's options)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mqtt: MqttConfig
    id_prefix: str = "sim"
    group: str | None = None
    rate: float = Field(default=1.0, ge=0)  # results per second per device
    pipeline: str = "detect"
    model: str = "shapes-detector"
    state_dir: Path
    trusted_keys: tuple[Path, ...] = ()
    allow_unsigned: bool = False
    probation_s: float = Field(default=10.0, ge=0)
    telemetry_interval_s: float = Field(default=30.0, gt=0)
    log_level: str = "warning"

    def device_id(self, index: int) -> str:
        """`<prefix>-0001`...: device `index` (counting from 1)."""
        return f"{self.id_prefix}-{index:04d}"

    def agent_config(self, index: int) -> AgentConfig:
        """Device `index`'s configuration: what a real device of the fleet would have."""
        device = self.device_id(index)
        root = self.state_dir / device
        groups = (self.group,) if self.group else ()
        return AgentConfig.model_validate(
            {
                "device": {"id": device},
                "mqtt": self.mqtt.model_dump(),
                "state_dir": root,
                "control_socket": root / "control.sock",
                "pipelines": [
                    {
                        "name": self.pipeline,
                        "source": {"type": "synthetic"},
                        "model": self.model,
                        "threads": 1,
                        "max_fps": self.rate if self.rate > 0 else None,
                    }
                ],
                "delivery": {
                    "groups": groups,
                    "trusted_keys": self.trusted_keys,
                    "allow_unsigned": self.allow_unsigned,
                    "probation_s": self.probation_s,
                    # The stand-in never hangs; ask for half the results it makes meanwhile.
                    "probation_min_results": int(self.rate * self.probation_s / 2),
                },
                "commands": {"groups": groups},
                "telemetry": {"interval_s": self.telemetry_interval_s},
            }
        )


# --- the stand-ins for LiteRT ------------------------------------------------------------


def parse_only_gate(
    path: Path,
    manifest: DeliveryManifest,
    *,
    source_kind: SourceKind,
    source_shape: tuple[int, ...],
    timeout_s: float = 30.0,
) -> GateReport:
    """The validation gate without LiteRT: the file must parse as TFLite (`not-tflite`).
    Everything before it (signature, size, sha256) and after it (install, probation) is
    the real thing."""
    del source_kind, source_shape, timeout_s  # what LiteRT would be given
    try:
        parsed = read_model(path)
    except ModelError as exc:
        raise DeliveryError(
            "not-tflite", f"{manifest.name} {manifest.version} is not a TFLite model: {exc}"
        ) from exc
    return GateReport(
        load_ms=0.0,
        invoke_ms=_FAKE_LATENCY_MS["invoke"],
        invoke_max_ms=_FAKE_LATENCY_MS["invoke"],
        operators=tuple(parsed.operator_names),
        input_shape=(),
        output_shapes=(),
        reference_max_error=None,
    )


class _StandInEngine(Engine):
    """Where a pipeline's `Engine` is read (status, telemetry, describe), it says
    `simulated`; it holds no interpreter and cannot invoke."""

    def __init__(self, model: ModelDescription) -> None:
        self.path = model.path
        self.model = model.model_file
        self.accelerator = "simulated"
        self.fallbacks = ()
        self.threads = 1
        self.load_s = 0.0
        self.operators = model.model_file.operator_names
        self.inputs = ()
        self.outputs = ()
        self._interpreter = None
        self._lock = threading.Lock()

    def invoke(self, inputs: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        raise EdgeAgentError("a simulated device runs no model")

    def warm_up(self, runs: int = 2) -> None:
        return

    def close(self) -> None:
        return


def _no_preprocess(_sample: np.ndarray[Any, Any]) -> Prepared:
    raise EdgeAgentError("a simulated device runs no model")


def _no_decode(outputs: list[np.ndarray[Any, Any]], prepared: Prepared) -> dict[str, Any]:
    del outputs, prepared
    raise EdgeAgentError("a simulated device runs no model")


def _runner(model: ModelDescription) -> Runner:
    return Runner(model, _StandInEngine(model), _no_preprocess, _no_decode)


class SimulatedPipeline(Pipeline):
    """A `Pipeline` whose results come from the worker's `InferenceStandIn` instead of a
    source and LiteRT: same name, config, stats, publish policy, `run`/`seq`, swap and
    describe, so the agent, delivery, probation and the commands treat it as any other."""

    def __init__(self, *args: Any, stand_in: InferenceStandIn, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stand_in = stand_in
        self._frame = itertools.count()
        self._rng = random.Random(self.name)

    def start(self, model: ModelDescription | None = None) -> None:
        cfg = self.config
        if model is None:
            model = _describe_configured(cfg.model)
        self.runner = _runner(model)
        if self._policy_factory is not None:
            self._policy = self._policy_factory(model.task.type)
        if cfg.max_fps:
            self._stand_in.add(self, 1.0 / cfg.max_fps)

    def stop(self, timeout: float = 10.0) -> None:
        self._stand_in.remove(self)  # returns once no result of it is being made
        self._close_policy()

    def swap(self, model: ModelDescription, timeout: float = 30.0) -> None:
        self.runner = _runner(model)  # the stand-in reads it once per result
        self.stats.model_swaps += 1

    def produce(self) -> None:
        """One result, as the decode thread would publish it (called by the stand-in)."""
        runner = self.runner
        if runner is None:
            return
        now = time.time()
        labels = runner.model.labels or ("object",)
        rng = self._rng
        detections = []
        for index in range(rng.randint(0, 3)):
            x, y = rng.random() * 0.8, rng.random() * 0.8
            detections.append(
                {
                    "index": index,
                    "label": labels[rng.randrange(len(labels))],
                    "score": round(0.5 + rng.random() / 2, 4),
                    "box": [round(x, 4), round(y, 4), round(x + 0.2, 4), round(y + 0.2, 4)],
                }
            )
        self.stats.frames_in += 1
        self._publish_decoded(
            runner,
            {"detections": detections},
            captured_at=now,
            frame=next(self._frame),
            latency=dict(_FAKE_LATENCY_MS),
            image=None,
            extra={},
        )


@functools.cache
def _describe_configured(ref: str) -> ModelDescription:
    """The configured model, described once per process (every device runs the same)."""
    return describe_model(ref)


class InferenceStandIn:
    """One thread that makes every simulated pipeline's results when they are due. A
    result that is late (the process is saturated) is made at once and the next one is
    due one interval later: the rate drops, it never bursts to catch up."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, SimulatedPipeline, float]] = []
        self._members: set[int] = set()
        self._order = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name="edgeagent-sim-inference", daemon=True
        )
        self.late = 0  # results made more than one interval after they were due

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(10.0)

    def add(self, pipeline: SimulatedPipeline, interval: float) -> None:
        # A random phase, so that devices started together do not publish in step.
        first = time.monotonic() + random.uniform(0, interval)
        with self._cond:
            self._members.add(id(pipeline))
            heapq.heappush(self._due, (first, next(self._order), pipeline, interval))
            self._cond.notify_all()

    def remove(self, pipeline: SimulatedPipeline) -> None:
        with self._cond:  # produce() runs under this lock: none of its results is in flight
            self._members.discard(id(pipeline))

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                if not self._due:
                    self._cond.wait(0.5)
                    continue
                due, _, pipeline, interval = self._due[0]
                now = time.monotonic()
                if due > now:
                    self._cond.wait(due - now)
                    continue
                heapq.heappop(self._due)
                if id(pipeline) not in self._members:
                    continue
                try:
                    pipeline.produce()
                except Exception:
                    log.exception("simulated pipeline %s failed to make a result", pipeline.name)
                following = due + interval
                if following < now:
                    self.late += 1
                    following = now + interval
                heapq.heappush(self._due, (following, next(self._order), pipeline, interval))


# --- one worker process ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker's slice: devices `first` .. `first + count - 1`."""

    settings: SimulationSettings
    first: int
    count: int
    report_every_s: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "settings": self.settings.model_dump(mode="json"),
                "first": self.first,
                "count": self.count,
                "report_every_s": self.report_every_s,
            }
        )

    @classmethod
    def from_json(cls, line: str) -> WorkerSpec:
        data = json.loads(line)
        return cls(
            SimulationSettings.model_validate(data["settings"]),
            int(data["first"]),
            int(data["count"]),
            float(data["report_every_s"]),
        )


def _worker_stats(agents: Sequence[Agent], stand_in: InferenceStandIn) -> dict[str, Any]:
    online = results = backlog = reconnects = 0
    for agent in agents:
        online += agent.link.connected
        reconnects += agent.link.reconnects
        stats = agent.outbox_stats()
        backlog += stats.depth if stats is not None else 0
        for name in agent.pipeline_names():
            pipeline_stats = agent.pipeline_stats(name)
            results += pipeline_stats.results_out if pipeline_stats is not None else 0
    return {
        "type": "stats",
        "ts": round(time.time(), 3),
        "devices": len(agents),
        "online": online,
        "results": results,
        "backlog": backlog,
        "reconnects": reconnects,
        "late": stand_in.late,
        "threads": threading.active_count(),
    }


def _emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def run_worker(spec: WorkerSpec, stop: threading.Event) -> None:
    """Runs devices `spec.first`.. until `stop` is set, printing a JSON stats line every
    `spec.report_every_s`; then stops them (each publishes its `offline` status)."""
    settings = spec.settings
    stand_in = InferenceStandIn()
    stand_in.start()
    factory = functools.partial(SimulatedPipeline, stand_in=stand_in)
    agents: list[Agent] = []
    lock = threading.Lock()

    def start_one(index: int) -> None:
        agent = Agent(
            settings.agent_config(index),
            pipeline_factory=factory,
            validate_model=parse_only_gate,
        )
        with lock:
            agents.append(agent)
        agent.start()

    indexes = range(spec.first, spec.first + spec.count)
    try:
        with ThreadPoolExecutor(_PARALLEL_STARTS, thread_name_prefix="edgeagent-sim-start") as pool:
            for index, failure in zip(
                indexes, pool.map(_call_catching(start_one), indexes), strict=True
            ):
                if failure is not None:
                    _emit({"type": "error", "device": settings.device_id(index), "error": failure})
        _emit({"type": "started", **_worker_stats(agents, stand_in)})
        while not stop.wait(spec.report_every_s):
            _emit(_worker_stats(agents, stand_in))
    finally:
        with ThreadPoolExecutor(_PARALLEL_STOPS, thread_name_prefix="edgeagent-sim-stop") as pool:
            list(pool.map(_call_catching(Agent.stop), agents))
        stand_in.stop()
        _emit({"type": "stopped", **_worker_stats(agents, stand_in)})


def _call_catching(call: Callable[[Any], None]) -> Callable[[Any], str | None]:
    def wrapped(arg: Any) -> str | None:
        try:
            call(arg)
        except Exception as exc:
            log.exception("simulated device failed")
            return str(exc)
        return None

    return wrapped


def worker_main() -> int:
    """`python -m edgeagent.fleet.simulated_device`: the spec is the first line of stdin; SIGTERM,
    SIGINT or the end of stdin (the parent went away) stops the devices."""
    spec = WorkerSpec.from_json(sys.stdin.readline())
    logging.basicConfig(
        level=spec.settings.log_level.upper(),
        format=f"%(asctime)s sim[{spec.first}] %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF
        stop.set()

    threading.Thread(target=watch_stdin, name="edgeagent-sim-stdin", daemon=True).start()
    run_worker(spec, stop)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
