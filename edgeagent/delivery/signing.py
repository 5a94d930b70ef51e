"""The signed manifest of a model delivered over MQTT, and its Ed25519 signature.

A delivery manifest says what a model is (name, version, sha256, size, how it is chunked)
and how to use it (task, labels, preprocess, an optional reference check). The fleet signs
it with an Ed25519 key; a device accepts it only when the signature verifies against one of
its trusted public keys (or, when its config says `allow_unsigned: true`, when unsigned).

Canonical form (the exact bytes that are signed and verified)
-------------------------------------------------------------
Take the manifest as a JSON object and remove its top-level `"signature"` member (if any).
Serialise what is left as UTF-8 JSON with object keys sorted (at every depth) by code point,
no whitespace at all (separators `,` and `:`), non-ASCII characters written as themselves
(not `\\u` escapes), NaN and infinities forbidden. In Python that is exactly::

    json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
               allow_nan=False).encode("utf-8")

which matches RFC 8785 (JCS) for the values a manifest holds (strings, integers, and floats
that Python and ECMAScript print alike, such as 0.0078). The device verifies the signature
over the canonical form of the JSON it *received* (not over a re-serialisation of the parsed
model), so a member the signer wrote is covered exactly as written, and a member the signer
left out takes its default here. `DeliveryManifest.to_json_bytes()` writes every member, so
what `sign_manifest` signs is what the device sees.

Signature block: `{"key_id": <16 hex>, "algorithm": "ed25519", "value": <base64 of the 64
byte signature>}`. `key_id` is the first 16 hex digits of sha256 over the 32-byte raw public
key, and only picks which trusted key to try; the signature is what proves anything.

Versions and chunking (what a device accepts, whoever signed it)
----------------------------------------------------------------
A delivered version is a semantic version (semver 2.0: `MAJOR.MINOR.PATCH[-PRERELEASE]`);
`version_key` is the one ordering the device (downgrade protection) and the fleet tools
use. Build metadata (`+...`) is part of semver but cannot be a version here: `+` is an MQTT
wildcard and not a safe identifier. Existing versions that are not semver stay readable in
the store; they are refused for delivery (`bad-version`).

A signed manifest is trusted about what the model is, not about what it costs to receive:
`check_chunking` bounds the bookkeeping whatever it declares. At most `MAX_CHUNKS` chunks,
each but the last at least `MIN_CHUNK_SIZE` bytes (`chunking`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgeagent import __version__ as AGENT_VERSION  # noqa: N812 - a constant, named as one
from edgeagent.config import Preprocess, Task
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.names import SAFE_NAME

_log = logging.getLogger(__name__)

GateCode = Literal[
    "not-tflite",
    "unsupported-op",
    "load-failed",
    "input-mismatch",
    "smoke-failed",
    "non-finite",
    "reference-mismatch",
    "smoke-crash",
    "smoke-hang",
]
"""Why the validation gate refused a model: the model is bad, not its transfer."""
GATE_CODES: frozenset[str] = frozenset(get_args(GateCode))

ReasonCode = Literal[
    # manifest and signature (this module)
    "malformed-manifest",
    "bad-name",
    "unsigned",
    "untrusted-key",
    "bad-signature",
    "too-large",
    "agent-too-old",
    "bad-version",
    "chunking",
    # transfer (transfer.py)
    "bad-chunk",
    "size-mismatch",
    "sha256-mismatch",
    "incomplete",
    "timeout",
    "disk-full",
    "io-error",
    # validation gate (gate.py): GateCode
    GateCode,
    # store (store.py)
    "quota",
    "not-stored",
    "version-conflict",
    "corrupt-version",
    "no-rollback",
]
REASON_CODES: frozenset[str] = frozenset(get_args(ReasonCode))

SAFE_ID = SAFE_NAME  # names and versions also become file and topic names
MAX_MANIFEST_BYTES = 1 << 20  # a manifest with a reference tensor is a few hundred KiB at most
MAX_CHUNK_SIZE = 16 << 20  # a chunk is held in memory once; MQTT payloads stay modest
# Every chunk but the last is at least this long: one file (a 4 KiB block) and one MQTT
# message per chunk stay small next to the data they carry.
MIN_CHUNK_SIZE = 4 << 10
# The most chunks a model may be cut into: the transfer's bookkeeping (a 2 KiB bitmap, one
# staged file per chunk, one subscription per chunk) is bounded whatever a manifest says.
# 128 MiB (the default max_model_bytes) fits in chunks of 8 KiB.
MAX_CHUNKS = 16_384
ALGORITHM: Literal["ed25519"] = "ed25519"
_SIGNATURE_BYTES = 64
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_RELEASE = re.compile(r"^\d+(?:\.\d+)*")
# semver.org's grammar, with ASCII digits only (re's \d also matches other scripts' digits).
_NUMERIC = r"(?:0|[1-9][0-9]*)"
_PRE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER = re.compile(
    rf"({_NUMERIC})\.({_NUMERIC})\.({_NUMERIC})"
    rf"(?:-({_PRE_ID}(?:\.{_PRE_ID})*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)


class DeliveryError(EdgeAgentError):
    """A delivered model or manifest was rejected; `code` is a stable reason code for
    metrics and replies, the message says what, why and what to do."""

    def __init__(
        self, code: ReasonCode, message: str, *, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code: ReasonCode = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __repr__(self) -> str:
        return f"DeliveryError({self.code!r}, {self.message!r})"


def check_safe_id(value: object, what: str) -> str:
    """`value` if it is usable as one path component and topic level, else DeliveryError
    ('bad-name'): 1 to 64 of [A-Za-z0-9._-], starting alphanumeric, without '..'."""
    if not isinstance(value, str) or not SAFE_ID.fullmatch(value) or ".." in value:
        raise DeliveryError(
            "bad-name",
            f"model {what} {value!r} is not a safe identifier: use 1 to 64 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit, without '..'",
        )
    return value


VersionKey = tuple[int, int, int, tuple[tuple[int, int, str], ...]]
"""A semantic version's precedence as a tuple: compare keys with < and ==."""


