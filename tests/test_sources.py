"""Camera and sensor backends on real files, a real video, and an emulated MPU-6050."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeagent.config import (
    CsvSensor,
    ImagesCamera,
    Mpu6050Sensor,
    OpenCVCamera,
    PiCamera,
    SourceConfig,
)
from edgeagent.errors import MissingDependencyError, SourceError
from edgeagent.hal.camera.images import ImagesSource
from edgeagent.hal.camera.opencv import OpenCVSource
from edgeagent.hal.camera.picamera2 import PiCameraSource, bgr_to_rgb, yuv420_to_rgb
from edgeagent.hal.camera.settings import lores_size_for
from edgeagent.hal.sensor.csv import CsvSource
from edgeagent.hal.sensor.mpu6050 import Mpu6050Source, open_smbus, rate_registers
from edgeagent.hal.sources import SOURCES, open_source, source_class
from tests import picamera2_fake
from tests.waiting import wait_until

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


# --- images --------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _image(tmp_path / "b.png", GREEN)
    _image(tmp_path / "a.png", RED)
    _image(tmp_path / "c.bmp", BLUE)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def _images(path: Path | str, **options: typing.Any) -> ImagesSource:
    source = ImagesSource(ImagesCamera(type="images", path=str(path), fps=0, **options))
    source.open()
    return source


def test_images_folder_plays_in_name_order_and_loops(folder: Path) -> None:
    source = _images(folder)
    samples = [source.read() for _ in range(4)]
    colours = [tuple(int(v) for v in s.data[0, 0]) for s in samples]
    assert colours == [RED, GREEN, BLUE, RED]
    assert [s.sequence for s in samples] == [0, 1, 2, 3]
    assert samples[0].data.shape == (6, 8, 3)
    assert samples[0].data.dtype == np.uint8
    assert source.kind == "image"
    source.close()


def test_images_glob_selects_matching_files(folder: Path) -> None:
    source = _images(folder / "*.png")
    colours = [tuple(int(v) for v in source.read().data[0, 0]) for _ in range(3)]
    assert colours == [RED, GREEN, RED]


def test_images_without_loop_are_exhausted(folder: Path) -> None:
    source = _images(folder, loop=False)
    for _ in range(3):
        source.read()
    with pytest.raises(SourceError, match="exhausted"):
        source.read()


def test_images_no_matching_files_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(SourceError, match=str(tmp_path)):
        _images(tmp_path)
    with pytest.raises(SourceError, match="nothing-here"):
        _images(tmp_path / "nothing-here" / "*.jpg")


def test_images_undecodable_files_are_skipped(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (folder / "0-garbage.jpg").write_bytes(b"this is not a jpeg")
    png = (folder / "a.png").read_bytes()
    (folder / "aa-truncated.png").write_bytes(png[: len(png) // 2])  # header fine, data cut
    with caplog.at_level(logging.WARNING):
        source = _images(folder)
        colours = [tuple(int(v) for v in source.read().data[0, 0]) for _ in range(4)]
    assert colours == [RED, GREEN, BLUE, RED]
    assert "0-garbage.jpg" in caplog.text
    assert "aa-truncated.png" in caplog.text


def test_images_all_undecodable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"junk")
    (tmp_path / "b.png").write_bytes(b"junk")
    with pytest.raises(SourceError, match="none of the 2 files"):
        _images(tmp_path)


def test_images_small_sets_are_cached(folder: Path) -> None:
    cached = _images(folder)
    uncached = ImagesSource(
        ImagesCamera(type="images", path=str(folder), fps=0), cache_limit_bytes=0
    )
    uncached.open()
    for _ in range(3):
        cached.read()
        uncached.read()
    (folder / "b.png").unlink()
    assert [tuple(int(v) for v in cached.read().data[0, 0]) for _ in range(3)] == [
        RED,
        GREEN,
        BLUE,
    ]
    assert [tuple(int(v) for v in uncached.read().data[0, 0]) for _ in range(3)] == [
        RED,
        BLUE,
        RED,
    ]


def test_images_are_paced_at_fps_without_drift(folder: Path) -> None:
    source = ImagesSource(ImagesCamera(type="images", path=str(folder), fps=20))
    source.open()
    stamps = [source.read().captured_at for _ in range(11)]
    # Never faster than the schedule; slower only by scheduling delay, which a monotonic
    # schedule absorbs instead of adding up.
    assert 0.495 <= stamps[-1] - stamps[0] < 0.58
    assert min(np.diff(stamps)) > 0.02


# --- opencv --------------------------------------------------------------------------


@pytest.fixture
def video(tmp_path: Path) -> Path:
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 200.0, (64, 48))
    assert writer.isOpened()
    for rgb in (RED, GREEN, BLUE):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:] = rgb[::-1]  # OpenCV writes BGR
        writer.write(frame)
    writer.release()
    return path


def _mean_colour(data: np.ndarray) -> tuple[int, ...]:
    return tuple(round(float(v) / 255) * 255 for v in data.reshape(-1, 3).mean(axis=0))


def test_opencv_file_is_rgb_and_loops_at_eof(video: Path) -> None:
    source = OpenCVSource(OpenCVCamera(type="opencv", uri=str(video)))
    source.open()
    samples = [source.read() for _ in range(5)]
    source.close()
    assert [_mean_colour(s.data) for s in samples] == [RED, GREEN, BLUE, RED, GREEN]
    assert samples[0].data.shape == (48, 64, 3)
    assert samples[0].data.dtype == np.uint8
    assert [s.sequence for s in samples] == [0, 1, 2, 3, 4]


def test_opencv_resizes_to_the_configured_size(video: Path) -> None:
    source = OpenCVSource(OpenCVCamera(type="opencv", uri=str(video), width=32, height=24))
    source.open()
    assert source.read().data.shape == (24, 32, 3)
    source.close()


def test_opencv_missing_file_and_device(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        OpenCVSource(OpenCVCamera(type="opencv", uri=str(tmp_path / "none.avi"))).open()
    with pytest.raises(SourceError, match="v4l2-ctl"):
        OpenCVSource(OpenCVCamera(type="opencv", uri="/dev/video97")).open()


def test_opencv_missing_dependency_names_the_extra(
    video: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgeagent\[opencv\]'"):
        OpenCVSource(OpenCVCamera(type="opencv", uri=str(video))).open()


class _DroppingStream:
    """Stands in for an RTSP camera (none can run here) that sends two frames and dies."""

    frames_left = 2

    def __init__(self, *_: object) -> None:
        pass

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return _DroppingStream.frames_left > 0

    def set(self, *_: object) -> bool:
        return True

    def get(self, *_: object) -> float:
        return 0.0

    def read(self) -> tuple[bool, np.ndarray | None]:
        if _DroppingStream.frames_left <= 0:
            return False, None
        _DroppingStream.frames_left -= 1
        return True, np.zeros((4, 4, 3), np.uint8)

    def release(self) -> None:
        pass


def test_opencv_stream_that_dies_fails_after_bounded_reconnects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cv2

    monkeypatch.setattr(cv2, "VideoCapture", _DroppingStream)
    monkeypatch.setattr(_DroppingStream, "frames_left", 2)
    source = OpenCVSource(
        OpenCVCamera(type="opencv", uri="rtsp://127.0.0.1:8554/cam"),
        reconnect_timeout_s=0.3,
        backoff_initial_s=0.05,
    )
    source.open()
    source.read()
    source.read()
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"delivered no frame for 0.3 s \(\d+ reconnect"):
        source.read()
    assert time.monotonic() - started > 0.25, "it retried for the configured time"
    source.close()


# --- picamera2 -----------------------------------------------------------------------


def _picamera2_importable() -> bool:
    try:
        import picamera2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_picamera2_importable(), reason="picamera2 is installed here")
def test_picamera2_missing_says_apt_and_system_site_packages() -> None:
    source = PiCameraSource(PiCamera(type="picamera2"))
    with pytest.raises(MissingDependencyError) as caught:
        source.open()
    assert "sudo apt install python3-picamera2" in str(caught.value)
    assert "--system-site-packages" in str(caught.value)


def test_picamera2_rgb888_arrays_are_bgr_and_get_swapped() -> None:
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 2] = 200  # red lives in the third byte of an "RGB888" pixel
    rgb = bgr_to_rgb(bgr)
    assert tuple(int(v) for v in rgb[0, 0]) == (200, 0, 0)
    assert rgb.flags["C_CONTIGUOUS"]
    xrgb = np.zeros((2, 2, 4), np.uint8)  # "XRGB8888" arrays are [B, G, R, 255]
    xrgb[..., 0], xrgb[..., 3] = 50, 255
    assert tuple(int(v) for v in bgr_to_rgb(xrgb)[0, 0]) == (0, 0, 50)


@pytest.mark.hardware
@pytest.mark.skipif(not _picamera2_importable(), reason="needs a Raspberry Pi with picamera2")
def test_picamera2_real_camera_delivers_rgb_frames() -> None:
    source = PiCameraSource(PiCamera(type="picamera2", width=320, height=240, fps=10))
    source.open()
    try:
        sample = source.read()
    finally:
        source.close()
    assert sample.data.shape == (240, 320, 3)


# --- csv -----------------------------------------------------------------------------


def _csv(tmp_path: Path, text: str, **options: typing.Any) -> CsvSource:
    path = tmp_path / "data.csv"
    path.write_text(text)
    source = CsvSource(CsvSensor(type="csv", path=str(path), rate_hz=1e6, **options))
    source.open()
    return source


ROWS = "time,x,label,z\n" + "".join(f"{i / 10},{i},ok,{-i}\n" for i in range(10))


def test_csv_header_numeric_columns_and_windows(tmp_path: Path) -> None:
    source = _csv(tmp_path, ROWS, window=4, hop=2)
    assert source.channels == ("time", "x", "z")
    assert source.kind == "window"
    starts = []
    for _ in range(5):
        sample = source.read()
        assert sample.data.shape == (4, 3)
        assert sample.data.dtype == np.float32
        starts.append(int(sample.data[0, 1]))
    assert starts == [0, 2, 4, 6, 0]  # the window at 8 would run past row 10: loop


def test_csv_selected_columns_without_loop(tmp_path: Path) -> None:
    source = _csv(tmp_path, ROWS, window=5, columns=("z", "x"), loop=False)
    first = source.read().data
    np.testing.assert_array_equal(first[:, 0], [0, -1, -2, -3, -4])
    np.testing.assert_array_equal(first[:, 1], [0, 1, 2, 3, 4])
    source.read()
    with pytest.raises(SourceError, match="exhausted"):
        source.read()


def test_csv_without_header_names_columns_by_index(tmp_path: Path) -> None:
    source = _csv(tmp_path, "1,2\n3,4\n5,6\n", window=2, hop=1, columns=("1",))
    assert source.channels == ("1",)
    np.testing.assert_array_equal(source.read().data[:, 0], [2, 4])
    np.testing.assert_array_equal(source.read().data[:, 0], [4, 6])


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("a,b\nx,y\n", {}, "no numeric columns"),
        (ROWS, {"columns": ("y",)}, r"no column 'y'; available: time, x, label, z"),
        (ROWS, {"columns": ("label",)}, r"column 'label' .* not numeric \(line 2: 'ok'\)"),
        (ROWS, {"window": 11}, "10 rows, fewer than one window of 11"),
        ("a,b\n1,2\n3\n", {"window": 1}, r"data.csv:3 has 1 cells, expected 2"),
    ],
)
def test_csv_errors_say_what_is_wrong(
    tmp_path: Path, text: str, options: dict[str, typing.Any], message: str
) -> None:
    with pytest.raises(SourceError, match=message):
        _csv(tmp_path, text, **options)


def test_csv_missing_file(tmp_path: Path) -> None:
    source = CsvSource(CsvSensor(type="csv", path=str(tmp_path / "gone.csv")))
    with pytest.raises(SourceError, match=r"gone.csv does not exist"):
        source.open()


def test_csv_windows_are_paced_by_hop_over_rate(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(ROWS)
    source = CsvSource(CsvSensor(type="csv", path=str(path), rate_hz=60, window=4, hop=3))
    source.open()
    stamps = [source.read().captured_at for _ in range(6)]
    assert 0.245 <= stamps[-1] - stamps[0] < 0.33  # 5 windows of 3 rows at 60 Hz


# --- mpu6050 -------------------------------------------------------------------------


class FakeMpu6050Bus:
    """An I2C bus with one MPU-6050 on it, emulating the registers the driver touches.

    It powers up asleep (PWR_MGMT_1=0x40) with zeroed data registers, refreshes the
    accelerometer registers only while awake, encodes g with the configured full-scale
    range (saturating like the chip), and fails like the kernel's I2C driver: OSError
    121 (Remote I/O) for an address with no device on it.
    """

    def __init__(
        self,
        address: int = 0x68,
        who_am_i: int = 0x68,
        accel_g: Callable[[int], Sequence[float]] = lambda n: (0.0, 0.0, 1.0),
    ) -> None:
        self.address = address
        self.registers = bytearray(128)
        self.registers[0x6B] = 0x40
        self.registers[0x75] = who_am_i
        self.accel_g = accel_g
        self.samples = 0
        self.fail_after: int | None = None
        self.closed = False

    def _answer(self, address: int) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "Bad file descriptor")
        if address != self.address or (
            self.fail_after is not None and self.samples >= self.fail_after
        ):
            raise OSError(errno.EREMOTEIO, "Remote I/O error")

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        self._answer(i2c_addr)
        return self.registers[register]

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._answer(i2c_addr)
        self.registers[register] = value & 0xFF

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]:
        self._answer(i2c_addr)
        if register == 0x3B and not self.registers[0x6B] & 0x40:
            lsb_per_g = 16384 >> ((self.registers[0x1C] >> 3) & 3)
            counts = [
                max(-32768, min(32767, round(g * lsb_per_g))) for g in self.accel_g(self.samples)
            ]
            self.registers[0x3B:0x41] = np.array(counts, ">i2").tobytes()
            self.samples += 1
        return list(self.registers[register : register + length])

    def close(self) -> None:
        self.closed = True


def _mpu(bus: FakeMpu6050Bus, **options: typing.Any) -> Mpu6050Source:
    source = Mpu6050Source(
        Mpu6050Sensor(type="mpu6050", **({"rate_hz": 1000, "window": 8} | options)),
        bus_factory=lambda number: bus,
        error_timeout_s=0.05,
    )
    source.open()
    return source


def test_mpu6050_configures_the_chip_and_converts_to_g() -> None:
    bus = FakeMpu6050Bus(accel_g=lambda n: (0.5, -1.0, 1.9999))
    source = _mpu(bus, rate_hz=200)
    try:
        window = source.read().data
    finally:
        source.close()
    assert bus.registers[0x6B] == 0x00  # awake
    assert bus.registers[0x1C] == 0x00  # +-2 g
    assert bus.registers[0x19] == 4  # 1 kHz / (1 + 4) = 200 Hz
    assert bus.registers[0x1A] == 2  # 94 Hz low-pass, below 100 Hz Nyquist
    assert bus.closed
    assert window.shape == (8, 3)
    assert window.dtype == np.float32
    np.testing.assert_allclose(window, [[0.5, -1.0, 1.9999]] * 8, atol=1 / 16384)


def test_mpu6050_windows_follow_hop() -> None:
    bus = FakeMpu6050Bus(accel_g=lambda n: (n / 1000, 0.0, 0.0))
    source = _mpu(bus, window=8, hop=4)
    try:
        first, second = source.read(), source.read()
    finally:
        source.close()
    x1 = np.round(first.data[:, 0] * 1000).astype(int)
    x2 = np.round(second.data[:, 0] * 1000).astype(int)
    assert list(x1) == list(range(8))
    assert list(x2) == list(range(4, 12))
    assert (first.sequence, second.sequence) == (0, 1)


def test_mpu6050_wrong_who_am_i() -> None:
    bus = FakeMpu6050Bus(who_am_i=0x70)
    with pytest.raises(SourceError, match="WHO_AM_I=0x70, not 0x68"):
        _mpu(bus)
    assert bus.closed


def test_mpu6050_no_device_at_address_is_remote_io() -> None:
    bus = FakeMpu6050Bus(address=0x68)
    with pytest.raises(SourceError, match=r"no device answers at 0x69 .*Remote I/O error"):
        _mpu(bus, address=0x69)


def test_mpu6050_device_lost_while_sampling() -> None:
    bus = FakeMpu6050Bus()
    source = _mpu(bus)
    source.read()
    bus.fail_after = bus.samples

    def read_until_it_fails() -> None:
        for _ in range(500):
            source.read()

    with pytest.raises(SourceError, match="Remote I/O error"):
        read_until_it_fails()
    source.close()


def test_mpu6050_rate_registers() -> None:
    assert rate_registers(1000) == (0, 1, 1000.0)
    assert rate_registers(100) == (9, 3, 100.0)
    divider, _, actual = rate_registers(300)
    assert (divider, round(actual, 1)) == (2, 333.3)


def test_mpu6050_missing_smbus2_and_missing_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SourceError, match="enable I2C with raspi-config"):
        open_smbus(250)

    def no_bus(number: int) -> FakeMpu6050Bus:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", f"/dev/i2c-{number}")

    source = Mpu6050Source(Mpu6050Sensor(type="mpu6050", bus=3), bus_factory=no_bus)
    with pytest.raises(SourceError, match=r"/dev/i2c-3 does not exist; enable I2C"):
        source.open()
    monkeypatch.setitem(sys.modules, "smbus2", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgeagent\[i2c\]'"):
        open_smbus(1)


@pytest.mark.hardware
@pytest.mark.skipif(not Path("/dev/i2c-1").exists(), reason="needs a Pi with I2C and an MPU-6050")
def test_mpu6050_real_chip_measures_gravity() -> None:
    source = Mpu6050Source(Mpu6050Sensor(type="mpu6050", window=50))
    source.open()
    try:
        window = source.read().data
    finally:
        source.close()
    magnitude = float(np.linalg.norm(window.mean(axis=0)))
    assert 0.8 < magnitude < 1.2  # 1 g at rest, whatever the orientation


# --- registry ------------------------------------------------------------------------


def test_registry_covers_every_configured_source_type() -> None:
    union = typing.get_args(typing.get_args(SourceConfig)[0])
    types = {typing.get_args(model.model_fields["type"].annotation)[0] for model in union}
    assert set(SOURCES) == types


@pytest.mark.parametrize("source_type", sorted(SOURCES))
def test_every_registered_backend_imports_without_its_vendor_library(source_type: str) -> None:
    cls = source_class(source_type)
    assert cls.__name__ == SOURCES[source_type].partition(":")[2]


def test_unknown_source_type_lists_known_ones() -> None:
    with pytest.raises(
        SourceError, match=r"unknown source type 'thermal'; known: alsa, csv, images"
    ):
        source_class("thermal")


def test_importing_the_registry_imports_no_backend_or_vendor_library() -> None:
    code = (
        "import sys, edgeagent.hal.sources; "
        "print(sorted(m for m in sys.modules if m in ('cv2', 'picamera2', 'smbus2') "
        "or m.startswith(('edgeagent.hal.camera.', 'edgeagent.hal.sensor.')) "
        "and not m.endswith('.settings')))"  # the light settings models are the config's
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_open_source_returns_an_open_source(folder: Path) -> None:
    source = open_source(ImagesCamera(type="images", path=str(folder), fps=0))
    assert tuple(int(v) for v in source.read().data[0, 0]) == RED
    source.close()


def test_open_source_passes_the_backend_error_on(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        open_source(CsvSensor(type="csv", path=str(tmp_path / "missing.csv")))


# --- picamera2 with a fake camera (picamera2's own configuration rules) ----------------


def _pi_camera(width: int = 640, height: int = 480, **options: typing.Any) -> PiCamera:
    return PiCamera(type="picamera2", width=width, height=height, fps=200, **options)


def test_picamera2_fake_refuses_what_picamera2_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake is only worth its tests if a wrong configuration fails in it."""
    camera = picamera2_fake.install(monkeypatch, picamera2_fake.Platform.VC4)(0)
    sycc = picamera2_fake.ColorSpace.Sycc()
    cases = [
        ({"size": (160, 160), "format": "RGB888"}, "lores stream must be YUV"),
        ({"size": (800, 160), "format": "YUV420"}, "may not exceed main stream"),
    ]
    for lores, message in cases:
        config = camera.create_video_configuration(
            main={"size": (640, 480), "format": "RGB888"}, lores=lores, colour_space=sycc
        )
        with pytest.raises(RuntimeError, match=message):
            camera.configure(config)
    config = camera.create_video_configuration(main={"size": (640, 480)}, colour_space="sYCC")
    with pytest.raises(RuntimeError, match="Colour space has incorrect type"):
        camera.configure(config)
    pisp = picamera2_fake.install(monkeypatch, picamera2_fake.Platform.PISP)(0)
    pisp.configure(
        pisp.create_video_configuration(
            main={"size": (640, 480)}, lores={"size": (160, 160), "format": "RGB888"}
        )
    )


