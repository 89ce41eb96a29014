"""Cache of frozen image-side features, so a frozen CLIP encodes each training image once.

The protocols of AnomalyCLIP and APRIL-GAN train with a frozen image encoder and no augmentation, so the
image side of every auxiliary sample is the same in every epoch. ``FeatureCache.fetch`` returns
``method.encode_images`` outputs per sample, computing only the ones it has not seen. Entries are keyed by
a hash of the method's frozen-side settings (backbone, weights, input size, tapped layers, ...) and of the
preprocessed image tensor itself (content, shape and preprocessing), so a changed file, size or layer list
can never hit a stale entry.

``storage="disk"`` writes one file per sample. Each file holds its own key, checked on load, so a truncated,
corrupt or swapped file is reported by name and recomputed instead of crashing or being used silently.
Files are written to a temporary name unique to the process and thread, then renamed over the target
(atomic on POSIX): jobs sharing a directory never read a partial file, and two writers of one key write the
same content. A directory that cannot be written is reported once and the run continues without storing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from vlmad.io import atomic_write

log = logging.getLogger(__name__)


def autocast_precision(device_type: str) -> str:
    """``fp32``, or the dtype autocast runs the encoder in (mixed precision changes the features)."""
    if not torch.is_autocast_enabled(device_type):
        return "fp32"
    return str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")


def method_signature(method: torch.nn.Module, precision: str = "fp32") -> str:
    """Hash of everything that determines a method's frozen image features, incl. the autocast precision."""
    parts = {"method": method.feature_signature(), "backbone": method.backbone.signature()}
    if precision != "fp32":  # fp32 keys stay as they were
        parts["precision"] = precision
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_entry(path: Path, key: str, value: object) -> None:
    """Write ``{"key": key, "value": value}`` to ``path`` atomically (temporary file + rename).

    The temporary name is unique per host process and thread (pid, thread id, random suffix) and does not
    end in ``.pt``, so concurrent writers never share it and readers never open it.

    Raises:
        OSError: the directory cannot be created or written (the temporary file is removed).
    """
    atomic_write(path, lambda handle: torch.save({"key": key, "value": value}, handle))


def load_entry(path: Path, key: str, what: str = "cache entry") -> object | None:
    """The value stored under ``key`` in ``path``; None if the file is missing or not a valid entry for ``key``.

    A bad file (unreadable, truncated, another key's entry, an old format) is reported in one warning line
    naming the file; the caller recomputes the value and overwrites it.
    """
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        problem = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})"
    else:
        if not isinstance(entry, dict) or set(entry) != {"key", "value"}:
            problem = "not a vlmad cache entry (old format or foreign file)"
        elif entry["key"] != key:
            problem = f"holds the entry of another key ({entry['key']!r}, expected {key!r})"
        else:
            return entry["value"]
    log.warning("%s %s: %s; recomputing it", what, path, problem)
    return None


def image_key(signature: str, image: Tensor) -> str:
    """Cache key of one preprocessed (3, S, S) image under a method signature (content and shape)."""
    pixels = image.detach().float().cpu().contiguous()
    digest = hashlib.sha1(repr(tuple(pixels.shape)).encode())  # same bytes, other shape: other key
    digest.update(pixels.numpy().tobytes())
    return f"{signature}/{digest.hexdigest()}"


class WorkerReader:
    """Reads disk-cache entries inside DataLoader workers (picklable: a folder and a signature).

    The datamodule calls it on each preprocessed image; the entry travels with the batch and
    :meth:`FeatureCache.prime` hands it to the main process's fetch, which only uses it under the key it computes
    itself, so a stale or foreign entry can never be served.
    """

    def __init__(self, directory: Path, signature: str) -> None:
        self.directory, self.signature = Path(directory), signature

    def __call__(self, image: Tensor) -> tuple[str, dict[str, Tensor] | None]:
        """(key, entry or None) of a (3, S, S) image."""
        key = image_key(self.signature, image)
        entry = load_entry(self.directory / f"{key}.pt", key, "feature cache entry")
        valid = isinstance(entry, dict) and all(isinstance(v, Tensor) for v in entry.values())
        return key, entry if valid else None


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
        self.writable = True  # set False (with one warning) on the first failed write
        self._memory: dict[str, dict[str, Tensor]] = {}
        self._signatures: dict[tuple[int, str], str] = {}
        self.hits = self.misses = self.bytes = 0
        self._primed: dict[str, dict[str, Tensor]] = {}  # entries read in DataLoader workers, for the next fetch
        self.worker_reads = 0  # entries that came from a worker instead of a read in this process

    @classmethod
    def from_setting(cls, setting: FeatureCache | str | None) -> FeatureCache | None:
        """``None`` (off), ``"memory"``, a directory path (disk cache), or a ready cache."""
        if setting is None or isinstance(setting, FeatureCache):
            return setting
        return cls("memory") if setting == "memory" else cls("disk", setting)

    def _key(self, signature: str, image: Tensor) -> str:
        return image_key(signature, image)

    def worker_reader(self, method: torch.nn.Module) -> WorkerReader | None:
        """A reader for DataLoader workers (disk caches, fp32 keys); None for a memory cache."""
        if self.storage != "disk":
            return None
        return WorkerReader(self.directory, method_signature(method))

    def prime(self, keys: list[str], entries: list[dict[str, Tensor] | None]) -> None:
        """Entries read by :class:`WorkerReader` for the next :meth:`fetch` (used only under matching keys)."""
        # replaces the previous batch's: at most one batch of entries is held
        self._primed = {k: e for k, e in zip(keys, entries, strict=True) if e is not None}

    def _load(self, key: str) -> dict[str, Tensor] | None:
        if key in self._primed:
            self.worker_reads += 1
            return self._primed.pop(key)
        if self.storage == "memory":
            return self._memory.get(key)
        entry = load_entry(self.directory / f"{key}.pt", key, "feature cache entry")
        valid = isinstance(entry, dict) and all(isinstance(v, Tensor) for v in entry.values())
        return entry if valid else None

    def _store(self, key: str, entry: dict[str, Tensor]) -> None:
        if self.storage == "memory":
            self._memory[key] = entry
        elif self.writable:
            try:
                save_entry(self.directory / f"{key}.pt", key, entry)
            except OSError as err:
                self.writable = False
                log.warning(
                    "feature cache %s is not writable (%s): continuing without storing features", self.directory, err
                )
                return
        else:
            return
        self.bytes += sum(t.numel() * t.element_size() for t in entry.values())

    @torch.no_grad()
    def fetch(self, method: torch.nn.Module, images: Tensor) -> dict[str, Tensor]:
        """Features of (B, 3, S, S) images: cached entries, the rest encoded now and stored.

        Returns:
            dict of (B, ...) tensors on the images' device, as ``method.encode_images`` returns.
        """
        precision = autocast_precision(images.device.type)  # bf16 features must never serve an fp32 run
        if (id(method), precision) not in self._signatures:  # the frozen side cannot change during a run
            self._signatures[(id(method), precision)] = method_signature(method, precision)
        signature = self._signatures[(id(method), precision)]
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
        return (
            f"feature cache ({self.storage}): {self.hits} hits, {self.misses} misses, "
            f"{self.bytes / 2**20:.1f} MiB stored"
        )