def version_key(version: str) -> VersionKey:
    """The precedence of semantic version `version` (semver 2.0, section 11): major, minor
    and patch numerically; a pre-release is lower than its release; pre-release identifiers
    compared one by one, numeric ones numerically and below alphanumeric ones (compared in
    ASCII order), a longer list higher when all before are equal; build metadata ignored.
    DeliveryError('bad-version') when `version` is not a semantic version."""
    match = _SEMVER.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise DeliveryError(
            "bad-version",
            f"model version {version!r} is not a semantic version: use MAJOR.MINOR.PATCH with "
            "an optional -PRERELEASE (1.4.0, 2.0.0-rc.1), so that devices can tell a newer "
            "version from an older one",
        )
    major, minor, patch, pre, _build = match.groups()
    if pre is None:
        # A release sorts after all its pre-releases: one "identifier" above any real one.
        identifiers: tuple[tuple[int, int, str], ...] = ((2, 0, ""),)
    else:
        identifiers = tuple(
            (0, int(part), "") if part.isdigit() else (1, 0, part) for part in pre.split(".")
        )
    return int(major), int(minor), int(patch), identifiers


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as semantic version `a` is lower than, equal to (in precedence) or higher
    than `b`. DeliveryError('bad-version') when either is not a semantic version."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


def check_version(value: object) -> str:
    """`value` if it can be a delivered model version: a safe identifier (`bad-name`) and a
    semantic version (`bad-version`); DeliveryError otherwise."""
    version = check_safe_id(value, "version")
    version_key(version)
    return version


