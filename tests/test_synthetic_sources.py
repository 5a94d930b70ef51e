"""The synthetic camera and vibration sensor: deterministic, well-formed, paced, faulty
on demand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgeagent.config import SyntheticCamera as CameraConfig
from edgeagent.config import SyntheticVibration as VibrationConfig
from edgeagent.errors import SourceError
from edgeagent.hal.camera.synthetic import LABELS, ShapeScene, SyntheticCamera
from edgeagent.hal.sensor.synthetic_vibration import (
    FAULTS,
    SyntheticVibration,
    VibrationGenerator,
)


class FakeClock:
    """A monotonic clock that only moves when the source sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


# --- camera ----------------------------------------------------------------------------


def test_same_seed_gives_same_frames_and_other_seed_differs() -> None:
    a, b = ShapeScene(320, 240, 4, seed=7), ShapeScene(320, 240, 4, seed=7)
    other = ShapeScene(320, 240, 4, seed=8)
    for t in (0, 1, 57):
        image_a, boxes_a = a.render(t)
        image_b, boxes_b = b.render(t)
        assert np.array_equal(image_a, image_b)
        assert boxes_a == boxes_b
    assert not np.array_equal(a.render(3)[0], other.render(3)[0])


def test_render_is_random_access() -> None:
    scene = ShapeScene(320, 240, 3, seed=1)
    later = scene.render(40)[0].copy()
    scene.render(3)
    assert np.array_equal(scene.render(40)[0], later)


def test_frame_shape_dtype_and_boxes_inside_image() -> None:
    scene = ShapeScene(640, 480, 5, seed=3)
    seen = set()
    for t in range(0, 600, 7):
        image, boxes = scene.render(t)
        assert image.shape == (480, 640, 3)
        assert image.dtype == np.uint8
        assert len(boxes) <= 5
        for truth in boxes:
            seen.add(truth["label"])
            x0, y0, x1, y1 = truth["box"]
            assert 0 <= x0 < x1 <= 1
            assert 0 <= y0 < y1 <= 1
            side = max((x1 - x0) * 640, (y1 - y0) * 480)
            assert 0.07 * 480 <= side <= 0.31 * 480
    assert seen <= set(LABELS)
    assert len(seen) >= 2


def test_boxes_cover_the_drawn_shapes() -> None:
    """Inside each box the shape's colour dominates; just outside it the background does."""
    scene = ShapeScene(640, 480, 1, seed=11)
    checked = 0
    for t in range(0, 400, 13):
        image, boxes = scene.render(t)
        if not boxes:
            continue
        x0, y0, x1, y1 = (
            round(v * s) for v, s in zip(boxes[0]["box"], (640, 480, 640, 480), strict=True)
        )
        inside = image[y0:y1, x0:x1].reshape(-1, 3).astype(int)
        colour = np.median(inside, axis=0)
        matches = np.all(np.abs(inside - colour) <= 1, axis=1)
        # A square fills its box; a circle ~79 %, a triangle ~50 %.
        assert matches.mean() >= 0.45
        ring = np.concatenate(
            [
                image[max(y0 - 2, 0) : y0, x0:x1].reshape(-1, 3),
                image[y1 : y1 + 2, x0:x1].reshape(-1, 3),
            ]
        ).astype(int)
        if len(ring):
            assert np.all(np.abs(ring - colour) <= 1, axis=1).mean() < 0.2
        checked += 1
    assert checked >= 5


def test_shapes_move_smoothly() -> None:
    scene = ShapeScene(640, 480, 1, seed=5)
    previous = None
    for t in range(200):
        _, boxes = scene.render(t)
        if boxes and previous:
            step = np.abs(np.array(boxes[0]["box"]) - np.array(previous[0]["box"]))
            assert step.max() < 0.03  # a few pixels per frame, bounces included
        previous = boxes


