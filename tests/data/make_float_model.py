"""Recipe of tests/data/float-patterns.tflite, a small FLOAT32 image classifier that the
`edgeagent model quantize` and `model inspect` tests use (the bundled models are int8).

It tells four synthetic 16x16 gray patterns apart: a horizontal bar, a vertical bar, a
diagonal and a ring, drawn at random positions with noise by `pattern()` (also used by the
tests to make calibration images). Run it once in an environment with the `build`
extra (TensorFlow) and commit the output; it is deterministic up to TensorFlow's kernels:

    .venv-build/bin/python tests/data/make_float_model.py

The network: CONV_2D 3x3x8 + RELU, MAX_POOL_2D, CONV_2D 3x3x16 + RELU, MEAN (global
average), FULLY_CONNECTED 4, SOFTMAX. Input float32 [1, 16, 16, 1] in [0, 1] (pixel / 255),
output float32 [1, 4] probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 16
LABELS = ("horizontal", "vertical", "diagonal", "ring")
HERE = Path(__file__).resolve().parent


def pattern(label: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [16, 16] gray image of class `label`, light strokes on a dark, noisy field."""
    image = rng.normal(30, 12, size=(SIZE, SIZE))
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    at = int(rng.integers(4, SIZE - 4))
    width = int(rng.integers(1, 3))
    if label == 0:
        mask = np.abs(ys - at) < width
    elif label == 1:
        mask = np.abs(xs - at) < width
    elif label == 2:
        mask = np.abs((ys - xs) - (at - SIZE // 2)) < width
    else:
        cy, cx = rng.integers(6, SIZE - 6, size=2)
        radius = np.hypot(ys - cy, xs - cx)
        mask = np.abs(radius - rng.uniform(3, 5)) < 0.5 + width * 0.4
    image[mask] = rng.normal(210, 20, size=int(mask.sum()))
    return np.clip(image, 0, 255).astype(np.uint8)


def dataset(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(LABELS), size=count)
    images = np.stack([pattern(int(k), rng) for k in labels])
    return (images[..., None].astype(np.float32) / 255.0), labels


def main() -> None:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    x_train, y_train = dataset(4000, seed=1)
    x_test, y_test = dataset(500, seed=2)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((SIZE, SIZE, 1), batch_size=1, name="image"),
            tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(2),
            tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(len(LABELS)),
            tf.keras.layers.Softmax(),
        ]
    )
    train = tf.keras.Sequential([tf.keras.Input((SIZE, SIZE, 1)), *model.layers])
    train.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    train.fit(x_train, y_train, epochs=6, batch_size=32, verbose=2)
    _, accuracy = train.evaluate(x_test, y_test, verbose=0)
    print(f"float test accuracy: {accuracy:.4f}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    data = converter.convert()
    out = HERE / "float-patterns.tflite"
    out.write_bytes(data)
    print(f"wrote {out} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