def check_chunking(size: int, chunk_size: int, chunks: int) -> None:
    """DeliveryError('chunking') unless a model of `size` bytes in `chunks` chunks of
    `chunk_size` bytes is within the transfer's bounds: at most MAX_CHUNKS chunks, every
    chunk but the last at least MIN_CHUNK_SIZE bytes. Constant time: nothing per chunk."""
    if chunks > MAX_CHUNKS:
        raise DeliveryError(
            "chunking",
            f"the model is cut into {chunks} chunks ({size} bytes in chunks of {chunk_size}), "
            f"more than the {MAX_CHUNKS} a device takes: publish it with a chunk size of at "
            f"least {max(-(-size // MAX_CHUNKS), MIN_CHUNK_SIZE)} bytes",
        )
    if chunks > 1 and chunk_size < MIN_CHUNK_SIZE:
        raise DeliveryError(
            "chunking",
            f"the model is cut into chunks of {chunk_size} bytes, smaller than the "
            f"{MIN_CHUNK_SIZE} a device takes (only a model that is one chunk may be "
            "shorter): publish it with a larger chunk size",
        )


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorBlob(_Frozen):
    """A tensor in a manifest: dtype, shape and the raw little-endian bytes in base64."""

    dtype: Literal["float32", "int8", "uint8", "int32"]
    shape: tuple[int, ...]
    data: str

    @model_validator(mode="after")
    def _data_fits_shape(self) -> TensorBlob:
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape {list(self.shape)} has a negative dimension")
        try:
            raw = base64.b64decode(self.data, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"data is not base64: {exc}") from exc
        expected = math.prod(self.shape) * np.dtype(self.dtype).itemsize
        if len(raw) != expected:
            raise ValueError(
                f"data holds {len(raw)} bytes but {self.dtype} {list(self.shape)} needs {expected}"
            )
        return self

    @classmethod
    def from_array(cls, array: npt.NDArray[Any]) -> TensorBlob:
        data = np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<"))
        return cls(
            dtype=np.dtype(array.dtype).name,
            shape=tuple(int(d) for d in array.shape),
            data=base64.b64encode(data.tobytes()).decode("ascii"),
        )

    def array(self) -> npt.NDArray[Any]:
        raw = base64.b64decode(self.data, validate=True)
        dtype = np.dtype(self.dtype).newbyteorder("<")
        return np.frombuffer(raw, dtype=dtype).astype(self.dtype).reshape(self.shape)


class DeliveryReference(_Frozen):
    """A known input (already in the input tensor's dtype) and the de-quantised first output
    the model must give for it, within `atol`."""

    input: TensorBlob
    output: TensorBlob
    atol: float = Field(default=1e-3, ge=0.0, allow_inf_nan=False)


class SignatureBlock(_Frozen):
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    algorithm: Literal["ed25519"] = ALGORITHM
    value: str  # base64 of the 64-byte Ed25519 signature


