"""Video files, V4L2 devices and RTSP/HTTP streams through OpenCV's VideoCapture."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeagent.errors import MissingDependencyError, SourceError
from edgeagent.hal.camera.settings import OPENCV_INSTALL_HINT, OpenCVCamera
from edgeagent.hal.pacing import Pacer
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample

logger = logging.getLogger(__name__)


class OpenCVSource:
    """Frames from `config.uri` as RGB. A file loops at its end; a device or stream that
    stops delivering is reconnected with back-off, and read() raises SourceError once it
    has failed for `reconnect_timeout_s`."""

    kind: SampleKind = "image"

    def __init__(
        self,
        config: OpenCVCamera,
        *,
        reconnect_timeout_s: float = 30.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.config = config
        self.reconnect_timeout_s = reconnect_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._cv2: ModuleType | None = None
        self._capture: Any = None
        self._target: int | str = config.uri
        self._is_file = False
        self._pacer = Pacer(0.0)
        self._sequence = 0
        self._resize_logged = False

    def open(self) -> None:
        cv2 = _import_cv2()
        self._cv2 = cv2
        uri = self.config.uri
        if uri.isdigit():
            self._target = int(uri)
        elif "://" in uri or uri.startswith("/dev/"):
            self._target = uri
        else:
            path = Path(uri).expanduser()
            if not path.is_file():
                raise SourceError(f"opencv source: video file {uri} does not exist")
            self._target = str(path)
            self._is_file = True
        self._capture = self._connect()
        if self._capture is None:
            raise SourceError(f"opencv source: cannot open {uri}: {self._open_hint()}")
        fps = self.config.fps
        if fps == 0 and self._is_file:  # a file's own pace is the rate it was recorded at
            fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self._pacer = Pacer(1.0 / fps if fps > 0 else 0.0)
        self._sequence = 0
        logger.info("opencv source: opened %s (%s fps)", uri, fps or "stream-paced")

    def read(self) -> Sample:
        if self._capture is None or self._cv2 is None:
            raise SourceError("opencv source: read() before open() or after close()")
        started = time.monotonic()
        ok, frame = self._capture.read()
        if not ok:
            frame = self._recover()
        rgb = self._to_rgb(frame)
        capture_s = time.monotonic() - started
        self._pacer.wait()
        sequence = self._sequence
        self._sequence += 1
        return Sample(rgb, captured_at=time.time(), capture_s=capture_s, sequence=sequence)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def _connect(self) -> Any:
        """A VideoCapture that is open, or None."""
        cv2 = self._cv2
        assert cv2 is not None
        params: list[int] = []
        if isinstance(self._target, str) and "://" in self._target:
            api = cv2.CAP_FFMPEG
            # Without these a stalled stream blocks read() for the FFmpeg default (30 s+).
            for name, value in (
                ("CAP_PROP_OPEN_TIMEOUT_MSEC", 10000),
                ("CAP_PROP_READ_TIMEOUT_MSEC", 5000),
            ):
                if hasattr(cv2, name):
                    params += [getattr(cv2, name), value]
        elif self._is_file:
            api = cv2.CAP_ANY
        else:
            api = cv2.CAP_V4L2
        capture = cv2.VideoCapture(self._target, api, params)
        if not capture.isOpened():
            capture.release()
            return None
        if not self._is_file:
            if self.config.width:
                capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.config.width)
            if self.config.height:
                capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.config.height)
            if self.config.fps > 0:
                capture.set(cv2.CAP_PROP_FPS, self.config.fps)
        return capture

    def _recover(self) -> npt.NDArray[Any]:
        """The next frame after a failed read: rewinds a file, reconnects anything else."""
        cv2 = self._cv2
        assert cv2 is not None
        if self._is_file:
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self._capture.read()
            if ok:
                logger.debug("opencv source: %s looped to its start", self.config.uri)
                return np.asarray(frame)
            raise SourceError(f"opencv source: cannot read any frame from {self.config.uri}")
        deadline = time.monotonic() + self.reconnect_timeout_s
        delay = self._backoff_initial_s
        attempt = 0
        logger.warning("opencv source: %s stopped delivering frames; reconnecting", self.config.uri)
        while True:
            if self._capture is not None:
                self._capture.release()
                self._capture = None
            attempt += 1
            capture = self._connect()
            if capture is not None:
                ok, frame = capture.read()
                if ok:
                    self._capture = capture
                    logger.info(
                        "opencv source: %s reconnected after %d attempts", self.config.uri, attempt
                    )
                    return np.asarray(frame)
                capture.release()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SourceError(
                    f"opencv source: {self.config.uri} delivered no frame for "
                    f"{self.reconnect_timeout_s:g} s ({attempt} reconnect attempts); "
                    f"{self._open_hint()}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, self._backoff_max_s)

    def _to_rgb(self, frame: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        cv2 = self._cv2
        assert cv2 is not None
        if frame.ndim == 2:
            rgb = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        elif frame.shape[2] == 4:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
        else:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        width, height = self.config.width, self.config.height
        if width and height and (rgb.shape[1], rgb.shape[0]) != (width, height):
            # Devices pick their nearest mode and files have their own size; downstream
            # gets the size the configuration asked for.
            if not self._resize_logged:
                logger.info(
                    "opencv source: resizing %dx%d frames to %dx%d",
                    rgb.shape[1],
                    rgb.shape[0],
                    width,
                    height,
                )
                self._resize_logged = True
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        result: npt.NDArray[np.uint8] = np.ascontiguousarray(rgb, dtype=np.uint8)
        return result

    def _open_hint(self) -> str:
        if isinstance(self._target, int) or str(self._target).startswith("/dev/"):
            return (
                "check that the camera is plugged in (`v4l2-ctl --list-devices`) and that "
                "this user is in the video group"
            )
        if self._is_file:
            return "the file is not a video OpenCV can decode"
        return "check the URL, the credentials and that the camera is reachable"


def _import_cv2() -> ModuleType:
    try:
        import cv2
    except ImportError as exc:
        raise MissingDependencyError("OpenCV", OPENCV_INSTALL_HINT) from exc
    return cv2
