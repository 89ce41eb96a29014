"""vlmad checkpoints without Lightning: read, check against a method, load its learned tensors.

A checkpoint holds only the learned tensors (never the frozen backbone) plus a ``vlmad`` entry with the
settings they belong to and the backbone weights they were trained on, so a mismatch is refused with a message
instead of loading silently. The official AnomalyCLIP and APRIL-GAN ``.pth`` files load too (converted).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vlmad.errors import VlmadError
from vlmad.io import atomic_write
from vlmad.methods.base import AnomalyMethod

log = logging.getLogger(__name__)

WEIGHTS_KEY = "backbone_weights"  # in the ``vlmad`` entry; not part of hparams_for_checkpoint (the cache key)
BUILD_KEY = "backbone_build"  # the backbone settings that made those weights, for the mismatch message


class CheckpointMismatchError(VlmadError, RuntimeError):
    """A checkpoint is unreadable or was made for another backbone or prompt/projection shape."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a per-process temporary file, then ``os.replace``: a killed write never tears ``path``."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Delete ``*.ckpt.<pid>.tmp`` / ``*.ckpt.tmp`` left in ``folder`` by a run killed while writing."""
    removed = sorted(Path(folder).glob("*.ckpt*.tmp")) if Path(folder).is_dir() else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a checkpoint, or CheckpointMismatchError naming the file (missing, truncated, not torch)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatchError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises OSError/RuntimeError/UnpicklingError/EOFError for damaged files
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise CheckpointMismatchError(f"{path}: not a readable checkpoint (truncated or damaged? {reason})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(f"{path}: not a vlmad checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def checkpoint_entry(method: AnomalyMethod) -> dict[str, Any]:
    """The ``vlmad`` entry of a checkpoint: the method's settings plus the backbone weights' id."""
    return {**method.hparams_for_checkpoint(), WEIGHTS_KEY: method.backbone.weights_id(), BUILD_KEY: _build(method)}


def _build(method: AnomalyMethod) -> dict[str, Any]:
    """The ``backbone.*`` settings that decide the weights (``random_seed`` only matters for random weights)."""
    backbone = method.backbone
    build = {"model_name": backbone.model_name, "pretrained": backbone.pretrained}
    if backbone.pretrained is None:
        build["random_seed"] = getattr(backbone, "random_seed", None)
    return build


def _overrides(build: dict[str, Any]) -> str:
    """``backbone.model_name=... backbone.pretrained=null ...``: the command-line overrides that rebuild ``build``."""
    return " ".join(f"backbone.{k}={'null' if v is None else v}" for k, v in build.items())


def weights_hint(saved: dict[str, Any], method: AnomalyMethod) -> str:
    """What to change so the configured backbone gets the checkpoint's weights (one sentence)."""
    build = saved.get(BUILD_KEY)
    if not build:
        return (
            "evaluate with the training run's backbone settings (backbone.pretrained, and backbone.random_seed for "
            "random weights; see its .hydra/config.yaml)"
        )
    if build == _build(method):  # same settings, other values: another open_clip/timm version or a changed file
        return f"the checkpoint's backbone ({_overrides(build)}) now builds other weights (another library version?)"
    return f"set {_overrides(build)} to evaluate it"


def _weights_diff(saved: dict[str, Any], method: AnomalyMethod) -> dict[str, tuple[Any, Any]]:
    """{"backbone weights": (checkpoint's, configured)} when learned tensors would run on other weights."""
    if not method.trainable:  # only settings in the checkpoint: nothing was fitted to the weights
        return {}
    configured = method.backbone.weights_id()
    if WEIGHTS_KEY not in saved:  # written before weights were recorded: cannot tell
        log.warning("checkpoint does not record its backbone weights; cannot check they are %s", configured)
        return {}
    if saved[WEIGHTS_KEY] != configured:
        name = method.backbone.model_name
        return {"backbone weights": (f"{saved.get('backbone', name)} {saved[WEIGHTS_KEY]}", f"{name} {configured}")}
    return {}


def check_checkpoint_fits(checkpoint: dict[str, Any], method: AnomalyMethod) -> None:
    """Raise CheckpointMismatchError unless the checkpoint's settings, backbone weights and tensor shapes fit.

    Learned tensors only mean something on the backbone weights they were fitted on (random tiny weights differ
    by seed), so other weights are refused, naming both.
    """
    saved = checkpoint.get("vlmad")
    if saved is None:
        raise CheckpointMismatchError("not a vlmad checkpoint (no 'vlmad' settings entry)")
    expected = method.hparams_for_checkpoint()
    diffs = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    diffs |= _weights_diff(saved, method)
    if diffs:
        lines = "; ".join(f"{k}: checkpoint {a!r} vs configured {b!r}" for k, (a, b) in diffs.items())
        hint = f"; {weights_hint(saved, method)}" if "backbone weights" in diffs else ""
        raise CheckpointMismatchError(f"checkpoint does not fit the configured method ({lines}){hint}")
    _check_tensors(
        {k[len("method.") :]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("method.")}, method
    )


def _check_tensors(state: dict[str, Any], method: AnomalyMethod) -> None:
    """Every learned tensor of ``method`` is in ``state`` with its shape (keys without the ``method.`` prefix)."""
    own = method.learned_state()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointMismatchError(
                f"checkpoint tensor method.{key} has shape {tuple(value.shape)}, the configured method expects "
                f"{tuple(own[key].shape)}"
            )
    missing = sorted(f"method.{k}" for k in set(own) - set(state))
    if missing:
        raise CheckpointMismatchError(f"checkpoint lacks learned tensors {missing}")


def convert_official(checkpoint: dict[str, Any], method: AnomalyMethod) -> dict[str, Any] | None:
    """The learned state of an official reference checkpoint for ``method``, or None if it is not one.

    Recognised: AnomalyCLIP's ``{"prompt_learner": ...}`` and APRIL-GAN's ``{"trainable_linearlayer": ...}``
    (or their inner dicts), via the method's ``convert_official_checkpoint``.
    """
    convert = getattr(type(method), "convert_official_checkpoint", None)
    if convert is None or "vlmad" in checkpoint or "state_dict" in checkpoint:
        return None
    try:
        return convert(checkpoint)
    except (KeyError, ValueError, AttributeError, TypeError):  # another layout: not this method's official file
        return None


def load_method_weights(method: AnomalyMethod, ckpt_path: str | Path) -> None:
    """Load a vlmad checkpoint's learned tensors into a method (no Trainer needed).

    An official AnomalyCLIP / APRIL-GAN file for the configured method is converted (one log line); those were
    trained on OpenAI's ViT-L-14-336 weights, which only a warning can check (they record nothing).
    """
    checkpoint = read_checkpoint(ckpt_path)
    official = convert_official(checkpoint, method)
    try:
        if official is not None:
            log.info("converted official %s checkpoint %s", type(method).__name__, ckpt_path)
            if method.backbone.pretrained != "openai":
                backbone = method.backbone
                log.warning(
                    "official %s checkpoints were trained on OpenAI ViT-L-14-336 weights; configured: %s %s",
                    type(method).__name__,
                    backbone.model_name,
                    backbone.weights_id(),
                )
            _check_tensors(official, method)
            state = official
        else:
            check_checkpoint_fits(checkpoint, method)
            state = {k[len("method.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("method.")}
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{ckpt_path}: {err}") from None
    method.load_state_dict(state, strict=False)
