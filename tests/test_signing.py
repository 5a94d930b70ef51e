"""Delivery manifests: signing, verification and the reasons a manifest is refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeagent.config import ClassificationTask, ImagePreprocess, WindowPreprocess
from edgeagent.delivery.signing import (
    MAX_CHUNKS,
    MIN_CHUNK_SIZE,
    REASON_CODES,
    DeliveryError,
    DeliveryManifest,
    DeliveryReference,
    TensorBlob,
    canonical_bytes,
    generate_keypair,
    key_id,
    sign_manifest,
    verify_manifest,
)
from edgeagent.errors import ConfigError

PRIVATE, PUBLIC = generate_keypair()
KEY_ID = key_id(PUBLIC)
TRUSTED = {KEY_ID: PUBLIC}


def manifest(**changes: Any) -> DeliveryManifest:
    fields: dict[str, Any] = {
        "name": "digits-classifier",
        "version": "1.2.0",
        "sha256": "ab" * 32,
        "size": 10000,
        "chunk_size": 4096,
        "chunks": 3,
        "task": ClassificationTask(top_k=2),
        "labels": ("0", "1"),
        "preprocess": ImagePreprocess(color="gray"),
        "min_agent_version": "0.1",
        "created_at": datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        "reference": DeliveryReference(
            input=TensorBlob.from_array(np.arange(4, dtype=np.int8).reshape(1, 4)),
            output=TensorBlob.from_array(np.array([[0.25, 0.75]], np.float32)),
            atol=0.01,
        ),
    }
    fields.update(changes)
    return DeliveryManifest(**fields)


def signed_bytes(m: DeliveryManifest | None = None) -> bytes:
    return sign_manifest(m or manifest(), PRIVATE).to_json_bytes()


def sign_raw(obj: dict[str, Any], private_pem: bytes = PRIVATE) -> bytes:
    """Signs an arbitrary JSON object the way the fleet CLI does (bypassing validation)."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    obj = {k: v for k, v in obj.items() if k != "signature"}
    value = base64.b64encode(key.sign(canonical_bytes(obj))).decode()
    obj["signature"] = {"key_id": key_id(key.public_key()), "algorithm": "ed25519", "value": value}
    return json.dumps(obj).encode()


def reason(raw: bytes, trusted: Any = TRUSTED, allow_unsigned: bool = False, **kw: Any) -> str:
    with pytest.raises(DeliveryError) as caught:
        verify_manifest(raw, trusted, allow_unsigned, **kw)
    assert caught.value.code in REASON_CODES
    assert str(caught.value)  # a sentence for the operator, not just a code
    return caught.value.code


def test_round_trip_verifies_and_keeps_every_field() -> None:
    original = manifest()
    signed = sign_manifest(original, PRIVATE)
    assert signed.signature is not None
    assert signed.signature.key_id == KEY_ID
    assert signed.signature.algorithm == "ed25519"
    assert len(base64.b64decode(signed.signature.value)) == 64
    verified = verify_manifest(signed.to_json_bytes(), TRUSTED, allow_unsigned=False)
    assert verified == signed
    assert verified.model_copy(update={"signature": None}) == original
    assert verified.reference is not None
    np.testing.assert_array_equal(verified.reference.input.array(), [[0, 1, 2, 3]])