def test_pi_camera_settings_fit_the_lores_stream_to_the_model() -> None:
    assert lores_size_for((640, 480), (160, 160), "stretch") == (160, 160)
    assert lores_size_for((640, 480), (160, 160), "letterbox") == (160, 120)  # padded only
    assert lores_size_for((640, 480), (160, 160), "crop") == (214, 160)  # cropped only
    assert lores_size_for((1280, 720), (300, 300), "letterbox") == (300, 168)  # even
    assert lores_size_for((320, 240), (640, 640), "stretch") is None  # the ISP scales down
    fitted = _pi_camera().fitted_to_input(160, 160, "stretch")
    assert fitted.lores_size == (160, 160)
    assert _pi_camera(lores=False).fitted_to_input(160, 160, "stretch").lores_size is None
    pinned = _pi_camera(lores_size=(320, 240))
    assert pinned.fitted_to_input(160, 160, "stretch") is pinned


@pytest.mark.parametrize(
    ("platform", "fmt"),
    [(picamera2_fake.Platform.VC4, "YUV420"), (picamera2_fake.Platform.PISP, "RGB888")],
)
def test_picamera2_infers_on_the_lores_stream_and_reads_main_only_for_a_snapshot(
    monkeypatch: pytest.MonkeyPatch, platform: picamera2_fake.Platform, fmt: str
) -> None:
    cameras = picamera2_fake.install(monkeypatch, platform)
    source = PiCameraSource(_pi_camera().fitted_to_input(160, 160, "stretch"))
    source.open()
    try:
        (camera,) = cameras.opened
        assert camera.config["lores"]["format"] == fmt
        samples = [source.read() for _ in range(3)]
        assert camera.captures == {"lores": 3}, "inference never reads the main stream"
        frame = samples[-1].data
        assert (frame.shape, frame.dtype) == ((160, 160, 3), np.uint8)
        # The ISP's picture, as RGB: exact from RGB888, within YUV420's rounding otherwise.
        error = np.abs(frame.astype(int) - picamera2_fake.scene(160, 160).astype(int))
        assert error.max() <= (0 if fmt == "RGB888" else 3)
        full_frame = samples[-1].full_frame
        assert full_frame is not None
        snapshot = full_frame()
        assert snapshot.shape == (480, 640, 3)
        np.testing.assert_array_equal(snapshot, picamera2_fake.scene(640, 480))
        assert camera.captures == {"lores": 3, "main": 1}
    finally:
        source.close()
    assert camera.closed


