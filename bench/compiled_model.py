"""CPU time per invoke of the Engine's CompiledModel path (what `litert-gpu` runs) against
its Interpreter path (the baseline), both on LiteRT's CPU kernels, in the same run.

No GPU is involved: the CompiledModel is compiled for the CPU through the test fake
(edgeagent.hal.accel.fake.FakeGpu), so this measures only what the CompiledModel path
adds around the same kernels (tensor buffer writes and reads, the signature call).

Run: PYTHONPATH=. .venv/bin/python bench/compiled_model.py [--runs 300] [MODEL ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgeagent.hal.accel.fake import FakeGpu
from edgeagent.inference import Engine
from edgeagent.modelfile.catalog import bundled_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("models", nargs="*", default=["shapes-detector", "digits-classifier"])
    args = parser.parse_args()
    for name in args.models:
        path = bundled_dir() / f"{name}.tflite"
        sample = np.load(bundled_dir() / f"{name}.ref-input.npy")
        engines = {
            "interpreter": Engine.load(path, accelerator="cpu", threads=1),
            "compiled": Engine.load(
                path,
                accelerator="litert-gpu",
                accelerators={"litert-gpu": FakeGpu().accelerator()},
                threads=1,
            ),
        }
        seconds = {}
        for kind, engine in engines.items():
            engine.warm_up(5)
            started = time.process_time()
            for _ in range(args.runs):
                engine.invoke([sample])
            seconds[kind] = (time.process_time() - started) / args.runs
            engine.close()
        print(
            f"{name}: interpreter {seconds['interpreter'] * 1e3:.3f} ms, compiled "
            f"{seconds['compiled'] * 1e3:.3f} ms CPU/invoke; ratio compiled/interpreter "
            f"{seconds['compiled'] / seconds['interpreter']:.2f}"
        )


if __name__ == "__main__":
    main()
