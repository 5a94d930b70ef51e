"""What every camera and sensor backend declares about itself, on its settings model.

A backend's settings model is the `source:` of a pipeline (picked by its `type:`) and
carries the backend's facts, so that nothing else keeps a list of source types: where its
implementation is (imported only when the source is opened), the kind of sample it
delivers, whether `read()` paces itself, the shape of one sample (for the delivery gate
before the first sample), the device family the doctor checks for it, and its doctor
pre-flight check, and the file paths it reads (which a command may set only under
`commands.remote_paths`). The models live in light modules (`hal/camera/settings.py`,
`hal/sensor/settings.py`) that import no vendor library and no numpy, so that loading the
configuration stays cheap; `edgeagent.config.SOURCE_BACKENDS` is the one list of them.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self, get_args

from pydantic import BaseModel, ConfigDict

SampleKind = Literal["image", "window"]
DeviceFamily = Literal["camera", "i2c"]
PathCheck = Literal["file", "glob", "never"]


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


@dataclass(frozen=True, slots=True)
class RemotePath:
    """A setting that names something to read, as a command would set it. `check`: "file"
    must resolve under a root; "glob" also every file it matches now; "never" is refused
    whatever the roots, for the reason `refusal`."""

    key: str  # below the pipeline, e.g. `source.path`
    value: str
    check: PathCheck
    refusal: str | None = None


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

    def fitted_to_input(self, height: int, width: int, resize: str) -> Self:
        """These settings for a model that takes (height, width) images resized by
        `resize` ("stretch", "letterbox", "crop"): a camera that can scale in hardware
        returns a copy that delivers frames the pre-processing need not resize. Others
        return themselves."""
        del height, width, resize
        return self

    def remote_paths(self) -> Iterator[RemotePath]:
        """The file paths these settings read, each with the check a command's value must
        pass; a source that reads no file yields none."""
        yield from ()

    def preflight(self, env: PreflightEnv) -> Preflight:
        """Whether the backend's library and what it reads are there, without opening it."""
        del env
        return Preflight(True, "built in")


class WindowSettings(SourceSettings):
    """A source of windows of `window` samples, a new one every `hop_samples`."""

    kind: ClassVar[SampleKind] = "window"
    window: int  # samples per window
    if TYPE_CHECKING:
        # Each backend declares `hop` (samples between windows; None: window) in its own
        # place: a field declared here would move it in the order of keys and errors.
        hop: int | None

    @property
    def hop_samples(self) -> int:
        """Samples from the start of one window to the next: `hop`, else `window`."""
        return self.hop or self.window


class RealtimeWindows(WindowSettings):
    """A window source that renders or replays its samples: `realtime` paces the windows
    at the sample rate; false delivers them as fast as they are read."""

    if TYPE_CHECKING:
        realtime: bool  # declared by each backend, in its place, as `hop` is

    def paced(self) -> bool:
        return self.realtime


class FileReplay(SourceSettings):
    """A source that replays the one file at `path`, which must exist; a command may set
    `source.path` only to a file under `commands.remote_paths`."""

    if TYPE_CHECKING:
        path: str  # declared by each backend, in its place, as `hop` is

    def remote_paths(self) -> Iterator[RemotePath]:
        yield RemotePath("source.path", self.path, "file")

    def preflight(self, env: PreflightEnv) -> Preflight:
        del env
        if not Path(self.path).is_file():
            return Preflight(False, f"{self.path} does not exist", "correct source.path")
        return Preflight(True, self.path)


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
