"""An honest fake of picamera2 and libcamera's Python bindings, for tests off the Pi.

`install(monkeypatch, platform)` puts fake `picamera2` and `libcamera` modules into
sys.modules. The fake keeps the rules picamera2 0.3 enforces in `configure()` (read from
its source: `check_camera_config`, `check_stream_config`, `align_stream`), so a wrong
configuration fails here as it would on a Pi:

- the colour space must be a libcamera.ColorSpace;
- sizes are (width, height) tuples of even numbers; a stream's format must be known;
- the lores stream may not exceed main, and on the VC4 ISP (Pi 4 and earlier) it must
  be YUV ("lores stream must be YUV"); the Pi 5's PiSP takes RGB there;
- capture_array() only after start(), only of a configured stream; a YUV420 array has
  shape (height * 3/2, stride), with stride padded to 64 bytes here (padding bytes are
  0xAB, so code that ignores the stride sees garbage); RGB888 arrays are [B, G, R].

The camera looks at one scene (`scene(width, height)`, RGB) and each stream shows all of
it scaled to its size, as the ISP's output scalers do. YUV uses the colour space asked
for (full-range BT.601 for sYCC, limited-range for SMPTE 170M). Captures are counted
per stream; capture_array waits one frame period as the real one waits for a frame.
"""

from __future__ import annotations

import enum
import sys
import threading
import time
import types
from typing import Any, ClassVar

import numpy as np
import pytest

_KNOWN_FORMATS = ("YUV420", "YVU420", "RGB888", "BGR888", "XBGR8888", "XRGB8888")


class Platform(enum.Enum):
    VC4 = 0
    PISP = 1


class ColorSpace:
    """libcamera.ColorSpace: only what picamera2 configurations name."""

    def __init__(self, name: str, full_range: bool) -> None:
        self.name = name
        self.full_range = full_range

    @staticmethod
    def Sycc() -> ColorSpace:  # noqa: N802 - libcamera's name
        return ColorSpace("sYCC", full_range=True)

    @staticmethod
    def Smpte170m() -> ColorSpace:  # noqa: N802 - libcamera's name
        return ColorSpace("SMPTE170M", full_range=False)

    @staticmethod
    def Rec709() -> ColorSpace:  # noqa: N802 - libcamera's name
        return ColorSpace("Rec709", full_range=False)


def scene(width: int, height: int) -> np.ndarray:
    """What the camera sees, at any size: smooth colour ramps and a flat block (2x2
    chroma blocks are nearly uniform, so YUV420 round trips stay within a few levels)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        (
            40 + 160 * xs / max(width - 1, 1),
            60 + 120 * ys / max(height - 1, 1),
            np.full_like(xs, 90.0),
        ),
        axis=-1,
    )
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (200, 40, 40)
    return np.rint(rgb).astype(np.uint8)


class Picamera2:
    platform = Platform.VC4
    cameras: ClassVar[list[dict[str, Any]]] = [{"Model": "imx708", "Num": 0}]
    opened: ClassVar[list[Picamera2]] = []  # every instance, so tests can see the one in use

    def __init__(self, camera_num: int = 0) -> None:
        if camera_num >= len(self.cameras):
            raise IndexError("list index out of range")
        self.camera_num = camera_num
        self.config: dict[str, Any] | None = None
        self.started = False
        self.closed = False
        self.captures: dict[str, int] = {}
        self._lock = threading.Lock()
        type(self).opened.append(self)

    @classmethod
    def global_camera_info(cls) -> list[dict[str, Any]]:
        return list(cls.cameras)

    def create_video_configuration(
        self,
        main: dict[str, Any] | None = None,
        lores: dict[str, Any] | None = None,
        raw: dict[str, Any] | None = None,
        transform: Any = None,
        colour_space: Any = None,
        buffer_count: int = 6,
        controls: dict[str, Any] | None = None,
        display: str | None = "main",
        encode: str | None = "main",
        queue: bool = True,
        sensor: dict[str, Any] | None = None,
        use_case: str = "video",
    ) -> dict[str, Any]:
        del raw, transform, display, encode, queue, sensor, use_case
        main_config = {"format": "XBGR8888", "size": (1280, 720)} | dict(main or {})
        _align(main_config)
        lores_config = None
        if lores is not None:
            lores_config = {"format": "YUV420", "size": main_config["size"]} | dict(lores)
            _align(lores_config)
        if colour_space is None:
            w, h = main_config["size"]
            colour_space = ColorSpace.Smpte170m() if w < 1280 or h < 720 else ColorSpace.Rec709()
        return {
            "colour_space": colour_space,
            "transform": None,
            "buffer_count": buffer_count,
            "main": main_config,
            "lores": lores_config,
            "raw": None,
            "controls": dict(controls or {}),
        }

    def configure(self, config: dict[str, Any]) -> None:
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        if not isinstance(config["colour_space"], ColorSpace):
            raise RuntimeError("Colour space has incorrect type")  # noqa: TRY004 - as picamera2
        _check_stream(config["main"], "main")
        lores = config["lores"]
        if lores is not None:
            _check_stream(lores, "lores")
            main_w, main_h = config["main"]["size"]
            lores_w, lores_h = lores["size"]
            if lores_w > main_w or lores_h > main_h:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
            if type(self).platform == Platform.VC4 and lores["format"] not in ("YUV420", "YVU420"):
                raise RuntimeError("lores stream must be YUV")
        for name in ("main", "lores"):
            stream = config[name]
            if stream is not None:
                stream["stride"] = _stride(stream["format"], stream["size"][0])
        self.config = config

    def camera_configuration(self) -> dict[str, Any]:
        assert self.config is not None
        return self.config

    def start(self) -> None:
        if self.config is None:
            raise RuntimeError("Camera has not been configured")
        self.started = True

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.started = False
        self.closed = True

    def capture_array(self, name: str = "main") -> np.ndarray:
        if not self.started or self.config is None:
            raise RuntimeError("Camera is not running")
        stream = self.config.get(name)
        if stream is None:
            raise KeyError(name)  # what picamera2's make_array raises for an absent stream
        frame_us = self.config["controls"].get("FrameDurationLimits", (33333, 33333))[0]
        time.sleep(frame_us / 1e6)  # the frame clock
        with self._lock:
            self.captures[name] = self.captures.get(name, 0) + 1
        width, height = stream["size"]
        rgb = scene(width, height)
        if stream["format"] in ("YUV420", "YVU420"):
            full = self.config["colour_space"].full_range
            return _yuv420(rgb, stream["stride"], full, swap=stream["format"] == "YVU420")
        if stream["format"] == "RGB888":
            return np.ascontiguousarray(rgb[..., ::-1])  # [B, G, R]
        if stream["format"] == "BGR888":
            return rgb
        alpha = np.full((height, width, 1), 255, np.uint8)
        order = rgb[..., ::-1] if stream["format"] == "XRGB8888" else rgb
        return np.concatenate((order, alpha), axis=-1)


def _align(stream: dict[str, Any]) -> None:
    """picamera2's align_stream(optimal=False): sizes down to even numbers."""
    w, h = stream["size"]
    stream["size"] = (w - w % 2, h - h % 2)


