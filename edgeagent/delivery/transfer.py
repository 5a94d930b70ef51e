"""Collects the chunks of a delivered model on disk, so a transfer survives a restart.

Staging layout, one directory per (name, version, sha256)::

    <state>/staging/<name>@<version>@<sha256>/
        manifest.json        the manifest being fetched (for resuming and for clean-up)
        chunk-000000 ...     one file per chunk received, each exactly its final length
        .tmp-*               a chunk being written (debris after a crash; removed on open)
        model.tflite         the assembled, verified model, ready for ModelStore.install

`@` cannot appear in a safe name or version, so the directory name is unambiguous.

Why one file per chunk (write to a temporary name, fsync, rename) rather than a
preallocated sparse file with a persisted bitmap: a chunk file exists under its final name
only after its bytes are on disk, so "which chunks do I have" is a directory listing that
cannot disagree with the data. A sparse file needs two writes kept in order (data fsynced
before the bitmap, the bitmap itself written atomically) and a bitmap bit can outlive
data a power cut lost. Duplicates and out-of-order chunks are trivial (a name that exists
is a chunk we have). The cost is one small file per chunk and one extra copy of the model
while `assemble()` concatenates; the chunk files are deleted as soon as the model is
assembled.

The directory is deliberately not fsynced after each chunk's rename: if a power cut loses
the rename, that chunk is simply fetched again; what must never happen, a name pointing
at bytes that were not written, is prevented by the fsync before the rename.

Bounded whatever the manifest says: a manifest past `signing.check_chunking`'s limits (more
than MAX_CHUNKS chunks, chunks under MIN_CHUNK_SIZE) is refused (`chunking`) before anything
is created, and which chunks are here is a bitmap (one bit per chunk, at most 2 KiB) with
running counts, so nothing is built per chunk to answer "complete?" or "what next?".
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from edgeagent.delivery.signing import DeliveryError, DeliveryManifest, check_chunking

_log = logging.getLogger(__name__)

STAGING_DIR = "staging"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.tflite"
TEMP_PREFIX = ".tmp-"
_CHUNK_PREFIX = "chunk-"
_READ_BLOCK = 1 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_SHOWN_MISSING = 20  # missing indices quoted in a message; the full list is in details


def staging_dir(state_dir: Path, manifest: DeliveryManifest) -> Path:
    """Where the chunks of `manifest` are collected under `state_dir`."""
    key = f"{manifest.name}@{manifest.version}@{manifest.sha256}"
    return state_dir / STAGING_DIR / key


@dataclass(frozen=True, slots=True)
class Progress:
    chunks_have: int
    chunks_total: int
    bytes_have: int
    bytes_total: int

    @property
    def fraction(self) -> float:
        return self.bytes_have / self.bytes_total if self.bytes_total else 1.0


class ChunkBitmap:
    """Which of `count` chunks are here: one bit each, plus running counts, so that
    `complete`, `count_have` and the next missing ones cost nothing per chunk held.
    Not thread-safe (ChunkAssembler guards it)."""

    __slots__ = ("_bits", "count", "count_have")

    def __init__(self, count: int) -> None:
        self.count = count
        self.count_have = 0
        self._bits = bytearray((count + 7) // 8)

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self.count:
            return False
        return bool(self._bits[index >> 3] >> (index & 7) & 1)

    def add(self, index: int) -> bool:
        """Marks `index` present; False when it already was."""
        byte, bit = index >> 3, 1 << (index & 7)
        if self._bits[byte] & bit:
            return False
        self._bits[byte] |= bit
        self.count_have += 1
        return True

    def clear(self) -> None:
        self._bits = bytearray(len(self._bits))
        self.count_have = 0

    @property
    def complete(self) -> bool:
        return self.count_have == self.count

    def present(self) -> Iterator[int]:
        """The indices present, ascending."""
        for byte_index, byte in enumerate(self._bits):
            if byte:
                yield from (byte_index * 8 + b for b in range(8) if byte >> b & 1)

    def absent(self) -> Iterator[int]:
        """The indices missing, ascending (full bytes are skipped whole)."""
        for byte_index, byte in enumerate(self._bits):
            if byte != 0xFF:
                base = byte_index * 8
                yield from (
                    base + b for b in range(8) if not byte >> b & 1 and base + b < self.count
                )


class ChunkAssembler:
    """Collects the chunks of one model in its staging directory. Opening one over a
    directory that already holds chunks resumes: `have()` lists them and `missing()` is
    what remains to fetch. Safe to call from several threads. DeliveryError('chunking')
    for a manifest past the transfer's bounds (nothing is created then)."""

    def __init__(self, state_dir: Path, manifest: DeliveryManifest) -> None:
        check_chunking(manifest.size, manifest.chunk_size, manifest.chunks)
        self.manifest = manifest
        self.path = staging_dir(state_dir, manifest)
        self._lock = threading.Lock()
        self._have = ChunkBitmap(manifest.chunks)
        self._bytes_have = 0
        self._assembled = False
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_manifest()
            self._scan()
        except OSError as exc:
            raise _io_error(exc, f"cannot prepare the staging directory {self.path}") from exc

    # --- state -------------------------------------------------------------------------------

    def have(self) -> set[int]:
        """Indices of the chunks already on disk (all of them once assembled)."""
        with self._lock:
            if self._assembled:
                return set(range(self.manifest.chunks))
            return set(self._have.present())

    def missing(self) -> list[int]:
        """Indices still to fetch, in ascending order (at most MAX_CHUNKS of them)."""
        return self.next_missing(self.manifest.chunks)

    def next_missing(self, limit: int, skip: Container[int] = ()) -> list[int]:
        """The first `limit` indices still to fetch and not in `skip`, ascending; the
        bitmap is scanned only as far as needed."""
        with self._lock:
            if self._assembled:
                return []
            return list(islice((i for i in self._have.absent() if i not in skip), limit))

    def complete(self) -> bool:
        with self._lock:
            return self._assembled or self._have.complete

    @property
    def bytes_received(self) -> int:
        with self._lock:
            if self._assembled:
                return self.manifest.size
            return self._bytes_have

    @property
    def progress(self) -> Progress:
        m = self.manifest
        with self._lock:
            if self._assembled:
                return Progress(m.chunks, m.chunks, m.size, m.size)
            return Progress(self._have.count_have, m.chunks, self._bytes_have, m.size)

    # --- receiving ---------------------------------------------------------------------------

    def add(self, index: int, data: bytes) -> bool:
        """Stores chunk `index`; False when it was already there (a duplicate, ignored).
        DeliveryError: bad-chunk (index out of range, wrong length), size-mismatch (the last
        chunk's length disagrees with the declared size), disk-full, io-error."""
        m = self.manifest
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < m.chunks:
            raise DeliveryError(
                "bad-chunk",
                f"chunk index {index!r} of {m.name} {m.version} is out of range: the model has "
                f"{m.chunks} chunk(s), 0 to {m.chunks - 1}",
            )
        expected = m.chunk_length(index)
        if len(data) != expected:
            last = index == m.chunks - 1
            raise DeliveryError(
                "size-mismatch" if last else "bad-chunk",
                f"chunk {index} of {m.name} {m.version} is {len(data)} bytes, expected "
                f"{expected}"
                + (
                    f": the model is not the {m.size} bytes its manifest declares"
                    if last
                    else f" (chunk_size {m.chunk_size}): the publisher chunks differently"
                ),
            )
        with self._lock:
            if self._assembled or index in self._have:
                return False
            target = self.path / f"{_CHUNK_PREFIX}{index:06d}"
            try:
                write_file_durably(target, data)
            except OSError as exc:
                raise _io_error(exc, f"cannot store chunk {index} of {m.name} {m.version}") from exc
            self._mark(index, expected)
            return True

    # --- finishing ---------------------------------------------------------------------------

    def assemble(self) -> Path:
        """Concatenates the chunks into `model.tflite`, checks size and sha256 and returns
        its path. On a mismatch the chunks are discarded (any of them may be the bad one) and
        DeliveryError size-mismatch / sha256-mismatch is raised; incomplete when chunks are
        still missing; disk-full / io-error when the copy cannot be written."""
        m = self.manifest
        model = self.path / MODEL_FILE
        with self._lock:
            if self._assembled:
                self._check_file(model)  # a restart after assembly: verify what is there
                return model
            if not self._have.complete:
                missing = list(self._have.absent())
                raise DeliveryError(
                    "incomplete",
                    f"{m.name} {m.version} cannot be assembled: {_describe_missing(missing)}",
                    details={"missing": missing},
                )
            temp = self.path / f"{TEMP_PREFIX}{MODEL_FILE}-{uuid.uuid4().hex}"
            digest = hashlib.sha256()
            size = 0
            try:
                with temp.open("xb") as out:
                    for index in range(m.chunks):
                        data = (self.path / f"{_CHUNK_PREFIX}{index:06d}").read_bytes()
                        digest.update(data)
                        size += len(data)
                        out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                _unlink_quietly(temp)
                raise _io_error(exc, f"cannot assemble {m.name} {m.version}") from exc
            try:
                _check_digest(m, size, digest.hexdigest())
            except DeliveryError:
                _unlink_quietly(temp)
                self._discard_chunks()
                raise
            try:
                temp.replace(model)
                fsync_dir(self.path)
            except OSError as exc:
                _unlink_quietly(temp)
                raise _io_error(exc, f"cannot finish assembling {m.name} {m.version}") from exc
            self._assembled = True
            self._discard_chunks()  # the model holds them all now
            _log.info("assembled %s %s (%d bytes, sha256 ok)", m.name, m.version, m.size)
            return model

    def discard(self) -> None:
        """Removes the staging directory (after install, or to abandon the transfer)."""
        with self._lock:
            shutil.rmtree(self.path, ignore_errors=True)
            self._have.clear()
            self._bytes_have = 0
            self._assembled = False

    # --- internals ---------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        path = self.path / MANIFEST_FILE
        data = self.manifest.to_json_bytes()
        try:
            if path.read_bytes() == data:
                return
        except FileNotFoundError:
            pass
        write_file_durably(path, data)

    def _scan(self) -> None:
        """Loads what a previous run left: chunks of the right length, an assembled model;
        removes temporaries and chunks that cannot be right."""
        m = self.manifest
        for entry in self.path.iterdir():
            name = entry.name
            if name.startswith(TEMP_PREFIX):
                _unlink_quietly(entry)  # a write cut short by a crash
            elif name == MODEL_FILE:
                self._assembled = entry.stat().st_size == m.size
                if not self._assembled:
                    _log.warning("staged %s has the wrong size; fetching again", entry)
                    _unlink_quietly(entry)
            elif name.startswith(_CHUNK_PREFIX):
                index = _chunk_index(name)
                length = entry.stat().st_size
                if index is None or index >= m.chunks or length != m.chunk_length(index):
                    _log.warning(
                        "discarding staged %s (%d bytes): not a chunk of this model", entry, length
                    )
                    _unlink_quietly(entry)
                else:
                    self._mark(index, length)
        if self._assembled:
            self._discard_chunks()
        elif self._have.count_have:
            _log.info(
                "resuming %s %s: %d of %d chunk(s) already staged",
                m.name,
                m.version,
                self._have.count_have,
                m.chunks,
            )

    def _mark(self, index: int, length: int) -> None:
        if self._have.add(index):
            self._bytes_have += length

    def _check_file(self, path: Path) -> None:
        digest = hashlib.sha256()
        size = 0
        try:
            with path.open("rb") as f:
                while block := f.read(_READ_BLOCK):
                    digest.update(block)
                    size += len(block)
        except OSError as exc:
            raise _io_error(exc, f"cannot read the staged model {path}") from exc
        try:
            _check_digest(self.manifest, size, digest.hexdigest())
        except DeliveryError:
            _unlink_quietly(path)
            self._assembled = False
            raise

    def _discard_chunks(self) -> None:
        for index in list(self._have.present()):
            _unlink_quietly(self.path / f"{_CHUNK_PREFIX}{index:06d}")
        self._have.clear()
        self._bytes_have = 0


