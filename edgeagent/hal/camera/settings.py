"""The settings of each camera backend (a pipeline's `source:`) and its facts.

Light by design: the configuration imports this module, so it imports no vendor library
and no numpy; each backend imports its own library when it is opened.
"""

from __future__ import annotations

import glob
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from edgeagent.hal.settings import (
    DeviceUse,
    Preflight,
    PreflightEnv,
    RemotePath,
    SampleKind,
    SourceSettings,
    library_preflight,
)

OPENCV_INSTALL_HINT = "pip install 'edgeagent[opencv]'"
PICAMERA2_INSTALL_HINT = (
    "sudo apt install python3-picamera2 (libcamera comes only from apt, so it is not "
    "pip-installable); the virtualenv must be created with --system-site-packages to see "
    "it, as deploy/install.sh does"
)


# What a command may name as an OpenCV source besides a file (strict: a command's value).
_NETWORK_STREAM = re.compile(r"(?:rtsps?|https?)://\S+", re.IGNORECASE)
_VIDEO_DEVICE = re.compile(r"/dev/video[0-9]{1,3}")
_REMOTE_URI_REFUSAL = (
    "a command may name an rtsp(s)/http(s) stream, /dev/videoN, a device index or a file"
)

_DEFAULT_WIDTH, _DEFAULT_HEIGHT = 640, 480  # what the gate assumes of a camera of no set size


def _frame(width: int | None, height: int | None) -> tuple[int, ...]:
    return (height or _DEFAULT_HEIGHT, width or _DEFAULT_WIDTH, 3)


class _Camera(SourceSettings):
    kind: ClassVar[SampleKind] = "image"
    fps: float  # 0: not paced by the backend (a file or a scene rendered on demand)

    def paced(self) -> bool:
        return self.fps != 0


class SyntheticCamera(_Camera):
    """A deterministic scene of moving shapes on a noisy background."""

    implementation: ClassVar[str] = "edgeagent.hal.camera.synthetic:SyntheticCamera"

    type: Literal["synthetic"]
    width: int = Field(default=640, ge=32, le=4096)
    height: int = Field(default=480, ge=32, le=4096)
    fps: float = Field(default=30.0, ge=0)  # 0: as fast as the consumer reads
    seed: int = 0
    shapes: int = Field(default=3, ge=0, le=16)

    def sample_shape(self) -> tuple[int, ...]:
        return _frame(self.width, self.height)


class ImagesCamera(_Camera):
    """Image files from a folder or a glob, played in name order and looped."""

    implementation: ClassVar[str] = "edgeagent.hal.camera.images:ImagesSource"

    type: Literal["images"]
    path: str
    fps: float = Field(default=1.0, ge=0)
    loop: bool = True

    def sample_shape(self) -> tuple[int, ...]:
        return _frame(None, None)  # each file has its own size

    def remote_paths(self) -> Iterator[RemotePath]:
        yield RemotePath("source.path", self.path, "glob")

    def preflight(self, env: PreflightEnv) -> Preflight:
        del env
        path = Path(self.path)
        # A glob such as /srv/frames/*.jpg is absolute, which Path.glob does not take.
        matches = [Path(p) for p in glob.glob(self.path)]  # noqa: PTH207
        found = sorted(path.iterdir()) if path.is_dir() else matches
        details = {"files": len(found)}
        if not found:
            fix = "correct source.path (a folder or a glob)"
            return Preflight(False, f"no files match {self.path}", fix, details)
        return Preflight(True, f"{len(found)} file(s) at {self.path}", None, details)


