"""Deploy layer: export (torch), the torch-free runtime, predict.

``from vlmad import deploy`` is the runtime's public API (numpy + PIL + onnxruntime/openvino, never torch):
``deploy.load``, ``DeployedModel``, ``Result``, ``DeployError``; ``read_manifest`` / ``write_manifest`` (validated,
sha256-checked ``vlmad_model.json``). The export and predict commands live in
:mod:`vlmad.deploy.export` and :mod:`vlmad.deploy.predict` and are imported only when used.
"""

from vlmad.deploy.runtime import (
    BACKENDS,
    MANIFEST,
    DeployedModel,
    DeployError,
    Result,
    basic_manifest,
    calibrate,
    load,
    load_image,
    preprocess,
    read_manifest,
    resize_map,
    sha256_file,
    validate_manifest,
    write_manifest,
)

__all__ = [
    "BACKENDS",
    "MANIFEST",
    "DeployError",
    "DeployedModel",
    "Result",
    "basic_manifest",
    "calibrate",
    "load",
    "load_image",
    "preprocess",
    "read_manifest",
    "resize_map",
    "sha256_file",
    "validate_manifest",
    "write_manifest",
]
