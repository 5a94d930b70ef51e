"""What every camera and sensor backend declares about itself, on its settings model.

A backend's settings model is the `source:` of a pipeline (picked by its `type:`) and
carries the backend's facts, so that nothing else keeps a list of source types: where its
implementation is (imported only when the source is opened), the kind of sample it
delivers, whether `read()` paces itself, the shape of one sample (for the delivery gate
before the first sample), the device family the doctor checks for it, and its doctor
pre-flight check. The models live in light modules (`hal/camera/settings.py`,
`hal/sensor/settings.py`) that import no vendor library and no numpy, so that loading the
configuration stays cheap; `edgeagent.config.SOURCE_BACKENDS` is the one list of them.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict

SampleKind = Literal["image", "window"]
DeviceFamily = Literal["camera", "i2c"]


class PreflightEnv(Protocol):
    """What a pre-flight check reads from the machine (doctor's `Environment`)."""

    @property
    def root(self) -> Path: ...  # where /dev is

    def is_raspberry_pi(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Preflight:
    """A pre-flight verdict: `finding` says what was found; `fix` what to do when not ok."""

    ok: bool
    finding: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeviceUse:
    """A device the doctor's camera or I2C check must look at for this source; `node` is a
    /dev glob that must match (e.g. `i2c-1`), None when the family's devices suffice."""

    family: DeviceFamily
    node: str | None = None


class SourceSettings(BaseModel):
    """The base of every backend's settings model. A subclass sets `type: Literal[...]`,
    `implementation` and `kind`, and overrides the facts that differ from the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str  # a Literal in each backend: the union's tag
    implementation: ClassVar[str]
    """`module:Class` of the backend, constructed with these settings."""
    kind: ClassVar[SampleKind]

    @classmethod
    def type_name(cls) -> str:
        """The `type:` that selects this backend."""
        (name,) = get_args(cls.model_fields["type"].annotation)
        return str(name)

    def paced(self) -> bool:
        """Whether `read()` waits for the next sample; an unpaced source renders as fast
        as it is read, so the pipeline keeps only one sample ready."""
        return True

    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample as configured: (height, width, 3) or (samples, channels)."""
        raise NotImplementedError

    def device(self) -> DeviceUse | None:
        return None

    def preflight(self, env: PreflightEnv) -> Preflight:
        """Whether the backend's library and what it reads are there, without opening it."""
        del env
        return Preflight(True, "built in")


def importable(module: str) -> bool | str:
    """True, or why the module cannot be imported (it is imported when it is found)."""
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - vendor imports fail in many ways
        return f"{type(exc).__name__}: {exc}"
    return True


def library_preflight(module: str, what: str, fix: str) -> Preflight | None:
    """A failed pre-flight when `module` cannot be imported, else None."""
    available = importable(module)
    if available is True:
        return None
    return Preflight(False, f"{what} is not importable ({available})", fix)