def test_canonical_form_is_sorted_compact_utf8_without_signature() -> None:
    signed = sign_manifest(manifest(labels=("é", "ß")), PRIVATE)
    canonical = signed.canonical_bytes()
    text = canonical.decode("utf-8")
    assert "signature" not in json.loads(text)
    assert " " not in text
    assert "\n" not in text
    assert "é" in text  # not \u00e9
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    expected = json.dumps(
        signed.model_dump(mode="json", exclude={"signature"}),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    assert canonical == expected


def test_key_id_is_sha256_prefix_of_the_raw_public_key() -> None:
    import hashlib

    key = serialization.load_pem_public_key(PUBLIC)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert hashlib.sha256(raw).hexdigest()[:16] == KEY_ID
    assert PRIVATE.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert PUBLIC.startswith(b"-----BEGIN PUBLIC KEY-----")


def test_manifest_signed_by_an_untrusted_key_is_refused() -> None:
    other_private, other_public = generate_keypair()
    raw = sign_manifest(manifest(), other_private).to_json_bytes()
    assert reason(raw) == "untrusted-key"
    # Claiming a trusted key id does not help: the signature must verify with that key.
    obj = json.loads(raw)
    obj["signature"]["key_id"] = KEY_ID
    assert reason(json.dumps(obj).encode()) == "bad-signature"
    assert verify_manifest(raw, {key_id(other_public): other_public}, False).name


TAMPERED_VALUES: dict[str, Any] = {
    "name": "shapes-detector",
    "version": "1.2.1",
    "sha256": "cd" * 32,
    "size": 10001,
    "chunk_size": 8192,
    "chunks": 2,
    "task": {"type": "raw"},
    "labels": ["0", "7"],
    "preprocess": {"type": "image", "resize": "crop"},
    "min_agent_version": "0.0.1",
    "created_at": "2025-03-01T12:00:01Z",
    "reference": None,
}


@pytest.mark.parametrize("field", sorted(TAMPERED_VALUES))
def test_any_tampered_field_breaks_the_signature(field: str) -> None:
    obj = json.loads(signed_bytes())
    assert obj[field] != TAMPERED_VALUES[field]
    obj[field] = TAMPERED_VALUES[field]
    assert reason(json.dumps(obj).encode()) == "bad-signature"


def test_tampered_nested_values_break_the_signature() -> None:
    obj = json.loads(signed_bytes())
    obj["reference"]["atol"] = 1.0
    assert reason(json.dumps(obj).encode()) == "bad-signature"
    obj = json.loads(signed_bytes())
    obj["extra"] = 1  # an added member is covered too
    assert reason(json.dumps(obj).encode()) == "bad-signature"


def test_a_damaged_signature_value_is_refused() -> None:
    obj = json.loads(signed_bytes())
    sig = bytearray(base64.b64decode(obj["signature"]["value"]))
    sig[0] ^= 1
    obj["signature"]["value"] = base64.b64encode(bytes(sig)).decode()
    assert reason(json.dumps(obj).encode()) == "bad-signature"
    obj["signature"]["value"] = base64.b64encode(bytes(sig[:32])).decode()
    assert reason(json.dumps(obj).encode()) == "bad-signature"
    obj["signature"]["value"] = "not base64!"
    assert reason(json.dumps(obj).encode()) == "bad-signature"


def test_unsigned_manifest_needs_allow_unsigned() -> None:
    raw = manifest().to_json_bytes()
    assert json.loads(raw)["signature"] is None
    assert reason(raw) == "unsigned"
    assert verify_manifest(raw, TRUSTED, allow_unsigned=True) == manifest()
    obj = json.loads(raw)
    del obj["signature"]
    assert verify_manifest(json.dumps(obj).encode(), {}, allow_unsigned=True) == manifest()


def test_allow_unsigned_still_checks_signatures_that_are_present() -> None:
    obj = json.loads(signed_bytes())
    obj["size"] = 999
    assert reason(json.dumps(obj).encode(), allow_unsigned=True) == "bad-signature"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[1, 2]",
        b'"manifest"',
        b"\xff\xfe{}",
        b'{"name": NaN}',
        b" " * (1 << 20) + b"{}",
    ],
    ids=["empty", "truncated", "array", "string", "not-utf8", "nan", "huge"],
)
def test_malformed_json_is_refused(raw: bytes) -> None:
    assert reason(raw, allow_unsigned=True) == "malformed-manifest"


def test_a_signed_manifest_missing_fields_or_inconsistent_is_malformed() -> None:
    obj = json.loads(manifest().to_json_bytes())
    del obj["sha256"]
    assert reason(sign_raw(obj)) == "malformed-manifest"
    obj = json.loads(manifest().to_json_bytes())
    obj["chunks"] = 2  # 10000 bytes in 4096-byte chunks are 3 chunks
    assert reason(sign_raw(obj)) == "malformed-manifest"
    obj = json.loads(signed_bytes())
    obj["signature"]["algorithm"] = "rsa"
    assert reason(json.dumps(obj).encode()) == "malformed-manifest"


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "a\x00b", ".hidden", "", "x" * 65, "..", "a..b", "a\\b", " a", 7]
)
@pytest.mark.parametrize("field", ["name", "version"])
def test_names_and_versions_with_path_characters_are_refused(field: str, bad: Any) -> None:
    obj = json.loads(manifest().to_json_bytes())
    obj[field] = bad
    assert reason(sign_raw(obj)) == "bad-name"
    assert reason(json.dumps({**obj, "signature": None}).encode(), allow_unsigned=True) == (
        "bad-name"
    )
    with pytest.raises(ValueError, match=field):
        manifest(**{field: bad})


