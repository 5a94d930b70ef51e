"""The Raspberry Pi camera through picamera2 (libcamera), as RGB frames."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeagent.errors import MissingDependencyError, SourceError
from edgeagent.hal.camera.settings import PICAMERA2_INSTALL_HINT, PiCamera
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample

logger = logging.getLogger(__name__)

NO_CAMERA_HINT = (
    "check the ribbon cable and that `rpicam-hello --list-cameras` lists the camera "
    "(camera_auto_detect=1 in /boot/firmware/config.txt)"
)


class PiCameraSource:
    """Frames from a Pi camera at `fps`; the camera's frame clock paces read()."""

    kind: SampleKind = "image"

    def __init__(self, config: PiCamera) -> None:
        self.config = config
        self._camera: Any = None
        self._sequence = 0

    def open(self) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError as exc:
            raise MissingDependencyError("picamera2", PICAMERA2_INSTALL_HINT) from exc
        cameras = Picamera2.global_camera_info()
        if self.config.camera >= len(cameras):
            raise SourceError(
                f"picamera2 source: camera {self.config.camera} not found "
                f"({len(cameras)} camera(s) detected); {NO_CAMERA_HINT}"
            )
        frame_us = round(1_000_000 / self.config.fps)
        try:
            camera = Picamera2(self.config.camera)
        except (RuntimeError, IndexError, OSError) as exc:
            raise SourceError(
                f"picamera2 source: camera {self.config.camera} cannot be opened "
                f"(in use by another process?): {exc}"
            ) from exc
        try:
            configuration = camera.create_video_configuration(
                main={"size": (self.config.width, self.config.height), "format": "RGB888"},
                controls={"FrameDurationLimits": (frame_us, frame_us)},
                buffer_count=4,
            )
            camera.configure(configuration)
            camera.start()
        except (RuntimeError, ValueError, OSError) as exc:
            camera.close()
            raise SourceError(
                f"picamera2 source: cannot start camera {self.config.camera} at "
                f"{self.config.width}x{self.config.height} {self.config.fps:g} fps: {exc}"
            ) from exc
        self._camera = camera
        self._sequence = 0
        logger.info(
            "picamera2 source: camera %d (%s) at %dx%d %g fps",
            self.config.camera,
            cameras[self.config.camera].get("Model", "unknown model"),
            self.config.width,
            self.config.height,
            self.config.fps,
        )

    def read(self) -> Sample:
        if self._camera is None:
            raise SourceError("picamera2 source: read() before open() or after close()")
        started = time.monotonic()
        try:
            frame = self._camera.capture_array("main")
        except (RuntimeError, OSError) as exc:
            raise SourceError(f"picamera2 source: capture failed: {exc}") from exc
        rgb = bgr_to_rgb(frame)
        sequence = self._sequence
        self._sequence += 1
        return Sample(
            rgb, captured_at=time.time(), capture_s=time.monotonic() - started, sequence=sequence
        )

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            camera.stop()
            camera.close()


def bgr_to_rgb(frame: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """picamera2 names formats after libcamera's little-endian pixel words: "RGB888" puts
    B in the lowest byte, so the numpy array it returns is ordered [B, G, R] per pixel
    (the picamera2 manual lists "RGB888" as "ordered [B, G, R]"). Reversing gives RGB."""
    return np.ascontiguousarray(frame[..., 2::-1], dtype=np.uint8)
