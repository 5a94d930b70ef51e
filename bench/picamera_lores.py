"""CPU time per camera frame before inference: the Pi camera's main stream resized on the
CPU (the baseline) against its ISP-scaled lores stream, measured in the same run.

Both paths start from the arrays picamera2 hands over (made once, outside the timing, by
the test fake in tests/picamera2_fake.py: its YUV420 packing has a padded stride as a Pi
4's does) and end with the model's input tensor from the agent's own pre-processing:

- main:  RGB888 640x480 (or --main) -> bgr_to_rgb -> preprocess (resizes to the model)
- lores: YUV420 at the model's size -> yuv420_to_rgb -> preprocess (no resize needed)
- lores-rgb: RGB888 at the model's size (a Pi 5) -> bgr_to_rgb -> preprocess

It prints CPU seconds (process_time) per frame and the ratio to the main path. The ISP's
own scaling costs no CPU and is not measured; nor is anything on a real Pi.

Run: PYTHONPATH=. .venv/bin/python bench/picamera_lores.py [--frames 300] [--model NAME]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeagent.config import ImagePreprocess
from edgeagent.hal.camera.picamera2 import bgr_to_rgb, yuv420_to_rgb
from edgeagent.hal.camera.settings import lores_size_for
from edgeagent.inference import Engine, make_preprocessor
from edgeagent.modelfile.catalog import describe_model
from tests import picamera2_fake


def per_frame(step: Callable[[], Any], frames: int) -> float:
    for _ in range(10):
        step()
    started = time.process_time()
    for _ in range(frames):
        step()
    return (time.process_time() - started) / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--model", default="shapes-detector")
    parser.add_argument("--main", default="640x480", help="main stream WxH")
    args = parser.parse_args()
    main_w, main_h = (int(v) for v in args.main.split("x"))

    model = describe_model(args.model)
    engine = Engine.load(model.path, accelerator="cpu")
    tensor = engine.inputs[0]
    engine.close()
    spec = model.preprocess if isinstance(model.preprocess, ImagePreprocess) else None
    resize = spec.resize if spec else "stretch"
    preprocess = make_preprocessor(spec, tensor, "image")
    lores = lores_size_for((main_w, main_h), (tensor.shape[2], tensor.shape[1]), resize)
    if lores is None:
        raise SystemExit(f"the model's input is not smaller than {args.main}: no lores stream")
    lores_w, lores_h = lores

    main_bgr = np.ascontiguousarray(picamera2_fake.scene(main_w, main_h)[..., ::-1])
    stride = picamera2_fake._stride("YUV420", lores_w)
    lores_yuv = picamera2_fake._yuv420(
        picamera2_fake.scene(lores_w, lores_h), stride, full_range=True, swap=False
    )
    lores_bgr = np.ascontiguousarray(picamera2_fake.scene(lores_w, lores_h)[..., ::-1])

    paths = {
        "main": lambda: preprocess(bgr_to_rgb(main_bgr)),
        "lores": lambda: preprocess(yuv420_to_rgb(lores_yuv, lores_w, lores_h)),
        "lores-rgb": lambda: preprocess(bgr_to_rgb(lores_bgr)),
    }
    print(
        f"model {args.model} input {list(tensor.shape)} ({resize}); main {main_w}x{main_h}, "
        f"lores {lores_w}x{lores_h}; {args.frames} frames each"
    )
    baseline = None
    for name, step in paths.items():
        seconds = per_frame(step, args.frames)
        baseline = baseline or seconds
        print(
            f"{name:10s} {seconds * 1e3:7.3f} ms CPU/frame  ratio to main {seconds / baseline:.3f}"
        )
    # Within the lores path: the conversion alone, and the pre-processing alone.
    rgb = yuv420_to_rgb(lores_yuv, lores_w, lores_h)
    convert = per_frame(lambda: yuv420_to_rgb(lores_yuv, lores_w, lores_h), args.frames)
    prepare = per_frame(lambda: preprocess(rgb), args.frames)
    print(
        f"lores parts: yuv420_to_rgb {convert * 1e3:.3f} ms, preprocess at the model's size "
        f"{prepare * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    main()
