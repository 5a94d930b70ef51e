"""What a command sender may change: `config.set` may change only the keys in
`REMOTE_CONFIG_KEYS`, and a file path a command sets must resolve under
`commands.remote_paths`. Whom the device trusts, where it connects and where it writes
change only in the local file, by root (docs/security.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Final

from edgeagent.config import AgentConfig, PipelineConfig
from edgeagent.hal.settings import RemotePath
from edgeagent.modelfile.catalog import bundled_path
from edgeagent.names import SAFE_NAME

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


def remotely_allowed(path: str) -> bool:
    """Whether a command may change the dotted key path `path`."""
    return any(path == key or path.startswith(key + ".") for key in REMOTE_CONFIG_KEYS)


def changed_keys(old: AgentConfig, new: AgentConfig) -> list[str]:
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


def roots_text(roots: tuple[Path, ...]) -> str:
    """`commands.remote_paths` as a reply names them."""
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


def model_refusal(ref: str, roots: tuple[Path, ...]) -> str | None:
    """Why a command may not name the model `ref` (a file outside the roots), or None."""
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
    yield "model", pipeline.model, lambda: model_refusal(pipeline.model, roots)


def _remote_path_refusal(path: RemotePath, roots: tuple[Path, ...]) -> str | None:
    """Why a command may not set `path` (the check its source declares), or None."""
    if path.check == "glob":
        return _glob_refusal(path.value, roots)
    if path.check == "never":
        return path.refusal
    return _file_refusal(path.value, roots)
