"""What the agent can be asked to do, by the fleet over MQTT (`cmd/<name>`) and by a
person at the device over the control socket (`edgeagent status`). One implementation
serves both, so a command behaves the same wherever it comes from."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from edgeagent import __version__
from edgeagent.config import AgentConfig, validate_config_data
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.inference.benchmark import measure
from edgeagent.mqtt.commands import BinaryResult, CommandRouter, Progress, Request
from edgeagent.snapshot import render_mask, render_snapshot

if TYPE_CHECKING:
    from edgeagent.service import Agent

log = logging.getLogger(__name__)

# Keys whose change the running agent applies at once; any other change is persisted and
# takes effect at the next restart (the reply says so).
_LIVE_KEYS = frozenset({"pipelines", "log_level"})


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelineArgs(_Args):
    pipeline: str


class ConfigSetArgs(_Args):
    config: dict[str, Any]  # merged into the running configuration; lists are replaced


class LogsArgs(_Args):
    lines: int = Field(default=100, ge=1, le=1000)


class BenchArgs(_Args):
    model: str | None = None  # default: the pipeline's model
    pipeline: str | None = None
    threads: int = Field(default=1, ge=1, le=16)
    runs: int = Field(default=30, ge=1, le=1000)


class SnapshotArgs(_Args):
    pipeline: str
    quality: int = Field(default=80, ge=10, le=95)
    mask: bool = False  # segmentation: the class map as a PNG instead of the JPEG


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Operations:
    """The agent's operations; each raises EdgeAgentError with a reason on failure."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        # Commands run on two workers and the control socket: changes go one at a time.
        self._changing = threading.Lock()

    def register_commands(self, router: CommandRouter) -> None:
        router.register("status", lambda _r: self.status())
        router.register("config.get", lambda _r: self.config_get())
        router.register(
            "config.set",
            lambda r: self.config_set(r.params_as(ConfigSetArgs)),
            schema=ConfigSetArgs,
        )
        for verb in ("start", "stop", "restart"):
            router.register(
                f"pipeline.{verb}",
                self._pipeline_handler(verb),
                schema=PipelineArgs,
            )
        router.register(
            "model.rollback",
            lambda r: self.model_rollback(r.params_as(PipelineArgs).pipeline),
            schema=PipelineArgs,
        )
        router.register(
            "snapshot", lambda r: self.snapshot(r.params_as(SnapshotArgs)), schema=SnapshotArgs
        )
        router.register("bench", self._bench_command, long=True, schema=BenchArgs)
        router.register("logs", lambda r: self.logs(r.params_as(LogsArgs).lines), schema=LogsArgs)
        router.register("restart", lambda _r: self.restart())

    def local_handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """Operations the local control socket offers (read-mostly, no MQTT needed)."""
        return {
            "status": lambda _args: self.status(),
            "logs": lambda args: self.logs(int(args.get("lines", 100))),
            "config.get": lambda _args: self.config_get(),
            "pipeline.restart": lambda args: self.pipeline("restart", str(args["pipeline"])),
        }

    # --- the operations --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything `edgeagent status` shows."""
        agent = self._agent
        pipelines = []
        for name in list(agent.pipelines):
            info = agent.describe_pipeline(name)
            pipeline = agent.pipelines.get(name)
            if pipeline is not None:
                stats = pipeline.stats
                info.update(
                    frames_in=stats.frames_in,
                    results_out=stats.results_out,
                    frames_dropped=stats.frames_dropped,
                    fps=round(stats.window.fps(), 2),
                    latency_ms=stats.percentiles(),
                    invoke_errors=stats.invoke_errors,
                    source_errors=stats.source_errors,
                    fallbacks_so_far=stats.fallbacks,
                    last_error=stats.last_error,
                    last_result_at=stats.last_result_at,
                )
            pipelines.append(info)
        link = agent.link
        outbox = agent.outbox.stats() if agent.outbox is not None else None
        return {
            "device": agent.device_id,
            "version": __version__,
            "run": agent.run_id,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - agent.started_at, 1),
            "pipelines": pipelines,
            "mqtt": {
                "broker": f"{agent.config.mqtt.host}:{agent.config.mqtt.port}",
                "connected": link.connected,
                "reconnects": link.reconnects,
                "unacknowledged": link.outstanding,
                "last_error": link.last_error,
            },
            "outbox": None
            if outbox is None
            else {
                "depth": outbox.depth,
                "bytes": outbox.bytes,
                "oldest_age_s": outbox.oldest_age_s,
                "dropped": outbox.dropped + outbox.dropped_full + outbox.dropped_error,
            },
            "last_errors": [line for line in agent.logs.tail(500) if " ERROR " in line][-10:],
        }

    def config_get(self) -> dict[str, Any]:
        return self._agent.config.model_dump(mode="json")

    def config_set(self, args: ConfigSetArgs) -> dict[str, Any]:
        """Validates the merged config, applies what can be applied live (rolling back if
        a pipeline then fails to start), and persists it. Raises EdgeAgentError."""
        with self._changing:
            return self._config_set(args)

    def _config_set(self, args: ConfigSetArgs) -> dict[str, Any]:
        agent = self._agent
        current = agent.config.model_dump(mode="json", exclude_unset=True)
        merged = _merge(current, args.config)
        try:
            new = validate_config_data(merged, "config.set")
        except ConfigError as exc:
            raise EdgeAgentError(
                f"the new configuration is invalid, nothing changed: {exc}"
            ) from exc
        changed = sorted(
            key
            for key in AgentConfig.model_fields
            if getattr(new, key) != getattr(agent.config, key)
        )
        if not changed:
            return {"changed": [], "restart_required": []}
        if "pipelines" in changed:
            self._apply_pipelines(agent.config, new)
        if "log_level" in changed:
            logging.getLogger().setLevel(new.log_level.upper())
        self._persist(merged)
        agent.config = new
        agent.publish_status()
        return {
            "changed": changed,
            "restart_required": [key for key in changed if key not in _LIVE_KEYS],
        }

    def _apply_pipelines(self, old: AgentConfig, new: AgentConfig) -> None:
        agent = self._agent
        before = {p.name: p for p in old.pipelines}
        after = {p.name: p for p in new.pipelines}
        touched = [n for n in before.keys() | after.keys() if before.get(n) != after.get(n)]
        for name in touched:
            agent.stop_pipeline(name)
        failures = {}
        for name in touched:
            config = after.get(name)
            if config is not None and config.enabled and agent.start_pipeline(config) is None:
                failures[name] = agent.failed.get(name, "did not start")
        if failures:
            # Roll back: the previous pipelines come back as they were.
            for name in touched:
                agent.stop_pipeline(name)
                if name in before and before[name].enabled:
                    agent.start_pipeline(before[name])
            reasons = "; ".join(f"{n}: {why}" for n, why in failures.items())
            raise EdgeAgentError(f"the new configuration was rolled back: {reasons}")

    def _persist(self, data: dict[str, Any]) -> None:
        path = self._agent.config_path
        if path is None:
            return
        text = "# Written by edgeagent config.set; the previous file is config.yaml.bak\n"
        text += yaml.safe_dump(data, sort_keys=False)
        try:
            if path.exists():
                path.with_name(path.name + ".bak").write_bytes(path.read_bytes())
            with tempfile.NamedTemporaryFile(
                "w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8"
            ) as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            Path(handle.name).replace(path)
        except OSError as exc:
            raise EdgeAgentError(
                f"applied, but could not save {path}: {exc.strerror}; it is lost at restart"
            ) from exc

    def pipeline(self, verb: str, name: str) -> dict[str, Any]:
        with self._changing:
            return self._pipeline(verb, name)

    def _pipeline(self, verb: str, name: str) -> dict[str, Any]:
        agent = self._agent
        config = next((p for p in agent.config.pipelines if p.name == name), None)
        if config is None:
            known = ", ".join(p.name for p in agent.config.pipelines) or "none"
            raise EdgeAgentError(f"no pipeline {name!r} in the configuration (known: {known})")
        if verb in ("stop", "restart"):
            agent.stop_pipeline(name)
        if verb in ("start", "restart"):
            if name in agent.pipelines and name not in agent.failed:
                raise EdgeAgentError(f"pipeline {name!r} is running already")
            if agent.start_pipeline(config) is None:
                raise EdgeAgentError(f"pipeline {name!r} did not start: {agent.failed[name]}")
        agent.publish_status()
        return (
            agent.describe_pipeline(name)
            if name in agent.pipelines
            else {"name": name, "state": "stopped"}
        )

    def _pipeline_handler(self, verb: str) -> Callable[[Request], Any]:
        return lambda request: self.pipeline(verb, request.params_as(PipelineArgs).pipeline)

    def model_rollback(self, pipeline: str) -> dict[str, Any]:
        return {"pipeline": pipeline, "version": self._agent.delivery.rollback(pipeline)}

    def snapshot(self, args: SnapshotArgs) -> BinaryResult:
        pipeline = self._agent.pipelines.get(args.pipeline)
        if pipeline is None or pipeline.last is None:
            raise EdgeAgentError(f"pipeline {args.pipeline!r} has no result to show yet")
        sample, result = pipeline.last
        if args.mask:
            mask = pipeline.last_mask
            if mask is None:
                raise EdgeAgentError(
                    f"pipeline {args.pipeline!r} has no mask: only segmentation models give one"
                )
            return BinaryResult(
                render_mask(mask),
                "image/png",
                meta={"pipeline": args.pipeline, "captured_at": sample.captured_at},
            )
        jpeg = render_snapshot(sample.data, result, quality=args.quality)
        return BinaryResult(
            jpeg,
            "image/jpeg",
            meta={"pipeline": args.pipeline, "captured_at": sample.captured_at},
        )

    def _bench_command(self, request: Request, progress: Progress) -> dict[str, Any]:
        args = request.params_as(BenchArgs)
        model = args.model
        if model is None:
            pipeline = self._agent.pipelines.get(args.pipeline or "")
            if pipeline is None or pipeline.runner is None:
                raise EdgeAgentError("bench needs 'model' or the name of a running 'pipeline'")
            model = str(pipeline.runner.model.path)
        progress.update(0, f"benchmarking {model} with {args.threads} thread(s)")
        return measure(
            model,
            "auto",
            args.threads,
            args.runs,
            on_progress=lambda done: progress.update(100 * done / args.runs),
        )

    def logs(self, lines: int) -> dict[str, Any]:
        return {"lines": self._agent.logs.tail(lines)}

    def restart(self) -> dict[str, Any]:
        self._agent.restart_requested.set()
        return {"restarting": True, "pid": os.getpid()}