def test_camera_samples_are_sequenced_with_truth() -> None:
    camera = SyntheticCamera(CameraConfig(type="synthetic", width=320, height=240, fps=0))
    camera.open()
    samples = [camera.read() for _ in range(3)]
    camera.close()
    assert [s.sequence for s in samples] == [0, 1, 2]
    for sample in samples:
        assert sample.data.shape == (240, 320, 3)
        assert sample.truth is not None
        assert isinstance(sample.truth["boxes"], list)
        assert sample.capture_s >= 0
    scene = ShapeScene(320, 240, 3, seed=0)
    assert np.array_equal(samples[2].data, scene.render(2)[0])


def test_camera_without_fps_never_sleeps() -> None:
    clock = FakeClock()
    config = CameraConfig(type="synthetic", width=64, height=48, fps=0)
    camera = SyntheticCamera(config, clock=clock, sleep=clock.sleep)
    camera.open()
    for _ in range(10):
        camera.read()
    assert clock.sleeps == []


def test_camera_paces_to_fps_on_a_fixed_schedule() -> None:
    clock = FakeClock()
    config = CameraConfig(type="synthetic", width=64, height=48, fps=20)
    camera = SyntheticCamera(config, clock=clock, sleep=clock.sleep)
    camera.open()
    start = clock.now
    reads = []
    for _ in range(6):
        camera.read()
        reads.append(clock.now)
        clock.now += 0.01  # the consumer's work between reads must not add drift
    assert reads == pytest.approx([start + i / 20 for i in range(6)])
    due = [camera.due_at(i) for i in range(6)]
    assert np.diff(due) == pytest.approx([0.05] * 5)


def test_camera_read_before_open_is_an_error() -> None:
    camera = SyntheticCamera(CameraConfig(type="synthetic"))
    with pytest.raises(SourceError, match="open"):
        camera.read()


# --- vibration -------------------------------------------------------------------------


def _band_energy(window: np.ndarray, rate: float, low: float, high: float) -> float:
    centred = window - window.mean(axis=0)
    spectrum = np.abs(np.fft.rfft(centred * np.hanning(len(window))[:, None], axis=0)) ** 2
    freqs = np.fft.rfftfreq(len(window), 1 / rate)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum())


def test_generator_is_deterministic_and_well_formed() -> None:
    a = VibrationGenerator(1000.0, seed=3)
    b = VibrationGenerator(1000.0, seed=3)
    for fault in (None, *FAULTS):
        wa, wb = a.window(256, fault), b.window(256, fault)
        assert wa.shape == (256, 3)
        assert wa.dtype == np.float32
        assert np.array_equal(wa, wb)
    assert not np.array_equal(VibrationGenerator(1000.0, seed=4).window(256), a.window(256))


def test_imbalance_raises_the_shaft_harmonic() -> None:
    normal, faulty = [], []
    for seed in range(10):
        generator = VibrationGenerator(1000.0, seed)
        shaft = generator.shaft_hz
        normal.append(_band_energy(generator.window(1024), 1000, shaft - 4, shaft + 4))
        faulty.append(_band_energy(generator.window(1024, "imbalance"), 1000, shaft - 4, shaft + 4))
    assert np.median(np.array(faulty) / np.array(normal)) > 3


def test_bearing_fault_adds_high_frequency_energy() -> None:
    ratios = []
    for seed in range(10):
        generator = VibrationGenerator(1000.0, seed)
        normal = _band_energy(generator.window(512), 1000, 200, 500)
        faulty = _band_energy(generator.window(512, "bearing"), 1000, 200, 500)
        ratios.append(faulty / normal)
    assert np.median(ratios) > 3


def test_looseness_adds_harmonics() -> None:
    ratios = []
    for seed in range(10):
        generator = VibrationGenerator(1000.0, seed)
        shaft = generator.shaft_hz
        normal = _band_energy(generator.window(1024), 1000, 3.5 * shaft, 11 * shaft)
        faulty = _band_energy(generator.window(1024, "looseness"), 1000, 3.5 * shaft, 11 * shaft)
        ratios.append(faulty / normal)
    assert np.median(ratios) > 2


