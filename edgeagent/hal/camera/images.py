"""Image files from a folder or a glob, decoded with Pillow and played in name order."""

from __future__ import annotations

import glob
import logging
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from edgeagent.errors import SourceError
from edgeagent.hal.camera.settings import ImagesCamera
from edgeagent.hal.pacing import Pacer
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample

logger = logging.getLogger(__name__)

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
CACHE_LIMIT_BYTES = 64 * 1024 * 1024  # decoded frames are kept only when all fit in this


class ImagesSource:
    """Plays image files at `fps` (0: as fast as read); loops, or stops with SourceError."""

    kind: SampleKind = "image"

    def __init__(self, config: ImagesCamera, *, cache_limit_bytes: int = CACHE_LIMIT_BYTES) -> None:
        self.config = config
        self._cache_limit = cache_limit_bytes
        self._files: list[Path] = []
        self._cache: dict[Path, npt.NDArray[np.uint8]] | None = None
        self._position = 0
        self._sequence = 0
        self._pacer = Pacer(1.0 / config.fps if config.fps > 0 else 0.0)

    def open(self) -> None:
        files = find_images(self.config.path)
        if not files:
            raise SourceError(
                f"images source: no .jpg/.jpeg/.png/.bmp files match {self.config.path!r}"
            )
        readable, decoded_bytes = [], 0
        for file in files:
            size = _header_size(file)
            if size is None:
                continue
            readable.append(file)
            decoded_bytes += size[0] * size[1] * 3
        if not readable:
            raise SourceError(
                f"images source: none of the {len(files)} files matching {self.config.path!r} "
                "is an image Pillow can decode"
            )
        self._files = readable
        self._cache = {} if decoded_bytes <= self._cache_limit else None
        self._position = 0
        self._sequence = 0
        self._pacer.reset()
        logger.info(
            "images source: %d files from %s at %s fps (%s)",
            len(readable),
            self.config.path,
            self.config.fps or "unpaced",
            "cached" if self._cache is not None else "decoded on every read",
        )

    def read(self) -> Sample:
        if not self._files:
            raise SourceError("images source: read() before open() or after close()")
        started = time.monotonic()
        frame, path = self._next_frame()
        capture_s = time.monotonic() - started
        self._pacer.wait()  # after decoding, so frames leave on schedule
        return Sample(
            data=frame,
            captured_at=time.time(),
            capture_s=capture_s,
            sequence=self._advance(),
            truth={"file": str(path)},
        )

    def close(self) -> None:
        self._files = []
        self._cache = None

    def _advance(self) -> int:
        sequence = self._sequence
        self._sequence += 1
        return sequence

    def _next_frame(self) -> tuple[npt.NDArray[np.uint8], Path]:
        while self._files:
            if self._position >= len(self._files):
                if not self.config.loop:
                    raise SourceError(
                        f"images source exhausted: all {len(self._files)} images of "
                        f"{self.config.path!r} were played and loop is false"
                    )
                self._position = 0
            path = self._files[self._position]
            frame = self._cache.get(path) if self._cache is not None else None
            if frame is None:
                frame = _decode(path)
            if frame is None:  # unreadable now: drop it and keep playing the rest
                del self._files[self._position]
                continue
            if self._cache is not None:
                self._cache[path] = frame
            self._position += 1
            return frame, path
        raise SourceError(
            f"images source: none of the files matching {self.config.path!r} can be decoded"
        )


def find_images(path: str) -> list[Path]:
    """Image files of a folder, or matching a glob, or the one file named; sorted by name."""
    target = Path(path).expanduser()
    if target.is_dir():
        candidates = list(target.iterdir())
    elif target.is_file():
        candidates = [target]
    else:
        candidates = [Path(p) for p in glob.glob(str(target), recursive=True)]  # noqa: PTH207
    return sorted(
        (p for p in candidates if p.suffix.lower() in EXTENSIONS and p.is_file()),
        key=lambda p: (p.name, str(p)),
    )


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding; None (and a warning) if
    Pillow cannot identify it."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        logger.warning("images source: skipping %s: %s", path, exc)
        return None
    return width, height


def read_image(path: Path) -> npt.NDArray[np.uint8]:
    """One image file as RGB; SourceError saying why it cannot be read."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise SourceError(f"cannot read image {path}: {exc}") from exc
    array: npt.NDArray[np.uint8] = np.asarray(rgb, dtype=np.uint8)
    return array


def _decode(path: Path) -> npt.NDArray[np.uint8] | None:
    try:
        return read_image(path)
    except SourceError as exc:
        logger.warning("images source: skipping %s: %s", path, exc.__cause__)
        return None
