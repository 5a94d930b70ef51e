"""`edgeagent model`: look inside a model, quantise it, and deliver it to the fleet. This
module parses and prints; the work is in `fleet/inspection.py`, `fleet/quantize.py` and
`fleet/publish.py`.

Actions:

- `inspect FILE [--json]`: what the .tflite holds and where it can run. Exit 0 when this
  LiteRT runs it, 1 when it cannot (unsupported operators or a load failure; the report is
  still printed) or when FILE is not a TFLite model.
- `quantize FLOAT.tflite --calibration DIR -o INT8.tflite [--manifest M.yaml] [--force]
  [--json]`: full-integer post-training quantisation with ai-edge-quantizer (the
  `quantize` extra); reports sizes and float/int8 agreement on the calibration set.
- `keygen -o KEYDIR`: a new Ed25519 signing key pair, `edgeagent-signing.key` (PKCS8 PEM,
  mode 0600) and `edgeagent-signing.pub`; prints the key id; never overwrites.
- `publish FILE --name N --version V --key K [--manifest M.yaml] [--chunk-size BYTES]
  [--min-agent-version X] [--timeout S] [--json] [broker options]`: signs a delivery
  manifest and publishes the chunks, then the manifest, retained with QoS 1. V must be a
  semantic version; chunks are 4 KiB to 127 KiB, at most 16,384 of them
  (docs/model-delivery.md).
- `unpublish --name N --version V [--chunks K] [broker options]`: clears the retained
  manifest (first) and chunks of a version. Without --chunks, the count is read from the
  retained manifest.

Broker options: --host, --port, --username, --password-file, --tls-ca, --protocol, --prefix.

`inspect --json` prints one object (members are only ever added):

    {"path": str, "size": int, "sha256": str,
     "inputs": [{"name": str, "shape": [int], "dtype": str, "scale": float,
                 "zero_point": int}], "outputs": [same],
     "operators": [{"name": str, "count": int, "supported": bool,
                    "on_edgetpu": int, "on_cpu": int}],      # sorted by name
     "runtime": {"litert": str, "runs": bool, "error": str | null,
                 "unsupported": [str]},
     "edgetpu": {"compiled": bool, "quantized": bool, "first_cpu_op": str | null,
                 "summary": str},
     "full_integer": bool, "integer_io": bool,
     "metadata_names": [str], "associated_files": [str], "labels": [str],
     "inferred": {"task": {...} | null, "explain": str, "sources": {"task": str,
                  "labels": str, "preprocess": str}, "about": str}}

`inferred` is what a pipeline with no task, labels or preprocess of its own would do with
the model (manifest, then metadata, then graph; docs/models.md) and why; `about` is the
metadata's model name and description.

`runtime.runs` is true when this LiteRT loads the model on the CPU and runs it once on
zeros; `unsupported` names the operators it lacks (builtins as "NAME (version N)").
`on_edgetpu`/`on_cpu` split each operator's count by the Edge TPU estimate of
`edgeagent/fleet/compat.py`.

`quantize --json` prints `{"source", "output", "float_size", "int8_size", "samples",
"full_integer", "integer_io", "agreement": {"samples", "top1" (null unless the first
output is [1, N]), "mean_abs_error", "max_abs_error", "cosine"}}`.

`publish --json` prints `{"name", "version", "size", "sha256", "chunk_size", "chunks",
"key_id", "manifest_topic", "chunk_topics": "<prefix>/models/<name>/<version>/chunk/<i>"}`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeagent.cli.bench import ProgressBar
from edgeagent.delivery.signing import (
    MIN_CHUNK_SIZE,
    check_safe_id,
    check_version,
    generate_keypair,
    key_id,
)
from edgeagent.errors import EdgeAgentError
from edgeagent.fleet import compat
from edgeagent.fleet.connection import add_broker_options, broker_config
from edgeagent.fleet.inspection import inspect_report
from edgeagent.fleet.publish import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    Publication,
    check_chunk_size,
    fleet_topics,
    publish_model,
    read_yaml_manifest,
    unpublish_model,
)
from edgeagent.modelfile.manifest import load_manifest
from edgeagent.modelfile.tflite import read_model

log = logging.getLogger(__name__)

PRIVATE_KEY_NAME = "edgeagent-signing.key"
PUBLIC_KEY_NAME = "edgeagent-signing.pub"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "model",
        description="Inspect a .tflite, quantise a float model to int8, and deliver models "
        "to devices over MQTT (signed manifest plus retained chunks).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    inspect = actions.add_parser(
        "inspect",
        help="what a .tflite holds and where it can run",
        description="Inputs, outputs, operators, what this LiteRT cannot run, what would "
        "stay on the CPU under an Edge TPU, metadata and labels. Exit 1 when the model "
        "cannot run here.",
    )
    inspect.add_argument("file", type=Path, help="the .tflite file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=execute_inspect)

    quantize = actions.add_parser(
        "quantize",
        help="full-integer post-training quantisation (needs the quantize extra)",
        description="Quantise a float32 .tflite to int8 (weights and activations, int8 "
        "inputs and outputs) with ai-edge-quantizer, calibrated on a representative set.",
    )
    quantize.add_argument("file", type=Path, help="the float32 .tflite")
    quantize.add_argument(
        "--calibration",
        type=Path,
        required=True,
        help="folder of images (resized per the model's input) or .npy input arrays",
    )
    quantize.add_argument("-o", "--output", type=Path, required=True, help="int8 .tflite")
    quantize.add_argument(
        "--manifest",
        type=Path,
        help="YAML manifest whose preprocess applies to the images (default: the one "
        "beside FILE, else pixel / 255)",
    )
    quantize.add_argument("--force", action="store_true", help="overwrite the output")
    quantize.add_argument("--json", action="store_true", help="print one JSON object")
    quantize.set_defaults(handler=execute_quantize)

    keygen = actions.add_parser(
        "keygen",
        help="create an Ed25519 key pair for signing model manifests",
        description=f"Write {PRIVATE_KEY_NAME} (PKCS8 PEM, mode 0600) and {PUBLIC_KEY_NAME} "
        "into KEYDIR and print the key id. Refuses to overwrite.",
    )
    keygen.add_argument("-o", "--output", type=Path, required=True, metavar="KEYDIR")
    keygen.set_defaults(handler=execute_keygen)

    publish = actions.add_parser(
        "publish",
        help="sign and publish a model version to the broker",
        description="Build and sign the delivery manifest, publish every chunk retained "
        "(QoS 1), then the manifest, and wait for the broker's acknowledgements.",
    )
    publish.add_argument("file", type=Path, help="the .tflite to deliver")
    _name_version(publish)
    publish.add_argument("--key", type=Path, required=True, help="private signing key (PEM)")
    publish.add_argument(
        "--manifest",
        type=Path,
        help="YAML manifest (docs/models.md) giving task, labels, preprocess and a "
        "reference check (default: the one beside FILE, if any)",
    )
    publish.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"bytes per chunk (default {DEFAULT_CHUNK_SIZE}, {MIN_CHUNK_SIZE} to "
        f"{MAX_CHUNK_SIZE})",
    )
    publish.add_argument(
        "--min-agent-version", default="0", help="oldest agent that may take this model"
    )
    publish.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="give up when nothing is acknowledged for this many seconds (default 30)",
    )
    publish.add_argument("--json", action="store_true", help="print one JSON object")
    add_broker_options(publish)
    publish.set_defaults(handler=execute_publish)

    unpublish = actions.add_parser(
        "unpublish",
        help="remove a published model version from the broker",
        description="Clear the retained manifest (first) and every chunk of a version.",
    )
    _name_version(unpublish)
    unpublish.add_argument(
        "--chunks", type=int, help="how many chunks (default: read from the retained manifest)"
    )
    unpublish.add_argument("--timeout", type=float, default=30.0, help="default 30 s")
    add_broker_options(unpublish)
    unpublish.set_defaults(handler=execute_unpublish)


def _name_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="model name (a safe identifier)")
    parser.add_argument("--version", required=True, help="model version (a safe identifier)")


# --- inspect ------------------------------------------------------------------------------


def execute_inspect(args: argparse.Namespace) -> int:
    report = inspect_report(args.file)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_inspect_text(report))
    return 0 if report["runtime"]["runs"] else 1


def _inspect_text(r: dict[str, Any]) -> str:
    lines = [f"{r['path']}: {r['size']} bytes, sha256 {r['sha256'][:16]}..."]
    if r["inferred"]["about"]:
        lines.append(f"model: {r['inferred']['about']}")
    for title in ("inputs", "outputs"):
        lines.append(f"{title}:")
        for t in r[title]:
            quant = (
                f"  scale {t['scale']:.6g} zero point {t['zero_point']}"
                if t["scale"]
                else "  not quantised"
            )
            lines.append(f"  {t['name']}: {t['dtype']} {t['shape']}{quant}")
    kind = "full-integer" if r["full_integer"] else "not full-integer (float operators)"
    io = "integer" if r["integer_io"] else "float"
    lines.append(f"quantisation: {kind}, {io} inputs/outputs")
    total = sum(o["count"] for o in r["operators"])
    lines.append(f"operators: {total} ({len(r['operators'])} kinds)")
    for o in r["operators"]:
        marks = [] if o["supported"] else ["NOT SUPPORTED by this LiteRT"]
        if o["on_cpu"] and o["on_edgetpu"]:
            marks.append(f"Edge TPU {o['on_edgetpu']}, CPU {o['on_cpu']}")
        elif o["on_cpu"]:
            marks.append("CPU under the Edge TPU")
        elif o["on_edgetpu"]:
            marks.append("Edge TPU")
        lines.append(f"  {o['name']:<32} x{o['count']:<4} {'; '.join(marks)}".rstrip())
    rt = r["runtime"]
    if rt["runs"]:
        lines.append(f"runtime: runs on this LiteRT {rt['litert']} (CPU)")
    elif rt["unsupported"]:
        lines.append(
            f"runtime: CANNOT RUN on this LiteRT {rt['litert']}: missing operator(s) "
            f"{', '.join(rt['unsupported'])}"
        )
        if any(u == compat.EDGETPU_CUSTOM_OP for u in rt["unsupported"]):
            lines.append("  (edgetpu-custom-op runs only with the Edge TPU delegate present)")
    else:
        lines.append(f"runtime: CANNOT RUN on this LiteRT {rt['litert']}: {rt['error']}")
    lines.append(f"Edge TPU: {r['edgetpu']['summary']}")
    lines.append(f"metadata: {', '.join(r['metadata_names']) or 'none'}")
    if r["associated_files"]:
        lines.append(f"associated files: {', '.join(r['associated_files'])}")
    labels = r["labels"]
    if labels:
        shown = ", ".join(labels[:10]) + (
            f", ... ({len(labels)} in all)" if len(labels) > 10 else ""
        )
        lines.append(f"labels: {shown}")
    else:
        lines.append("labels: none")
    lines.append(f"inferred: {r['inferred']['explain']}")
    return "\n".join(lines)


# --- quantize -----------------------------------------------------------------------------


def execute_quantize(args: argparse.Namespace) -> int:
    from edgeagent.fleet import quantize

    if args.output.exists() and not args.force:
        raise EdgeAgentError(f"{args.output} exists: choose another -o or pass --force")
    if args.output.resolve() == args.file.resolve():
        raise EdgeAgentError("the output would overwrite the float model: choose another -o")
    read_model(args.file)  # a clear error for a file that is not a model
    spec = read_yaml_manifest(args.manifest) if args.manifest else load_manifest(args.file)
    preprocess = spec.preprocess if spec is not None else None
    if preprocess is not None and preprocess.type != "image":
        preprocess = None  # window specs apply to sensor windows; .npy inputs are as given
    tensor, key, input_name = quantize.float_input(args.file)
    samples = quantize.load_calibration(args.calibration, tensor, preprocess)
    log.info("calibrating %s on %d samples", args.file, len(samples))
    result = quantize.quantize_model(args.file, samples, args.output, signature=(key, input_name))
    a = result.agreement
    report = {
        "source": str(result.source),
        "output": str(result.output),
        "float_size": result.float_size,
        "int8_size": result.int8_size,
        "samples": result.samples,
        "full_integer": result.full_integer,
        "integer_io": result.integer_io,
        "agreement": {
            "samples": a.samples,
            "top1": a.top1,
            "mean_abs_error": a.mean_abs_error,
            "max_abs_error": a.max_abs_error,
            "cosine": a.cosine,
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    kind = "full-integer" if result.full_integer else "NOT full-integer"
    print(
        f"wrote {result.output}: {result.int8_size} bytes ({kind}, "
        f"{'int8' if result.integer_io else 'float'} inputs/outputs), from {result.float_size} "
        f"bytes float ({result.int8_size / result.float_size:.0%})"
    )
    top1 = f"top-1 agreement {a.top1:.1%}, " if a.top1 is not None else ""
    print(
        f"float vs int8 on {a.samples} calibration samples: {top1}mean abs error "
        f"{a.mean_abs_error:.4g}, max abs error {a.max_abs_error:.4g}, cosine {a.cosine:.4f}"
    )
    return 0


# --- keygen -------------------------------------------------------------------------------


def execute_keygen(args: argparse.Namespace) -> int:
    directory: Path = args.output
    private_path, public_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    existing = [p for p in (private_path, public_path) if p.exists()]
    if existing:
        raise EdgeAgentError(
            f"{existing[0]} already exists: a signing key is never overwritten (devices "
            "trust it); choose another folder, or delete the old key pair yourself"
        )
    private_pem, public_pem = generate_keypair()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_new(private_path, private_pem, 0o600)
        _write_new(public_path, public_pem, 0o644)
    except FileExistsError as exc:
        raise EdgeAgentError(f"{exc.filename} appeared meanwhile; not overwriting it") from exc
    except OSError as exc:
        raise EdgeAgentError(f"cannot write the key pair into {directory}: {exc}") from exc
    print(f"key id {key_id(public_pem)}")
    print(f"private key: {private_path} (keep it secret; sign with --key)")
    print(f"public key:  {public_path} (give it to devices as a trusted key)")
    return 0


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    path.chmod(mode)  # the umask may have narrowed it


# --- publish / unpublish ------------------------------------------------------------------


def execute_publish(args: argparse.Namespace) -> int:
    name = check_safe_id(args.name, "name")
    ver = check_version(args.version)
    check_chunk_size(args.chunk_size)
    if args.timeout <= 0:
        raise EdgeAgentError("--timeout must be positive")
    config = broker_config(args)
    fleet_topics(config.prefix)  # a bad --prefix is refused before anything is read
    bars: list[ProgressBar] = []

    def start(chunks: int) -> Callable[[int], None]:
        bars.append(ProgressBar(chunks, f"{name} {ver}"))
        return bars[0].update

    def done() -> None:
        bars[0].close()

    item = Publication(
        args.file,
        name,
        ver,
        key=args.key,
        manifest=args.manifest,
        chunk_size=args.chunk_size,
        min_agent_version=args.min_agent_version,
    )
    report = publish_model(config, item, timeout=args.timeout, on_start=start, on_done=done)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"published {name} {ver}: {report['size']} bytes in {report['chunks']} chunk(s) "
            f"of {report['chunk_size']}, sha256 {report['sha256'][:16]}..., signed by key "
            f"{report['key_id']}; manifest on {report['manifest_topic']}"
        )
    return 0


def execute_unpublish(args: argparse.Namespace) -> int:
    name = check_safe_id(args.name, "name")
    ver = check_safe_id(args.version, "version")
    if args.chunks is not None and args.chunks < 0:
        raise EdgeAgentError("--chunks must be 0 or more")
    config = broker_config(args)
    count = unpublish_model(config, name, ver, args.chunks, timeout=args.timeout)
    print(f"unpublished {name} {ver}: cleared the manifest and {count} chunk(s)")
    return 0
