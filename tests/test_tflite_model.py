"""read_model: operators, tensors, metadata and packed labels of real .tflite files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.errors import ModelError
from edgeagent.modelfile.tflite import TENSOR_AXIS_LABELS, parse_model, read_model
from tests import modelfactory as mf

LABELS = ["background", "circle", "square", "triangle"]


def test_operators_are_counted_by_builtin_name_and_custom_code(tmp_path: Path) -> None:
    head = mf.constant_head([np.zeros((1, 3)), np.zeros((1, 2))], input_dtype="uint8")
    model = read_model(mf.save(tmp_path / "head.tflite", head))
    assert model.operators == {"FULLY_CONNECTED": 2, "RESHAPE": 2, "DEQUANTIZE": 1}

    custom = read_model(mf.save(tmp_path / "tpu.tflite", mf.custom_op("edgetpu-custom-op")))
    assert custom.operators == {"edgetpu-custom-op": 1}
    assert custom.operator_names == frozenset({"edgetpu-custom-op"})


def test_tensors_carry_shape_dtype_and_quantisation(tmp_path: Path) -> None:
    data = mf.int8_add(np.ones((1, 4), np.float32), (0.02, -10), (0.03, 5), [1, 4])
    model = read_model(mf.save(tmp_path / "add.tflite", data))
    (inp,) = model.inputs
    (out,) = model.outputs
    assert (inp.name, inp.shape, inp.dtype, inp.zero_point) == ("input", (1, 4), "int8", -10)
    assert inp.scale == pytest.approx(0.02)
    assert (out.name, out.dtype, out.zero_point) == ("output", "int8", 5)
    assert out.scale == pytest.approx(0.03)
    assert model.size == len(data)
    assert model.labels == ()
    assert model.metadata_names == ()

    fc = read_model(mf.save(tmp_path / "fc.tflite", mf.float_fc(np.ones((2, 3)), np.zeros(2))))
    assert (fc.inputs[0].dtype, fc.inputs[0].scale, fc.outputs[0].shape) == ("float32", 0.0, (1, 2))


def test_labels_come_from_the_metadata_and_the_appended_zip(tmp_path: Path) -> None:
    base = mf.float_fc(np.ones((4, 3)), np.zeros(4))
    data = mf.with_labels(base, LABELS, name="shapes_labels.txt")
    model = read_model(mf.save(tmp_path / "labelled.tflite", data))
    assert model.labels == tuple(LABELS)
    assert "TFLITE_METADATA" in model.metadata_names
    assert set(model.packed_files) == {"shapes_labels.txt", "README.txt"}
    by_owner = {(f.owner, f.name): f.type for f in model.associated_files}
    assert by_owner == {
        ("output:0", "shapes_labels.txt"): TENSOR_AXIS_LABELS,
        ("model", "README.txt"): 1,
    }


def test_a_lone_label_file_is_used_without_metadata(tmp_path: Path) -> None:
    base = mf.float_fc(np.ones((4, 3)), np.zeros(4))
    data = mf.with_labels(base, LABELS, in_metadata=False)
    model = read_model(mf.save(tmp_path / "zip-only.tflite", data))
    assert model.metadata_names == ()
    assert model.labels == tuple(LABELS)


def test_blank_lines_inside_a_label_file_keep_their_index(tmp_path: Path) -> None:
    base = mf.float_fc(np.ones((3, 3)), np.zeros(3))
    model = read_model(mf.save(tmp_path / "m.tflite", mf.with_labels(base, ["a", "", "c"])))
    assert model.labels == ("a", "", "c")


def test_missing_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        read_model(tmp_path / "nope.tflite")


def test_empty_file_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "empty.tflite").write_bytes(b"")
    with pytest.raises(ModelError, match="is empty"):
        read_model(tmp_path / "empty.tflite")


def test_a_file_that_is_not_a_model_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "notes.tflite").write_text("this is not a model at all\n")
    with pytest.raises(ModelError, match="not a TFLite model"):
        read_model(tmp_path / "notes.tflite")


_LABELLED = mf.with_labels(
    mf.int8_add(np.ones((1, 4), np.float32), (0.02, 0), (0.03, 0), [1, 4]), ["a", "b"]
)


@settings(max_examples=150, deadline=None)
@given(
    cut=st.integers(min_value=8, max_value=len(_LABELLED)),
    edits=st.lists(st.tuples(st.integers(8, len(_LABELLED) - 1), st.integers(0, 255)), max_size=4),
)
def test_a_damaged_model_parses_or_raises_model_error_only(
    cut: int, edits: list[tuple[int, int]]
) -> None:
    damaged = bytearray(_LABELLED)
    for position, value in edits:
        damaged[position] = value
    try:
        parse_model(bytes(damaged[:cut]), Path("damaged.tflite"))
    except ModelError as exc:
        message = str(exc)
    else:
        return
    assert "damaged.tflite" in message


def test_identifier_with_garbage_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"does not parse|no subgraph|corrupt"):
        parse_model(b"\xff\xff\xff\x7fTFL3" + b"\x00" * 8, Path("garbage.tflite"))
