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

Entries are stored compactly: floating tensors in ``dtype`` (``bf16`` by default in ``module.feature_cache_dtype``)
and handed back as fp32; ``fp32`` keeps them exactly as ``encode_images`` returned them. The storage dtype is part
of the key. :func:`choose_storage` is the ``auto`` setting: memory when the fit set's estimated size fits
``MEMORY_SHARE`` of the available host memory, else the run folder's disk when it fits ``DISK_SHARE`` of its free
space, else no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from vlmad.io import atomic_write

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # None: stored as returned
MEMORY_SHARE = 0.5  # auto: at most this share of the available host memory holds the cache
DISK_SHARE = 0.5  # auto: else at most this share of the free space of the run folder's disk


def autocast_precision(device_type: str) -> str:
    """``fp32``, or the dtype autocast runs the encoder in (mixed precision changes the features)."""
    if not torch.is_autocast_enabled(device_type):
        return "fp32"
    return str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")


def method_signature(method: torch.nn.Module, precision: str = "fp32", storage: str = "fp32") -> str:
    """Hash of everything that determines a method's cached image features: autocast and storage precision."""
    parts = {"method": method.feature_signature(), "backbone": method.backbone.signature()}
    if precision != "fp32":  # fp32 keys stay as they were
        parts["precision"] = precision
    if storage != "fp32":  # bf16-stored entries never serve an fp32-storage run (nor the reverse)
        parts["storage"] = storage
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


def available_memory() -> int:
    """Bytes of host memory available to new allocations (``MemAvailable``; free pages where it is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_disk(directory: Path) -> int:
    """Free bytes on the disk that holds ``directory`` (its nearest existing parent)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def choose_storage(
    estimate: int, directory: Path | None, memory_share: float = MEMORY_SHARE, disk_share: float = DISK_SHARE
) -> tuple[str | None, str]:
    """The ``auto`` choice for a cache of ``estimate`` bytes: ``memory``, ``disk`` (in ``directory``) or None.

    Returns:
        (storage, one-line reason naming the sizes compared).
    """
    size = f"{estimate / 2**30:.2f} GiB"
    memory = available_memory()
    if estimate <= memory_share * memory:
        return "memory", f"memory ({size} <= {memory_share:g} x {memory / 2**30:.1f} GiB available host memory)"
    why_not = f"{size} > {memory_share:g} x {memory / 2**30:.1f} GiB available host memory"
    if directory is not None:
        disk = free_disk(directory)
        if estimate <= disk_share * disk:
            return "disk", f"disk {directory} ({why_not}; <= {disk_share:g} x {disk / 2**30:.1f} GiB free disk)"
        why_not += f", > {disk_share:g} x {disk / 2**30:.1f} GiB free disk"
    else:
        why_not += ", no run folder for a disk cache"
    return None, f"off ({why_not})"


