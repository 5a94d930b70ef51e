"""Model delivery to the device: signed manifests (`signing`), resumable chunk staging
(`transfer`), the validation gate in a child process (`gate`), the atomic on-device model
store (`store`), and `ModelDelivery`, which drives them (`worker`, with its `download`,
`probation`, `reporting` and `agent_view`; imported from its module, since it depends on the
pipeline). docs/model-delivery.md."""

from edgeagent.delivery.signing import (
    DeliveryError,
    DeliveryManifest,
    sign_manifest,
    verify_manifest,
)
from edgeagent.delivery.store import ModelStore, StoredModel

__all__ = [
    "DeliveryError",
    "DeliveryManifest",
    "ModelStore",
    "StoredModel",
    "sign_manifest",
    "verify_manifest",
]
