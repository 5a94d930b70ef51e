"""make_preprocessor: geometry of each resize mode, colour order, quantisation, windows."""

from __future__ import annotations

import numpy as np
import pytest

from edgeagent.config import ImagePreprocess, WindowPreprocess
from edgeagent.errors import ModelError
from edgeagent.inference import TensorInfo, make_preprocessor
from edgeagent.inference import preprocess as preprocess_module
from edgeagent.inference.preprocess import RESIZERS, Resizer, default_resizer

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def image_input(
    height: int,
    width: int,
    channels: int = 3,
    *,
    dtype: str = "float32",
    scale: float = 0.0,
    zero_point: int = 0,
) -> TensorInfo:
    return TensorInfo("image", 0, (1, height, width, channels), dtype, scale, zero_point)


def window_input(
    *shape: int, dtype: str = "float32", scale: float = 0.0, zero_point: int = 0
) -> TensorInfo:
    return TensorInfo("window", 0, shape, dtype, scale, zero_point)


def uniform(height: int, width: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (height, width, 3)).copy()


def stripes(height: int, width: int) -> np.ndarray:
    """Left quarter red, middle half green, right quarter blue."""
    image = uniform(height, width, GREEN)
    image[:, : width // 4] = RED
    image[:, width - width // 4 :] = BLUE
    return image


def test_stretch_keeps_every_part_of_the_image() -> None:
    prepare = make_preprocessor(ImagePreprocess(std=(1.0,)), image_input(8, 8), "image")
    prepared = prepare(stripes(100, 200))
    assert prepared.tensor.shape == (1, 8, 8, 3)
    row = prepared.tensor[0, 4]
    assert [tuple(row[0]), tuple(row[4]), tuple(row[7])] == [RED, GREEN, BLUE]
    assert prepared.transform is not None
    np.testing.assert_allclose(
        prepared.transform.boxes_to_source(np.array([0.1, 0.2, 0.3, 0.4])), [0.1, 0.2, 0.3, 0.4]
    )


def test_crop_takes_the_centre_at_the_model_aspect() -> None:
    prepare = make_preprocessor(
        ImagePreprocess(resize="crop", std=(1.0,)), image_input(10, 10), "image"
    )
    image = uniform(100, 200, GREEN)
    image[:, :30], image[:, 170:] = RED, BLUE
    prepared = prepare(image)
    # The centre 100x100 of a 200x100 image is all green (the filter reaches 10 px beyond).
    np.testing.assert_allclose(
        prepared.tensor[0], np.broadcast_to(np.array(GREEN, np.float32), (10, 10, 3))
    )
    box = prepared.transform.boxes_to_source(np.array([0.0, 0.0, 1.0, 1.0], np.float32))
    np.testing.assert_allclose(box, [0.25, 0.0, 0.75, 1.0])


def test_letterbox_keeps_the_aspect_and_pads_with_the_mean() -> None:
    spec = ImagePreprocess(resize="letterbox", mean=(100.0, 50.0, 10.0), std=(2.0,))
    tensor = image_input(64, 64, dtype="int8", scale=0.5, zero_point=-3)
    prepared = make_preprocessor(spec, tensor, "image")(uniform(480, 640, (110, 60, 20)))
    # 640x480 fits 64x48, centred: 8 rows of bars above and below.
    content = (np.array([110, 60, 20]) - np.array([100, 50, 10])) / 2.0
    np.testing.assert_allclose(prepared.normalised[0, 8:56], np.broadcast_to(content, (48, 64, 3)))
    assert np.all(prepared.normalised[0, :8] == 0)
    assert np.all(prepared.normalised[0, 56:] == 0)
    # The bars are the mean colour: normalised 0, quantised to the zero point.
    assert np.all(prepared.tensor[0, :8] == -3)
    # A box over the whole picture area maps to the whole source image.
    box = prepared.transform.boxes_to_source(np.array([0.0, 8 / 64, 1.0, 56 / 64]))
    np.testing.assert_allclose(box, [0.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_letterbox_of_a_tall_image_pads_left_and_right() -> None:
    prepare = make_preprocessor(ImagePreprocess(resize="letterbox"), image_input(20, 20), "image")
    prepared = prepare(uniform(100, 50, (255, 255, 255)))
    assert np.all(prepared.normalised[0, :, :5] == 0)
    assert np.all(prepared.normalised[0, :, 15:] == 0)
    np.testing.assert_allclose(prepared.normalised[0, :, 5:15], 1.0)
    box = prepared.transform.boxes_to_source(np.array([0.25, 0.0, 0.75, 1.0]))
    np.testing.assert_allclose(box, [0.0, 0.0, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize(
    ("color", "expected"),
    [
        ("rgb", [10, 100, 200]),
        ("bgr", [200, 100, 10]),
        ("gray", [0.299 * 10 + 0.587 * 100 + 0.114 * 200] * 3),
    ],
)
def test_colour_order(color: str, expected: list[float]) -> None:
    prepare = make_preprocessor(
        ImagePreprocess(color=color, std=(1.0,)), image_input(4, 4), "image"
    )
    prepared = prepare(uniform(16, 16, (10, 100, 200)))
    np.testing.assert_allclose(prepared.tensor[0, 2, 2], expected, rtol=1e-5)


def test_one_channel_model_gets_luminance_unless_told_otherwise() -> None:
    prepared = make_preprocessor(None, image_input(4, 4, channels=1), "image")(
        uniform(8, 8, (0, 255, 0))
    )
    assert prepared.tensor.shape == (1, 4, 4, 1)
    np.testing.assert_allclose(prepared.tensor, 0.587, rtol=1e-5)
    with pytest.raises(ModelError, match="use color: gray"):
        make_preprocessor(ImagePreprocess(color="rgb"), image_input(4, 4, channels=1), "image")


def test_quantisation_matches_a_hand_computation_and_clips() -> None:
    spec = ImagePreprocess(mean=(127.5,), std=(127.5,))
    tensor = image_input(2, 2, dtype="int8", scale=0.004, zero_point=-5)
    prepare = make_preprocessor(spec, tensor, "image")
    for value in (0, 60, 127, 128, 200, 255):
        prepared = prepare(uniform(6, 6, (value, value, value)))
        x = (value - 127.5) / 127.5
        # Python's round() also rounds halves to even, as LiteRT does.
        expected = min(max(round(float(np.float32(x) / np.float32(0.004))) - 5, -128), 127)
        assert prepared.tensor.dtype == np.int8
        assert np.all(prepared.tensor == expected), (value, prepared.tensor[0, 0, 0], expected)
        np.testing.assert_allclose(prepared.normalised, x, rtol=1e-6)


def test_default_spec_suits_a_uint8_model_with_scale_one_over_255() -> None:
    tensor = image_input(3, 3, dtype="uint8", scale=1 / 255, zero_point=0)
    prepared = make_preprocessor(None, tensor, "image")(uniform(9, 9, (0, 128, 255)))
    np.testing.assert_array_equal(prepared.tensor[0, 1, 1], [0, 128, 255])
    int8 = image_input(3, 3, dtype="int8", scale=1 / 255, zero_point=-128)
    prepared = make_preprocessor(None, int8, "image")(uniform(9, 9, (0, 128, 255)))
    np.testing.assert_array_equal(prepared.tensor[0, 1, 1], [-128, 0, 127])


def test_float_models_get_float32() -> None:
    prepared = make_preprocessor(None, image_input(4, 4), "image")(uniform(8, 8, (51, 102, 255)))
    assert prepared.tensor.dtype == np.float32
    np.testing.assert_allclose(prepared.tensor[0, 0, 0], [0.2, 0.4, 1.0], rtol=1e-6)


@pytest.mark.parametrize(
    "shape",
    [(1, 10), (1, 8, 8, 4), (2, 8, 8, 3), (1, 8, 8)],
)
def test_an_image_source_needs_an_image_input(shape: tuple[int, ...]) -> None:
    tensor = TensorInfo("in", 0, shape, "float32", 0.0, 0)
    with pytest.raises(
        ModelError,
        match=rf"\(height, width, 3\).*{list(shape)}".replace("[", r"\[").replace("]", r"\]"),
    ):
        make_preprocessor(None, tensor, "image")


def test_spec_errors_are_raised_when_the_preprocessor_is_made() -> None:
    with pytest.raises(ModelError, match="mean has 2 values but the model input has 3"):
        make_preprocessor(ImagePreprocess(mean=(1.0, 2.0)), image_input(4, 4), "image")
    with pytest.raises(ModelError, match="std contains 0"):
        make_preprocessor(ImagePreprocess(std=(0.0,)), image_input(4, 4), "image")
    with pytest.raises(ModelError, match="int16"):
        make_preprocessor(None, image_input(4, 4, dtype="int16"), "image")
    with pytest.raises(ModelError, match="window preprocess spec was given for an image"):
        make_preprocessor(WindowPreprocess(), image_input(4, 4), "image")


def test_a_short_window_is_padded_with_zeros_at_the_front() -> None:
    spec = WindowPreprocess(mean=(1.0, 2.0), std=(2.0, 4.0))
    prepare = make_preprocessor(spec, window_input(1, 5, 2), "window")
    window = np.array([[3.0, 6.0], [5.0, 10.0]], np.float32)
    prepared = prepare(window)
    assert prepared.transform is None
    expected = (np.array([[0, 0], [0, 0], [0, 0], [3, 6], [5, 10]], np.float32) - [1, 2]) / [2, 4]
    np.testing.assert_allclose(prepared.tensor[0], expected)
    assert prepared.tensor.shape == (1, 5, 2)


def test_a_long_window_keeps_its_last_samples_and_quantises() -> None:
    tensor = window_input(1, 3, 1, dtype="int8", scale=0.1, zero_point=2)
    prepared = make_preprocessor(None, tensor, "window")(
        np.arange(10, dtype=np.float32).reshape(10, 1) / 10
    )
    np.testing.assert_array_equal(prepared.tensor[0, :, 0], [9, 10, 11])
    np.testing.assert_allclose(prepared.normalised[0, :, 0], [0.7, 0.8, 0.9], rtol=1e-6)


def test_a_flat_window_input_is_sample_major() -> None:
    prepare = make_preprocessor(None, window_input(1, 6), "window")
    prepared = prepare(np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.float32))
    np.testing.assert_array_equal(prepared.tensor, [[3, 4, 5, 6, 7, 8]])
    with pytest.raises(ModelError, match=r"does not split into the 4 channel"):
        prepare(np.zeros((4, 4), np.float32))


def test_a_conv_window_input_takes_a_trailing_one() -> None:
    prepared = make_preprocessor(None, window_input(1, 2, 3, 1), "window")(
        np.ones((2, 3), np.float32)
    )
    assert prepared.tensor.shape == (1, 2, 3, 1)


def test_window_inputs_that_do_not_fit() -> None:
    with pytest.raises(ModelError, match=r"\(samples, channels\).*\[1, 8, 8, 3\]"):
        make_preprocessor(None, window_input(1, 8, 8, 3), "window")
    with pytest.raises(ModelError, match="mean has 2 values but the model input has 3"):
        make_preprocessor(WindowPreprocess(mean=(0.0, 1.0)), window_input(1, 8, 3), "window")
    prepare = make_preprocessor(None, window_input(1, 8, 3), "window")
    with pytest.raises(ModelError, match=r"sensor gives 2 channel\(s\).*takes 3"):
        prepare(np.zeros((8, 2), np.float32))
    with pytest.raises(ModelError, match="image preprocess spec was given for a sensor"):
        make_preprocessor(ImagePreprocess(), window_input(1, 8, 3), "window")


def test_pillow_shrinks_by_whole_factors_to_whole_block_means() -> None:
    """640x480 -> 160x160 is 4x3 blocks: Pillow's two-step resize gives each block's mean,
    where a one-step bilinear filter also weighs in neighbours."""
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    prepare = make_preprocessor(
        ImagePreprocess(std=(1.0,)), image_input(160, 160), "image", resizer="pillow"
    )
    got = prepare(frame).tensor[0]
    blocks = frame.astype(np.float64).reshape(160, 3, 160, 4, 3).mean(axis=(1, 3))
    assert np.abs(got - blocks).max() <= 0.5 + 1e-6  # Pillow rounds the mean to uint8


@pytest.mark.parametrize("resizer", RESIZERS)
@pytest.mark.parametrize("size", [(160, 160), (224, 224), (96, 128), (300, 300)])
def test_every_resizer_filters_out_detail_finer_than_the_model_sees(
    resizer: Resizer, size: tuple[int, int]
) -> None:
    """One-pixel black and white lines (the finest detail a frame can hold) average to mid
    grey when shrunk: a resize that only picked or interpolated between nearby pixels would
    give stripes or a flat black or white (aliasing)."""
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, ::2] = 255
    frame[::2] = 255 - frame[::2]  # a checkerboard: fine in both directions
    height, width = size
    prepare = make_preprocessor(
        ImagePreprocess(std=(1.0,)), image_input(height, width), "image", resizer=resizer
    )
    got = prepare(frame).tensor[0]
    assert np.abs(got - 127.5).max() <= 40, (got.min(), got.max())


def test_opencv_is_the_default_resizer_when_it_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cv2", reason="the dev extra installs OpenCV; this needs it")
    assert default_resizer() == "opencv"
    monkeypatch.setattr(preprocess_module, "_cv2", lambda: None)
    assert default_resizer() == "pillow"
    with pytest.raises(ModelError, match=r"edgeagent\[opencv\]"):
        make_preprocessor(None, image_input(4, 4), "image", resizer="opencv")
    # Without OpenCV the default still works, through Pillow.
    prepared = make_preprocessor(None, image_input(4, 4), "image")(uniform(8, 8, (0, 255, 0)))
    np.testing.assert_allclose(prepared.tensor[0, 1, 1], [0.0, 1.0, 0.0])


@pytest.mark.parametrize("color", ["rgb", "bgr"])
@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
@pytest.mark.parametrize(
    ("dtype", "scale", "zero_point"), [("int8", 1 / 255, -128), ("uint8", 1 / 255, 0)]
)
def test_the_integer_path_gives_the_bytes_the_float_arithmetic_gives(
    color: str, resize: str, dtype: str, scale: float, zero_point: int
) -> None:
    """When quantising a pixel is adding a whole number, no float arithmetic runs: the
    tensor equals quantising the float values, and `normalised` is derived from it."""
    frame = np.random.default_rng(5).integers(0, 256, (48, 96, 3), dtype=np.uint8)
    tensor = image_input(24, 24, dtype=dtype, scale=scale, zero_point=zero_point)
    spec = ImagePreprocess(color=color, resize=resize)  # type: ignore[arg-type]
    prepared = make_preprocessor(spec, tensor, "image", resizer="pillow")(frame)
    assert prepared.exact is None  # the integer path ran
    # The float arithmetic on the same resized pixels, done here by hand.
    as_floats = make_preprocessor(
        ImagePreprocess(resize=resize, std=(1.0,)),
        image_input(24, 24),
        "image",
        resizer="pillow",
    )
    pixels = as_floats(frame).tensor[0]
    if color == "bgr":
        pixels = pixels[..., ::-1]
    expected = tensor.quantize((pixels / np.float32(255))[np.newaxis])
    if resize == "letterbox":  # 96x48 into 24x24: 6 rows of bars above and below
        expected[0, :6] = expected[0, 18:] = zero_point
    np.testing.assert_array_equal(prepared.tensor, expected)
    assert prepared.tensor.dtype == np.dtype(dtype)
    assert prepared.tensor.flags.c_contiguous
    np.testing.assert_allclose(prepared.normalised, tensor.dequantize(expected))


def test_a_quantisation_that_rounds_keeps_the_float_path() -> None:
    # mean 127.5: every pixel lands on a half, which rounds to even: no single offset.
    spec = ImagePreprocess(mean=(127.5,), std=(127.5,))
    tensor = image_input(4, 4, dtype="int8", scale=1 / 127.5, zero_point=-1)
    prepared = make_preprocessor(spec, tensor, "image")(uniform(8, 8, (2, 128, 255)))
    assert prepared.exact is not None
    values = np.array([2, 128, 255], np.float32)
    expected = tensor.quantize((values - np.float32(127.5)) / np.float32(127.5))
    np.testing.assert_array_equal(prepared.tensor[0, 0, 0], expected)
    offsets = expected.astype(int) - values.astype(int)
    assert len(set(offsets)) > 1  # what rules the integer path out


@pytest.mark.parametrize("resizer", ["opencv", "pillow"])
@pytest.mark.parametrize("resize", ["stretch", "crop", "letterbox"])
@pytest.mark.parametrize(
    ("dtype", "scale", "zero_point"), [("int8", 1 / 255, -128), ("uint8", 1 / 128, 0)]
)
def test_the_fast_resizes_stay_close_to_the_one_step_resize(
    resizer: Resizer, resize: str, dtype: str, scale: float, zero_point: int
) -> None:
    """Same shape, dtype and transform as the one-step bilinear resize, and values within a
    few quantisation steps on a natural-looking frame (a smooth gradient plus shapes)."""
    yy, xx = np.mgrid[0:480, 0:640]
    frame = np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) * 255 // 1118], axis=2)
    frame = frame.astype(np.uint8)
    frame[100:200, 300:420] = (220, 60, 50)
    tensor = image_input(224, 224, dtype=dtype, scale=scale, zero_point=zero_point)
    spec = ImagePreprocess(resize=resize)  # type: ignore[arg-type]
    fast = make_preprocessor(spec, tensor, "image", resizer=resizer)(frame)
    exact = make_preprocessor(spec, tensor, "image", resizer="one-step")(frame)
    assert fast.tensor.shape == exact.tensor.shape == (1, 224, 224, 3)
    assert fast.tensor.dtype == exact.tensor.dtype == np.dtype(dtype)
    assert fast.transform == exact.transform
    difference = np.abs(fast.tensor.astype(np.int32) - exact.tensor.astype(np.int32))
    assert np.mean(difference) < 1.5
    assert np.percentile(difference, 99) <= 8  # only along the shape's hard edges


@pytest.mark.parametrize("resize", ["stretch", "crop", "letterbox"])
def test_a_frame_already_at_the_model_size_is_used_as_it_is(resize: str) -> None:
    # What a Pi camera's lores stream delivers: every resize mode is the identity.
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    spec = ImagePreprocess(resize=resize)  # type: ignore[arg-type]
    prepared = make_preprocessor(spec, image_input(48, 64), "image")(frame)
    np.testing.assert_array_equal(prepared.normalised[0], frame.astype(np.float32) / 255)
    assert prepared.transform is not None
    boxes = np.array([[0.1, 0.2, 0.5, 0.9]], np.float32)
    np.testing.assert_array_equal(prepared.transform.boxes_to_source(boxes), boxes)
