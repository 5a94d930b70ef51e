"""The one registry of camera and sensor backends, by the `type:` of their settings.

It is built from `edgeagent.config.SOURCE_BACKENDS`; each backend's settings model names
its implementation, and only the selected backend's module is imported, so a Pi without
OpenCV never imports cv2.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Final, cast

from edgeagent.config import SOURCE_BACKENDS, SourceConfig
from edgeagent.errors import EdgeAgentError, SourceError
from edgeagent.hal.source import Source

logger = logging.getLogger(__name__)

SOURCES: Final = {backend.type_name(): backend.implementation for backend in SOURCE_BACKENDS}
"""`type:` -> `module:Class` of its backend."""


def source_class(source_type: str) -> type[Any]:
    """The backend class for a config `type`, importing its module (and nothing else)."""
    target = SOURCES.get(source_type)
    if target is None:
        raise SourceError(
            f"unknown source type {source_type!r}; known: {', '.join(sorted(SOURCES))}"
        )
    module_name, _, class_name = target.partition(":")
    # Vendor libraries are imported inside the backends, which raise MissingDependencyError;
    # an ImportError escaping from here is a broken installation and is not hidden.
    module = importlib.import_module(module_name)
    return cast(type[Any], getattr(module, class_name))


def open_source(config: SourceConfig) -> Source:
    """Constructs the backend for `config` and opens it; raises SourceError or
    MissingDependencyError saying what is wrong and what to do."""
    cls = source_class(config.type)
    source = cast(Source, cls(config))
    try:
        source.open()
    except EdgeAgentError:
        _close_quietly(source, config.type)
        raise
    logger.info("opened %s source", config.type)
    return source


def _close_quietly(source: Source, source_type: str) -> None:
    """Releases what a failed open() may have taken; the open error is the one to report."""
    try:
        source.close()
    except EdgeAgentError as exc:
        logger.debug("closing the %s source after a failed open: %s", source_type, exc)
