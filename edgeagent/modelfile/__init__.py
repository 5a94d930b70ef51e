"""What a model file is and says about itself: the `.tflite` reader (`tflite`), its TFLite
metadata (`metadata`), what its graph implies (`introspect`), the YAML manifest beside it
(`manifest`), and the catalog that resolves a name or a path and merges config, manifest,
metadata and graph into one description (`catalog`). Not to be confused with the bundled
`.tflite` files in the repository's top-level `models/`."""

from edgeagent.modelfile.catalog import (
    ModelDescription,
    bundled_models,
    describe_model,
    resolve_model,
)
from edgeagent.modelfile.manifest import Manifest, load_manifest
from edgeagent.modelfile.tflite import ModelFile, read_model

__all__ = [
    "Manifest",
    "ModelDescription",
    "ModelFile",
    "bundled_models",
    "describe_model",
    "load_manifest",
    "read_model",
    "resolve_model",
]
