"""How every JSON message the agent publishes is encoded, and how readers decode one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def to_json(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; ValueError for NaN or infinity, which JSON cannot carry."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def from_json(payload: bytes) -> Any:
    """The JSON value of `payload`, or None when it is empty, not UTF-8 or not JSON (a
    reader of what others publish skips such messages)."""
    if not payload:
        return None
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
