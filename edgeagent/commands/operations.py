"""What the agent can be asked to do, by the fleet over MQTT (`cmd/<name>`) and by a
person at the device over the control socket (`edgeagent status`). One implementation
serves both, so a command behaves the same wherever it comes from, and both check their
arguments with the same strict models (no "100" for 100, no `true` for 1). It reaches the
agent only through `AgentControl`; what a command sender may change is decided in
`commands/remote.py` (`REMOTE_CONFIG_KEYS`, `commands.remote_paths`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeagent import __version__
from edgeagent.commands.remote import (
    REMOTE_CONFIG_KEYS,
    changed_keys,
    forbidden_paths,
    model_refusal,
    remotely_allowed,
    roots_text,
)
from edgeagent.commands.request import Request, validation_reason
from edgeagent.commands.router import BinaryResult, CommandRouter, Progress
from edgeagent.config import AgentConfig, rename_legacy_keys, validate_config_data
from edgeagent.errors import ConfigError, EdgeAgentError, SourceError
from edgeagent.inference.benchmark import measure
from edgeagent.snapshot import render_mask, render_snapshot
from edgeagent.telemetry.report import LinkFigures

if TYPE_CHECKING:
    import numpy as np

    from edgeagent.config import PipelineConfig
    from edgeagent.hal.source import Sample
    from edgeagent.outbox import OutboxStats
    from edgeagent.pipeline import PipelineStats

log = logging.getLogger(__name__)

# Keys whose change the running agent applies at once; any other change is persisted and
# takes effect at the next restart (the reply says so).
_LIVE_KEYS = frozenset({"pipelines", "log_level"})

A = TypeVar("A", bound=BaseModel)


class _Args(BaseModel):
    # strict: JSON's "100" is no int, `true` no 1; a wrong type is refused, not coerced.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NoArgs(_Args):
    """A command without arguments: any argument is refused."""


class PipelineArgs(_Args):
    pipeline: str = Field(min_length=1, max_length=64)


class ConfigSetArgs(_Args):
    # Merged into the running configuration; lists are replaced. Its size is bounded by
    # `commands.max_payload_bytes`.
    config: dict[str, Any]


class LogsArgs(_Args):
    lines: int = Field(default=100, ge=1, le=1000)


class BenchArgs(_Args):
    # default: the pipeline's model; a path must be under commands.remote_paths
    model: str | None = Field(default=None, min_length=1, max_length=4096)
    pipeline: str | None = Field(default=None, min_length=1, max_length=64)
    threads: int = Field(default=1, ge=1, le=16)
    runs: int = Field(default=30, ge=1, le=1000)


class SnapshotArgs(_Args):
    pipeline: str = Field(min_length=1, max_length=64)
    quality: int = Field(default=80, ge=10, le=95)
    mask: bool = False  # segmentation: the class map as a PNG instead of the JPEG


def parse_args(schema: type[A], args: dict[str, Any], command: str) -> A:
    """`args` validated by `schema`; EdgeAgentError naming each bad argument. The router
    does the same for MQTT requests, in the same words."""
    try:
        return schema.model_validate(args)
    except ValidationError as exc:
        raise EdgeAgentError(validation_reason(command, exc)) from None


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class LinkState(LinkFigures, Protocol):
    """What `status` shows of the MQTT link: telemetry's figures and the last error."""

    @property
    def last_error(self) -> str | None: ...