class TransferTimer:
    """The policy for a chunk that never arrives: the transfer fails when it has made no
    progress for `stall_timeout_s`. Call `check(assembler)` whenever convenient (after
    each chunk and from a periodic tick); `clock` is injectable for tests."""

    def __init__(
        self, stall_timeout_s: float = 120.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be positive, got {stall_timeout_s}")
        self.stall_timeout_s = stall_timeout_s
        self._clock = clock
        self._last_progress = clock()
        self._last_bytes = -1

    def progressed(self) -> None:
        """Records progress now (the deadline moves to now + stall_timeout_s)."""
        self._last_progress = self._clock()

    def remaining(self) -> float:
        """Seconds until the transfer times out without further progress (<= 0: expired)."""
        return self._last_progress + self.stall_timeout_s - self._clock()

    def check(self, assembler: ChunkAssembler) -> None:
        """Raises DeliveryError('timeout'), listing the missing chunks, when `assembler`
        has received nothing new for stall_timeout_s and is not complete."""
        received = assembler.bytes_received
        if received != self._last_bytes:
            self._last_bytes = received
            self.progressed()
            return
        if self.remaining() > 0 or assembler.complete():
            return
        missing = assembler.missing()
        m = assembler.manifest
        raise DeliveryError(
            "timeout",
            f"the transfer of {m.name} {m.version} made no progress for "
            f"{self.stall_timeout_s:g} s: {_describe_missing(missing)}; the staged chunks are "
            "kept, so a retry fetches only those",
            details={"missing": missing},
        )


def write_file_durably(path: Path, data: bytes) -> None:
    """Writes `data` to `path` so that `path` never holds partial data: write a temporary
    file beside it, fsync it, rename it over `path`. The directory is not fsynced (see the
    module doc); callers that need the name to be durable call `fsync_dir`."""
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(temp)
        raise
    os.close(fd)
    try:
        temp.replace(path)
    except BaseException:
        _unlink_quietly(temp)
        raise


def fsync_dir(path: Path) -> None:
    """Makes the names in directory `path` (renames, creations, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_digest(m: DeliveryManifest, size: int, sha256: str) -> None:
    if size != m.size:
        raise DeliveryError(
            "size-mismatch",
            f"{m.name} {m.version} assembled to {size} bytes but its manifest says {m.size}: "
            "the staged chunks were discarded; the transfer starts again",
        )
    if sha256 != m.sha256:
        raise DeliveryError(
            "sha256-mismatch",
            f"{m.name} {m.version} has sha256 {sha256} but its manifest says {m.sha256}: a "
            "chunk was corrupted in transit or the manifest is wrong; the staged chunks were "
            "discarded",
        )


def _chunk_index(name: str) -> int | None:
    digits = name[len(_CHUNK_PREFIX) :]
    return int(digits) if digits.isdigit() and len(digits) == 6 else None


def _describe_missing(missing: Iterable[int]) -> str:
    indices = list(missing)
    shown = ", ".join(str(i) for i in indices[:_SHOWN_MISSING])
    more = f" and {len(indices) - _SHOWN_MISSING} more" if len(indices) > _SHOWN_MISSING else ""
    return f"{len(indices)} chunk(s) missing ({shown}{more})"


def _io_error(exc: OSError, what: str) -> DeliveryError:
    if exc.errno in _DISK_FULL:
        return DeliveryError(
            "disk-full",
            f"{what}: the disk is full ({exc.strerror}); what was staged is kept and "
            "consistent. Free space (or lower the number of kept versions) and retry",
        )
    return DeliveryError("io-error", f"{what}: {exc}")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        _log.warning("cannot remove %s: %s", path, exc)


__all__ = [
    "ChunkAssembler",
    "ChunkBitmap",
    "Progress",
    "TransferTimer",
    "fsync_dir",
    "staging_dir",
    "write_file_durably",
]