class FeatureCache:
    """Per-sample store of ``method.encode_images`` outputs.

    Args:
        storage: ``memory`` (a dict in this process) or ``disk`` (``directory``, shared across runs/jobs).
        directory: folder of the disk cache.
        dtype: storage precision of floating features: ``fp32`` (as ``encode_images`` returned them, exact),
            ``bf16`` or ``fp16`` (half the bytes; handed back as fp32).
    """

    def __init__(self, storage: str = "memory", directory: str | None = None, dtype: str = "fp32") -> None:
        if storage not in {"memory", "disk"}:
            raise ValueError(f"feature cache storage must be 'memory' or 'disk', got {storage!r}")
        if storage == "disk" and not directory:
            raise ValueError("a disk feature cache needs a directory")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"feature cache dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        self.storage, self.dtype = storage, dtype
        self.directory = Path(directory) if directory else None
        self.writable = True  # set False (with one warning) on the first failed write
        self._memory: dict[str, dict[str, Tensor]] = {}
        self._signatures: dict[tuple[int, str], str] = {}
        self.hits = self.misses = self.bytes = 0
        self._primed: dict[str, dict[str, Tensor]] = {}  # entries read in DataLoader workers, for the next fetch
        self.worker_reads = 0  # entries that came from a worker instead of a read in this process
        self._bypass: list[bool] | None = None  # per image of the next fetch: encode, never look up or store
        self.bypassed = 0

    @classmethod
    def from_setting(cls, setting: FeatureCache | str | None, dtype: str = "fp32") -> FeatureCache | None:
        """``None`` (off), ``"memory"``, a directory path (disk cache), or a ready cache."""
        if setting is None or isinstance(setting, FeatureCache):
            return setting
        return cls("memory", dtype=dtype) if setting == "memory" else cls("disk", setting, dtype=dtype)

    def bypass_next(self, flags: list[bool] | None) -> None:
        """Images of the next :meth:`fetch` to encode without looking up or storing (per-epoch augmented samples:
        they never recur, so storing them would only grow the cache)."""
        self._bypass = None if flags is None else [bool(f) for f in flags]

    def absorb(self, other: FeatureCache) -> None:
        """Store the entries of a memory cache ``other`` (same dtype) in this one."""
        for key, entry in other._memory.items():
            self._store(key, entry)
        self.hits, self.misses = self.hits + other.hits, self.misses + other.misses

    def _key(self, signature: str, image: Tensor) -> str:
        return image_key(signature, image)

    def worker_reader(self, method: torch.nn.Module) -> WorkerReader | None:
        """A reader for DataLoader workers (disk caches, fp32 autocast keys); None for a memory cache."""
        if self.storage != "disk":
            return None
        return WorkerReader(self.directory, method_signature(method, storage=self.dtype))

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

    def _compact(self, value: Tensor) -> Tensor:
        """One sample's feature tensor, detached on the CPU in the storage dtype."""
        value = value.detach().cpu()
        target = STORAGE_DTYPES[self.dtype]
        return value.to(target) if target is not None and value.is_floating_point() else value.clone()

    def _restore(self, value: Tensor) -> Tensor:
        """A stored tensor as the method uses it (fp32 when it was stored compactly)."""
        if STORAGE_DTYPES[self.dtype] is not None and value.is_floating_point():
            return value.float()
        return value

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
        bypass, self._bypass = self._bypass or [False] * len(images), None
        if len(bypass) != len(images):
            raise ValueError(f"feature cache: {len(bypass)} bypass flags for a fetch of {len(images)} images")
        precision = autocast_precision(images.device.type)  # bf16 features must never serve an fp32 run
        if (id(method), precision) not in self._signatures:  # the frozen side cannot change during a run
            self._signatures[(id(method), precision)] = method_signature(method, precision, self.dtype)
        signature = self._signatures[(id(method), precision)]
        keys = [None if skip else self._key(signature, img) for img, skip in zip(images, bypass, strict=True)]
        entries = [None if k is None else self._load(k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        self.bypassed += sum(bypass)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing) - sum(bypass)
        if missing:
            fresh = method.encode_images(images[missing])
            for j, i in enumerate(missing):
                if keys[i] is None:  # bypassed: the features as encoded (never rounded to the storage dtype)
                    entries[i] = {name: value[j].detach().cpu() for name, value in fresh.items()}
                else:
                    entries[i] = {name: self._compact(value[j]) for name, value in fresh.items()}
                    self._store(keys[i], entries[i])
        return {name: torch.stack([self._restore(e[name]) for e in entries]).to(images.device) for name in entries[0]}

    def report(self) -> str:
        """One line: hits, misses and stored size."""
        bypassed = f", {self.bypassed} augmented images not cached" if self.bypassed else ""
        return (
            f"feature cache ({self.storage}, {self.dtype}): {self.hits} hits, {self.misses} misses, "
            f"{self.bytes / 2**20:.1f} MiB stored{bypassed}"
        )
