"""What the agent can be asked to do, by the fleet over MQTT (`cmd/<name>`) and by a
person at the device over the control socket (`edgeagent status`). One implementation
serves both, so a command behaves the same wherever it comes from, and both check their
arguments with the same strict models (no "100" for 100, no `true` for 1).

What a command sender can change is bounded: `config.set` may change only the keys in
`REMOTE_CONFIG_KEYS` (anything else fails with `forbidden-key: ...` and changes nothing),
and a file path it sets, like `bench`'s `model`, must resolve under
`commands.remote_paths` (else `forbidden-path: ...`). Whom the device trusts, where it
connects and where it writes change only in the local file, by root (docs/security.md).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeagent import __version__
from edgeagent.commands.router import (
    BinaryResult,
    CommandRouter,
    Progress,
    Request,
    validation_reason,
)
from edgeagent.config import (
    AgentConfig,
    PipelineConfig,
    rename_legacy_keys,
    validate_config_data,
)
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.hal.settings import RemotePath
from edgeagent.inference.benchmark import measure
from edgeagent.modelfile.catalog import bundled_path
from edgeagent.names import SAFE_NAME
from edgeagent.snapshot import render_mask, render_snapshot

if TYPE_CHECKING:
    from edgeagent.service import Agent

log = logging.getLogger(__name__)

# Keys whose change the running agent applies at once; any other change is persisted and
# takes effect at the next restart (the reply says so).
_LIVE_KEYS = frozenset({"pipelines", "log_level"})

REMOTE_CONFIG_KEYS: Final = frozenset(
    {
        "pipelines",
        "log_level",
        "telemetry.interval_s",
        "homeassistant.enabled",
        "homeassistant.prefix",
    }
)
"""The configuration a command sender may change with `config.set`: a changed key path is
allowed when it is one of these or lies below one. `pipelines` is allowed whole (sources,
models, task and thresholds, pre-processing, accelerator, rate, enabled), but the file
paths in it must resolve under `commands.remote_paths`. Everything else is local-only
(`mqtt.*`, `delivery.*`, `device.*`, `commands.*`, `outbox.*`, `state_dir`,
`control_socket`, `telemetry.prometheus`, and any key added later until it is listed
here): it decides whom the device trusts, where it connects or what it writes, and only
root changes it, in the file. Documented in docs/protocol.md."""

_GLOB_MAGIC = re.compile(r"[*?\[]")

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


# --- what a command sender may change ------------------------------------------------


def _changed_paths(old: Any, new: Any, path: tuple[str, ...] = ()) -> Iterator[str]:
    """The dotted key paths whose values differ between two JSON-like trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys(), key=str):
            if key in old and key in new:
                yield from _changed_paths(old[key], new[key], (*path, str(key)))
            else:
                yield ".".join((*path, str(key)))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (before, after) in enumerate(zip(old, new, strict=True)):
            yield from _changed_paths(before, after, (*path, str(index)))
    elif old != new:
        yield ".".join(path) or "(the whole configuration)"


def _remotely_allowed(path: str) -> bool:
    return any(path == key or path.startswith(key + ".") for key in REMOTE_CONFIG_KEYS)


def _changed_keys(old: AgentConfig, new: AgentConfig) -> list[str]:
    """The dotted key paths whose values `new` changes, e.g. `telemetry.interval_s`."""
    return list(_changed_paths(old.model_dump(mode="json"), new.model_dump(mode="json")))


def _resolved(path: Path) -> Path | None:
    """`path` with `~` expanded and symlinks followed; None when it cannot be (a symlink
    loop, an unknown user, a NUL byte)."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether `path`, symlinks followed, lies in one of `roots` (also resolved)."""
    resolved = _resolved(path)
    if resolved is None:
        return False
    return any(
        (root_resolved := _resolved(root)) is not None and resolved.is_relative_to(root_resolved)
        for root in roots
    )


def _roots_text(roots: tuple[Path, ...]) -> str:
    return ", ".join(str(r) for r in roots) if roots else "none configured"