class AgentControl(Protocol):
    """All that the operations may see of and do to the running agent (`Agent` implements
    it): status pieces, the configuration (replaced only through `replace_config`),
    pipelines started and stopped by their configuration, logs, a restart request and a
    delivered model's rollback."""

    @property
    def config(self) -> AgentConfig: ...
    @property
    def config_path(self) -> Path | None: ...
    @property
    def device_id(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    @property
    def link(self) -> LinkState: ...

    def replace_config(self, config: AgentConfig) -> None:
        """Makes `config` the running configuration (what was live is applied already)."""

    def outbox_stats(self) -> OutboxStats | None:
        """The outbox's counters; None when `outbox.enabled` is false."""

    def pipeline_names(self) -> list[str]:
        """The pipelines started (running or failed), in start order."""

    def pipeline_stats(self, name: str) -> PipelineStats | None:
        """The counters of a started pipeline; None when it is not started."""

    def pipeline_failure(self, name: str) -> str | None:
        """Why a started pipeline failed; None when it runs (or is not started)."""

    def last_output(self, name: str) -> tuple[Sample, dict[str, Any]] | None:
        """The last sample a pipeline published a result for, and that result."""

    def last_mask(self, name: str) -> np.ndarray[Any, Any] | None:
        """The class map of a segmentation pipeline's last result."""

    def running_model_path(self, name: str) -> Path | None:
        """The model file a started pipeline has loaded; None when it has none."""

    def describe_pipeline(self, name: str) -> dict[str, Any]:
        """One pipeline as the status shows it."""

    def start_pipeline(self, config: PipelineConfig) -> Any:
        """Starts a pipeline; None (its reason in `pipeline_failure`) when it cannot."""

    def stop_pipeline(self, name: str) -> None: ...
    def publish_status(self) -> None: ...
    def log_tail(self, lines: int) -> list[str]: ...
    def request_restart(self) -> None: ...
    def rollback_model(self, pipeline: str) -> str:
        """The version a pipeline's delivered model went back to (DeliveryError if none)."""


class Operations:
    """The agent's operations; each raises EdgeAgentError with a reason on failure."""

    def __init__(self, agent: AgentControl) -> None:
        self._agent = agent
        # Commands run on two workers and the control socket: changes go one at a time.
        self._changing = threading.Lock()

    def register_commands(self, router: CommandRouter) -> None:
        router.register("status", lambda _r: self.status(), schema=NoArgs)
        router.register("config.get", lambda _r: self.config_get(), schema=NoArgs)
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
        router.register("restart", lambda _r: self.restart(), schema=NoArgs)

    def local_handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """Operations the local control socket offers (read-mostly, no MQTT needed); their
        arguments are checked by the same models as the MQTT commands'."""
        return {
            "status": _local("status", NoArgs, lambda _a: self.status()),
            "logs": _local("logs", LogsArgs, lambda a: self.logs(a.lines)),
            "config.get": _local("config.get", NoArgs, lambda _a: self.config_get()),
            "pipeline.restart": _local(
                "pipeline.restart", PipelineArgs, lambda a: self.pipeline("restart", a.pipeline)
            ),
        }

    # --- the operations --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything `edgeagent status` shows."""
        agent = self._agent
        pipelines = []
        for name in agent.pipeline_names():
            info = agent.describe_pipeline(name)
            stats = agent.pipeline_stats(name)
            if stats is not None:
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
        outbox = agent.outbox_stats()
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
            "last_errors": [line for line in agent.log_tail(500) if " ERROR " in line][-10:],
        }

    def config_get(self) -> dict[str, Any]:
        return self._agent.config.model_dump(mode="json")

    def config_set(self, args: ConfigSetArgs) -> dict[str, Any]:
        """Validates the merged config, refuses it whole when it changes a key outside
        `REMOTE_CONFIG_KEYS` or names a file outside `commands.remote_paths`, applies what
        can be applied live (rolling back if a pipeline then fails to start), and persists
        it. Raises EdgeAgentError; a refused change changes nothing."""
        with self._changing:
            return self._config_set(args)

    def _config_set(self, args: ConfigSetArgs) -> dict[str, Any]:
        agent = self._agent
        current = agent.config.model_dump(mode="json", exclude_unset=True)
        merged = _merge(current, rename_legacy_keys(args.config, "config.set"))
        try:
            new = validate_config_data(merged, "config.set")
        except ConfigError as exc:
            raise EdgeAgentError(
                f"the new configuration is invalid, nothing changed: {exc}"
            ) from exc
        changed_paths = changed_keys(agent.config, new)
        forbidden = [path for path in changed_paths if not remotely_allowed(path)]
        if forbidden:
            raise EdgeAgentError(
                f"forbidden-key: {', '.join(forbidden)}: local-only, changed only in the "
                "configuration file on the device; a command may change "
                f"{', '.join(sorted(REMOTE_CONFIG_KEYS))}; nothing changed"
            )
        files = forbidden_paths(agent.config, new)
        if files:
            raise EdgeAgentError(
                f"forbidden-path: {'; '.join(files)}; a file a command names must lie under "
                f"commands.remote_paths ({roots_text(agent.config.commands.remote_paths)}); "
                "nothing changed"
            )
        changed = sorted({path.split(".", 1)[0] for path in changed_paths})
        if not changed:
            return {"changed": [], "restart_required": []}
        if "pipelines" in changed:
            self._apply_pipelines(agent.config, new)
        if "log_level" in changed:
            logging.getLogger().setLevel(new.log_level.upper())
        self._persist(merged)
        agent.replace_config(new)
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
                failures[name] = agent.pipeline_failure(name) or "did not start"
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
            if name in agent.pipeline_names() and agent.pipeline_failure(name) is None:
                raise EdgeAgentError(f"pipeline {name!r} is running already")
            if agent.start_pipeline(config) is None:
                why = agent.pipeline_failure(name)
                raise EdgeAgentError(f"pipeline {name!r} did not start: {why}")
        agent.publish_status()
        return (
            agent.describe_pipeline(name)
            if name in agent.pipeline_names()
            else {"name": name, "state": "stopped"}
        )

    def _pipeline_handler(self, verb: str) -> Callable[[Request], Any]:
        return lambda request: self.pipeline(verb, request.params_as(PipelineArgs).pipeline)

    def model_rollback(self, pipeline: str) -> dict[str, Any]:
        return {"pipeline": pipeline, "version": self._agent.rollback_model(pipeline)}

    def snapshot(self, args: SnapshotArgs) -> BinaryResult:
        last = self._agent.last_output(args.pipeline)
        if last is None:
            raise EdgeAgentError(f"pipeline {args.pipeline!r} has no result to show yet")
        sample, result = last
        if args.mask:
            mask = self._agent.last_mask(args.pipeline)
            if mask is None:
                raise EdgeAgentError(
                    f"pipeline {args.pipeline!r} has no mask: only segmentation models give one"
                )
            return BinaryResult(
                render_mask(mask),
                "image/png",
                meta={"pipeline": args.pipeline, "captured_at": sample.captured_at},
            )
        image = sample.data
        if sample.full_frame is not None:
            # A camera that infers on its low-resolution stream shows its main stream here.
            try:
                image = sample.full_frame()
            except SourceError as exc:  # the pipeline stopped, or the camera failed
                log.info("snapshot of %s shows the frame the model saw: %s", args.pipeline, exc)
        jpeg = render_snapshot(image, result, quality=args.quality)
        return BinaryResult(
            jpeg,
            "image/jpeg",
            meta={"pipeline": args.pipeline, "captured_at": sample.captured_at},
        )

    def _bench_command(self, request: Request, progress: Progress) -> dict[str, Any]:
        args = request.params_as(BenchArgs)
        model = args.model
        if model is not None:
            why = model_refusal(model, self._agent.config.commands.remote_paths)
            if why is not None:
                raise EdgeAgentError(f"forbidden-path: model {model!r}: {why}")
        else:
            path = self._agent.running_model_path(args.pipeline or "")
            if path is None:
                raise EdgeAgentError("bench needs 'model' or the name of a running 'pipeline'")
            model = str(path)
        progress.update(0, f"benchmarking {model} with {args.threads} thread(s)")
        return measure(
            model,
            "auto",
            args.threads,
            args.runs,
            on_progress=lambda done: progress.update(100 * done / args.runs),
        )

    def logs(self, lines: int) -> dict[str, Any]:
        return {"lines": self._agent.log_tail(lines)}

    def restart(self) -> dict[str, Any]:
        self._agent.request_restart()
        return {"restarting": True, "pid": os.getpid()}


def _local(
    command: str, schema: type[A], run: Callable[[A], Any]
) -> Callable[[dict[str, Any]], Any]:
    """A control socket handler: `args` checked by `schema` (as over MQTT), then `run`."""
    return lambda args: run(parse_args(schema, args, command))
