"""`edgeagent infer`: one inference on an image file or a CSV sensor window.

The model is described as a pipeline describes it (config, then manifest, then metadata,
then graph: `edgeagent.modelfile.catalog`); the options below are the pipeline's overrides:
`--task` replaces the task (or, given alone, `--threshold` and the like adjust the one
inferred), `--resize/--color/--mean/--std` adjust the image preparation, `--labels` reads
one label per line from a file. The report says what was inferred and from what
(`inferred`, and `sources` per part)."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import TypeAdapter, ValidationError

from edgeagent.config import ImagePreprocess, Task, WindowPreprocess
from edgeagent.errors import ConfigError, SourceError
from edgeagent.hal.accel import AUTO_ORDER
from edgeagent.hal.audio.wav import read_wav
from edgeagent.hal.camera.images import read_image
from edgeagent.hal.settings import SampleKind
from edgeagent.inference import Engine, make_decoder, make_preprocessor
from edgeagent.modelfile.catalog import ModelDescription, describe_model
from edgeagent.modelfile.tflite import label_lines

_TASK_OPTIONS = ("threshold", "iou_threshold", "top_k", "max_detections", "layout", "coordinates")
_IMAGE_OPTIONS = ("resize", "color", "mean", "std")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "infer",
        description="Run MODEL (a bundled name or a .tflite path) once on INPUT: an image "
        "file for camera models, a CSV file (one row per sample, one column per channel, "
        "optional header) for sensor models, a WAV file (mono samples in [-1, 1]) for audio "
        "models.",
    )
    parser.add_argument("model", help="bundled model name or path to a .tflite file")
    parser.add_argument(
        "input", type=Path, help="image file, CSV for sensor models, WAV for audio models"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--accelerator", default="auto", choices=["auto", *AUTO_ORDER])
    parser.add_argument("--threads", type=int, default=2)
    overrides = parser.add_argument_group(
        "overrides", "what a pipeline's task/preprocess/labels would set (default: inferred)"
    )
    overrides.add_argument(
        "--task",
        choices=["classification", "detection", "pose", "segmentation", "anomaly", "raw"],
        help="the task type (default: the manifest's, else inferred from the model)",
    )
    overrides.add_argument("--threshold", type=float, help="score threshold of the task")
    overrides.add_argument("--iou-threshold", type=float, help="detection NMS overlap")
    overrides.add_argument("--top-k", type=int, help="classification: classes reported")
    overrides.add_argument("--max-detections", type=int, help="detection: at most this many")
    overrides.add_argument(
        "--layout", choices=["auto", "postprocess", "raw", "yolov8", "yolov5"], help="detection"
    )
    overrides.add_argument(
        "--coordinates", choices=["auto", "normalized", "pixels"], help="detection boxes"
    )
    overrides.add_argument("--resize", choices=["stretch", "letterbox", "crop"])
    overrides.add_argument("--color", choices=["rgb", "bgr", "gray"])
    overrides.add_argument("--mean", type=float, nargs="+", help="one value or one per channel")
    overrides.add_argument("--std", type=float, nargs="+", help="one value or one per channel")
    overrides.add_argument("--labels", type=Path, help="a text file, one label per line")
    parser.set_defaults(handler=execute)


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


def describe_for(args: argparse.Namespace) -> ModelDescription:
    """The model's description with the command line's overrides (pipeline semantics)."""
    set_task = {k: getattr(args, k) for k in _TASK_OPTIONS if getattr(args, k) is not None}
    set_image = {k: getattr(args, k) for k in _IMAGE_OPTIONS if getattr(args, k) is not None}
    labels = _read_labels(args.labels) if args.labels is not None else None
    if not (args.task or set_task or set_image):
        return describe_model(args.model, labels=labels)
    task: Task | None = None
    if args.task or set_task:
        # Options given without --task adjust the task the model is described with.
        task_type = args.task or describe_model(args.model).task.type
        spec = {"type": task_type, **set_task}
        try:
            task = TypeAdapter(Task).validate_python(spec)
        except ValidationError as exc:
            raise ConfigError(f"the task options do not fit task {spec['type']}: {exc}") from exc
    preprocess: ImagePreprocess | WindowPreprocess | None = None
    if set_image:
        try:
            preprocess = ImagePreprocess.model_validate(set_image)
        except ValidationError as exc:
            raise ConfigError(f"invalid image preprocessing options: {exc}") from exc
    return describe_model(args.model, task=task, labels=labels, preprocess=preprocess)


def _read_labels(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read labels {path}: {exc}") from exc
    return label_lines(text)


def execute(args: argparse.Namespace) -> int:
    description = describe_for(args)
    engine = Engine.load(
        description.path,
        accelerator=args.accelerator,
        threads=args.threads,
        model=description.model_file,
    )
    try:
        suffix = args.input.suffix.lower()
        kind: SampleKind = "window" if suffix in (".csv", ".txt", ".wav") else "image"
        data: npt.NDArray[Any]
        if suffix == ".wav":
            data = read_wav(args.input)[0][:, np.newaxis]
        elif kind == "window":
            data = read_csv_window(args.input)
        else:
            data = read_image(args.input)
        preprocess = make_preprocessor(description.preprocess, engine.inputs[0], kind)
        decode = make_decoder(
            description.task, engine.outputs, description.labels, inputs=engine.inputs
        )
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
        "inferred": description.explain(),
        "sources": description.sources,
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
        f"(invoke {report['latency_ms']['invoke']:.2f} ms)",
        f"  {report['inferred']}",
    ]
    result = report["result"]
    if "classes" in result:
        lines += [
            f"  {c['label'] or c['index']:>12}  "
            + (f"{c['fraction']:.1%} of the image" if "fraction" in c else f"{c['score']:.3f}")
            for c in result["classes"]
        ]
        if not result["classes"]:
            lines.append("  no class above the threshold")
    elif "detections" in result:
        for d in result["detections"]:
            box = ", ".join(f"{v:.3f}" for v in d["box"])
            lines.append(f"  {d['label'] or d['index']:>12}  {d['score']:.3f}  [{box}]")
        if not result["detections"]:
            lines.append("  no detection above the threshold")
    elif "poses" in result:
        for pose in result["poses"]:
            seen = [k for k in pose["keypoints"] if k["score"] >= 0.3]
            lines.append(f"  pose {pose['score']:.3f}: {len(seen)} of 17 keypoints seen")
        if not result["poses"]:
            lines.append("  no pose above the threshold")
    elif "score" in result:
        verdict = "ANOMALY" if result["anomaly"] else "normal"
        lines.append(f"  score {result['score']:.4f} (threshold {result['threshold']}): {verdict}")
    else:
        for out in result.get("outputs", []):
            lines.append(f"  {out['name']} {out['shape']}: {json.dumps(out['values'])[:200]}")
    return "\n".join(lines)