def test_longest_safe_name_is_accepted() -> None:
    raw = signed_bytes(manifest(name="a" * 64, version="1.0.0-rc-1"))
    assert verify_manifest(raw, TRUSTED, False).name == "a" * 64


def test_declared_size_over_the_quota_is_refused() -> None:
    raw = signed_bytes()
    assert reason(raw, max_size=9999) == "too-large"
    assert verify_manifest(raw, TRUSTED, False, max_size=10000).size == 10000


def test_manifest_for_a_newer_agent_is_refused() -> None:
    raw = signed_bytes(manifest(min_agent_version="0.2"))
    assert reason(raw, agent_version="0.1.9") == "agent-too-old"
    assert verify_manifest(raw, TRUSTED, False, agent_version="0.2.0").version == "1.2.0"
    assert verify_manifest(raw, TRUSTED, False, agent_version="1.0").version == "1.2.0"


def test_a_broken_trusted_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PEM"):
        verify_manifest(signed_bytes(), {KEY_ID: "not a key"}, False)


def test_reference_tensor_must_match_its_shape() -> None:
    with pytest.raises(ValueError, match="bytes"):
        TensorBlob(dtype="float32", shape=(2, 2), data=base64.b64encode(b"\0" * 12).decode())


# --- property: verify(sign(m)) == m for any valid manifest ----------------------------------

_safe_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z").filter(lambda s: ".." not in s)
_pre_id = st.from_regex(r"\A(0|[1-9][0-9]{0,3}|[0-9]{0,2}[a-z-][0-9a-z-]{0,5})\Z")
_semvers = st.builds(
    lambda release, pre: ".".join(map(str, release)) + (f"-{'.'.join(pre)}" if pre else ""),
    st.tuples(*[st.integers(0, 10**6)] * 3),
    st.lists(_pre_id, max_size=3),
)
_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def manifests(draw: st.DrawFn) -> DeliveryManifest:
    size = draw(st.integers(1, 10**9))
    # Within what a device takes: at most MAX_CHUNKS chunks of at least MIN_CHUNK_SIZE.
    chunk_size = draw(st.integers(max(MIN_CHUNK_SIZE, -(-size // MAX_CHUNKS)), 16 << 20))
    preprocess = draw(
        st.one_of(
            st.none(),
            st.builds(
                ImagePreprocess,
                resize=st.sampled_from(["stretch", "letterbox", "crop"]),
                color=st.sampled_from(["rgb", "bgr", "gray"]),
                mean=st.tuples(_floats),
                std=st.tuples(_floats.filter(bool)),
            ),
            st.builds(WindowPreprocess, mean=st.lists(_floats, max_size=3).map(tuple)),
        )
    )
    reference = None
    if draw(st.booleans()):
        values = draw(st.lists(st.integers(-128, 127), min_size=1, max_size=8))
        out = draw(st.lists(_floats, min_size=1, max_size=4))
        reference = DeliveryReference(
            input=TensorBlob.from_array(np.array(values, np.int8)),
            output=TensorBlob.from_array(np.array(out, np.float32)),
            atol=draw(st.floats(0, 1)),
        )
    return DeliveryManifest(
        name=draw(_safe_ids),
        version=draw(_semvers),
        sha256=draw(st.binary(min_size=32, max_size=32)).hex(),
        size=size,
        chunk_size=chunk_size,
        chunks=-(-size // chunk_size),
        task=draw(
            st.one_of(
                st.builds(ClassificationTask, top_k=st.integers(1, 10)),
                st.just({"type": "raw"}),
                st.builds(lambda t: {"type": "anomaly", "threshold": t}, _floats),
            )
        ),
        labels=tuple(draw(st.lists(st.text(max_size=12), max_size=5))),
        preprocess=preprocess,
        min_agent_version=draw(st.sampled_from(["0", "0.0", "0.1", "0.0.9"])),
        created_at=draw(
            st.datetimes(
                min_value=datetime(2000, 1, 1),
                max_value=datetime(2100, 1, 1),
                timezones=st.integers(-12 * 60, 14 * 60).map(
                    lambda m: timezone(timedelta(minutes=m))
                ),
            )
        ),
        reference=reference,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests())
def test_verify_of_sign_is_identity(m: DeliveryManifest) -> None:
    signed = sign_manifest(m, PRIVATE)
    assert verify_manifest(signed.to_json_bytes(), TRUSTED, allow_unsigned=False) == signed
    assert signed.model_copy(update={"signature": None}) == m
