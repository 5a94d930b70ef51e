"""The validation gate: real models through the real LiteRT, in a supervised child process.

The crash and hang tests cannot use a model that really crashes or hangs LiteRT (none is
known to do so reliably), so they point `gate._GATE_ENTRY` at scripts that SIGSEGV
themselves or sleep: what they prove is the supervision (kill, reap, report), not that a
particular model crashes.
"""

from __future__ import annotations

import hashlib
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from edgeagent.delivery import gate
from edgeagent.delivery.gate import GateReport, SourceKind, validate_model
from edgeagent.delivery.signing import (
    DeliveryError,
    DeliveryManifest,
    DeliveryReference,
    TensorBlob,
)
from tests import modelfactory
from tests.waiting import wait_until

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "bundled"
FRAME = (120, 160, 3)
WINDOW = (256, 3)


def delivery_manifest(
    model: Path, yaml_path: Path | None = None, **changes: Any
) -> DeliveryManifest:
    """A delivery manifest for `model`, taking task, labels, preprocess and the reference
    check from a bundled YAML manifest when given."""
    data = model.read_bytes()
    fields: dict[str, Any] = {
        "name": model.stem,
        "version": "1.0.0",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "chunk_size": 65536,
        "chunks": -(-len(data) // 65536),
        "created_at": datetime(2025, 1, 1, tzinfo=UTC),
    }
    if yaml_path is not None:
        y = yaml.safe_load(yaml_path.read_text())
        ref = y["reference"]
        fields.update(
            task=y["task"],
            labels=y["labels"],
            preprocess=y["preprocess"],
            reference=DeliveryReference(
                input=TensorBlob.from_array(np.load(yaml_path.parent / ref["input"])),
                output=TensorBlob.from_array(np.load(yaml_path.parent / ref["output"])),
                atol=ref["atol"],
            ),
        )
    fields.update(changes)
    return DeliveryManifest.model_validate(fields)


def bundled(name: str, **changes: Any) -> tuple[Path, DeliveryManifest]:
    model = BUNDLED / f"{name}.tflite"
    return model, delivery_manifest(model, BUNDLED / f"{name}.yaml", **changes)


def rejected(
    path: Path, m: DeliveryManifest, kind: SourceKind, shape: tuple[int, ...]
) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        validate_model(path, m, source_kind=kind, source_shape=shape, timeout_s=60)
    return caught.value


@pytest.mark.parametrize(
    ("name", "kind", "shape"),
    [
        ("digits-classifier", "image", FRAME),
        ("shapes-detector", "image", FRAME),
        ("shapes-detector-ssd", "image", FRAME),
        ("vibration-anomaly", "window", WINDOW),
    ],
)
def test_bundled_models_pass_with_their_manifests(
    name: str, kind: SourceKind, shape: tuple[int, ...]
) -> None:
    model, m = bundled(name)
    report = validate_model(model, m, source_kind=kind, source_shape=shape)
    assert isinstance(report, GateReport)
    assert report.load_ms > 0
    assert report.invoke_ms > 0
    assert report.invoke_max_ms >= report.invoke_ms
    assert report.reference_max_error is not None
    assert m.reference is not None
    assert report.reference_max_error <= m.reference.atol
    assert report.operators
    assert report.input_shape[0] == 1


def test_a_model_without_reference_passes_on_smoke_alone(tmp_path: Path) -> None:
    model = modelfactory.save(
        tmp_path / "head.tflite", modelfactory.constant_head(np.array([0.5, 0.25], np.float32))
    )
    report = validate_model(
        model, delivery_manifest(model), source_kind="image", source_shape=FRAME
    )
    assert report.reference_max_error is None
    assert report.output_shapes == ((2,),)


def test_a_file_that_is_not_a_flatbuffer_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "notes.tflite"
    model.write_bytes(b"this is a text file, not a model\n" * 10)
    error = rejected(model, delivery_manifest(model), "image", FRAME)
    assert error.code == "not-tflite"
    assert "TFL3" in str(error)


def test_a_truncated_model_is_refused(tmp_path: Path) -> None:
    data = (BUNDLED / "digits-classifier.tflite").read_bytes()
    model = tmp_path / "cut.tflite"
    model.write_bytes(data[: len(data) // 3])
    error = rejected(model, delivery_manifest(model), "image", FRAME)
    assert error.code in {"not-tflite", "load-failed"}


def test_an_operator_the_runtime_lacks_is_named(tmp_path: Path) -> None:
    model = modelfactory.save(tmp_path / "custom.tflite", modelfactory.custom_op("FancyOp"))
    error = rejected(model, delivery_manifest(model), "image", FRAME)
    assert error.code == "unsupported-op"
    assert "FancyOp" in str(error)


def test_a_window_model_on_an_image_source_is_an_input_mismatch() -> None:
    model, m = bundled("vibration-anomaly")
    assert rejected(model, m, "image", FRAME).code == "input-mismatch"
    # Without the window spec it is the tensor shape that does not fit.
    no_spec = m.model_copy(update={"preprocess": None})
    error = rejected(model, no_spec, "image", FRAME)
    assert error.code == "input-mismatch"
    assert "[1, 256, 3]" in str(error)


def test_an_image_model_on_a_sensor_is_an_input_mismatch() -> None:
    model, m = bundled("digits-classifier", preprocess=None)
    assert rejected(model, m, "window", WINDOW).code == "input-mismatch"


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_outputs_are_refused(tmp_path: Path, bad: float) -> None:
    model = modelfactory.save(
        tmp_path / "broken.tflite",
        modelfactory.constant_head(np.array([0.1, bad, 0.3], np.float32)),
    )
    error = rejected(model, delivery_manifest(model), "image", FRAME)
    assert error.code == "non-finite"
    assert "output_0" in str(error)


def test_a_wrong_reference_output_is_refused() -> None:
    model, m = bundled("digits-classifier")
    assert m.reference is not None
    wrong = m.reference.output.array() + 0.5
    ref = m.reference.model_copy(update={"output": TensorBlob.from_array(wrong)})
    error = rejected(model, m.model_copy(update={"reference": ref}), "image", FRAME)
    assert error.code == "reference-mismatch"
    assert "0.5" in str(error)


def test_a_reference_for_another_model_is_refused() -> None:
    model, m = bundled("digits-classifier")
    _, other = bundled("vibration-anomaly")
    error = rejected(model, m.model_copy(update={"reference": other.reference}), "image", FRAME)
    assert error.code == "reference-mismatch"


# --- supervision: a crash or a hang costs the child, never the caller -----------------------


def entry(tmp_path: Path, body: str) -> tuple[str, ...]:
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(body))
    return (gate._GATE_ENTRY[0], str(script))


def test_a_child_that_segfaults_is_a_smoke_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash = """
        import os, signal, sys
        sys.stdin.read()
        sys.stderr.write("kernel blew up\\n"); sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    """
    monkeypatch.setattr(gate, "_GATE_ENTRY", entry(tmp_path, crash))
    model, m = bundled("digits-classifier")
    error = rejected(model, m, "image", FRAME)
    assert error.code == "smoke-crash"
    assert error.details["signal"] == "SIGSEGV"
    assert "kernel blew up" in str(error)


def test_a_child_that_hangs_is_killed_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hang = """
        import subprocess, sys, time
        sys.stdin.read()
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1e9)"])  # a grandchild
        time.sleep(1e9)
    """
    monkeypatch.setattr(gate, "_GATE_ENTRY", entry(tmp_path, hang))
    model, m = bundled("digits-classifier")
    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        validate_model(model, m, source_kind="image", source_shape=FRAME, timeout_s=1.5)
    assert caught.value.code == "smoke-hang"
    assert time.monotonic() - started >= 1.5, "it waited out the timeout before killing"

    # The whole process group went: the grandchild is not left running (the autouse leak
    # fixture sees only direct children, so look for it explicitly).
    def leftovers() -> list[Path]:
        return [
            p
            for p in Path("/proc").glob("[0-9]*/cmdline")
            if _readable(p)
            and b"time.sleep(1e9)" in p.read_bytes()
            and b"Popen" not in p.read_bytes()
        ]

    # Killed, it ends (the kernel may take a moment to reap it); left running, it never would.
    wait_until(lambda: not leftovers(), 5, lambda: f"the grandchild to end: {leftovers()}")


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError:
        return False
    return True


def test_a_child_that_exits_without_a_verdict_is_a_smoke_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        gate,
        "_GATE_ENTRY",
        entry(tmp_path, "import sys; sys.stdin.read(); print('hi'); sys.exit(3)"),
    )
    model, m = bundled("digits-classifier")
    error = rejected(model, m, "image", FRAME)
    assert error.code == "smoke-crash"
    assert error.details["exit_status"] == 3
