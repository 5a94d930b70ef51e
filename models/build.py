"""Builds the bundled models: train in Keras, convert to full int8, measure, describe.

Run on a workstation with the `build` extra (TensorFlow), never on a device:

    python models/build.py [--only NAME]

Every step is seeded, so a rebuild gives the same data sets and (up to TensorFlow's CPU
kernels) the same models. Each model is measured twice, as the float Keras model and as
the int8 .tflite run by LiteRT, and both numbers go into its manifest and models/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality as q  # noqa: E402  (models/ is not a package; the tests import it the same way)

BUNDLED = HERE / "bundled"
BENCH = HERE / "bench"
SAMPLES = HERE / "samples"
SEED = 20240601


def _tf() -> Any:
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(2)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    return tf


# --- conversion and bookkeeping ------------------------------------------------------


def convert_int8(model: Any, representative: Callable[[], Iterator[list[np.ndarray]]]) -> bytes:
    """Full-integer conversion: int8 weights, activations, inputs and outputs."""
    tf = _tf()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def write_reference(
    name: str, folder: Path, runner: q.TFLiteRunner, x: np.ndarray, atol: float | None = None
) -> dict[str, Any]:
    """Stores a quantised input and the int8 model's de-quantised first output for it."""
    tensor = runner.quantize_input(x[None])
    output = runner.invoke_raw(tensor)[0]
    np.save(folder / f"{name}.ref-input.npy", tensor)
    np.save(folder / f"{name}.ref-output.npy", output)
    if atol is None:
        # Two quantisation steps: other CPUs' int8 kernels may round an accumulator
        # differently.
        atol = 2.0 * float(runner.outputs[0]["quantization"][0]) + 1e-6
    return {
        "input": f"{name}.ref-input.npy",
        "output": f"{name}.ref-output.npy",
        "atol": round(atol, 6),
    }


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    print(f"wrote {path.relative_to(HERE.parent)}")


def invoke_ms(path: Path, repeats: int = 50) -> float:
    """Median single-thread invoke time of a model, on this machine."""
    runner = q.TFLiteRunner(path, threads=1)
    tensor = np.zeros(runner.input["shape"], dtype=runner.input["dtype"])
    runner.interpreter.set_tensor(runner.input["index"], tensor)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.interpreter.invoke()
        times.append(time.perf_counter() - started)
    return 1000.0 * float(np.median(times))


def _keras_predict(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=256, verbose=0))


# --- digits-classifier -----------------------------------------------------------------


