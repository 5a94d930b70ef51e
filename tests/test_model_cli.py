"""`edgeagent model inspect|quantize|keygen|publish|unpublish`, run in-process through
`edgeagent.cli.main.main` (publish against a real mosquitto on loopback)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from PIL import Image

from edgeagent.cli.main import main
from edgeagent.delivery.signing import key_id, verify_manifest
from edgeagent.modelfile.catalog import bundled_dir
from edgeagent.modelfile.tflite import read_model
from tests import modelfactory as mf
from tests.broker import Mosquitto, MqttReader
from tests.data.make_float_model import LABELS, pattern

DATA = Path(__file__).resolve().parent / "data"
FLOAT_MODEL = DATA / "float-patterns.tflite"
BUNDLED = sorted(p.stem for p in bundled_dir().glob("*.tflite"))
Reader = Callable[..., MqttReader]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def inspect_json(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, dict[str, Any]]:
    code, out, err = cli(capsys, "model", "inspect", str(path), "--json")
    assert out, err
    return code, json.loads(out)


def broker_args(broker: Mosquitto) -> list[str]:
    return ["--host", broker.host, "--port", str(broker.port)]


# --- inspect ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_inspect_every_bundled_model_runs_here(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = bundled_dir() / f"{name}.tflite"
    code, report = inspect_json(capsys, path)
    model = read_model(path)
    assert code == 0
    assert report["runtime"]["runs"] is True
    assert report["runtime"]["unsupported"] == []
    assert [i["shape"] for i in report["inputs"]] == [list(t.shape) for t in model.inputs]
    assert [o["dtype"] for o in report["outputs"]] == [t.dtype for t in model.outputs]
    assert report["inputs"][0]["dtype"] == "int8"
    assert report["inputs"][0]["scale"] > 0
    assert {o["name"]: o["count"] for o in report["operators"]} == dict(model.operators)
    assert all(o["supported"] for o in report["operators"])
    assert all(o["on_edgetpu"] + o["on_cpu"] == o["count"] for o in report["operators"])
    assert report["size"] == path.stat().st_size
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_ssd_detector_counts_its_postprocess_op_as_supported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = bundled_dir() / "shapes-detector-ssd.tflite"
    code, report = inspect_json(capsys, path)
    ops = {o["name"]: o for o in report["operators"]}
    assert code == 0
    assert ops["TFLite_Detection_PostProcess"]["supported"] is True
    # A custom op the Edge TPU does not have, at the end: it stays on the CPU.
    assert ops["TFLite_Detection_PostProcess"]["on_cpu"] == 1
    assert ops["CONV_2D"]["on_edgetpu"] > 0
    assert report["full_integer"] is False  # the post-processing works on floats
    code, out, _ = cli(capsys, "model", "inspect", str(path))
    assert code == 0
    assert "TFLite_Detection_PostProcess" in out
    assert "runs on this LiteRT" in out
    assert "detection_boxes: float32 [1, 20, 4]" in out


def test_inspect_int8_classifier_is_full_integer_and_mostly_on_the_edgetpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, report = inspect_json(capsys, bundled_dir() / "digits-classifier.tflite")
    ops = {o["name"]: o for o in report["operators"]}
    assert code == 0
    assert report["full_integer"] is True
    assert report["integer_io"] is True
    assert report["edgetpu"]["quantized"] is True
    assert ops["CONV_2D"]["on_edgetpu"] == ops["CONV_2D"]["count"]
    # SHAPE is not an Edge TPU op: the compiler stops there, the rest stays on the CPU.
    assert report["edgetpu"]["first_cpu_op"] == "SHAPE"
    assert ops["SOFTMAX"]["on_cpu"] == 1


def _two_custom_ops(tmp_path: Path) -> Path:
    g = mf.Graph()
    x = g.tensor("input", [1, 4])
    relu = g.tensor("relu", [1, 4])
    mid = g.tensor("mid", [1, 4])
    y = g.tensor("output", [1, 4])
    g.op(schema.BuiltinOperator.RELU, [x], [relu])
    g.op("MadeUpOp", [relu], [mid])
    g.op("AnotherMadeUpOp", [mid], [y])
    return mf.save(tmp_path / "custom.tflite", g.build([x], [y]))


def test_inspect_lists_every_unknown_custom_op_and_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _two_custom_ops(tmp_path)
    code, report = inspect_json(capsys, path)
    ops = {o["name"]: o for o in report["operators"]}
    assert code == 1
    assert report["runtime"]["runs"] is False
    # LiteRT itself names only the first; the per-operator probes find the second too.
    assert report["runtime"]["unsupported"] == ["MadeUpOp", "AnotherMadeUpOp"]
    assert "unresolved custom op: MadeUpOp" in report["runtime"]["error"]
    assert ops["MadeUpOp"]["supported"] is False
    assert ops["RELU"]["supported"] is True
    code, out, _ = cli(capsys, "model", "inspect", str(path))
    assert code == 1
    assert "CANNOT RUN" in out
    assert "MadeUpOp, AnotherMadeUpOp" in out


def test_inspect_single_unknown_custom_op(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = mf.save(tmp_path / "one.tflite", mf.custom_op("NoSuchOp"))
    code, report = inspect_json(capsys, path)
    assert code == 1
    assert report["runtime"]["unsupported"] == ["NoSuchOp"]


def test_inspect_edgetpu_compiled_model_needs_the_delegate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = mf.save(tmp_path / "compiled.tflite", mf.custom_op("edgetpu-custom-op"))
    code, report = inspect_json(capsys, path)
    assert code == 1  # no Edge TPU delegate on the CPU-only runtime
    assert report["edgetpu"]["compiled"] is True
    assert "already compiled" in report["edgetpu"]["summary"]
    _, out, _ = cli(capsys, "model", "inspect", str(path))
    assert "only with the Edge TPU delegate" in out


def test_inspect_float_model_stays_on_the_cpu_under_the_edgetpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = cli(capsys, "model", "inspect", str(FLOAT_MODEL))
    assert code == 0
    assert "stays on the CPU under the Edge TPU" in out
    assert "float32 [1, 16, 16, 1]" in out
    assert "not full-integer" in out
    _, report = inspect_json(capsys, FLOAT_MODEL)
    assert report["edgetpu"]["quantized"] is False
    assert all(o["on_edgetpu"] == 0 for o in report["operators"])
    assert report["full_integer"] is False


def test_inspect_shows_embedded_labels_and_metadata(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = mf.with_labels(
        mf.float_fc(np.eye(3, 4, dtype=np.float32), np.zeros(3, np.float32)), ["cat", "dog", "bird"]
    )
    path = mf.save(tmp_path / "labelled.tflite", model)
    code, report = inspect_json(capsys, path)
    assert code == 0
    assert report["labels"] == ["cat", "dog", "bird"]
    assert "TFLITE_METADATA" in report["metadata_names"]
    assert "labels.txt" in report["associated_files"]
    _, out, _ = cli(capsys, "model", "inspect", str(path))
    assert "labels: cat, dog, bird" in out


@pytest.mark.parametrize("content", [b"", b"not a model at all, just text\n"])
def test_inspect_not_a_model_is_a_clean_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "notes.tflite"
    path.write_bytes(content)
    code, out, err = cli(capsys, "model", "inspect", str(path))
    assert code == 1
    assert out == ""
    assert err.startswith("edgeagent: error:")
    assert "Traceback" not in err
    assert "not a TFLite model" in err or "is empty" in err


def test_inspect_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = cli(capsys, "model", "inspect", str(tmp_path / "nope.tflite"))
    assert code == 1
    assert "does not exist" in err


# --- quantize -----------------------------------------------------------------------------


def _calibration(folder: Path, count: int = 48) -> Path:
    """PNGs at twice the model's resolution (so they are resized) plus one .npy stack."""
    folder.mkdir()
    rng = np.random.default_rng(11)
    for i in range(count):
        image = Image.fromarray(pattern(i % len(LABELS), rng)).resize((32, 32))
        image.convert("RGB").save(folder / f"sample-{i:03d}.png")
    stack = np.stack([pattern(k % len(LABELS), rng)[..., None] for k in range(16)])
    np.save(folder / "stack.npy", (stack / 255.0).astype(np.float32))
    return folder