def _file_refusal(value: str, roots: tuple[Path, ...]) -> str | None:
    """Why a file path set by a command may not be used, or None when it lies in a root."""
    target = Path(value)
    if ".." in target.parts:
        return "'..' is not allowed in a path set by a command"
    if not roots:
        return "this device accepts no file path from commands (commands.remote_paths is empty)"
    if not _inside(target, roots):
        return f"it resolves to {_resolved(target) or 'nothing'}, outside commands.remote_paths"
    return None


def _glob_refusal(pattern: str, roots: tuple[Path, ...]) -> str | None:
    """A folder, a file or a glob (an images source): its fixed part and every file it
    matches now must lie in a root (a symlink inside a root may not lead out of it)."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path()
    refusal = _file_refusal(str(base), roots) or _file_refusal(pattern, roots)
    if refusal is not None:
        return refusal
    from edgeagent.hal.camera.images import find_images  # Pillow, only when needed

    for file in find_images(pattern):
        if not _inside(file, roots):
            return f"{file} resolves to {_resolved(file)}, outside commands.remote_paths"
    return None


def model_is_path(ref: str) -> bool:
    """Whether a pipeline's or bench's `model` names a file: not a bundled model, and not a
    plain name (a model delivered over MQTT) without a file of that name at hand."""
    if bundled_path(ref) is not None:
        return False
    if SAFE_NAME.fullmatch(ref) and ".." not in ref and not ref.endswith(".tflite"):
        return Path(ref).expanduser().exists()
    return True


def _model_refusal(ref: str, roots: tuple[Path, ...]) -> str | None:
    return _file_refusal(ref, roots) if model_is_path(ref) else None


def forbidden_paths(old: AgentConfig, new: AgentConfig) -> list[str]:
    """The file paths `new` sets, not already set the same way in `old`, that do not
    resolve under `old.commands.remote_paths`; each as `key.path 'value': why`."""
    roots = old.commands.remote_paths
    before = {p.name: p for p in old.pipelines}
    problems = []
    for index, pipeline in enumerate(new.pipelines):
        previous = before.get(pipeline.name)
        unchanged = (
            {key: value for key, value, _ in _pipeline_files(previous, roots)}
            if previous is not None
            else {}
        )
        for key, value, check in _pipeline_files(pipeline, roots):
            if unchanged.get(key) == value:
                continue  # the pipeline had it already: set in the local file, or checked
            why = check()
            if why is not None:
                problems.append(f"pipelines.{index}.{key} {value!r}: {why}")
    return problems


def _pipeline_files(
    pipeline: PipelineConfig, roots: tuple[Path, ...]
) -> Iterator[tuple[str, str, Callable[[], str | None]]]:
    """(key, value, check) for every file a pipeline may name; `check` says why it may
    not be set by a command, or None."""
    for path in pipeline.source.remote_paths():
        yield path.key, path.value, partial(_remote_path_refusal, path, roots)
    yield "model", pipeline.model, lambda: _model_refusal(pipeline.model, roots)


def _remote_path_refusal(path: RemotePath, roots: tuple[Path, ...]) -> str | None:
    """Why a command may not set `path` (the check its source declares), or None."""
    if path.check == "glob":
        return _glob_refusal(path.value, roots)
    if path.check == "never":
        return path.refusal
    return _file_refusal(path.value, roots)


class Operations:
    """The agent's operations; each raises EdgeAgentError with a reason on failure."""

    def __init__(self, agent: Agent) -> None:
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
        changed_paths = _changed_keys(agent.config, new)
        forbidden = [path for path in changed_paths if not _remotely_allowed(path)]
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
                f"commands.remote_paths ({_roots_text(agent.config.commands.remote_paths)}); "
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
        if model is not None:
            why = _model_refusal(model, self._agent.config.commands.remote_paths)
            if why is not None:
                raise EdgeAgentError(f"forbidden-path: model {model!r}: {why}")
        else:
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


def _local(
    command: str, schema: type[A], run: Callable[[A], Any]
) -> Callable[[dict[str, Any]], Any]:
    """A control socket handler: `args` checked by `schema` (as over MQTT), then `run`."""
    return lambda args: run(parse_args(schema, args, command))
