"""Do the fast resizes (edgeagent/inference/preprocess.py, RESIZERS) cost accuracy? The
agent's own preprocessor with the one-step bilinear resize (the reference), Pillow's two-step
one and OpenCV's (halvings, then bilinear), scored with models/quality.py:

- shapes-detector and shapes-detector-ssd: mAP@0.5 on 300 fresh 640x480 scenes (seeds the
  build used for neither training nor testing);
- digits-classifier: top-1 on the held-out digits, drawn 64x64 and 240x240 (gray pictures
  given to the agent as RGB frames);
- mobilenet-224-int8 (seeded random weights: no labels mean anything): how far its input
  tensors and outputs move from the one-step resize's on 300 synthetic frames.

    python bench/resize_accuracy.py [--frames 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeagent.inference import Engine, make_preprocessor  # noqa: E402
from edgeagent.inference.preprocess import RESIZERS  # noqa: E402
from edgeagent.modelfile.catalog import describe_model  # noqa: E402
from models import quality  # noqa: E402

REFERENCE = "one-step"


def _runner_and_preps(model: str) -> tuple[quality.TFLiteRunner, dict[str, Any]]:
    description = describe_model(model)
    engine = Engine.load(description.path, accelerator="cpu", threads=1)
    tensor = engine.inputs[0]
    engine.close()
    preps: dict[str, Any] = {
        name: make_preprocessor(description.preprocess, tensor, "image", resizer=name)
        for name in RESIZERS
    }
    return quality.TFLiteRunner(Path(description.path), threads=1), preps


def detector_map(model: str, frames: int) -> dict[str, float]:
    runner, preps = _runner_and_preps(model)
    postprocess = len(runner.outputs) == 4
    found: dict[str, list[list[quality.Detection]]] = {name: [] for name in preps}
    truths = []
    scenes = quality.shape_frames(range(900_000, 900_000 + frames), 1, shapes=3)
    for frame, boxes in scenes:
        truths.append(boxes)
        for name, prep in preps.items():
            outputs = runner.invoke_raw(prep(frame).tensor)
            if postprocess:
                found[name].append(quality.decode_postprocess(*outputs))
            else:
                found[name].append(quality.decode_raw(outputs[0][0], 0.05, 0.45))
    return {name: quality.mean_average_precision(d, truths) for name, d in found.items()}


def digits_top1(size: int) -> dict[str, float]:
    runner, preps = _runner_and_preps("digits-classifier")
    split = quality.digits_split(seed=0)
    scores: dict[str, list[Any]] = {name: [] for name in preps}
    for pixels in split.test_images:
        picture = quality.digit_picture(pixels, size)
        rgb = np.repeat(picture[..., None], 3, axis=2)
        for name, prep in preps.items():
            scores[name].append(runner.invoke_raw(prep(rgb).tensor)[0][0])
    return {name: quality.accuracy(np.stack(s), split.test_labels) for name, s in scores.items()}


def classifier_difference(model: str, frames: int) -> dict[str, tuple[float, float, int]]:
    """Per fast resize: the mean |difference| of the input tensors (quantised units) and of
    the de-quantised outputs from the one-step resize's, and how many classes were ever
    top-1 (a model with random weights may always answer the same class, so top-1
    agreement would prove nothing)."""
    runner, preps = _runner_and_preps(model)
    found: dict[str, tuple[list[float], list[float], set[int]]] = {
        name: ([], [], set()) for name in preps if name != REFERENCE
    }
    scenes = quality.shape_frames(range(900_000, 900_000 + frames), 1, shapes=3)
    for frame, _ in scenes:
        reference = preps[REFERENCE](frame).tensor
        expected = runner.invoke_raw(reference)[0][0]
        for name, (inputs, outputs, classes) in found.items():
            tensor = preps[name](frame).tensor
            got = runner.invoke_raw(tensor)[0][0]
            inputs.append(float(np.abs(reference.astype(np.float32) - tensor).mean()))
            outputs.append(float(np.abs(expected - got).mean()))
            classes.update((int(np.argmax(expected)), int(np.argmax(got))))
    return {
        name: (float(np.mean(inputs)), float(np.mean(outputs)), len(classes))
        for name, (inputs, outputs, classes) in found.items()
    }


def _row(label: str, scores: dict[str, float]) -> str:
    return f"{label:<36}" + "".join(f"{scores[name]:>10.4f}" for name in RESIZERS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    args = parser.parse_args()
    print(f"{'model':<36}" + "".join(f"{name:>10}" for name in RESIZERS))
    for model in ("shapes-detector", "shapes-detector-ssd"):
        print(_row(f"{model} mAP@0.5", detector_map(model, args.frames)))
    for size in (64, 240):
        print(_row(f"digits-classifier top-1 ({size}x{size})", digits_top1(size)))
    bench_model = str(REPO / "models" / "bench" / "mobilenet-224-int8.tflite")
    for name, (inputs, outputs, classes) in classifier_difference(bench_model, args.frames).items():
        print(
            f"mobilenet-224-int8, {name} against {REFERENCE} (random weights, {classes} "
            f"distinct top-1 class(es)): mean |input difference| {inputs:.3f} quantised "
            f"units, mean |output difference| {outputs:.5f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