def _need_quantizer() -> None:
    if importlib.util.find_spec("ai_edge_quantizer") is None:
        reason = "ai-edge-quantizer is not installed (pip install 'edgeagent[quantize]')"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the quantize test")
        pytest.skip(reason)


def test_quantize_end_to_end_gives_a_full_integer_model_that_agrees(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _need_quantizer()
    calibration = _calibration(tmp_path / "calibration")
    out_path = tmp_path / "int8.tflite"
    code, out, err = cli(
        capsys,
        "model",
        "quantize",
        str(FLOAT_MODEL),
        "--calibration",
        str(calibration),
        "-o",
        str(out_path),
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["samples"] == 48 + 16
    assert report["full_integer"] is True
    assert report["integer_io"] is True
    assert report["int8_size"] == out_path.stat().st_size
    assert report["int8_size"] < report["float_size"]
    agreement = report["agreement"]
    assert agreement["top1"] >= 0.95
    assert agreement["cosine"] >= 0.99
    assert agreement["mean_abs_error"] < 0.05
    _, inspected = inspect_json(capsys, out_path)
    assert inspected["runtime"]["runs"] is True
    assert inspected["full_integer"] is True
    assert inspected["inputs"][0]["dtype"] == "int8"
    assert inspected["edgetpu"]["first_cpu_op"] is None  # every op maps
    # The human report, and refusing to overwrite without --force.
    code, _, err = cli(
        capsys,
        "model",
        "quantize",
        str(FLOAT_MODEL),
        "--calibration",
        str(calibration),
        "-o",
        str(out_path),
    )
    assert code == 1
    assert "exists" in err
    code, out, _ = cli(
        capsys,
        "model",
        "quantize",
        str(FLOAT_MODEL),
        "--calibration",
        str(calibration),
        "-o",
        str(out_path),
        "--force",
    )
    assert code == 0
    assert "full-integer" in out
    assert "top-1 agreement" in out


def test_quantize_without_the_library_names_the_extra(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("ai_edge_quantizer", "ai_edge_quantizer.quantizer", "ai_edge_quantizer.recipe"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    calibration = _calibration(tmp_path / "calibration", count=4)
    code, _, err = cli(
        capsys,
        "model",
        "quantize",
        str(FLOAT_MODEL),
        "--calibration",
        str(calibration),
        "-o",
        str(tmp_path / "int8.tflite"),
    )
    assert code == 1
    assert "ai-edge-quantizer is not available" in err
    assert "pip install 'edgeagent[quantize]'" in err
    assert not (tmp_path / "int8.tflite").exists()


def test_quantize_refuses_what_it_cannot_calibrate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    no_signature = mf.save(
        tmp_path / "fc.tflite", mf.float_fc(np.eye(2, 3, dtype=np.float32), np.zeros(2, np.float32))
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(
        capsys,
        "model",
        "quantize",
        str(no_signature),
        "--calibration",
        str(empty),
        "-o",
        str(tmp_path / "out.tflite"),
    )
    assert code == 1
    assert "no signature" in err
    code, _, err = cli(
        capsys,
        "model",
        "quantize",
        str(FLOAT_MODEL),
        "--calibration",
        str(empty),
        "-o",
        str(tmp_path / "out.tflite"),
    )
    assert code == 1
    assert "holds no image" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "wrong.npy", np.zeros((3, 3), np.float32))
    code, _, err = cli(
        capsys,
        "model",
        "quantize",
        str(FLOAT_MODEL),
        "--calibration",
        str(bad),
        "-o",
        str(tmp_path / "out.tflite"),
    )
    assert code == 1
    assert "wrong.npy has shape [3, 3]" in err
    int8 = bundled_dir() / "digits-classifier.tflite"
    code, _, err = cli(
        capsys,
        "model",
        "quantize",
        str(int8),
        "--calibration",
        str(bad),
        "-o",
        str(tmp_path / "out.tflite"),
    )
    assert code == 1
    assert "already quantised" in err


# --- keygen -------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_we_can_read_and_never_overwrites(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    code, out, _ = cli(capsys, "model", "keygen", "-o", str(keys))
    private, public = keys / "edgeagent-signing.key", keys / "edgeagent-signing.pub"
    assert code == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert f"key id {key_id(public.read_bytes())}" in out
    before = private.read_bytes()
    code, _, err = cli(capsys, "model", "keygen", "-o", str(keys))
    assert code == 1
    assert "already exists" in err
    assert private.read_bytes() == before


# --- publish / unpublish ------------------------------------------------------------------


@pytest.fixture
def signing_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> tuple[Path, bytes]:
    assert main(["model", "keygen", "-o", str(tmp_path / "keys")]) == 0
    capsys.readouterr()
    keys = tmp_path / "keys"
    return keys / "edgeagent-signing.key", (keys / "edgeagent-signing.pub").read_bytes()


def _retained(broker: Mosquitto, mqtt_reader: Reader, count: int) -> dict[str, bytes]:
    reader = mqtt_reader(broker, "edgeagent/models/#")
    messages = reader.wait_for_count(count, lambda m: m.retain)
    return {m.topic: m.payload for m in messages}


def test_publish_sends_retained_chunks_then_the_signed_manifest(
    capsys: pytest.CaptureFixture[str],
    mosquitto: Mosquitto,
    mqtt_reader: Reader,
    signing_key: tuple[Path, bytes],
) -> None:
    key, public = signing_key
    path = bundled_dir() / "digits-classifier.tflite"
    data = path.read_bytes()
    chunk_size = 16384
    chunks = -(-len(data) // chunk_size)
    live = mqtt_reader(mosquitto, "edgeagent/models/#")
    code, out, err = cli(
        capsys,
        "model",
        "publish",
        str(path),
        "--name",
        "digits",
        "--version",
        "1.1.0",
        "--key",
        str(key),
        "--chunk-size",
        str(chunk_size),
        "--json",
        *broker_args(mosquitto),
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["chunks"] == chunks
    base = "edgeagent/models/digits/1.1.0"
    assert report["manifest_topic"] == f"{base}/manifest"
    # In publish order: every chunk, then the manifest.
    order = [m.topic for m in live.wait_for_count(chunks + 1)]
    assert order[-1] == f"{base}/manifest"
    assert sorted(order[:-1]) == sorted(f"{base}/chunk/{i}" for i in range(chunks))
    # All of it retained, for a device that subscribes later.
    retained = _retained(mosquitto, mqtt_reader, chunks + 1)
    manifest = verify_manifest(retained[f"{base}/manifest"], {key_id(public): public}, False)
    assert (manifest.name, manifest.version, manifest.chunks) == ("digits", "1.1.0", chunks)
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()
    parts = [retained[f"{base}/chunk/{i}"] for i in range(chunks)]
    assert all(len(p) == manifest.chunk_length(i) <= chunk_size for i, p in enumerate(parts))
    assert b"".join(parts) == data
    # Task, labels, preprocess and the reference check come from the YAML beside the model.
    assert manifest.task.type == "classification"
    assert manifest.labels == tuple(str(d) for d in range(10))
    assert manifest.preprocess is not None
    assert manifest.reference is not None
    expected = np.load(bundled_dir() / "digits-classifier.ref-output.npy")
    np.testing.assert_allclose(manifest.reference.output.array(), expected)


def test_publish_with_an_explicit_manifest_and_the_default_chunk_size(
    capsys: pytest.CaptureFixture[str],
    mosquitto: Mosquitto,
    mqtt_reader: Reader,
    signing_key: tuple[Path, bytes],
    tmp_path: Path,
) -> None:
    key, public = signing_key
    path = bundled_dir() / "shapes-detector.tflite"
    data = path.read_bytes()
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: whatever\ntask: {type: raw}\nlabels: [a, b]\n", encoding="utf-8")
    code, out, err = cli(
        capsys,
        "model",
        "publish",
        str(path),
        "--name",
        "shapes",
        "--version",
        "2.0.0",
        "--key",
        str(key),
        "--manifest",
        str(spec),
        *broker_args(mosquitto),
    )
    assert code == 0, err
    assert "published shapes 2.0.0" in out
    chunks = -(-len(data) // 65536)
    retained = _retained(mosquitto, mqtt_reader, chunks + 1)
    manifest = verify_manifest(
        retained["edgeagent/models/shapes/2.0.0/manifest"], {key_id(public): public}, False
    )
    assert manifest.chunk_size == 65536
    assert manifest.labels == ("a", "b")
    assert manifest.reference is None
    assert max(len(v) for t, v in retained.items() if "/chunk/" in t) == 65536


@pytest.mark.parametrize("size", ["0", "131073", "200000"])
def test_publish_refuses_chunks_that_do_not_fit_the_broker_cap(
    capsys: pytest.CaptureFixture[str], signing_key: tuple[Path, bytes], size: str
) -> None:
    key, _ = signing_key
    code, _, err = cli(
        capsys,
        "model",
        "publish",
        str(bundled_dir() / "vibration-anomaly.tflite"),
        "--name",
        "vib",
        "--version",
        "1.0.0",
        "--key",
        str(key),
        "--chunk-size",
        size,
        "--port",
        "1",  # never reached: the options are checked first
    )
    assert code == 1
    assert "--chunk-size" in err
    assert "128 KiB" in err


@pytest.mark.parametrize(
    ("name", "version"), [("../etc", "1"), ("ok", "a/b"), ("-dash", "1"), ("ok", "1+2")]
)
def test_publish_and_unpublish_refuse_unsafe_names(
    capsys: pytest.CaptureFixture[str], signing_key: tuple[Path, bytes], name: str, version: str
) -> None:
    key, _ = signing_key
    model = str(bundled_dir() / "vibration-anomaly.tflite")
    for action in (
        ["publish", model, "--key", str(key)],
        ["unpublish", "--chunks", "1"],
    ):
        code, _, err = cli(
            capsys, "model", *action, f"--name={name}", f"--version={version}", "--port", "1"
        )
        assert code == 1
        assert "is not a safe identifier" in err


def test_publish_refuses_a_file_that_is_not_a_model(
    capsys: pytest.CaptureFixture[str], signing_key: tuple[Path, bytes], tmp_path: Path
) -> None:
    key, _ = signing_key
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 100)
    code, _, err = cli(
        capsys,
        "model",
        "publish",
        str(junk),
        "--name",
        "j",
        "--version",
        "1.0.0",
        "--key",
        str(key),
        "--port",
        "1",
    )
    assert code == 1
    assert "not a TFLite model" in err


def test_publish_to_an_absent_broker_says_so(
    capsys: pytest.CaptureFixture[str], signing_key: tuple[Path, bytes]
) -> None:
    from tests.broker import free_port

    key, _ = signing_key
    code, _, err = cli(
        capsys,
        "model",
        "publish",
        str(bundled_dir() / "vibration-anomaly.tflite"),
        "--name",
        "vib",
        "--version",
        "1.0.0",
        "--key",
        str(key),
        "--port",
        str(free_port()),
    )
    assert code == 1
    assert "cannot reach the MQTT broker" in err


def test_unpublish_clears_the_manifest_first_then_every_chunk(
    capsys: pytest.CaptureFixture[str],
    mosquitto: Mosquitto,
    mqtt_reader: Reader,
    signing_key: tuple[Path, bytes],
) -> None:
    key, _ = signing_key
    path = bundled_dir() / "vibration-anomaly.tflite"
    chunks = -(-path.stat().st_size // 4096)
    args = ["--name", "vib", "--version", "1.0.0", *broker_args(mosquitto)]
    code, _, err = cli(
        capsys, "model", "publish", str(path), "--key", str(key), "--chunk-size", "4096", *args
    )
    assert code == 0, err
    _retained(mosquitto, mqtt_reader, chunks + 1)
    live = mqtt_reader(mosquitto, "edgeagent/models/#")
    live.wait_for_count(chunks + 1, lambda m: m.retain)  # the retained ones on subscribing
    code, out, err = cli(capsys, "model", "unpublish", *args)  # count read from the manifest
    assert code == 0, err
    assert f"{chunks} chunk(s)" in out
    clears = live.wait_for_count(chunks + 1, lambda m: not m.retain and m.payload == b"")
    assert clears[0].topic == "edgeagent/models/vib/1.0.0/manifest"
    assert {m.topic for m in clears[1:]} == {
        f"edgeagent/models/vib/1.0.0/chunk/{i}" for i in range(chunks)
    }
    # A late subscriber finds nothing retained any more.
    late = mqtt_reader(mosquitto, "edgeagent/models/#")
    with pytest.raises(AssertionError):
        late.wait_for(timeout=0.5)
    # Without a manifest there is no count to read.
    code, _, err = cli(capsys, "model", "unpublish", *args)
    assert code == 1
    assert "--chunks" in err


@pytest.mark.parametrize("version", ["1", "1.2", "v1.0.0", "1.0.0-01", "01.0.0"])
def test_publish_refuses_a_version_that_is_not_semantic(
    capsys: pytest.CaptureFixture[str], signing_key: tuple[Path, bytes], version: str
) -> None:
    """Devices order versions to refuse downgrades: a version they could not order is
    refused before anything is published."""
    key, _ = signing_key
    model = str(bundled_dir() / "vibration-anomaly.tflite")
    code, _, err = cli(
        capsys, "model", "publish", model, "--key", str(key), "--name=vib",
        f"--version={version}", "--port", "1",
    )  # fmt: skip
    assert code == 1
    assert "is not a semantic version" in err


@pytest.mark.parametrize("size", ["1", "4095"])
def test_publish_refuses_chunks_devices_would_refuse(
    capsys: pytest.CaptureFixture[str], signing_key: tuple[Path, bytes], size: str
) -> None:
    key, _ = signing_key
    model = str(bundled_dir() / "vibration-anomaly.tflite")
    code, _, err = cli(
        capsys, "model", "publish", model, "--key", str(key), "--name=vib",
        "--version=1.0.0", "--chunk-size", size, "--port", "1",
    )  # fmt: skip
    assert code == 1
    assert "--chunk-size" in err
    assert "4096" in err
