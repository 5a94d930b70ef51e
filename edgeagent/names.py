"""The naming rule for everything that becomes an MQTT topic level and a file name.

Device ids, pipeline, group, command and model names and model versions follow it. It
lives apart from the topic module so that the configuration can check names without
importing the MQTT client.
"""

from __future__ import annotations

import re
from typing import Final

SAFE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Names that are safe as a topic level and as a file name (use `fullmatch`)."""

GROUPS_LEVEL: Final = "group"
MODELS_LEVEL: Final = "models"
RESERVED_DEVICE_IDS: Final = frozenset({GROUPS_LEVEL, MODELS_LEVEL})
"""Topic levels under the prefix that are fleet-wide, so no device may take them as its id."""


def check_name(value: str, what: str | None = None) -> str:
    """Returns `value` if it follows `SAFE_NAME`; raises ValueError naming `what` (None: the
    caller's message names it already, as a configuration error names its key)."""
    if not SAFE_NAME.fullmatch(value):
        named = f"{what} {value!r} " if what else ""
        raise ValueError(
            f"{named}must be 1-64 characters of letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (it becomes an MQTT topic level)"
        )
    return value


def check_not_reserved(device_id: str) -> str:
    """Returns `device_id` unless it is one of the fleet-wide topic levels (ValueError)."""
    if device_id in RESERVED_DEVICE_IDS:
        raise ValueError(
            f"device id {device_id!r} is reserved for fleet-wide topics; choose another"
        )
    return device_id


def check_device_id(value: str) -> str:
    """A device id: a safe name that is not one of the fleet-wide topic levels."""
    return check_not_reserved(check_name(value))
