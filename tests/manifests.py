"""Delivery manifests for model files, as the fleet side would publish them."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeagent.delivery.signing import DeliveryManifest


def manifest_for(model: Path, version: str, name: str = "m", **changes: Any) -> DeliveryManifest:
    """A valid manifest for `model` (4 KiB chunks); `changes` override its fields."""
    data = model.read_bytes()
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "chunk_size": 4096,
        "chunks": -(-len(data) // 4096),
        "created_at": datetime(2025, 1, 1, tzinfo=UTC),
    }
    fields.update(changes)
    return DeliveryManifest.model_validate(fields)