class OpenCVCamera(_Camera):
    """A video file, a V4L2 device (/dev/video0 or an index) or an RTSP URL via OpenCV."""

    implementation: ClassVar[str] = "edgeagent.hal.camera.opencv:OpenCVSource"

    type: Literal["opencv"]
    uri: str
    fps: float = Field(default=0, ge=0)  # 0: the stream's own pace
    width: int | None = None
    height: int | None = None

    def sample_shape(self) -> tuple[int, ...]:
        return _frame(self.width, self.height)

    def device(self) -> DeviceUse | None:
        on_device = self.uri.startswith("/dev/video") or self.uri.isdigit()
        return DeviceUse("camera") if on_device else None

    def remote_paths(self) -> Iterator[RemotePath]:
        """Network streams, device indexes and /dev/videoN read no file; a file must be
        checked; any other scheme or /dev node is refused."""
        uri = self.uri
        if uri.isdigit() or _NETWORK_STREAM.fullmatch(uri) or _VIDEO_DEVICE.fullmatch(uri):
            return
        if "://" in uri or uri.startswith("/dev/"):
            yield RemotePath("source.uri", uri, "never", _REMOTE_URI_REFUSAL)
        else:
            yield RemotePath("source.uri", uri, "file")

    def preflight(self, env: PreflightEnv) -> Preflight:
        missing = library_preflight("cv2", "OpenCV", OPENCV_INSTALL_HINT)
        if missing is not None:
            return missing
        uri = self.uri
        if uri.startswith("/dev/") and not (env.root / uri.lstrip("/")).exists():
            return Preflight(
                False, f"{uri} does not exist", "plug in the camera or correct source.uri"
            )
        if "://" not in uri and not uri.isdigit() and not Path(uri).exists():
            return Preflight(False, f"{uri} does not exist", "correct source.uri")
        return Preflight(True, f"OpenCV imports; {uri}")


class PiCamera(_Camera):
    """The Raspberry Pi camera through picamera2 (libcamera).

    `width` x `height` is the main stream (snapshots). With `lores` on, the ISP also
    delivers a low-resolution stream at the size the model's pre-processing wants
    (`lores_size`, filled in from the model by `fitted_to_input` unless set), and
    inference reads that one, so no CPU resize runs."""

    implementation: ClassVar[str] = "edgeagent.hal.camera.picamera2:PiCameraSource"

    type: Literal["picamera2"]
    width: int = 640
    height: int = 480
    fps: float = Field(default=30.0, gt=0)
    camera: int = 0
    lores: bool = True  # false: infer on the main stream, resized on the CPU
    lores_size: tuple[int, int] | None = None  # (width, height); None: from the model

    def sample_shape(self) -> tuple[int, ...]:
        return _frame(self.width, self.height)

    def fitted_to_input(self, height: int, width: int, resize: str) -> PiCamera:
        if not self.lores or self.lores_size is not None:
            return self
        size = lores_size_for((self.width, self.height), (width, height), resize)
        return self if size is None else self.model_copy(update={"lores_size": size})

    def device(self) -> DeviceUse | None:
        return DeviceUse("camera", "media*")  # libcamera's media controller nodes

    def preflight(self, env: PreflightEnv) -> Preflight:
        del env
        missing = library_preflight("picamera2", "picamera2", PICAMERA2_INSTALL_HINT)
        return missing or Preflight(True, "picamera2 imports")


def lores_size_for(
    main: tuple[int, int], model: tuple[int, int], resize: str
) -> tuple[int, int] | None:
    """The (width, height) of a low-resolution stream showing `main`'s view that the
    pre-processing turns into a `model`-sized input without resizing: the model's size
    for "stretch"; `main` scaled to fit inside it ("letterbox", then only padded) or to
    cover it ("crop", then only cropped). Even sizes, as libcamera wants; None when the
    model's input is not smaller than the main stream (the ISP only scales down)."""
    (main_w, main_h), (model_w, model_h) = main, model
    if resize == "stretch":
        width, height = model_w, model_h
    else:
        fit = min if resize == "letterbox" else max
        ratio = fit(model_w / main_w, model_h / main_h)
        # Up to even for "crop" (it must still cover the model), to nearest for "letterbox".
        step = math.ceil if resize == "crop" else round
        width, height = step(main_w * ratio / 2) * 2, step(main_h * ratio / 2) * 2
    width, height = width + width % 2, height + height % 2
    if width > main_w or height > main_h or (width, height) == (main_w, main_h):
        return None
    return max(width, 2), max(height, 2)
