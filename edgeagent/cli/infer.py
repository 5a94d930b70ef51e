"""`edgeagent infer`: one inference on an image file or a CSV sensor window."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from edgeagent.errors import SourceError
from edgeagent.hal.settings import SampleKind
from edgeagent.inference import Engine, make_decoder, make_preprocessor
from edgeagent.models.catalog import describe_model


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "infer",
        description="Run MODEL (a bundled name or a .tflite path) once on INPUT: an image "
        "file for camera models, a CSV file (one row per sample, one column per channel, "
        "optional header) for sensor models.",
    )
    parser.add_argument("model", help="bundled model name or path to a .tflite file")
    parser.add_argument("input", type=Path, help="image file, or CSV for sensor models")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "edgetpu", "gpu", "cpu"])
    parser.add_argument("--threads", type=int, default=2)
    parser.set_defaults(handler=execute)


def read_image(path: Path) -> npt.NDArray[np.uint8]:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise SourceError(f"cannot read image {path}: {exc}") from exc


def read_csv_window(path: Path) -> npt.NDArray[np.float32]:
    """Rows of numbers; a first row that is not numeric is taken as a header."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        if rows and not _numeric(rows[0]):
            rows = rows[1:]
        window = np.array([[float(v) for v in row] for row in rows], dtype=np.float32)
    except ValueError as exc:
        raise SourceError(f"{path}: every row after the header must be numbers ({exc})") from exc
    if window.ndim != 2 or window.shape[0] == 0:
        raise SourceError(f"{path}: no samples (expected rows of equal length)")
    return window


def _numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def execute(args: argparse.Namespace) -> int:
    description = describe_model(args.model)
    engine = Engine.load(description.path, accelerator=args.accelerator, threads=args.threads)
    try:
        kind: SampleKind = "window" if args.input.suffix.lower() in (".csv", ".txt") else "image"
        data = read_csv_window(args.input) if kind == "window" else read_image(args.input)
        preprocess = make_preprocessor(description.preprocess, engine.inputs[0], kind)
        decode = make_decoder(description.task, engine.outputs, description.labels)
        t0 = time.perf_counter()
        prepared = preprocess(data)
        t1 = time.perf_counter()
        outputs = engine.invoke([prepared.tensor])
        t2 = time.perf_counter()
        result = decode(outputs, prepared)
        t3 = time.perf_counter()
    finally:
        engine.close()
    report = {
        "model": {
            "name": description.name,
            "version": description.version,
            "path": str(description.path),
        },
        "input": str(args.input),
        "accelerator": engine.accelerator,
        "fallbacks": list(engine.fallbacks),
        "latency_ms": {
            "preprocess": round((t1 - t0) * 1000, 3),
            "invoke": round((t2 - t1) * 1000, 3),
            "postprocess": round((t3 - t2) * 1000, 3),
        },
        "task": description.task.type,
        "result": result,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_human(report))
    return 0


def _human(report: dict[str, Any]) -> str:
    model = report["model"]
    lines = [
        f"{model['name']} {model['version']} on {report['accelerator']} "
        f"(invoke {report['latency_ms']['invoke']:.2f} ms)"
    ]
    result = report["result"]
    if "classes" in result:
        lines += [f"  {c['label'] or c['index']:>12}  {c['score']:.3f}" for c in result["classes"]]
        if not result["classes"]:
            lines.append("  no class above the threshold")
    elif "detections" in result:
        for d in result["detections"]:
            box = ", ".join(f"{v:.3f}" for v in d["box"])
            lines.append(f"  {d['label'] or d['index']:>12}  {d['score']:.3f}  [{box}]")
        if not result["detections"]:
            lines.append("  no detection above the threshold")
    elif "score" in result:
        verdict = "ANOMALY" if result["anomaly"] else "normal"
        lines.append(f"  score {result['score']:.4f} (threshold {result['threshold']}): {verdict}")
    else:
        for out in result.get("outputs", []):
            lines.append(f"  {out['name']} {out['shape']}: {json.dumps(out['values'])[:200]}")
    return "\n".join(lines)
