"""Deploy layer: export (torch), the torch-free runtime, predict.

``from vlmad import deploy`` is the runtime's public API (numpy + PIL + onnxruntime/openvino, never torch):
``deploy.load``, ``DeployedModel``, ``Result``, ``DeployError``. The export and predict commands live in
:mod:`vlmad.deploy.export` and :mod:`vlmad.deploy.predict` and are imported only when used.
"""

from vlmad.deploy.runtime import (
    BACKENDS,
    MANIFEST,
    DeployedModel,
    DeployError,
    Result,
    calibrate,
    load,
    load_image,
    preprocess,
    read_manifest,
)

__all__ = [
    "BACKENDS",
    "MANIFEST",
    "DeployError",
    "DeployedModel",
    "Result",
    "calibrate",
    "load",
    "load_image",
    "preprocess",
    "read_manifest",
]
