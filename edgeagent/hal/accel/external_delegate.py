"""Finding and loading LiteRT external delegate libraries (Edge TPU, GPU) without noise.

`DelegateAccelerator` is what the Edge TPU and the GPU have in common: a probe that finds
the library (and the device) without loading it, kept for a while once a load proved it,
and the delegate loaded from the library it found.

`load_delegate` leaves a half-built `Delegate` behind when the library cannot be opened or
lacks the plugin entry points, and its `__del__` then prints an AttributeError on stderr.
Checking the library with ctypes first turns those cases into one clear message instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeagent.errors import AcceleratorError
from edgeagent.hal.accel.base import Probe, ProbeState

logger = logging.getLogger(__name__)

_ENTRY_POINTS = ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")

LIBRARY_DIRS = (
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/local/lib",
    "/usr/lib",
)
SEARCHED = f"{', '.join(LIBRARY_DIRS)} or the linker cache"


def find_library(env_var: str, filename: str, link_name: str) -> tuple[str | None, str]:
    """The library to load and how it was found.

    Returns (path or None, explanation). `env_var` overrides the search; when it is set to a
    path that does not exist the result is None and the explanation says so.
    """
    override = os.environ.get(env_var)
    if override:
        if Path(override).is_file():
            return override, f"{env_var}={override}"
        return None, f"{env_var} is set to {override}, which does not exist"
    for directory in LIBRARY_DIRS:
        candidate = Path(directory) / filename
        if candidate.is_file():
            return str(candidate), f"found at {candidate}"
    # ldconfig's cache covers directories that LIBRARY_DIRS misses.
    found = ctypes.util.find_library(link_name)
    if found:
        return found, f"found by the dynamic linker as {found}"
    return None, f"{filename} not found in {SEARCHED}"


def load_external_delegate(library: str, options: dict[str, str] | None, what: str) -> Any:
    """Loads `library` through LiteRT's `load_delegate`; AcceleratorError says why it failed."""
    check_delegate_library(library, what)
    from ai_edge_litert.interpreter import load_delegate

    try:
        return load_delegate(library, options)
    except (OSError, ValueError, RuntimeError) as exc:
        detail = _one_line(str(exc)) or type(exc).__name__
        raise AcceleratorError(f"{what} is present but broken: {detail}") from exc


def check_delegate_library(library: str, what: str) -> None:
    """Raises AcceleratorError unless `library` opens and exports the external delegate API."""
    try:
        handle = ctypes.CDLL(library)
    except OSError as exc:
        raise AcceleratorError(
            f"{what} is present but broken: cannot load {library}: {_one_line(str(exc))}"
        ) from exc
    missing = [name for name in _ENTRY_POINTS if not hasattr(handle, name)]
    if missing:
        raise AcceleratorError(
            f"{what} is present but broken: {library} is not a LiteRT external delegate "
            f"(it does not export {', '.join(missing)})"
        )


def _one_line(text: str) -> str:
    return ": ".join(part.strip() for part in text.splitlines() if part.strip())


class ProbeCache:
    """Keeps a probe's result for `ttl_s` seconds: loading a delegate library is the only
    real test of it, and not free enough to repeat on every health check."""

    def __init__(
        self, probe: Callable[[], Probe], ttl_s: float, clock: Callable[[], float]
    ) -> None:
        self._probe = probe
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, Probe] | None = None

    def get(self, *, fresh: bool = False) -> Probe:
        with self._lock:
            now = self._clock()
            if not fresh and self._cached and now - self._cached[0] < self._ttl_s:
                return self._cached[1]
            result = self._probe()
            self._cached = (now, result)
            return result


class DelegateAccelerator:
    """An accelerator reached through an external delegate library. A subclass sets `name`
    and `what` (its name in messages) and implements `_inspect`: the probe without loading
    the library, whose details name the `library` when it is not ABSENT."""

    name: str
    what: str

    def __init__(
        self,
        *,
        root: Path = Path("/"),
        cache_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = root
        self._cache = ProbeCache(lambda: self._probe(load=True), cache_s, clock)

    def probe(self, *, fresh: bool = False) -> Probe:
        """What is there now; loading the delegate is the only real test, so a result is
        kept for `cache_s` seconds unless `fresh` asks for a new look."""
        result = self._cache.get(fresh=fresh)
        logger.debug("%s probe: %s: %s", self.name, result.state, result.reason)
        return result

    def present(self) -> bool:
        return self._probe(load=False).state is ProbeState.PRESENT

    def delegates(self) -> list[Any]:
        found = self._probe(load=False)
        if found.state is ProbeState.ABSENT:
            raise AcceleratorError(f"{self.what} is absent: {found.reason}")
        if found.state is ProbeState.BROKEN:
            raise AcceleratorError(f"{self.what} is present but broken: {found.reason}")
        return [load_external_delegate(found.details["library"], self._options(), self.what)]

    def _options(self) -> dict[str, str] | None:
        """The delegate's options (libedgetpu's `device`); None: its defaults."""
        return None

    def _inspect(self) -> Probe:
        raise NotImplementedError

    def _probe(self, *, load: bool) -> Probe:
        found = self._inspect()
        if load and found.state is ProbeState.PRESENT:
            try:
                load_external_delegate(found.details["library"], self._options(), self.what)
            except AcceleratorError as exc:
                return Probe(self.name, ProbeState.BROKEN, str(exc), found.details)
        return found
