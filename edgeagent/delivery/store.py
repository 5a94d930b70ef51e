"""The on-device model store: installed versions, the active pointer, rollback and pruning.

Layout under `root` (docs/model-delivery.md has the full argument)::

    versions/<name>/<version>/model.tflite     the model, verified against its manifest
    versions/<name>/<version>/manifest.json    the signed delivery manifest
    versions/<name>/<version>/installed.json   written last: {"installed_at", "installed_ns"}
    versions/<name>/.tmp-<version>-<rand>/     a version being installed (debris if left)
    versions/<name>/.trash-<version>-<rand>/   a version being deleted (debris if left)
    active/<name>.json                         {"version", "sha256", "previous", "activated_at"}
    highest/<name>.json                        {"version", "recorded_at"}: the highest
                                               semantic version ever activated (downgrades)
    staging/                                   chunk transfers (edgeagent.delivery.transfer)

Crash safety rests on two atomic renames. A version directory is filled under a temporary
name, its files fsynced, then renamed to its final name and the parent fsynced: a version
directory under a final name is complete (that rename is the completion marker; the
presence of all three files is checked too). The active pointer is written to a temporary
file, fsynced, renamed over the old pointer and the directory fsynced: it holds the old
version or the new one, never a mix. Since a pointer is only ever renamed into place after
the version it names is durable, a power cut at any moment leaves an active model; and if
disk corruption breaks one anyway, opening the store falls back to the newest intact
previous version and says why.

The highest-version record only ever rises, and is written (durably) before the pointer
that activates a version: a crash between the two leaves a record at least as high as what
runs, never lower. Pruning and eviction leave it alone, so a version deleted long ago still
counts. `highest()` also takes the versions the pointer names into account, so a store an
older agent wrote (no record yet), or a record lost to corruption, still refuses going
below what it ran.

One process owns a store (the agent); `repair=False` opens it read-only for inspection
(`doctor`). Methods are safe to call from several threads of that process.

Longer than 600 lines on purpose: the layout, the pointer and highest-record writes and the
API that orders them are one crash-safety argument (above), kept in one file to be checked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgeagent.delivery.signing import (
    SAFE_ID,
    DeliveryError,
    DeliveryManifest,
    VersionKey,
    check_safe_id,
    version_key,
)
from edgeagent.delivery.transfer import (
    MANIFEST_FILE,
    MODEL_FILE,
    STAGING_DIR,
    TEMP_PREFIX,
    fsync_dir,
    write_file_durably,
)

_log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
ACTIVE_DIR = "active"
HIGHEST_DIR = "highest"
INSTALLED_FILE = "installed.json"
TRASH_PREFIX = ".trash-"
_VERSION_FILES = (MODEL_FILE, MANIFEST_FILE, INSTALLED_FILE)
_READ_BLOCK = 1 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_STAGING_MAX_AGE_S = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class StoredModel:
    """One installed version of a model."""

    name: str
    version: str
    path: Path  # the model file
    manifest: DeliveryManifest
    installed_ns: int  # time.time_ns() at install: orders versions

    @property
    def directory(self) -> Path:
        return self.path.parent


@dataclass(frozen=True, slots=True)
class ActivePointer:
    """The content of active/<name>.json."""

    version: str
    sha256: str
    previous: tuple[str, ...]  # versions active before, most recent first
    activated_at: str

    def to_json_bytes(self) -> bytes:
        body = {
            "version": self.version,
            "sha256": self.sha256,
            "previous": list(self.previous),
            "activated_at": self.activated_at,
        }
        return json.dumps(body, indent=2, sort_keys=True).encode("utf-8") + b"\n"


class _Unusable(Exception):  # noqa: N818 - a reason to skip something, shown in a log line
    """A pointer or version that cannot be used; the message says why."""


class ModelStore:
    """Installed model versions under `root`, with one active version per model name.

    `keep`: versions kept per name by `prune` (plus the active one and the one before it);
    `quota_bytes`: the most all installed versions may take on disk."""

    def __init__(self, root: Path, *, keep: int = 3, quota_bytes: int, repair: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"keep must be 1 or more, got {keep}")
        if quota_bytes <= 0:
            raise ValueError(f"quota_bytes must be positive, got {quota_bytes}")
        self.root = root
        self.keep = keep
        self.quota_bytes = quota_bytes
        self._repair = repair
        self._lock = threading.RLock()
        self._versions = root / VERSIONS_DIR
        self._active = root / ACTIVE_DIR
        self._highest = root / HIGHEST_DIR
        if repair:
            for d in (self._versions, self._active, self._highest, root / STAGING_DIR):
                d.mkdir(parents=True, exist_ok=True)
            self._recover()

    @property
    def staging_root(self) -> Path:
        """The state directory to give ChunkAssembler (it stages under root/staging)."""
        return self.root

    # --- reading ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Model names that have installed versions or an active pointer."""
        found = {p.stem for p in _listdir(self._active) if p.suffix == ".json"}
        found |= {p.name for p in _listdir(self._versions) if p.is_dir()}
        return sorted(n for n in found if _is_safe(n))

    def versions(self, name: str) -> list[StoredModel]:
        """Complete installed versions of `name`, oldest install first (files not hashed)."""
        check_safe_id(name, "name")
        found = []
        for d in _listdir(self._versions / name):
            if not _is_safe(d.name):
                continue
            with contextlib.suppress(_Unusable):
                found.append(self._load(name, d.name, verify=False))
        return sorted(found, key=lambda s: (s.installed_ns, s.version))

    def active(self, name: str) -> StoredModel | None:
        """The active version of `name` (None when none was ever activated). A pointer that
        is corrupt or names a missing or damaged version falls back, with a warning, to the
        newest intact previous version (and the pointer is rewritten unless read-only).
        The file is hashed on open and on activation, not on every call: that is
        `verify_integrity`'s job."""
        check_safe_id(name, "name")
        with self._lock:
            try:
                pointer = self._read_pointer(name)
            except _Unusable:
                return self._fall_back(name)
            if pointer is None:
                return None
            try:
                return self._load(name, pointer.version, verify=False, sha256=pointer.sha256)
            except _Unusable:
                return self._fall_back(name)

    def previous(self, name: str) -> list[StoredModel]:
        """The versions that were active before the current one and are still stored, most
        recent first: the rollback candidates."""
        check_safe_id(name, "name")
        with self._lock:
            try:
                pointer = self._read_pointer(name)
            except _Unusable:
                return []
            if pointer is None:
                return []
            found = []
            for version in pointer.previous:
                with contextlib.suppress(_Unusable):
                    found.append(self._load(name, version, verify=False))
            return found

    def highest(self, name: str) -> str | None:
        """The highest semantic version of `name` ever activated on this device (None when
        none was): the durable record, or a higher semantic version the active pointer or
        its history names. Versions that are not semantic versions do not count."""
        check_safe_id(name, "name")
        with self._lock:
            candidates = [self._read_highest(name)]
            with contextlib.suppress(_Unusable):
                pointer = self._read_pointer(name)
                if pointer is not None:
                    candidates += [pointer.version, *pointer.previous]
            found: tuple[VersionKey, str] | None = None
            for version in candidates:
                key = _semver_key(version)
                if key is not None and (found is None or key > found[0]):
                    found = (key, str(version))
            return None if found is None else found[1]

    def usage(self) -> int:
        """Bytes taken by installed versions (and debris under versions/)."""
        return sum(f.stat().st_size for f in _walk_files(self._versions))

    def check_quota(self, additional_bytes: int, *, name: str | None = None) -> None:
        """DeliveryError('quota') when `additional_bytes` more would not fit in the quota,
        even after evicting the old (inactive) versions of `name` that `install` may
        evict to make room."""
        with self._lock:
            usage = self.usage()
            reclaimable = 0
            if name is not None:
                reclaimable = sum(_dir_size(s.directory) for s in self._evictable(name))
            if usage - reclaimable + additional_bytes > self.quota_bytes:
                raise DeliveryError(
                    "quota",
                    f"{additional_bytes} more bytes do not fit the model quota of "
                    f"{self.quota_bytes} bytes ({usage} used, {reclaimable} reclaimable from "
                    "old versions): raise the quota or remove other models",
                )

    # --- changing ----------------------------------------------------------------------------

    def install(self, staged_path: Path, manifest: DeliveryManifest, *, move: bool = True) -> Path:
        """Puts the verified file `staged_path` in the store as `manifest`'s version and
        returns the installed model's path; `move` renames it (same file system), else it is
        copied. Old inactive versions of the name are evicted, oldest first, when the quota
        needs it. Installing a version already stored intact is a no-op.
        DeliveryError: bad-name, size-mismatch, sha256-mismatch, version-conflict, quota,
        disk-full, io-error."""
        name = check_safe_id(manifest.name, "name")
        version = check_safe_id(manifest.version, "version")
        with self._lock:
            final = self._versions / name / version
            if final.exists():
                try:
                    existing = self._load(name, version, verify=True)
                except _Unusable as why:
                    _log.warning("reinstalling %s %s: the stored copy %s", name, version, why)
                    self._delete_dir(final)
                else:
                    if existing.manifest.sha256 != manifest.sha256:
                        raise DeliveryError(
                            "version-conflict",
                            f"{name} {version} is already installed with sha256 "
                            f"{existing.manifest.sha256}, not {manifest.sha256}: versions are "
                            "immutable; publish the new model under a new version",
                        )
                    return existing.path
            _verify_file(staged_path, manifest)
            self._make_room(name, manifest.size)
            parent = self._versions / name
            temp = parent / f"{TEMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
            try:
                parent.mkdir(parents=True, exist_ok=True)
                temp.mkdir()
                _place(staged_path, temp / MODEL_FILE, move=move)
                write_file_durably(temp / MANIFEST_FILE, manifest.to_json_bytes())
                now = time.time_ns()
                installed = {
                    "installed_at": _iso(now),
                    "installed_ns": now,
                    "sha256": manifest.sha256,
                }
                write_file_durably(temp / INSTALLED_FILE, json.dumps(installed).encode("utf-8"))
                fsync_dir(temp)
                temp.rename(final)
                fsync_dir(parent)
            except OSError as exc:
                shutil.rmtree(temp, ignore_errors=True)
                raise _io_error(exc, f"cannot install {name} {version}") from exc
            _log.info("installed %s %s (%d bytes)", name, version, manifest.size)
            return final / MODEL_FILE

    def activate(self, name: str, version: str) -> StoredModel:
        """Makes the installed `version` the active one of `name`, durably, after checking
        its file against its manifest. DeliveryError: not-stored, corrupt-version."""
        check_safe_id(name, "name")
        check_safe_id(version, "version")
        with self._lock:
            target = self._load_or_raise(name, version)
            self._raise_highest(name, version)  # before the pointer: see the module doc
            try:
                old = self._read_pointer(name)
            except _Unusable:
                old = None
            history: list[str] = []
            if old is not None:
                history = [old.version, *old.previous]
            self._write_pointer(name, target, history)
            _log.info(
                "activated %s %s%s",
                name,
                version,
                f" (was {old.version})" if old is not None and old.version != version else "",
            )
            return target

    def rollback(self, name: str, to_version: str | None = None) -> StoredModel:
        """Activates the previous active version of `name` still intact, or `to_version`
        when given (any stored version). DeliveryError: no-rollback, not-stored,
        corrupt-version."""
        check_safe_id(name, "name")
        with self._lock:
            if to_version is not None:
                check_safe_id(to_version, "version")
                return self.activate(name, to_version)
            current = self.active(name)
            reasons: list[str] = []
            for candidate in self._history(name):
                if current is not None and candidate == current.version:
                    continue
                try:
                    self._load(name, candidate, verify=True)
                except _Unusable as why:
                    reasons.append(f"{candidate}: {why}")
                    continue
                return self.activate(name, candidate)
            raise DeliveryError(
                "no-rollback",
                f"{name} has no previous version to roll back to"
                + (f" ({'; '.join(reasons)})" if reasons else "")
                + ": deploy a known-good version instead",
            )

    def prune(self, name: str) -> list[str]:
        """Deletes old versions of `name`, keeping the `keep` most recently installed plus
        the active one and the one before it (the rollback target). Returns the versions
        deleted."""
        check_safe_id(name, "name")
        with self._lock:
            stored = self.versions(name)
            protected = set(self._protected(name))
            newest = {s.version for s in stored[-self.keep :]}
            doomed = [s for s in stored if s.version not in protected | newest]
            for s in doomed:
                self._delete_dir(s.directory)
                _log.info("pruned %s %s", name, s.version)
            if doomed:
                self._forget(name, {s.version for s in doomed})
            return [s.version for s in doomed]

    def clean_debris(self, *, staging_max_age_s: float = _STAGING_MAX_AGE_S) -> list[Path]:
        """Removes what interrupted operations left (call at start, before transfers
        resume): temporary files and directories, half-deleted versions, version
        directories that are incomplete, and staging directories without a readable manifest,
        for a version already installed, or untouched for `staging_max_age_s`."""
        removed: list[Path] = []
        with self._lock:
            for entry in (*_listdir(self._active), *_listdir(self._highest)):
                if entry.name.startswith(TEMP_PREFIX):
                    removed += _remove(entry)
            for name_dir in _listdir(self._versions):
                if not name_dir.is_dir() or not _is_safe(name_dir.name):
                    removed += _remove(name_dir)
                    continue
                for entry in _listdir(name_dir):
                    complete = entry.is_dir() and all((entry / f).is_file() for f in _VERSION_FILES)
                    if not _is_safe(entry.name) or not complete:
                        removed += _remove(entry)
            removed += self._clean_staging(staging_max_age_s)
        for path in removed:
            _log.info("removed debris %s", path)
        return removed

    def verify_integrity(self) -> list[str]:
        """Every problem found (empty when all is well): each stored file hashed against its
        manifest, each active pointer checked. Read-only; for `doctor`."""
        problems: list[str] = []
        with self._lock:
            for name_dir in _listdir(self._versions):
                for entry in _listdir(name_dir):
                    if entry.name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
                        problems.append(f"{entry}: debris of an interrupted operation")
                        continue
                    try:
                        self._load(name_dir.name, entry.name, verify=True)
                    except _Unusable as why:
                        problems.append(f"{entry}: {why}")
            for pointer_file in _listdir(self._active):
                name = pointer_file.stem
                if pointer_file.name.startswith(TEMP_PREFIX) or not _is_safe(name):
                    problems.append(f"{pointer_file}: not an active pointer")
                    continue
                try:
                    self._verify_active(name)
                except _Unusable as why:
                    problems.append(f"{pointer_file}: {why}")
            for record in _listdir(self._highest):
                if record.name.startswith(TEMP_PREFIX):
                    problems.append(f"{record}: debris of an interrupted operation")
                elif not _is_safe(record.stem) or self._read_highest(record.stem) is None:
                    problems.append(f"{record}: not a readable highest-version record")
        return problems

    # --- internals ---------------------------------------------------------------------------

    def _recover(self) -> None:
        """On open: every active pointer must name an intact version (hashed)."""
        for pointer_file in _listdir(self._active):
            name = pointer_file.stem
            if pointer_file.suffix != ".json" or not _is_safe(name):
                continue
            try:
                self._verify_active(name)
            except _Unusable as why:
                _log.warning("active model %s is unusable: %s", name, why)
                self._fall_back(name)

    def _verify_active(self, name: str) -> None:
        """Hashes the version the active pointer of `name` names (none: nothing to do).
        Raises _Unusable saying what is wrong with the pointer or the version."""
        pointer = self._read_pointer(name)
        if pointer is not None:
            self._load(name, pointer.version, verify=True, sha256=pointer.sha256)

    def _fall_back(self, name: str) -> StoredModel | None:
        """The newest intact version among the pointer's history (or, when the pointer is
        unreadable, among all installed versions); the pointer is rewritten to it."""
        candidates = self._history(name)
        by_install = [s.version for s in reversed(self.versions(name))]
        candidates += [v for v in by_install if v not in candidates]
        for version in candidates:
            try:
                found = self._load(name, version, verify=True)
            except _Unusable as why:
                _log.warning("%s %s cannot be the fallback: %s", name, version, why)
                continue
            _log.warning("falling back to %s %s, the newest intact version", name, version)
            if self._repair:
                self._write_pointer(name, found, [v for v in candidates if v != version])
            return found
        _log.error("model %s has no intact version left: deploy it again", name)
        return None

    def _history(self, name: str) -> list[str]:
        """The pointer's version then its previous ones; [] when it is missing/unreadable."""
        try:
            pointer = self._read_pointer(name)
        except _Unusable:
            return []
        return [] if pointer is None else [pointer.version, *pointer.previous]

    def _protected(self, name: str) -> list[str]:
        return self._history(name)[:2]

    def _evictable(self, name: str) -> list[StoredModel]:
        """Versions of `name` that may go to make room, oldest first: all but the active."""
        active = self._history(name)[:1]
        return [s for s in self.versions(name) if s.version not in active]

    def _make_room(self, name: str, size: int) -> None:
        self.check_quota(size, name=name)
        for victim in self._evictable(name):
            if self.usage() + size <= self.quota_bytes:
                break
            _log.warning(
                "evicting %s %s to make room for a new version (quota %d bytes)",
                name,
                victim.version,
                self.quota_bytes,
            )
            self._delete_dir(victim.directory)
            self._forget(name, {victim.version})

    def _forget(self, name: str, versions: set[str]) -> None:
        """Drops deleted versions from the pointer's history."""
        try:
            pointer = self._read_pointer(name)
        except _Unusable:
            return
        if pointer is None or not versions.intersection(pointer.previous):
            return
        kept = tuple(v for v in pointer.previous if v not in versions)
        self._store_pointer(name, ActivePointer(**{**_fields(pointer), "previous": kept}))

    def _write_pointer(self, name: str, target: StoredModel, history: list[str]) -> None:
        previous: list[str] = []
        for v in history:
            if v != target.version and v not in previous:
                previous.append(v)
        pointer = ActivePointer(
            version=target.version,
            sha256=target.manifest.sha256,
            previous=tuple(previous[: max(self.keep, 1)]),
            activated_at=_iso(time.time_ns()),
        )
        self._store_pointer(name, pointer)

    def _store_pointer(self, name: str, pointer: ActivePointer) -> None:
        self._active.mkdir(parents=True, exist_ok=True)
        try:
            # Temporary file, fsync, rename over the old pointer: the pointer is the old
            # one or the new one. The directory fsync makes the rename itself durable, so
            # that a version this pointer no longer names may then be deleted.
            write_file_durably(self._active / f"{name}.json", pointer.to_json_bytes())
            fsync_dir(self._active)
        except OSError as exc:
            raise _io_error(exc, f"cannot write the active pointer of {name}") from exc

    def _read_highest(self, name: str) -> str | None:
        """The recorded highest version of `name`; None when there is none or it is
        unreadable (logged: `highest()` then falls back to the pointer's versions)."""
        path = self._highest / f"{name}.json"
        try:
            version = json.loads(path.read_bytes())["version"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log.warning("ignoring the unreadable highest-version record %s: %s", path, exc)
            return None
        if _semver_key(version) is None:
            _log.warning("ignoring %s: %r is not a semantic version", path, version)
            return None
        return str(version)

    def _raise_highest(self, name: str, version: str) -> None:
        """Records `version` as the highest activated one of `name` if it is a semantic
        version above the record (durably: written, fsynced, renamed, directory fsynced)."""
        key = _semver_key(version)
        if key is None:
            _log.info("%s %s is not a semantic version: no downgrade floor recorded", name, version)
            return
        current = self._read_highest(name)
        current_key = _semver_key(current)
        if current_key is not None and current_key >= key:
            return
        body = {"version": version, "recorded_at": _iso(time.time_ns())}
        try:
            self._highest.mkdir(parents=True, exist_ok=True)
            write_file_durably(self._highest / f"{name}.json", json.dumps(body).encode("utf-8"))
            fsync_dir(self._highest)
        except OSError as exc:
            what = f"cannot record {version} as the highest version of {name}"
            raise _io_error(exc, what) from exc

    def _read_pointer(self, name: str) -> ActivePointer | None:
        path = self._active / f"{name}.json"
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise _Unusable(f"its active pointer {path} is unreadable ({exc})") from exc
        try:
            pointer = ActivePointer(
                version=str(raw["version"]),
                sha256=str(raw["sha256"]),
                previous=tuple(str(v) for v in raw["previous"]),
                activated_at=str(raw["activated_at"]),
            )
        except (KeyError, TypeError) as exc:
            raise _Unusable(f"its active pointer {path} is malformed ({exc!r})") from exc
        if not all(_is_safe(v) for v in (pointer.version, *pointer.previous)):
            raise _Unusable(f"its active pointer {path} names an unsafe version")
        return pointer

    def _load(
        self, name: str, version: str, *, verify: bool, sha256: str | None = None
    ) -> StoredModel:
        """A stored version; with `verify`, its file is hashed against its manifest.
        Raises _Unusable saying what is wrong."""
        directory = self._versions / name / version
        if not directory.is_dir():
            raise _Unusable(f"version {version} is not stored")
        missing = [f for f in _VERSION_FILES if not (directory / f).is_file()]
        if missing:
            raise _Unusable(f"version {version} is incomplete (no {', '.join(missing)})")
        try:
            manifest = DeliveryManifest.model_validate_json(
                (directory / MANIFEST_FILE).read_bytes()
            )
            installed = json.loads((directory / INSTALLED_FILE).read_bytes())
            installed_ns = int(installed["installed_ns"])
            size = (directory / MODEL_FILE).stat().st_size
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            raise _Unusable(f"version {version} has unreadable metadata ({exc})") from exc
        if manifest.name != name or manifest.version != version:
            raise _Unusable(
                f"version {version} holds the manifest of {manifest.name} {manifest.version}"
            )
        if sha256 is not None and manifest.sha256 != sha256:
            raise _Unusable(f"version {version} is not the build the pointer names")
        if size != manifest.size:
            raise _Unusable(f"version {version} is {size} bytes, its manifest says {manifest.size}")
        if verify:
            actual = _sha256(directory / MODEL_FILE)
            if actual != manifest.sha256:
                raise _Unusable(
                    f"version {version} is corrupt: sha256 {actual}, manifest {manifest.sha256}"
                )
        return StoredModel(name, version, directory / MODEL_FILE, manifest, installed_ns)

    def _load_or_raise(self, name: str, version: str) -> StoredModel:
        if not (self._versions / name / version).is_dir():
            stored = ", ".join(s.version for s in self.versions(name)) or "none"
            raise DeliveryError(
                "not-stored",
                f"{name} {version} is not installed (installed: {stored}): deliver it first",
            )
        try:
            return self._load(name, version, verify=True)
        except _Unusable as why:
            raise DeliveryError(
                "corrupt-version", f"{name} {why}: deliver it again, or roll back"
            ) from why

    def _delete_dir(self, directory: Path) -> None:
        """Renames `directory` out of the way (atomic), then deletes it: a crash leaves
        trash that clean_debris removes, never a half-deleted version."""
        trash = directory.with_name(f"{TRASH_PREFIX}{directory.name}-{uuid.uuid4().hex[:8]}")
        try:
            directory.rename(trash)
            fsync_dir(directory.parent)
        except OSError as exc:
            raise _io_error(exc, f"cannot delete {directory}") from exc
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_staging(self, max_age_s: float) -> list[Path]:
        removed: list[Path] = []
        now = time.time()
        for entry in _listdir(self.root / STAGING_DIR):
            if not entry.is_dir():
                removed += _remove(entry)
                continue
            try:
                manifest = DeliveryManifest.model_validate_json(
                    (entry / MANIFEST_FILE).read_bytes()
                )
            except (OSError, ValueError, ValidationError):
                removed += _remove(entry)
                continue
            expected = f"{manifest.name}@{manifest.version}@{manifest.sha256}"
            newest = max((f.stat().st_mtime for f in _walk_files(entry)), default=0.0)
            installed = (self._versions / manifest.name / manifest.version).is_dir()
            if entry.name != expected or installed or now - newest > max_age_s:
                removed += _remove(entry)
                continue
            for f in _listdir(entry):
                if f.name.startswith(TEMP_PREFIX):
                    removed += _remove(f)
        return removed


def _place(source: Path, target: Path, *, move: bool) -> None:
    """Moves (rename) or copies `source` to `target`, then fsyncs `target`."""
    if move:
        try:
            source.rename(target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _log.info("%s is on another file system: copying it instead", source)
        else:
            _fsync_file(target)
            return
    with source.open("rb") as src, target.open("xb") as dst:
        shutil.copyfileobj(src, dst, _READ_BLOCK)
        dst.flush()
        os.fsync(dst.fileno())
    if move:
        source.unlink()


def _verify_file(path: Path, manifest: DeliveryManifest) -> None:
    try:
        size = path.stat().st_size
        digest = _sha256(path) if size == manifest.size else ""
    except OSError as exc:
        raise _io_error(exc, f"cannot read the staged model {path}") from exc
    if size != manifest.size:
        raise DeliveryError(
            "size-mismatch",
            f"{path} is {size} bytes but {manifest.name} {manifest.version} is {manifest.size}",
        )
    if digest != manifest.sha256:
        raise DeliveryError(
            "sha256-mismatch",
            f"{path} has sha256 {digest}, not the {manifest.sha256} of {manifest.name} "
            f"{manifest.version}: it is not the verified model; deliver it again",
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fields(pointer: ActivePointer) -> dict[str, Any]:
    return {
        "version": pointer.version,
        "sha256": pointer.sha256,
        "previous": pointer.previous,
        "activated_at": pointer.activated_at,
    }


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def _semver_key(version: object) -> VersionKey | None:
    if not isinstance(version, str):
        return None
    try:
        return version_key(version)
    except DeliveryError:
        return None


def _is_safe(value: str) -> bool:
    return bool(SAFE_ID.fullmatch(value)) and ".." not in value


def _listdir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _walk_files(path: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            yield Path(dirpath) / f


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in _walk_files(path))


def _remove(path: Path) -> list[Path]:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return []
    except OSError as exc:
        _log.warning("cannot remove debris %s: %s", path, exc)
        return []
    return [path]


def _io_error(exc: OSError, what: str) -> DeliveryError:
    if exc.errno in _DISK_FULL:
        return DeliveryError(
            "disk-full", f"{what}: the disk is full ({exc.strerror}); free space and retry"
        )
    return DeliveryError("io-error", f"{what}: {exc}")


__all__ = ["ActivePointer", "ModelStore", "StoredModel"]