def test_picamera2_without_lores_reads_main_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    cameras = picamera2_fake.install(monkeypatch)
    source = PiCameraSource(_pi_camera(lores=False).fitted_to_input(160, 160, "stretch"))
    source.open()
    try:
        sample = source.read()
    finally:
        source.close()
    assert cameras.opened[0].config["lores"] is None
    assert sample.data.shape == (480, 640, 3)
    assert sample.full_frame is None
    assert cameras.opened[0].captures == {"main": 1}


def test_picamera2_yuv420_conversion_handles_stride_and_yvu() -> None:
    rgb = picamera2_fake.scene(96, 64)
    for swap in (False, True):
        packed = picamera2_fake._yuv420(rgb, stride=128, full_range=True, swap=swap)
        assert packed.shape == (96, 128)
        back = yuv420_to_rgb(packed, 96, 64, swap_uv=swap)
        assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 3
    with pytest.raises(SourceError, match="should be an array of 96 rows"):
        yuv420_to_rgb(np.zeros((64, 96), np.uint8), 96, 64)


def _pi_camera_pipeline(results: list[dict[str, typing.Any]]) -> typing.Any:
    """A started pipeline of shapes-detector on a 640x480 Pi camera (install the fake
    first), publishing into `results`."""
    from edgeagent.config import parse_config
    from edgeagent.pipeline import Pipeline

    config = parse_config(
        """
pipelines:
  - name: cam
    source: {type: picamera2, width: 640, height: 480, fps: 100}
    model: shapes-detector
    accelerator: cpu
    threads: 1
"""
    ).pipelines[0]
    pipeline = Pipeline(config, lambda _name, result: results.append(result))
    pipeline.start()
    return pipeline