def _check_stream(stream: dict[str, Any], name: str) -> None:
    if stream["format"] not in _KNOWN_FORMATS:
        raise RuntimeError(f"Bad format {stream['format']} in stream {name}")
    size = stream["size"]
    if type(size) is not tuple or len(size) != 2:
        raise RuntimeError(f"size in {name} stream should be (width, height)")
    if size[0] % 2 or size[1] % 2:
        raise RuntimeError("width and height should be even")


def _stride(fmt: str, width: int) -> int:
    bytes_per_pixel = {"YUV420": 1, "YVU420": 1, "RGB888": 3, "BGR888": 3}.get(fmt, 4)
    return -(-width * bytes_per_pixel // 64) * 64


def _yuv420(rgb: np.ndarray, stride: int, full_range: bool, *, swap: bool) -> np.ndarray:
    height, width = rgb.shape[:2]
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    if not full_range:  # studio swing: Y in 16..235, chroma in 16..240
        y = 16 + y * 219 / 255
        cb = 128 + (cb - 128) * 224 / 255
        cr = 128 + (cr - 128) * 224 / 255

    def half(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    def u8(plane: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(plane), 0, 255).astype(np.uint8)

    out = np.full(height * 3 // 2 * stride, 0xAB, np.uint8)
    out[: height * stride].reshape(height, stride)[:, :width] = u8(y)
    plane = (height // 2) * (stride // 2)
    first, second = (half(cr), half(cb)) if swap else (half(cb), half(cr))
    start = height * stride
    out[start : start + plane].reshape(height // 2, stride // 2)[:, : width // 2] = u8(first)
    out[start + plane : start + 2 * plane].reshape(height // 2, stride // 2)[:, : width // 2] = u8(
        second
    )
    return out.reshape(height * 3 // 2, stride)


def install(monkeypatch: pytest.MonkeyPatch, platform: Platform = Platform.VC4) -> type[Picamera2]:
    """Fake picamera2 and libcamera modules in sys.modules for this test; returns the
    fake Picamera2 class (its `opened` list holds the instances made)."""
    camera_class = type("Picamera2", (Picamera2,), {"platform": platform, "opened": []})
    picamera2 = types.ModuleType("picamera2")
    picamera2.Picamera2 = camera_class  # type: ignore[attr-defined]
    libcamera = types.ModuleType("libcamera")
    libcamera.ColorSpace = ColorSpace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "picamera2", picamera2)
    monkeypatch.setitem(sys.modules, "libcamera", libcamera)
    return camera_class
