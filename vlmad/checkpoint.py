"""vlmad checkpoints without Lightning: read, check against a method, load its learned tensors.

A checkpoint holds only the learned tensors (never the frozen backbone) plus a ``vlmad`` entry with the
settings they belong to, so a mismatch is refused with a message instead of loading silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vlmad.errors import VlmadError
from vlmad.methods.base import AnomalyMethod


class CheckpointMismatchError(VlmadError, RuntimeError):
    """A checkpoint is unreadable or was made for another backbone or prompt/projection shape."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a per-process temporary file, then ``os.replace``: a killed write never tears ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def check_checkpoint_fits(checkpoint: dict[str, Any], method: AnomalyMethod) -> None:
    """Raise CheckpointMismatchError unless the checkpoint's settings and tensor shapes fit ``method``."""
    saved = checkpoint.get("vlmad")
    if saved is None:
        raise CheckpointMismatchError("not a vlmad checkpoint (no 'vlmad' settings entry)")
    expected = method.hparams_for_checkpoint()
    diffs = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if diffs:
        lines = "; ".join(f"{k}: checkpoint {a!r} vs configured {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointMismatchError(f"checkpoint does not fit the configured method ({lines})")
    own = {f"method.{k}": v for k, v in method.learned_state().items()}
    for key, value in checkpoint.get("state_dict", {}).items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointMismatchError(
                f"checkpoint tensor {key} has shape {tuple(value.shape)}, the configured method expects "
                f"{tuple(own[key].shape)}"
            )
    missing = sorted(set(own) - set(checkpoint.get("state_dict", {})))
    if missing:
        raise CheckpointMismatchError(f"checkpoint lacks learned tensors {missing}")


def load_method_weights(method: AnomalyMethod, ckpt_path: str | Path) -> None:
    """Load a vlmad checkpoint's learned tensors into a method (no Trainer needed)."""
    checkpoint = read_checkpoint(ckpt_path)
    try:
        check_checkpoint_fits(checkpoint, method)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{ckpt_path}: {err}") from None
    state = {k[len("method.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("method.")}
    method.load_state_dict(state, strict=False)