def test_a_pipeline_on_a_pi_camera_has_the_isp_scale_frames_to_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pipeline fits the camera to its model (shapes-detector takes 160x160), so the
    frames it prepares already have the model's size; the main stream stays unread."""
    cameras = picamera2_fake.install(monkeypatch)
    results: list[dict[str, typing.Any]] = []
    pipeline = _pi_camera_pipeline(results)
    try:
        wait_until(lambda: len(results) >= 3, timeout=20)
    finally:
        pipeline.stop()
    (camera,) = cameras.opened
    assert camera.config["lores"]["size"] == (160, 160)
    assert camera.config["lores"]["format"] == "YUV420"
    assert set(camera.captures) == {"lores"}
    assert pipeline.last is not None
    assert pipeline.last[0].data.shape == (160, 160, 3)


def test_a_model_of_another_size_swapped_in_gets_a_lores_stream_of_its_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A swap to a model with another input size opens the camera again with the lores
    stream at the new size; a swap to a model of the same size leaves the camera open."""
    from edgeagent.modelfile.catalog import describe_model

    cameras = picamera2_fake.install(monkeypatch)
    results: list[dict[str, typing.Any]] = []
    pipeline = _pi_camera_pipeline(results)
    try:
        wait_until(lambda: len(results) >= 2, timeout=20)
        pipeline.swap(describe_model("shapes-detector-ssd"))  # 160x160 as well
        wait_until(lambda: pipeline.last is not None and "ssd" in str(results[-1]), timeout=20)
        assert len(cameras.opened) == 1
        pipeline.swap(describe_model("digits-classifier"))  # 32x32
        wait_until(
            lambda: pipeline.last is not None and pipeline.last[0].data.shape == (32, 32, 3),
            timeout=20,
        )
    finally:
        pipeline.stop()
    first, second = cameras.opened
    assert first.config["lores"]["size"] == (160, 160)
    assert first.closed
    assert second.config["lores"]["size"] == (32, 32)
    assert set(second.captures) == {"lores"}


def test_a_snapshot_of_a_lores_pipeline_shows_the_main_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The `snapshot` command draws the last result on the camera's main stream, not on
    the small frame the model saw."""
    import io

    from edgeagent.commands.operations import Operations, SnapshotArgs

    picamera2_fake.install(monkeypatch)
    source = PiCameraSource(_pi_camera().fitted_to_input(160, 160, "stretch"))
    source.open()
    try:
        sample = source.read()
        result = {"detections": [{"box": [0.25, 0.25, 0.5, 0.5], "score": 0.9, "index": 0}]}

        class Agent:
            def last_output(self, _name: str) -> tuple[typing.Any, dict[str, typing.Any]]:
                return sample, result

        operations = Operations(typing.cast(typing.Any, Agent()))
        snapshot = operations.snapshot(SnapshotArgs(pipeline="cam"))
    finally:
        source.close()
    assert sample.data.shape == (160, 160, 3)
    assert Image.open(io.BytesIO(snapshot.data)).size == (640, 480)
    # Once the camera is closed (the pipeline stopped), the frame the model saw.
    after = operations.snapshot(SnapshotArgs(pipeline="cam"))
    assert Image.open(io.BytesIO(after.data)).size == (160, 160)