class DeliveryManifest(_Frozen):
    """What a delivered model is and how to use it; signed as described in the module doc."""

    name: str
    version: str
    sha256: str
    size: int = Field(gt=0)
    chunk_size: int = Field(gt=0, le=MAX_CHUNK_SIZE)
    chunks: int = Field(gt=0)
    # None: the model says (its TFLite metadata, then its graph), as for a local model.
    task: Task | None = None
    labels: tuple[str, ...] = ()
    preprocess: Preprocess | None = None
    min_agent_version: str = Field(default="0", pattern=r"^\d+(\.\d+)*$")
    created_at: AwareDatetime
    reference: DeliveryReference | None = None
    signature: SignatureBlock | None = None

    @field_validator("name", "version")
    @classmethod
    def _safe_identifier(cls, value: str) -> str:
        if not SAFE_ID.fullmatch(value) or ".." in value:
            raise ValueError(
                "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
                "digit, without '..'"
            )
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not _SHA256_HEX.fullmatch(value):
            raise ValueError("must be 64 lower-case hex digits")
        return value

    @model_validator(mode="after")
    def _chunking_adds_up(self) -> DeliveryManifest:
        expected = -(-self.size // self.chunk_size)
        if self.chunks != expected:
            raise ValueError(
                f"{self.size} bytes in chunks of {self.chunk_size} make {expected} chunk(s), "
                f"but the manifest says {self.chunks}"
            )
        return self

    def chunk_length(self, index: int) -> int:
        """The exact length of chunk `index` (every chunk is chunk_size but the last)."""
        if index == self.chunks - 1:
            return self.size - self.chunk_size * (self.chunks - 1)
        return self.chunk_size

    def payload(self) -> dict[str, Any]:
        """Every member as JSON values, without the signature block: what is signed."""
        return self.model_dump(mode="json", exclude={"signature"})

    def canonical_bytes(self) -> bytes:
        return canonical_bytes(self.payload())

    def to_json_bytes(self) -> bytes:
        """The manifest as published (canonical layout, signature block included if any)."""
        return _compact_json(self.model_dump(mode="json"))


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """The canonical form of a manifest object (see the module doc); drops "signature"."""
    return _compact_json({k: v for k, v in obj.items() if k != "signature"})


def _compact_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def key_id(public_key: Ed25519PublicKey | bytes | str) -> str:
    """First 16 hex digits of sha256 over the raw 32-byte public key (PEM accepted)."""
    key = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (PKCS8 private PEM, SubjectPublicKeyInfo public PEM)."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def load_public_key(pem: bytes | str) -> Ed25519PublicKey:
    """An Ed25519 public key from SubjectPublicKeyInfo PEM; ConfigError when it is not one."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"a trusted model-signing key is not a PEM public key ({exc}): paste the "
            "'-----BEGIN PUBLIC KEY-----' block the fleet CLI printed"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(
            f"a trusted model-signing key is a {type(key).__name__}, not Ed25519: "
            "model manifests are signed with Ed25519 keys only"
        )
    return key


def _load_private_key(pem: bytes | str) -> Ed25519PrivateKey:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"the signing key is not an unencrypted PKCS8 PEM private key ({exc})"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"the signing key is a {type(key).__name__}, not Ed25519")
    return key


def sign_manifest(manifest: DeliveryManifest, private_key_pem: bytes | str) -> DeliveryManifest:
    """`manifest` with a signature block over its canonical form (any old one replaced)."""
    private = _load_private_key(private_key_pem)
    signature = private.sign(manifest.canonical_bytes())
    block = SignatureBlock(
        key_id=key_id(private.public_key()),
        algorithm=ALGORITHM,
        value=base64.b64encode(signature).decode("ascii"),
    )
    return manifest.model_copy(update={"signature": block})


def verify_manifest(
    raw: bytes,
    trusted: Mapping[str, bytes | str],
    allow_unsigned: bool,
    *,
    max_size: int | None = None,
    agent_version: str = AGENT_VERSION,
) -> DeliveryManifest:
    """The manifest in `raw`, once its signature verifies against `trusted` (key id ->
    public PEM). Raises DeliveryError: malformed-manifest, unsigned, untrusted-key,
    bad-signature, bad-name, bad-version (not a semantic version), too-large (size over
    `max_size`), chunking (see `check_chunking`), agent-too-old."""
    obj = _parse_object(raw)
    block = obj.get("signature")
    if block is None:
        if not allow_unsigned:
            raise DeliveryError(
                "unsigned",
                "the model manifest is not signed and this device requires signatures: sign "
                "it with the fleet key, or set allow_unsigned: true (development only)",
            )
        _log.warning("accepting an UNSIGNED model manifest: allow_unsigned is true")
    else:
        _verify_signature(obj, block, trusted)
    check_safe_id(obj.get("name"), "name")
    check_version(obj.get("version"))
    try:
        manifest = DeliveryManifest.model_validate(obj)
    except ValidationError as exc:
        raise DeliveryError(
            "malformed-manifest", f"the model manifest does not validate: {_one_line(exc)}"
        ) from exc
    check_chunking(manifest.size, manifest.chunk_size, manifest.chunks)
    if max_size is not None and manifest.size > max_size:
        raise DeliveryError(
            "too-large",
            f"model {manifest.name} {manifest.version} is {manifest.size} bytes, more than the "
            f"{max_size} bytes this device may store: raise the model quota or ship a smaller "
            "model",
        )
    if _release(agent_version) < _release(manifest.min_agent_version):
        raise DeliveryError(
            "agent-too-old",
            f"model {manifest.name} {manifest.version} needs edgeagent "
            f"{manifest.min_agent_version} or newer, this is {agent_version}: upgrade the agent "
            "first",
        )
    return manifest


def _parse_object(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise DeliveryError(
            "malformed-manifest",
            f"the model manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit",
        )
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DeliveryError(
            "malformed-manifest", f"the model manifest is not UTF-8 JSON: {exc}"
        ) from exc
    if not isinstance(obj, dict):
        raise DeliveryError(
            "malformed-manifest",
            f"the model manifest is a JSON {type(obj).__name__}, not an object",
        )
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a manifest")


def _verify_signature(
    obj: dict[str, Any], block: object, trusted: Mapping[str, bytes | str]
) -> None:
    try:
        sig = SignatureBlock.model_validate(block)
    except ValidationError as exc:
        raise DeliveryError(
            "malformed-manifest",
            f"the manifest's signature block is malformed ({_one_line(exc)}): it needs key_id "
            "(16 hex digits), algorithm 'ed25519' and value (base64)",
        ) from exc
    if sig.key_id not in trusted:
        raise DeliveryError(
            "untrusted-key",
            f"the model manifest is signed by key {sig.key_id}, which this device does not "
            f"trust (trusted: {', '.join(sorted(trusted)) or 'none'}): add the fleet's public "
            "key to the config, or re-sign with a trusted key",
        )
    public = load_public_key(trusted[sig.key_id])
    try:
        value = base64.b64decode(sig.value, validate=True)
    except binascii.Error as exc:
        raise DeliveryError(
            "bad-signature", f"the manifest's signature is not base64: {exc}"
        ) from exc
    if len(value) != _SIGNATURE_BYTES:
        raise DeliveryError(
            "bad-signature",
            f"the manifest's signature is {len(value)} bytes; Ed25519 signatures are 64",
        )
    try:
        payload = canonical_bytes(obj)
    except ValueError as exc:  # a NaN or infinity slipped past the parser
        raise DeliveryError("malformed-manifest", f"the manifest is not canonical: {exc}") from exc
    try:
        public.verify(value, payload)
    except InvalidSignature as exc:
        raise DeliveryError(
            "bad-signature",
            f"the model manifest's signature does not verify with key {sig.key_id}: the "
            "manifest was altered after signing (or signed over another form); re-sign it",
        ) from exc


def _release(version: str) -> tuple[int, ...]:
    """Leading numeric release segments: '1.2.3rc1' -> (1, 2, 3); no digits -> (0,)."""
    match = _RELEASE.match(version)
    if match is None:
        return (0,)
    parts = [int(p) for p in match.group(0).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()  # 1.0 == 1
    return tuple(parts)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


__all__ = [
    "GATE_CODES",
    "MAX_CHUNKS",
    "MIN_CHUNK_SIZE",
    "REASON_CODES",
    "SAFE_ID",
    "DeliveryError",
    "DeliveryManifest",
    "DeliveryReference",
    "ReasonCode",
    "SignatureBlock",
    "TensorBlob",
    "VersionKey",
    "canonical_bytes",
    "check_chunking",
    "check_safe_id",
    "check_version",
    "compare_versions",
    "generate_keypair",
    "key_id",
    "load_public_key",
    "sign_manifest",
    "verify_manifest",
    "version_key",
]
