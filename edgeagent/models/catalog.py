"""Finds a pipeline's model and merges what is known about it into one description.

A model is named either by a bundled name (`shapes-detector`) or by a path to a
`.tflite`. Its description comes, in order of precedence, from the pipeline's config,
the manifest beside the file, and the labels embedded in the model's TFLite metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgeagent.config import ImagePreprocess, RawTask, Task, WindowPreprocess
from edgeagent.errors import ModelError
from edgeagent.models.manifest import Manifest, load_manifest
from edgeagent.models.tflite import read_model

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelDescription:
    name: str
    version: str
    path: Path
    task: Task
    labels: tuple[str, ...]
    preprocess: ImagePreprocess | WindowPreprocess | None
    manifest: Manifest | None


def bundled_dir() -> Path:
    """Where the bundled models are: inside the installed wheel, else the source tree."""
    installed = Path(__file__).resolve().parent.parent / "bundled_models"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "models" / "bundled"


def samples_dir() -> Path:
    """Sample inputs for the bundled models (digit images), shipped beside them."""
    return bundled_dir().parent / (
        "bundled_samples" if bundled_dir().name == "bundled_models" else "samples"
    )


def bundled_models() -> list[str]:
    return sorted(p.stem for p in bundled_dir().glob("*.tflite"))


def resolve_model(ref: str) -> Path:
    """The `.tflite` file that `ref` names; ModelError saying what exists when none does."""
    bundled = bundled_dir() / f"{ref}.tflite"
    if "/" not in ref and not ref.endswith(".tflite") and bundled.is_file():
        return bundled
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    available = ", ".join(bundled_models()) or "none"
    raise ModelError(
        f"model {ref!r} not found: it is neither a bundled model (available: {available}) "
        f"nor an existing file; give a bundled name or the path to a .tflite file"
    )


def describe_model(
    ref: str,
    *,
    task: Task | None = None,
    labels: tuple[str, ...] | None = None,
    preprocess: ImagePreprocess | WindowPreprocess | None = None,
) -> ModelDescription:
    """Resolves `ref` and merges config overrides, its manifest and its metadata labels."""
    path = resolve_model(ref)
    manifest = load_manifest(path)
    if labels is None:
        labels = manifest.labels if manifest and manifest.labels else read_model(path).labels
    if task is None:
        task = manifest.task if manifest else RawTask()
    if manifest is None and isinstance(task, RawTask):
        log.info("model %s has no manifest and no task in the config: running it as raw", path)
    return ModelDescription(
        name=manifest.name if manifest else path.stem,
        version=manifest.version if manifest else "unversioned",
        path=path,
        task=task,
        labels=labels,
        preprocess=preprocess
        if preprocess is not None
        else manifest.preprocess
        if manifest
        else None,
        manifest=manifest,
    )
