"""Models: finding and describing them (`catalog`, `manifest`, `tflite`), and delivering them
to the device (`signing`, `transfer`, `gate`, `store`; `delivery` drives them and is
imported from its module, since it depends on the pipeline)."""

from edgeagent.models.catalog import ModelDescription, bundled_models, describe_model, resolve_model
from edgeagent.models.manifest import Manifest, load_manifest
from edgeagent.models.signing import DeliveryError, DeliveryManifest, sign_manifest, verify_manifest
from edgeagent.models.store import ModelStore, StoredModel
from edgeagent.models.tflite import ModelFile, read_model

__all__ = [
    "DeliveryError",
    "DeliveryManifest",
    "Manifest",
    "ModelDescription",
    "ModelFile",
    "ModelStore",
    "StoredModel",
    "bundled_models",
    "describe_model",
    "load_manifest",
    "read_model",
    "resolve_model",
    "sign_manifest",
    "verify_manifest",
]
