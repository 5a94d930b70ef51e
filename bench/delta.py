"""Binary deltas between model versions: how much smaller than the whole model, at what CPU.

    python bench/delta.py [--json FILE]

A rollout sends every device the whole model (bench/fleet.py measures N x model size at
the broker). A delta against the version a device already runs (bsdiff4, the BSDIFF4
format with bzip2 inside) would send only what changed. How much changes depends on how
the new version was made, so each pair below is built the way such a version is:

- requantized: tests/data/float-patterns.tflite quantised to int8 twice by the real
  `edgeagent model quantize` (ai-edge-quantizer), calibrated on two sets drawn with
  different seeds: same weights, new scales and zero points (8 KiB model).
- metadata: the 3.9 MB int8 MobileNet (models/bench) with a 1,000-line label file
  attached as metadata, and the same with one label renamed.
- head: the same with the last FULLY_CONNECTED layer's weights drawn again (a retrained
  classifier head on a frozen backbone, as transfer learning does).
- fine-tuned: every int8 weight moves by one quantisation step with probability 0.3 (a
  short fine-tune at a low learning rate: most weights keep their int8 value).
- retrained: every int8 weight drawn again (a retrain from scratch, the worst case).

Both versions of a pair are packed by the same code (the flatbuffers object API), so the
layout does not differ by accident. Reported: full size, delta size and ratio, the CPU
seconds of `bsdiff4.diff` (the workstation, once per version pair) and `bsdiff4.patch`
(each device), and the bz2-compressed full model as the baseline a compressor alone gives.
"""

from __future__ import annotations

import argparse
import bz2
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bsdiff4
import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as s

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.data.make_float_model import LABELS, pattern  # noqa: E402

MOBILENET = REPO / "models" / "bench" / "mobilenet-224-int8.tflite"
FLOAT_MODEL = REPO / "tests" / "data" / "float-patterns.tflite"
INT8 = s.TensorType.INT8


def pack(model: Any) -> bytes:
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def unpack(data: bytes) -> Any:
    return s.ModelT.InitFromPackedBuf(bytearray(data), 0)


def weight_buffers(model: Any) -> list[int]:
    """Indexes of the buffers that hold int8 constant tensors (weights)."""
    found = []
    for tensor in model.subgraphs[0].tensors:
        buffer = model.buffers[tensor.buffer]
        if tensor.type == INT8 and buffer.data is not None and len(buffer.data) > 0:
            found.append(tensor.buffer)
    return sorted(set(found))


def with_labels(model: Any, labels: list[str]) -> bytes:
    """`model` with a label file (one label a line) attached as a metadata buffer."""
    buffer = s.BufferT()
    buffer.data = np.frombuffer("\n".join(labels).encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = s.MetadataT()
    entry.name, entry.buffer = "labels", len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return pack(model)


def variant(original: bytes, how: str, rng: np.random.Generator) -> bytes:
    model = unpack(original)
    weights = weight_buffers(model)
    if how == "metadata":
        labels = [f"class-{i:04d}" for i in range(1000)]
        labels[500] = "class-0500-renamed"
        return with_labels(model, labels)
    if how == "head":
        head = next(
            op.inputs[1]
            for op in reversed(model.subgraphs[0].operators)
            if model.operatorCodes[op.opcodeIndex].builtinCode == s.BuiltinOperator.FULLY_CONNECTED
        )
        buffer = model.buffers[model.subgraphs[0].tensors[head].buffer]
        buffer.data = rng.integers(0, 256, len(buffer.data), dtype=np.uint8)
    elif how == "fine-tuned":
        for index in weights:
            data = model.buffers[index].data.view(np.int8).astype(np.int16)
            step = rng.choice([-1, 0, 1], size=data.shape, p=[0.15, 0.7, 0.15])
            model.buffers[index].data = (
                np.clip(data + step, -127, 127).astype(np.int8).view(np.uint8)
            )
    elif how == "retrained":
        for index in weights:
            size = len(model.buffers[index].data)
            model.buffers[index].data = rng.integers(0, 256, size, dtype=np.uint8)
    return pack(model)


def requantized_pair(workdir: Path) -> tuple[bytes, bytes]:
    outputs = []
    for seed in (1, 2):
        folder = workdir / f"calibration-{seed}"
        folder.mkdir()
        rng = np.random.default_rng(seed)
        stack = np.stack([pattern(k % len(LABELS), rng)[..., None] for k in range(64)])
        np.save(folder / "stack.npy", (stack / 255.0).astype(np.float32))
        out = workdir / f"requantized-{seed}.tflite"
        subprocess.run(
            [sys.executable, "-m", "edgeagent.cli.main", "model", "quantize", str(FLOAT_MODEL),
             "--calibration", str(folder), "-o", str(out)],
            check=True, capture_output=True,
        )  # fmt: skip
        outputs.append(out.read_bytes())
    return outputs[0], outputs[1]


def measure(name: str, old: bytes, new: bytes) -> dict[str, Any]:
    started = time.process_time()
    delta = bsdiff4.diff(old, new)
    diff_s = time.process_time() - started
    started = time.process_time()
    rebuilt = bsdiff4.patch(old, delta)
    patch_s = time.process_time() - started
    assert rebuilt == new, f"{name}: the patch does not rebuild the new version"
    return {
        "pair": name,
        "full_bytes": len(new),
        "bz2_full_bytes": len(bz2.compress(new, 9)),
        "delta_bytes": len(delta),
        "delta_ratio": round(len(delta) / len(new), 4),
        "diff_cpu_s": round(diff_s, 3),
        "patch_cpu_s": round(patch_s, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeagent-bench-delta-") as tmp:
        rows.append(measure("requantized", *requantized_pair(Path(tmp))))
    base = pack(unpack(MOBILENET.read_bytes()))
    labelled = with_labels(unpack(base), [f"class-{i:04d}" for i in range(1000)])
    rows.append(measure("metadata", labelled, variant(base, "metadata", np.random.default_rng(0))))
    for how in ("head", "fine-tuned", "retrained"):
        rows.append(measure(how, base, variant(base, how, np.random.default_rng(0))))
    print("| pair | full | bz2 of full | delta | delta/full | diff CPU s | patch CPU s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pair']} | {r['full_bytes']:,} | {r['bz2_full_bytes']:,} | "
            f"{r['delta_bytes']:,} | {r['delta_ratio']:.2%} | {r['diff_cpu_s']} | "
            f"{r['patch_cpu_s']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