def test_sensor_windows_hops_and_fault_rate() -> None:
    config = VibrationConfig(
        type="synthetic-vibration", window=64, hop=16, fault_rate=0.3, realtime=False, seed=2
    )
    sensor = SyntheticVibration(config)
    sensor.open()
    samples = [sensor.read() for _ in range(600)]
    sensor.close()
    assert [s.sequence for s in samples[:3]] == [0, 1, 2]
    assert all(s.data.shape == (64, 3) and s.data.dtype == np.float32 for s in samples)
    faults = [s.truth["fault"] for s in samples if s.truth]
    assert set(faults) <= {None, *FAULTS}
    assert 0.2 < np.mean([f is not None for f in faults]) < 0.4
    # With an unchanged condition, consecutive windows overlap by window - hop samples.
    for prev, cur in itertools.pairwise(samples):
        assert prev.truth is not None
        assert cur.truth is not None
        if prev.truth["fault"] == cur.truth["fault"]:
            assert np.array_equal(prev.data[16:], cur.data[:-16])
            break
    else:
        pytest.fail("no two consecutive windows shared a condition")


def test_injected_faults_are_reported_and_change_the_signal() -> None:
    config = VibrationConfig(type="synthetic-vibration", fault_rate=0.0, realtime=False)
    sensor = SyntheticVibration(config)
    sensor.open()
    normal = sensor.read()
    sensor.inject("bearing", windows=2)
    faulty = [sensor.read(), sensor.read()]
    after = sensor.read()
    assert normal.truth == {"fault": None}
    assert [s.truth for s in faulty] == [{"fault": "bearing"}] * 2
    assert after.truth == {"fault": None}
    high = [_band_energy(s.data, 1000, 200, 500) for s in (normal, *faulty)]
    assert min(high[1:]) > 3 * high[0]
    with pytest.raises(ValueError, match="unknown fault"):
        sensor.inject("rust")


def test_sensor_realtime_pacing_follows_rate() -> None:
    clock = FakeClock()
    config = VibrationConfig(type="synthetic-vibration", rate_hz=1000, window=100, hop=50)
    sensor = SyntheticVibration(config, clock=clock, sleep=clock.sleep)
    sensor.open()
    start = clock.now
    times = []
    for _ in range(4):
        sensor.read()
        times.append(clock.now)
    # The first window is due once 100 samples exist, then one every 50 samples.
    assert times == pytest.approx([start + 0.1, start + 0.15, start + 0.2, start + 0.25])


def test_sensor_without_realtime_never_sleeps() -> None:
    clock = FakeClock()
    config = VibrationConfig(type="synthetic-vibration", realtime=False)
    sensor = SyntheticVibration(config, clock=clock, sleep=clock.sleep)
    sensor.open()
    for _ in range(5):
        sensor.read()
    assert clock.sleeps == []


@pytest.mark.parametrize("label", LABELS)
def test_shape_stamps_paint_exactly_the_shape_mask(label: str) -> None:
    """The renderer paints each shape as rectangles (runs of rows); they must cover the
    shape's pixel mask exactly, and the truth box is the mask's extent, at every size."""
    from edgeagent.hal.camera.synthetic import _mask, _stamp

    for size in range(3, 150):
        mask = _mask(label, size)  # type: ignore[arg-type]
        stamp = _stamp(label, size)  # type: ignore[arg-type]
        painted = np.zeros((size, size), dtype=bool)
        for top, bottom, left, right in stamp.blocks:
            assert not painted[top:bottom, left:right].any()  # no pixel painted twice
            painted[top:bottom, left:right] = True
        np.testing.assert_array_equal(painted, mask)
        rows, cols = np.nonzero(mask)
        assert stamp.extent == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
