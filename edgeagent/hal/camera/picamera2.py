"""The Raspberry Pi camera through picamera2 (libcamera), as RGB frames.

With `lores_size` set (the pipeline sets it from the model, see settings.PiCamera), the
camera runs two streams: `main` at width x height and `lores` at the size the model's
pre-processing wants, scaled by the ISP. Inference reads `lores`; `main` is read only
when someone asks for the full frame (a snapshot), through the sample's `full_frame`.

picamera2's rules, which its `configure()` enforces: both sizes even, the lores stream
no larger than main, and on the Pi 4 and earlier (the VC4 ISP) the lores stream must be
YUV; the Pi 5 (PiSP) can deliver it as RGB. A YUV420 capture is an array of shape
(height * 3/2, stride): the Y plane, then the U and V planes at half resolution (rows of
stride / 2 bytes). It is converted here with the full-range BT.601 matrix of the sYCC
colour space the stream is configured with.
"""

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
        # The stream inference reads and how its arrays become RGB (set by open()).
        self._stream = "main"
        self._lores_format = ""
        self._lores_size = (0, 0)

    def open(self) -> None:
        try:
            import libcamera
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
        lores_size = self.config.lores_size
        lores_format = lores_format_for(Picamera2)
        lores = {"size": lores_size, "format": lores_format} if lores_size else None
        try:
            configuration = camera.create_video_configuration(
                main={"size": (self.config.width, self.config.height), "format": "RGB888"},
                lores=lores,
                colour_space=libcamera.ColorSpace.Sycc(),
                controls={"FrameDurationLimits": (frame_us, frame_us)},
                buffer_count=4,
            )
            camera.configure(configuration)
            camera.start()
        except (RuntimeError, ValueError, OSError) as exc:
            camera.close()
            streams = f" with a {lores_format} lores stream at {_size(lores_size)}" if lores else ""
            raise SourceError(
                f"picamera2 source: cannot start camera {self.config.camera} at "
                f"{self.config.width}x{self.config.height} {self.config.fps:g} fps"
                f"{streams}: {exc}"
            ) from exc
        self._camera = camera
        self._sequence = 0
        self._stream = "lores" if lores else "main"
        if lores:
            # libcamera may adjust a size to what the hardware does; read back what it chose.
            actual = camera.camera_configuration()["lores"]
            self._lores_size = (int(actual["size"][0]), int(actual["size"][1]))
            self._lores_format = str(actual["format"])
        logger.info(
            "picamera2 source: camera %d (%s) at %dx%d %g fps%s",
            self.config.camera,
            cameras[self.config.camera].get("Model", "unknown model"),
            self.config.width,
            self.config.height,
            self.config.fps,
            f"; inference on the ISP's {self._lores_format} stream at {_size(self._lores_size)}"
            if lores
            else "",
        )

    def read(self) -> Sample:
        if self._camera is None:
            raise SourceError("picamera2 source: read() before open() or after close()")
        started = time.monotonic()
        frame = self._capture(self._stream)
        if self._stream == "lores":
            rgb = self._lores_to_rgb(frame)
            full_frame = self.capture_main
        else:
            rgb = bgr_to_rgb(frame)
            full_frame = None
        sequence = self._sequence
        self._sequence += 1
        return Sample(
            rgb,
            captured_at=time.time(),
            capture_s=time.monotonic() - started,
            sequence=sequence,
            full_frame=full_frame,
        )

    def capture_main(self) -> npt.NDArray[np.uint8]:
        """The main stream's next frame as RGB (the full view, for snapshots)."""
        return bgr_to_rgb(self._capture("main"))

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            camera.stop()
            camera.close()

    def _capture(self, stream: str) -> npt.NDArray[Any]:
        camera = self._camera
        if camera is None:
            raise SourceError("picamera2 source: the camera is closed")
        try:
            frame: npt.NDArray[Any] = camera.capture_array(stream)
        except (RuntimeError, OSError) as exc:
            raise SourceError(f"picamera2 source: capture of {stream} failed: {exc}") from exc
        return frame

    def _lores_to_rgb(self, frame: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        width, height = self._lores_size
        if self._lores_format in ("YUV420", "YVU420"):
            return yuv420_to_rgb(frame, width, height, swap_uv=self._lores_format == "YVU420")
        return bgr_to_rgb(frame)


def lores_format_for(picamera2_class: Any) -> str:
    """RGB888 on a Pi 5 (PiSP), whose lores stream may be RGB; YUV420 elsewhere (the VC4
    ISP of the Pi 4 and earlier allows only YUV there), and when the platform is unknown."""
    platform = getattr(picamera2_class, "platform", None)
    return "RGB888" if getattr(platform, "name", "") == "PISP" else "YUV420"


def bgr_to_rgb(frame: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """picamera2 names formats after libcamera's little-endian pixel words: "RGB888" puts
    B in the lowest byte, so the numpy array it returns is ordered [B, G, R] per pixel
    (the picamera2 manual lists "RGB888" as "ordered [B, G, R]"). Reversing gives RGB; a
    fourth (X) channel is dropped. One plane at a time: a fifth of the CPU of copying the
    reversed view (0.26 against 1.3 ms for 640x480)."""
    rgb = np.empty((*frame.shape[:2], 3), np.uint8)
    for channel in range(3):
        rgb[..., channel] = frame[..., 2 - channel]
    return rgb


def yuv420_to_rgb(
    frame: npt.NDArray[Any], width: int, height: int, *, swap_uv: bool = False
) -> npt.NDArray[np.uint8]:
    """A picamera2 YUV420 array (height * 3/2 rows of `stride` bytes) -> (height, width, 3)
    RGB, with the full-range BT.601 (sYCC, JPEG) matrix. Chroma is computed at half
    resolution and repeated, which costs less than upsampling first."""
    rows, stride = frame.shape
    if rows != height * 3 // 2 or stride < width or height % 2 or width % 2:
        raise SourceError(
            f"picamera2 source: a YUV420 frame of {width}x{height} should be an array of "
            f"{height * 3 // 2} rows of at least {width} bytes, got {list(frame.shape)}"
        )
    flat = frame.reshape(-1)
    half_w, half_h, half_stride = width // 2, height // 2, stride // 2
    plane = half_h * half_stride
    start = height * stride
    u = flat[start : start + plane].reshape(half_h, half_stride)[:, :half_w]
    v = flat[start + plane : start + 2 * plane].reshape(half_h, half_stride)[:, :half_w]
    if swap_uv:
        u, v = v, u
    cb = u.astype(np.float32) - 128.0
    cr = v.astype(np.float32) - 128.0
    # Per chroma sample: what each colour adds to the luma of its 2x2 block.
    offsets = np.stack((1.402 * cr, -0.344136 * cb - 0.714136 * cr, 1.772 * cb), axis=-1)
    offsets = offsets.repeat(2, axis=0).repeat(2, axis=1)
    rgb = frame[:height, :width, np.newaxis].astype(np.float32) + offsets
    np.rint(rgb, out=rgb)
    np.clip(rgb, 0, 255, out=rgb)
    result: npt.NDArray[np.uint8] = rgb.astype(np.uint8)
    return result


def _size(size: tuple[int, int] | None) -> str:
    return f"{size[0]}x{size[1]}" if size else "none"