def _digit_augment(pixels8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A digit as a person might photograph it: drawn at some size, shifted a little,
    and half the time dark on light (ink on paper) rather than light on dark."""
    picture = q.digit_picture(pixels8, int(rng.choice([24, 32, 48, 64, 96])))
    x = q.digit_input(picture)
    dy, dx = rng.integers(-2, 3, size=2)
    x = np.roll(x, (dy, dx), axis=(0, 1))
    if rng.random() < 0.5:
        x = 1.0 - x
    return x


def build_digits() -> None:
    tf = _tf()
    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    split = q.digits_split(seed=0)
    x_train = np.stack([_digit_augment(p, rng) for p in split.train_images for _ in range(4)])
    y_train = np.repeat(split.train_labels, 4)
    x_test = np.stack([q.digit_input(q.digit_picture(p)) for p in split.test_images])
    x_test_inv = 1.0 - x_test

    layers = tf.keras.layers
    model = tf.keras.Sequential(
        [
            layers.Input((q.DIGIT_SIZE, q.DIGIT_SIZE, 1)),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dropout(0.3),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=12, batch_size=64, verbose=2, shuffle=True)

    def representative() -> Iterator[list[np.ndarray]]:
        for x in x_train[rng.choice(len(x_train), 200, replace=False)]:
            yield [x[None].astype(np.float32)]

    name = "digits-classifier"
    path = BUNDLED / f"{name}.tflite"
    path.write_bytes(convert_int8(model, representative))
    runner = q.TFLiteRunner(path)
    acc_float = q.accuracy(_keras_predict(model, x_test), split.test_labels)
    acc_int8 = q.accuracy(runner.predict(x_test)[0], split.test_labels)
    acc_inv_int8 = q.accuracy(runner.predict(x_test_inv)[0], split.test_labels)
    print(f"{name}: accuracy float {acc_float:.4f} int8 {acc_int8:.4f}")

    from PIL import Image

    SAMPLES.mkdir(exist_ok=True)
    for i in range(3):
        label = int(split.test_labels[i])
        picture = q.digit_picture(split.test_images[i])
        Image.fromarray(picture, mode="L").save(SAMPLES / f"digit-{label}-{i}.png")

    write_manifest(
        BUNDLED / f"{name}.yaml",
        {
            "name": name,
            "version": "1.0.0",
            "description": (
                "Handwritten digit 0-9 from a grayscale picture (scikit-learn digits). "
                "Input: the picture stretched to 32x32, pixel / 255. Trained on light "
                "strokes on dark and on dark ink on light, drawn at several sizes."
            ),
            "task": {"type": "classification", "top_k": 3},
            "labels": [str(d) for d in range(10)],
            "preprocess": {
                "type": "image",
                "resize": "stretch",
                "color": "gray",
                "mean": [0.0],
                "std": [255.0],
            },
            "reference": write_reference(name, BUNDLED, runner, x_test[0]),
            "quality": {
                "accuracy_float": round(acc_float, 4),
                "accuracy_int8": round(acc_int8, 4),
                "accuracy_inverted_int8": round(acc_inv_int8, 4),
                "test_samples": float(len(x_test)),
            },
        },
    )


# --- shapes-detector -------------------------------------------------------------------

GRID = q.DETECTOR_GRID
NUM_CLASSES = len(q.SHAPE_LABELS)


def _detector_targets(boxes: list[dict[str, Any]]) -> np.ndarray:
    """Each truth box goes to the grid cell holding its centre: (cx, cy, w, h, one-hot)."""
    target = np.zeros((GRID * GRID, 4 + NUM_CLASSES), dtype=np.float32)
    # Bigger boxes first, so a small shape sharing a cell with a big one wins the cell.
    for truth in sorted(boxes, key=lambda t: -(t["box"][2] - t["box"][0])):
        x0, y0, x1, y1 = truth["box"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        cell = min(int(cy * GRID), GRID - 1) * GRID + min(int(cx * GRID), GRID - 1)
        target[cell, :4] = (cx, cy, x1 - x0, y1 - y0)
        target[cell, 4:] = 0
        target[cell, 4 + q.SHAPE_LABELS.index(truth["label"])] = 1
    return target


def _detector_data(
    seeds: range, frames: int, rng: np.random.Generator, mixed_resize: bool
) -> tuple[np.ndarray, np.ndarray, list[list[dict[str, Any]]]]:
    images, targets, truths = [], [], []
    size = q.DETECTOR_SIZE
    for frame, boxes in q.shape_frames(seeds, frames, shapes=int(rng.integers(3, 7))):
        if mixed_resize and rng.random() < 0.4:
            # The agent may shrink frames by area averaging instead of bilinear sampling.
            small = q.resize_area(frame, size, size)
        else:
            small = q.resize_bilinear(frame, size, size)
        images.append(np.round(small).astype(np.uint8))
        targets.append(_detector_targets(boxes))
        truths.append(boxes)
    return np.stack(images), np.stack(targets), truths


def _detector_model(tf: Any) -> Any:
    layers = tf.keras.layers
    size = q.DETECTOR_SIZE

    def block(x: Any, filters: int, stride: int) -> Any:
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU(6.0)(x)

    inputs = layers.Input((size, size, 3))
    x = block(inputs, 16, 2)  # 80
    x = block(x, 24, 2)  # 40
    x = block(x, 24, 1)
    x = block(x, 48, 2)  # 20
    x = block(x, 48, 1)
    x = block(x, 96, 2)  # 10
    x = block(x, 96, 1)
    raw = layers.Conv2D(4 + NUM_CLASSES, 1)(x)
    raw = layers.Reshape((GRID * GRID, 4 + NUM_CLASSES))(raw)
    # Centres are offsets within the cell; sizes and scores are sigmoids, so the whole
    # head lies in [0, 1] and shares one int8 scale without losing precision.
    cells = np.stack(np.meshgrid(np.arange(GRID), np.arange(GRID)), axis=-1)
    cells = cells.reshape(1, GRID * GRID, 2).astype(np.float32)
    sig = layers.Activation("sigmoid")(raw)
    xy = layers.Lambda(lambda s: (s[..., :2] + cells) / GRID, name="centres")(sig)
    rest = layers.Lambda(lambda s: s[..., 2:], name="sizes_scores")(sig)
    head = layers.Concatenate(axis=-1, name="head")([xy, rest])
    return tf.keras.Model(inputs, head, name="shapes_detector")


def _detector_loss(tf: Any) -> Callable[[Any, Any], Any]:
    def loss(y_true: Any, y_pred: Any) -> Any:
        positive = tf.reduce_max(y_true[..., 4:], axis=-1)
        count = tf.maximum(tf.reduce_sum(positive), 1.0)
        p = tf.clip_by_value(y_pred[..., 4:], 1e-6, 1 - 1e-6)
        t = y_true[..., 4:]
        bce = -(t * tf.math.log(p) + (1 - t) * tf.math.log(1 - p))
        # Focal weighting: the 100 cells are mostly background; easy ones should not drown
        # the few shapes.
        weight = tf.where(t > 0.5, (1 - p) ** 2, p**2)
        cls = tf.reduce_sum(weight * bce) / count
        centre = tf.reduce_sum(tf.abs(y_true[..., :2] - y_pred[..., :2]), axis=-1) * GRID
        size = tf.reduce_sum(tf.abs(y_true[..., 2:4] - y_pred[..., 2:4]), axis=-1) * 8.0
        box = tf.reduce_sum(positive * (centre + size)) / count
        return 4.0 * cls + box

    return loss


def _detect_all(heads: np.ndarray, threshold: float = 0.05) -> list[list[q.Detection]]:
    return [q.decode_raw(h, threshold=threshold, iou_threshold=0.45) for h in heads]


def build_detector(
    epochs: int = 24, train_scenes: int = 900, frames: int = 4
) -> tuple[Any, np.ndarray]:
    tf = _tf()
    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    started = time.perf_counter()
    x_train, y_train, _ = _detector_data(range(10_000, 10_000 + train_scenes), frames, rng, True)
    x_test, _, test_truth = _detector_data(range(500_000, 500_100), 3, rng, False)
    x_val, _, val_truth = _detector_data(range(600_000, 600_050), 3, rng, False)
    print(
        f"detector data: {len(x_train)} train, {len(x_test)} test frames, "
        f"{time.perf_counter() - started:.0f} s"
    )

    def to_float(x: Any, y: Any) -> tuple[Any, Any]:
        x = tf.cast(x, tf.float32) / 255.0
        return x, y

    train = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=SEED)
        .map(to_float)
        .batch(32)
        .prefetch(2)
    )
    model = _detector_model(tf)
    schedule = tf.keras.optimizers.schedules.CosineDecay(3e-3, epochs * len(train))
    model.compile(tf.keras.optimizers.Adam(schedule), _detector_loss(tf))
    model.fit(train, epochs=epochs, verbose=2)

    x_test_f = x_test.astype(np.float32) / 255.0

    def representative() -> Iterator[list[np.ndarray]]:
        for x in x_train[rng.choice(len(x_train), 200, replace=False)]:
            yield [x[None].astype(np.float32) / 255.0]

    name = "shapes-detector"
    path = BUNDLED / f"{name}.tflite"
    path.write_bytes(convert_int8(model, representative))
    runner = q.TFLiteRunner(path)
    map_float = q.mean_average_precision(_detect_all(_keras_predict(model, x_test_f)), test_truth)
    heads_int8 = runner.predict(x_test_f)[0]
    map_int8 = q.mean_average_precision(_detect_all(heads_int8), test_truth)
    print(f"{name}: mAP@0.5 float {map_float:.4f} int8 {map_int8:.4f}")
    # The operating threshold: best F1 on validation scenes (not the test scenes).
    val_detections = _detect_all(runner.predict(x_val.astype(np.float32) / 255.0)[0])
    candidates = np.round(np.arange(0.2, 0.81, 0.05), 2)
    f1s = [q.detection_f1(val_detections, val_truth, float(t)) for t in candidates]
    threshold = float(candidates[int(np.argmax(f1s))])
    f1_test = q.detection_f1(_detect_all(heads_int8), test_truth, threshold)
    print(f"{name}: threshold {threshold} (F1 on test {f1_test:.4f})")

    write_manifest(
        BUNDLED / f"{name}.yaml",
        {
            "name": name,
            "version": "1.0.0",
            "description": (
                "Circles, squares and triangles from the synthetic camera. Input: the frame "
                "stretched to 160x160 RGB, pixel / 255. Output: one raw head [1, 100, 7], "
                "a 10x10 grid of (cx, cy, w, h, circle, square, triangle) in [0, 1]."
            ),
            "task": {
                "type": "detection",
                "layout": "raw",
                "threshold": threshold,
                "iou_threshold": 0.45,
                "max_detections": 20,
            },
            "labels": list(q.SHAPE_LABELS),
            "preprocess": {
                "type": "image",
                "resize": "stretch",
                "color": "rgb",
                "mean": [0.0, 0.0, 0.0],
                "std": [255.0, 255.0, 255.0],
            },
            "reference": write_reference(name, BUNDLED, runner, x_test_f[0]),
            "quality": {
                "map50_float": round(map_float, 4),
                "map50_int8": round(map_int8, 4),
                "f1_at_threshold_int8": round(f1_test, 4),
                "test_frames": float(len(x_test)),
            },
        },
    )
    build_detector_ssd(
        model,
        representative=representative,
        x_test=x_test_f,
        test_truth=test_truth,
        raw_heads=heads_int8,
        threshold=threshold,
    )
    return model, x_train


# --- shapes-detector-ssd ---------------------------------------------------------------

SSD_XY_SCALE = 10.0  # centre offsets are small; scaling them up spends int8 steps on them
SSD_WH_SCALE = 1.0


def _grid_anchors() -> np.ndarray:
    """One anchor per grid cell: (ycenter, xcenter, h, w) = (cell centre, 1, 1)."""
    rows, cols = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    centres = (np.stack([rows, cols], axis=-1).reshape(-1, 2) + 0.5) / GRID
    return np.concatenate([centres, np.ones_like(centres)], axis=1).astype(np.float32)


def _ssd_front(tf: Any, model: Any) -> Any:
    """The trained detector re-headed as SSD inputs: box encodings (ty, tx, th, tw)
    relative to the grid anchors, and class predictions with a background column."""
    anchors = _grid_anchors()
    layers = tf.keras.layers

    def encode(head: Any) -> Any:
        ty = (head[..., 1:2] - anchors[:, 0:1]) * SSD_XY_SCALE
        tx = (head[..., 0:1] - anchors[:, 1:2]) * SSD_XY_SCALE
        th = tf.math.log(tf.maximum(head[..., 3:4], 0.01)) * SSD_WH_SCALE
        tw = tf.math.log(tf.maximum(head[..., 2:3], 0.01)) * SSD_WH_SCALE
        return tf.concat([ty, tx, th, tw], axis=-1)

    def classes(head: Any) -> Any:
        return tf.concat([tf.zeros_like(head[..., 4:5]), head[..., 4:]], axis=-1)

    encodings = layers.Lambda(encode, name="box_encodings")(model.output)
    predictions = layers.Lambda(classes, name="class_predictions")(model.output)
    return tf.keras.Model(model.input, [encodings, predictions], name="shapes_detector_ssd")


def attach_postprocess(
    front: bytes, anchors: np.ndarray, max_detections: int, score: float, iou: float
) -> bytes:
    """Appends DEQUANTIZE ops and a TFLite_Detection_PostProcess custom op to a converted
    model whose signature outputs are (box encodings, class predictions)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    from flatbuffers import flexbuffers

    model = flatbuffer_utils.convert_bytearray_to_object(front)
    graph = model.subgraphs[0]
    signature = model.signatureDefs[0]
    # Keras names its outputs output_0, output_1 in order; the graph may list them swapped.
    by_name = {_text(t.name): t.tensorIndex for t in signature.outputs}
    encodings, predictions = by_name["output_0"], by_name["output_1"]

    def add_tensor(name: str, shape: list[int], data: bytes | None = None) -> int:
        buffer = schema.BufferT()
        buffer.data = None if data is None else np.frombuffer(data, dtype=np.uint8)
        model.buffers.append(buffer)
        tensor = schema.TensorT()
        tensor.name = name
        tensor.shape = np.array(shape, dtype=np.int32)
        tensor.type = schema.TensorType.FLOAT32
        tensor.buffer = len(model.buffers) - 1
        graph.tensors.append(tensor)
        return len(graph.tensors) - 1

    def add_code(builtin: int, custom: str | None = None, version: int = 1) -> int:
        code = schema.OperatorCodeT()
        code.builtinCode = builtin
        code.deprecatedBuiltinCode = builtin
        code.customCode = custom
        code.version = version
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def add_op(code: int, inputs: list[int], outputs: list[int]) -> Any:
        op = schema.OperatorT()
        op.opcodeIndex = code
        op.inputs = np.array(inputs, dtype=np.int32)
        op.outputs = np.array(outputs, dtype=np.int32)
        graph.operators.append(op)
        return op

    # The post-processing kernel here rejects int8 inputs at invoke time, so it is fed
    # de-quantised copies; the network itself stays int8.
    dequantize = add_code(schema.BuiltinOperator.DEQUANTIZE, version=2)
    floats = []
    for index in (encodings, predictions):
        source = graph.tensors[index]
        floats.append(add_tensor(f"{_text(source.name)}_float", list(source.shape)))
        add_op(dequantize, [index], [floats[-1]])
    anchors_index = add_tensor("anchors", list(anchors.shape), anchors.astype("<f4").tobytes())
    names = ["detection_boxes", "detection_classes", "detection_scores", "num_detections"]
    shapes = [[1, max_detections, 4], [1, max_detections], [1, max_detections], [1]]
    outputs = [add_tensor(n, s) for n, s in zip(names, shapes, strict=True)]

    options = flexbuffers.Builder()
    with options.Map():
        options.Int("max_detections", max_detections)
        options.Int("max_classes_per_detection", 1)
        options.Int("detections_per_class", max_detections)
        # Fast (class-agnostic) NMS: one shape per place anyway, and LiteRT's regular
        # per-class NMS drops whole classes when the interpreter runs on 2 threads.
        options.Bool("use_regular_nms", False)
        options.Float("nms_score_threshold", score)
        options.Float("nms_iou_threshold", iou)
        options.Int("num_classes", NUM_CLASSES)
        options.Float("y_scale", SSD_XY_SCALE)
        options.Float("x_scale", SSD_XY_SCALE)
        options.Float("h_scale", SSD_WH_SCALE)
        options.Float("w_scale", SSD_WH_SCALE)
    post = add_code(schema.BuiltinOperator.CUSTOM, "TFLite_Detection_PostProcess")
    op = add_op(post, [*floats, anchors_index], outputs)
    op.customOptions = np.frombuffer(bytes(options.Finish()), dtype=np.uint8)
    op.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS

    graph.outputs = np.array(outputs, dtype=np.int32)
    signature.outputs = []
    for name, index in zip(names, outputs, strict=True):
        entry = schema.TensorMapT()
        entry.name = name
        entry.tensorIndex = index
        signature.outputs.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def build_detector_ssd(
    model: Any,
    *,
    representative: Callable[[], Iterator[list[np.ndarray]]],
    x_test: np.ndarray,
    test_truth: list[list[dict[str, Any]]],
    raw_heads: np.ndarray,
    threshold: float,
) -> None:
    tf = _tf()
    name = "shapes-detector-ssd"
    front = convert_int8(_ssd_front(tf, model), representative)
    path = BUNDLED / f"{name}.tflite"
    path.write_bytes(attach_postprocess(front, _grid_anchors(), 20, 0.05, 0.45))
    runner = q.TFLiteRunner(path)
    detections = [q.decode_postprocess(*runner.predict(x[None])) for x in x_test]
    map_int8 = q.mean_average_precision(detections, test_truth)
    agreement = _agreement(detections, [q.decode_raw(h) for h in raw_heads], threshold)
    print(f"{name}: mAP@0.5 int8 {map_int8:.4f}, {agreement:.3f} of raw detections matched")
    quality = yaml.safe_load((BUNDLED / "shapes-detector.yaml").read_text(encoding="utf-8"))
    write_manifest(
        BUNDLED / f"{name}.yaml",
        {
            "name": name,
            "version": "1.0.0",
            "description": (
                "The shapes-detector network with TFLite_Detection_PostProcess appended: "
                "outputs boxes [1, 20, 4] (ymin, xmin, ymax, xmax), classes [1, 20], "
                "scores [1, 20] and the count [1]. Same input as shapes-detector."
            ),
            "task": {
                "type": "detection",
                "layout": "postprocess",
                "threshold": threshold,
                "iou_threshold": 0.45,
                "max_detections": 20,
            },
            "labels": list(q.SHAPE_LABELS),
            "preprocess": quality["preprocess"],
            # A fresh interpreter: rows past `count` are whatever the op's buffer held
            # before, so only a first invoke gives the all-zero padding a gate expects.
            "reference": write_reference(name, BUNDLED, q.TFLiteRunner(path), x_test[0], atol=0.02),
            "quality": {
                "map50_float": quality["quality"]["map50_float"],
                "map50_int8": round(map_int8, 4),
                "raw_agreement_int8": round(agreement, 4),
                "test_frames": float(len(x_test)),
            },
        },
    )


def _agreement(
    ssd: list[list[q.Detection]], raw: list[list[q.Detection]], threshold: float
) -> float:
    """Fraction of the raw model's detections above `threshold` that the SSD model also
    reports with the same label and IoU >= 0.9."""
    matched = total = 0
    for ssd_ds, raw_ds in zip(ssd, raw, strict=True):
        for r in (d for d in raw_ds if d.score >= threshold):
            total += 1
            matched += any(
                s.label == r.label and q.box_iou(np.array(s.box), np.array(r.box))[0, 0] >= 0.9
                for s in ssd_ds
            )
    return matched / max(total, 1)


# --- vibration-anomaly -------------------------------------------------------------------


def build_vibration() -> None:
    tf = _tf()
    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    x_train, y_train = q.vibration_set(range(300), 40)
    x_val, y_val = q.vibration_set(range(20_000, 20_050), 40)
    x_test, y_test = q.vibration_set(range(50_000, 50_100), 40)
    mean = x_train.mean(axis=(0, 1))
    std = x_train.std(axis=(0, 1))

    def norm(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)

    layers = tf.keras.layers
    inputs = layers.Input((q.VIBRATION_WINDOW, 3))
    x = layers.Conv1D(16, 9, strides=2, padding="same", activation="relu")(inputs)
    x = layers.Conv1D(32, 5, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv1D(32, 5, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv1D(48, 3, strides=2, padding="same", activation="relu")(x)
    # Impacts are brief (max) while imbalance and looseness are steady (average).
    x = layers.Concatenate()([layers.GlobalMaxPooling1D()(x), layers.GlobalAveragePooling1D()(x)])
    x = layers.Dense(16, activation="relu")(x)
    score = layers.Dense(1, activation="sigmoid", name="anomaly")(x)
    model = tf.keras.Model(inputs, score)
    model.compile("adam", "binary_crossentropy")
    model.fit(norm(x_train), (y_train > 0).astype(np.float32), epochs=15, batch_size=64, verbose=2)

    def representative() -> Iterator[list[np.ndarray]]:
        for x in norm(x_train[rng.choice(len(x_train), 300, replace=False)]):
            yield [x[None]]

    name = "vibration-anomaly"
    path = BUNDLED / f"{name}.tflite"
    path.write_bytes(convert_int8(model, representative))
    runner = q.TFLiteRunner(path)

    val_scores = runner.predict(norm(x_val))[0].ravel()
    threshold = _youden_threshold(val_scores, y_val > 0)
    scores_float = _keras_predict(model, norm(x_test)).ravel()
    scores_int8 = runner.predict(norm(x_test))[0].ravel()
    auc_float = q.roc_auc(scores_float, y_test > 0)
    auc_int8 = q.roc_auc(scores_int8, y_test > 0)
    flagged = scores_int8 >= threshold
    recall = float(np.mean(flagged[y_test > 0]))
    false_alarms = float(np.mean(flagged[y_test == 0]))
    print(f"{name}: ROC AUC float {auc_float:.4f} int8 {auc_int8:.4f}, threshold {threshold}")

    write_manifest(
        BUNDLED / f"{name}.yaml",
        {
            "name": name,
            "version": "1.0.0",
            "description": (
                "Machine fault score (imbalance, bearing, looseness) from a 3-axis "
                "accelerometer window of 256 samples at 1 kHz, in g. Output: probability "
                "that the window shows a fault."
            ),
            "task": {"type": "anomaly", "score": "output", "threshold": threshold},
            "labels": ["fault"],
            "preprocess": {
                "type": "window",
                "mean": [round(float(m), 5) for m in mean],
                "std": [round(float(s), 5) for s in std],
            },
            "reference": write_reference(name, BUNDLED, runner, norm(x_test[y_test > 0][:1])[0]),
            "quality": {
                "roc_auc_float": round(auc_float, 4),
                "roc_auc_int8": round(auc_int8, 4),
                "recall_at_threshold_int8": round(recall, 4),
                "false_alarm_rate_int8": round(false_alarms, 4),
                "test_windows": float(len(x_test)),
            },
        },
    )


def _youden_threshold(scores: np.ndarray, is_fault: np.ndarray) -> float:
    """The threshold that maximises recall minus false alarm rate on validation windows
    (machines neither in training nor in the test set)."""
    candidates = np.unique(scores)
    best, best_j = 0.5, -1.0
    for t in candidates:
        flagged = scores >= t
        j = float(np.mean(flagged[is_fault]) - np.mean(flagged[~is_fault]))
        if j > best_j:
            best, best_j = float(t), j
    return round(best, 4)


# --- sound-classifier ----------------------------------------------------------------------


def build_sounds() -> None:
    tf = _tf()
    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    x_train, y_train = q.sound_set(range(400), 3)  # 4800 clips
    x_test, y_test = q.sound_set(range(60_000, 60_100), 2)  # 800 clips, unseen seeds

    layers = tf.keras.layers
    inputs = layers.Input((q.SOUND_WINDOW, 1))
    x = layers.Conv1D(16, 64, strides=8, padding="same", activation="relu")(inputs)
    x = layers.Conv1D(24, 9, strides=4, padding="same", activation="relu")(x)
    x = layers.Conv1D(32, 5, strides=2, padding="same", activation="relu")(x)
    # Knocks are brief (max); tones and sweeps are steady (average).
    x = layers.Concatenate()([layers.GlobalMaxPooling1D()(x), layers.GlobalAveragePooling1D()(x)])
    x = layers.Dense(24, activation="relu")(x)
    probabilities = layers.Dense(len(q.SOUNDS), activation="softmax", name="sound")(x)
    model = tf.keras.Model(inputs, probabilities)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=12, batch_size=64, verbose=2)

    def representative() -> Iterator[list[np.ndarray]]:
        for x in x_train[rng.choice(len(x_train), 300, replace=False)]:
            yield [x[None]]

    name = "sound-classifier"
    path = BUNDLED / f"{name}.tflite"
    path.write_bytes(convert_int8(model, representative))
    runner = q.TFLiteRunner(path)
    predicted_float = _keras_predict(model, x_test).argmax(axis=1)
    predicted_int8 = runner.predict(x_test)[0].argmax(axis=1)
    accuracy_float = float(np.mean(predicted_float == y_test))
    accuracy_int8 = float(np.mean(predicted_int8 == y_test))
    print(f"{name}: accuracy float {accuracy_float:.4f} int8 {accuracy_int8:.4f}")
    write_manifest(
        BUNDLED / f"{name}.yaml",
        {
            "name": name,
            "version": "1.0.0",
            "description": (
                "Which sound fills one second of mono audio at 8 kHz in [-1, 1]: background, "
                "beep, siren or knock (the synthetic-sounds source's classes)."
            ),
            "task": {"type": "classification", "top_k": 2},
            "labels": list(q.SOUNDS),
            "preprocess": {"type": "window", "mean": [0.0], "std": [1.0]},
            "reference": write_reference(name, BUNDLED, runner, x_test[1]),
            "quality": {
                "accuracy_float": round(accuracy_float, 4),
                "accuracy_int8": round(accuracy_int8, 4),
                "test_clips": float(len(x_test)),
            },
        },
    )


# --- bench model ---------------------------------------------------------------------


def build_mobilenet() -> None:
    tf = _tf()
    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = tf.keras.applications.MobileNetV2(
        weights=None, input_shape=(224, 224, 3), alpha=1.0, classes=1000
    )
    ramp = np.linspace(-1, 1, 224, dtype=np.float32)

    def representative() -> Iterator[list[np.ndarray]]:
        # Smooth gradients plus noise: enough spread for calibration, no data set needed.
        for _ in range(32):
            base = rng.uniform(-1, 1, 3) * ramp[:, None, None] + rng.uniform(-1, 1, 3)
            noise = rng.normal(0, 0.3, (224, 224, 3))
            yield [np.clip(base + noise, -1, 1)[None].astype(np.float32)]

    name = "mobilenet-224-int8"
    BENCH.mkdir(exist_ok=True)
    path = BENCH / f"{name}.tflite"
    path.write_bytes(convert_int8(model, representative))
    write_manifest(
        BENCH / f"{name}.yaml",
        {
            "name": name,
            "version": "1.0.0",
            "description": (
                "Benchmark only: MobileNetV2 1.0 224x224 with seeded random weights, full "
                "int8. Its outputs mean nothing; its cost is that of the real network."
            ),
            "task": {"type": "classification", "top_k": 5},
            "preprocess": {
                "type": "image",
                "resize": "stretch",
                "color": "rgb",
                "mean": [127.5, 127.5, 127.5],
                "std": [127.5, 127.5, 127.5],
            },
        },
    )


# --- README ----------------------------------------------------------------------------

_METRICS = {"accuracy": "accuracy", "map50": "mAP@0.5", "roc_auc": "ROC AUC"}


def write_readme() -> None:
    rows = []
    for folder in (BUNDLED, BENCH):
        for manifest_path in sorted(folder.glob("*.yaml")):
            manifest = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
            model_path = manifest_path.with_suffix(".tflite")
            if not model_path.exists():
                continue
            runner = q.TFLiteRunner(model_path)
            inputs = _tensor_text([runner.input])
            outputs = _tensor_text(runner.outputs)
            quality = manifest.get("quality", {})
            metric, float_v, int8_v, diff = "-", "-", "-", "-"
            for key, title in _METRICS.items():
                if f"{key}_float" in quality:
                    metric = title
                    f, i = quality[f"{key}_float"], quality[f"{key}_int8"]
                    float_v, int8_v = f"{f:.4f}", f"{i:.4f}"
                    diff = f"{100 * (i - f):+.2f}"
            rows.append(
                f"| `{folder.name}/{model_path.name}` | {manifest['task']['type']} | {metric} "
                f"| {float_v} | {int8_v} | {diff} | {model_path.stat().st_size / 1024:.0f} KiB "
                f"| {invoke_ms(model_path):.2f} | {inputs} | {outputs} |"
            )
    text = README_TEMPLATE.format(rows="\n".join(rows))
    (HERE / "README.md").write_text(text, encoding="utf-8")
    print("wrote models/README.md")


def _tensor_text(details: list[dict[str, Any]]) -> str:
    return "<br>".join(
        f"{np.dtype(d['dtype']).name} {[int(n) for n in d['shape']]}" for d in details
    )


README_TEMPLATE = """# Bundled models

Built by `models/build.py` from generated or bundled data only (no downloads), seeded.
Every number below was measured by the build on held-out data: the float Keras model and
the full-int8 `.tflite` as LiteRT runs it. "Δ points" is int8 minus float, in percentage
points. Invoke time is the median of 50 single-thread invokes on the build machine.

| model | task | metric | float | int8 | Δ points | size | invoke ms (1 thread) | input | output |
|---|---|---|---|---|---|---|---|---|---|
{rows}

What each number means:

- `digits-classifier`: top-1 accuracy on the held-out 25 % of scikit-learn's digits
  (stratified split, `random_state=0`, 450 images). Each 8x8 digit is drawn as a 64x64
  grayscale picture and stretched to the 32x32 input, pixel / 255 (mean 0, std 255).
  The model was also trained on inverted pictures, so dark ink on light paper works as
  well as light strokes on dark (`accuracy_inverted_int8` in the manifest).
  `models/samples/digit-<label>-<i>.png` are held-out digits for demos and tests.
- `shapes-detector`: VOC mAP@0.5 (all-point interpolation, mean over circle, square,
  triangle) on 300 frames from 100 scenes whose seeds were not used in training. Frames
  are stretched from 640x480 to 160x160 (bilinear), pixel / 255. The output is the `raw`
  layout: [1, 100, 7], a 10x10 grid of (cx, cy, w, h, scores); the agent runs NMS.
- `shapes-detector-ssd`: the same trained network with the other common detection
  layout: its head is re-expressed as SSD box encodings (ty, tx, th, tw against one
  anchor per grid cell, x/y scale 10, h/w scale 1) and class predictions with a
  background column, converted to int8, and then a `TFLite_Detection_PostProcess`
  custom op (fed through DEQUANTIZE) is appended by editing the flatbuffer. Outputs:
  boxes [1, 20, 4] (ymin, xmin, ymax, xmax), classes, scores, count, all float32 as the
  op defines them. Its "float" column repeats the raw model's float mAP (same network);
  `raw_agreement_int8` in its manifest is the fraction of the raw model's detections it
  reproduces (same label, IoU >= 0.9).
- `vibration-anomaly`: ROC AUC of fault windows (imbalance, bearing, looseness) against
  normal ones, 4000 held-out windows from 100 simulated machines not seen in training.
  The model is a 1-D CNN classifier whose single output is the fault probability; its
  threshold maximises recall minus false-alarm rate on a separate validation set.
- `sound-classifier`: top-1 accuracy on 800 one-second clips (200 per class) from 100
  generator seeds not used in training (`edgeagent/hal/audio/sounds.py`: background,
  beep, siren, knock, each over random room noise). Input: mono samples at 8 kHz in
  [-1, 1], as the `synthetic-sounds`, `wav` and `alsa` sources give them (mean 0, std 1).
  A 1-D CNN on the raw waveform.
- `bench/mobilenet-224-int8`: MobileNetV2 with random weights, for timing only.

Rebuild (a workstation; TensorFlow is in the `build` extra, never on a device; about
5 minutes on 2 cores):

    python -m venv .venv-build && .venv-build/bin/pip install -e '.[build]'
    .venv-build/bin/python models/build.py            # everything
    .venv-build/bin/python models/build.py --only shapes-detector   # also builds -ssd

Check the bundled models (no TensorFlow needed):

    pytest tests/test_bundled_models.py
"""

BUILDERS: dict[str, Callable[[], Any]] = {
    "digits-classifier": build_digits,
    "shapes-detector": build_detector,
    "vibration-anomaly": build_vibration,
    "sound-classifier": build_sounds,
    "mobilenet-224-int8": build_mobilenet,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), help="build one model")
    args = parser.parse_args()
    names = [args.only] if args.only else list(BUILDERS)
    for name in names:
        started = time.perf_counter()
        BUILDERS[name]()
        print(f"{name}: built in {time.perf_counter() - started:.0f} s")
    write_readme()


if __name__ == "__main__":
    main()
