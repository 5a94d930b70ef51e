"""How every JSON message the agent publishes is encoded."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def to_json(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; ValueError for NaN or infinity, which JSON cannot carry."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
