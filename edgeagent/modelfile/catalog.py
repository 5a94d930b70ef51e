"""Finds a pipeline's model and merges what is known about it into one description.

A model is named either by a bundled name (`shapes-detector`) or by a path to a
`.tflite`. Its task, labels and preprocess come, in order of precedence, from the
pipeline's config, the manifest beside the file, then what the model says about itself
(its TFLite metadata, then its graph: `introspect`). A config task of the same type as
the one below it, and a config preprocess of the same type, override only the fields they
set (`task: {type: detection, threshold: 0.3}` keeps the inferred layout); of another
type they replace it. `ModelDescription.sources` says where each part came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from edgeagent.config import ImagePreprocess, Task, WindowPreprocess
from edgeagent.errors import ModelError
from edgeagent.modelfile.introspect import infer_description
from edgeagent.modelfile.manifest import Manifest, load_manifest
from edgeagent.modelfile.tflite import ModelFile, read_model

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
    # The parsed file, handed to `Engine.load` so that starting a pipeline reads it once.
    model_file: ModelFile
    # "task", "labels", "preprocess" -> where each came from, for people.
    sources: dict[str, str] = field(default_factory=dict)
    about: str = ""  # the metadata's model name and description

    def explain(self) -> str:
        """One line: what the agent will do with the model and why."""
        task = self.sources.get("task", "")
        parts = [task if task.startswith(f"{self.task.type}:") else f"{self.task.type}: {task}"]
        labels = self.sources.get("labels", "")
        parts.append(f"{len(self.labels)} labels {labels}" if self.labels else "no labels")
        if isinstance(self.preprocess, ImagePreprocess):
            why = self.sources.get("preprocess", "")
            parts.append(f"input {_describe_image(self.preprocess)} ({why})")
        return "; ".join(p.rstrip(": ") for p in parts if p)


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


def bundled_path(ref: str) -> Path | None:
    """The bundled model that `ref` names, or None: a bundled name has no `/` and no
    `.tflite` suffix, and wins over a file of the same name."""
    if "/" in ref or ref.endswith(".tflite"):
        return None
    path = bundled_dir() / f"{ref}.tflite"
    return path if path.is_file() else None


def resolve_model(ref: str) -> Path:
    """The `.tflite` file that `ref` names; ModelError saying what exists when none does."""
    bundled = bundled_path(ref)
    if bundled is not None:
        return bundled
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    available = ", ".join(bundled_models()) or "none"
    raise ModelError(
        f"model {ref!r} not found: it is neither a bundled model (available: {available}) "
        f"nor an existing file; give a bundled name or the path to a .tflite file"
    )


@dataclass(frozen=True, slots=True)
class Declared:
    """What a manifest says about its model: None or () where it says nothing, so that
    the model's own metadata and graph decide. `origin` names the manifest for people."""

    task: Task | None
    labels: tuple[str, ...]
    preprocess: ImagePreprocess | WindowPreprocess | None
    origin: str = "the manifest"


def describe_model(
    ref: str,
    *,
    task: Task | None = None,
    labels: tuple[str, ...] | None = None,
    preprocess: ImagePreprocess | WindowPreprocess | None = None,
    model_file: ModelFile | None = None,
) -> ModelDescription:
    """Resolves `ref` and merges the config overrides, its manifest and what the model
    says about itself (see the module docstring). `model_file` is the file `ref` names,
    already parsed (`read_model`); it is not parsed again."""
    path = resolve_model(ref)
    if model_file is not None and model_file.path != path:
        model_file = None  # `ref` named a bundled model, not the file that was parsed
    manifest = load_manifest(path)
    declared = None
    if manifest is not None:
        declared = Declared(
            manifest.task if "task" in manifest.model_fields_set else None,
            manifest.labels,
            manifest.preprocess,
        )
    return describe_file(
        path,
        declared,
        name=manifest.name if manifest else path.stem,
        version=manifest.version if manifest else "unversioned",
        manifest=manifest,
        task=task,
        labels=labels,
        preprocess=preprocess,
        model_file=model_file,
    )


def describe_file(
    path: Path,
    declared: Declared | None,
    *,
    name: str,
    version: str,
    manifest: Manifest | None = None,
    task: Task | None = None,
    labels: tuple[str, ...] | None = None,
    preprocess: ImagePreprocess | WindowPreprocess | None = None,
    model_file: ModelFile | None = None,
) -> ModelDescription:
    """The description of the model file `path`, by the one precedence every model follows
    (bundled, local or delivered over MQTT): the pipeline config (`task`, `labels`,
    `preprocess`), then what its manifest `declared`, then its TFLite metadata, then its
    graph. ModelError when the file cannot be read as a TFLite model. `model_file` is
    `path` already parsed (`read_model`), to spare parsing it again."""
    if model_file is None:
        model_file = read_model(path)
    inferred = infer_description(model_file)
    sources: dict[str, str] = {}
    said = f"from {declared.origin}" if declared is not None else ""

    if declared is not None and declared.task is not None:
        base_task, sources["task"] = declared.task, said
    else:
        base_task, sources["task"] = inferred.task, inferred.task_reason
    chosen_task, sources["task"] = _override(task, base_task, sources["task"])

    if labels is not None:
        chosen_labels, sources["labels"] = labels, "from the pipeline config"
    elif declared is not None and declared.labels:
        chosen_labels, sources["labels"] = declared.labels, said
    else:
        chosen_labels, sources["labels"] = inferred.labels, inferred.labels_reason

    base_pre: ImagePreprocess | WindowPreprocess | None
    if declared is not None and declared.preprocess is not None:
        base_pre, sources["preprocess"] = declared.preprocess, said
    else:
        base_pre, sources["preprocess"] = inferred.preprocess, inferred.preprocess_reason
    if preprocess is None:
        chosen_pre = base_pre
    elif base_pre is not None and preprocess.type == base_pre.type:
        chosen_pre, sources["preprocess"] = _override(preprocess, base_pre, sources["preprocess"])
    else:
        chosen_pre, sources["preprocess"] = preprocess, "from the pipeline config"

    description = ModelDescription(
        name=name,
        version=version,
        path=path,
        task=chosen_task,
        labels=chosen_labels,
        preprocess=chosen_pre,
        manifest=manifest,
        model_file=model_file,
        sources=sources,
        about=inferred.about,
    )
    log.info("model %s %s: %s", name, version, description.explain())
    return description


_Spec = TypeVar("_Spec", bound=BaseModel)


def _override(config: _Spec | None, base: _Spec, source: str) -> tuple[_Spec, str]:
    """`config` over `base`: only the fields it sets when both are the same type."""
    if config is None:
        return base, source
    if type(config) is not type(base):
        return config, "from the pipeline config"
    fields = config.model_fields_set - {"type"}
    if not fields:
        return base, source
    merged = type(base).model_validate({**base.model_dump(), **config.model_dump(include=fields)})
    return merged, f"{', '.join(sorted(fields))} from the pipeline config, the rest {source}"


def _describe_image(spec: ImagePreprocess) -> str:
    mean = ", ".join(f"{v:g}" for v in spec.mean)
    std = ", ".join(f"{v:g}" for v in spec.std)
    return f"{spec.resize}, {spec.color}, mean {mean}, std {std}"
