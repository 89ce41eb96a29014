"""Cache of frozen image-side features, so a frozen CLIP encodes each training image once.

The protocols of AnomalyCLIP and APRIL-GAN train with a frozen image encoder and no augmentation, so the
image side of every auxiliary sample is the same in every epoch. ``FeatureCache.fetch`` returns
``method.encode_images`` outputs per sample, computing only the ones it has not seen. Entries are keyed by
a hash of the method's frozen-side settings (backbone, weights, input size, tapped layers, ...) and of the
preprocessed image tensor itself (content and preprocessing), so a changed file, size or layer list can
never hit a stale entry. ``storage="disk"`` writes one file per sample atomically, which is safe for
concurrent jobs (same key = same content).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def method_signature(method: torch.nn.Module) -> str:
    """Hash of everything that determines a method's frozen image features."""
    parts = {"method": method.feature_signature(), "backbone": method.backbone.signature()}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureCache:
    """Per-sample store of ``method.encode_images`` outputs.

    Args:
        storage: ``memory`` (a dict in this process) or ``disk`` (``directory``, shared across runs/jobs).
        directory: folder of the disk cache.
    """

    def __init__(self, storage: str = "memory", directory: str | None = None) -> None:
        if storage not in {"memory", "disk"}:
            raise ValueError(f"feature cache storage must be 'memory' or 'disk', got {storage!r}")
        if storage == "disk" and not directory:
            raise ValueError("a disk feature cache needs a directory")
        self.storage = storage
        self.directory = Path(directory) if directory else None
        self._memory: dict[str, dict[str, Tensor]] = {}
        self._signatures: dict[int, str] = {}
        self.hits = self.misses = self.bytes = 0

    @classmethod
    def from_setting(cls, setting: FeatureCache | str | None) -> FeatureCache | None:
        """``None`` (off), ``"memory"``, a directory path (disk cache), or a ready cache."""
        if setting is None or isinstance(setting, FeatureCache):
            return setting
        return cls("memory") if setting == "memory" else cls("disk", setting)

    def _key(self, signature: str, image: Tensor) -> str:
        digest = hashlib.sha1(image.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        return f"{signature}/{digest}"

    def _load(self, key: str) -> dict[str, Tensor] | None:
        if self.storage == "memory":
            return self._memory.get(key)
        path = self.directory / f"{key}.pt"
        return torch.load(path, weights_only=True) if path.is_file() else None

    def _store(self, key: str, entry: dict[str, Tensor]) -> None:
        self.bytes += sum(t.numel() * t.element_size() for t in entry.values())
        if self.storage == "memory":
            self._memory[key] = entry
            return
        path = self.directory / f"{key}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(entry, tmp)
        os.replace(tmp, path)

    @torch.no_grad()
    def fetch(self, method: torch.nn.Module, images: Tensor) -> dict[str, Tensor]:
        """Features of (B, 3, S, S) images: cached entries, the rest encoded now and stored.

        Returns:
            dict of (B, ...) tensors on the images' device, as ``method.encode_images`` returns.
        """
        if id(method) not in self._signatures:  # the frozen side cannot change during a run
            self._signatures[id(method)] = method_signature(method)
        signature = self._signatures[id(method)]
        keys = [self._key(signature, img) for img in images]
        entries = [self._load(k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = method.encode_images(images[missing])
            for j, i in enumerate(missing):
                entries[i] = {name: value[j].detach().cpu().clone() for name, value in fresh.items()}
                self._store(keys[i], entries[i])
        return {name: torch.stack([e[name] for e in entries]).to(images.device) for name in entries[0]}

    def report(self) -> str:
        """One line: hits, misses and stored size."""
        return (f"feature cache ({self.storage}): {self.hits} hits, {self.misses} misses, "
                f"{self.bytes / 2**20:.1f} MiB stored")  # fmt: skip
