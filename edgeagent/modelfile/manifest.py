"""A model's description: the YAML manifest that sits beside its `.tflite` file.

`shapes-detector.tflite` is described by `shapes-detector.yaml` in the same folder.
The format is documented in docs/models.md.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeagent.config import Preprocess, RawTask, Task
from edgeagent.errors import ModelError


class ReferenceCheck(BaseModel):
    """A known input and the output the model must give for it (the validation gate)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    input: str  # file name beside the manifest: .npy tensor already quantised, or an image
    output: str  # .npy of the expected de-quantised first output
    atol: float = 1e-3


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str = "0.0.0"
    description: str = ""
    task: Task = Field(default_factory=RawTask)
    labels: tuple[str, ...] = ()
    preprocess: Preprocess | None = None
    reference: ReferenceCheck | None = None
    quality: dict[str, float] = Field(default_factory=dict)  # measured at build time


def manifest_path(model_path: Path) -> Path:
    return model_path.with_suffix(".yaml")


def load_manifest(model_path: Path) -> Manifest | None:
    """The manifest beside `model_path`, or None when the model has none."""
    path = manifest_path(model_path)
    if not path.exists():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Manifest.model_validate(raw)
    except (yaml.YAMLError, ValidationError, OSError) as exc:
        raise ModelError(f"model manifest {path} is invalid: {exc}") from exc
