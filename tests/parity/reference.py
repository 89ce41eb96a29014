"""Locate and load the official implementations' reference fixtures (rule: ../fixtures/README.md).

The fixture folder is ``$VLMAD_REFERENCE_FIXTURES`` if set, else ``tests/fixtures`` (a copy of the shared
reference set). Every ``*.pt`` directly inside a method folder is one fixture; the CLIP it was computed
with is named inside the fixture, never assumed here. A method folder (e.g. ``metrics/``) or CLIP file the set
folder lacks is taken from the shipped ``tests/fixtures``, saying so once (a warning).

A fixture may leave keys out (``meta omitted_keys``, exact keys or globs such as ``lnamd/*``). The parity tests
then skip exactly those comparisons; a stage whose reference *input* is left out runs from vlmad's own upstream
output instead, so it is still checked, end to end.
"""

from __future__ import annotations

import fnmatch
import io
import lzma
import os
import warnings
from pathlib import Path

import safetensors.torch
import torch

from vlmad.backbones import ClipBackbone

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parent / "fixtures"


def fixture_root() -> Path:
    """The reference fixture folder."""
    return Path(os.environ.get("VLMAD_REFERENCE_FIXTURES", SHIPPED)).expanduser()


def _fixtures_in(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.pt"), *folder.glob("*.pt.xz")])  # .xz: a copy kept under the repo's size limit


def fixture_files(method: str) -> list[Path]:
    """Every fixture of a method folder (sorted); the shipped ones when the set folder has none; else fails loudly."""
    files = _fixtures_in(fixture_root() / method)
    if not files and fixture_root().resolve() != SHIPPED.resolve():
        files = _fixtures_in(SHIPPED / method)
        if files:
            where = f"{fixture_root() / method}: no fixtures there; using the shipped {SHIPPED / method}"
            warnings.warn(where, stacklevel=2)
    if not files:
        raise FileNotFoundError(f"no *.pt fixtures in {fixture_root() / method}")
    return files


def load_fixture(path: Path) -> dict:
    """A fixture dict of plain tensors, numbers and strings (``*.pt``, or an xz-compressed ``*.pt.xz``)."""
    if path.suffix == ".xz":
        return torch.load(io.BytesIO(lzma.decompress(path.read_bytes())), weights_only=True)
    return torch.load(path, weights_only=True)


def meta(fx: dict, key: str):
    """``fx['meta'][key]`` (AnomalyCLIP/APRIL-GAN) or ``fx['meta.' + key]`` (WinCLIP)."""
    return fx["meta"][key] if "meta" in fx else fx[f"meta.{key}"]


class OmittedKeys(frozenset):
    """The keys a fixture leaves out; ``key in`` also matches glob entries (``features/block*/tokens``)."""

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or any(fnmatch.fnmatchcase(str(key), str(p)) for p in self)


def omitted(fx: dict) -> OmittedKeys:
    """Keys a large fixture leaves out (their comparisons are skipped)."""
    try:
        return OmittedKeys(meta(fx, "omitted_keys"))
    except KeyError:
        return OmittedKeys()


def reference_or_ours(fx: dict, key: str, ours):
    """The reference's ``fx[key]`` as a stage's input, or (key omitted) vlmad's own upstream output.

    ``ours`` is the value or a zero-argument callable computing it (only called when needed).
    """
    if key in fx:
        return fx[key]
    if key not in omitted(fx):
        raise KeyError(f"{key}: neither in the fixture nor listed in its omitted_keys")
    return ours() if callable(ours) else ours


def _expand_compact(path: Path) -> dict[str, torch.Tensor]:
    sd = safetensors.torch.load_file(path)
    rows = sd.pop("token_embedding.compact_rows")
    values = sd.pop("token_embedding.compact_values")
    shape = sd.pop("token_embedding.compact_shape").tolist()
    sd.pop("token_embedding.compact_dtype_fp16")
    table = torch.zeros(shape, dtype=torch.float32)
    table[rows] = values.float()
    sd["token_embedding.weight"] = table
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def clip_checkpoint(fx: dict, tmp_dir: Path) -> tuple[Path, Path]:
    """(model config JSON, full checkpoint path) of the fixture's CLIP.

    Uses the named weights file when it exists, else the compact copy expanded into ``tmp_dir``.
    """
    root = fixture_root()
    if not (root / meta(fx, "clip_config")).is_file():  # a set folder without the CLIP files: the shipped ones
        root = SHIPPED
    config = root / meta(fx, "clip_config")
    weights = root / meta(fx, "clip_weights")
    if weights.is_file():
        return config, weights
    compact = weights.with_name(weights.name.split(".")[0] + ".compact.safetensors")
    if not compact.is_file():
        raise FileNotFoundError(f"fixture weights missing: {weights} (nor {compact})")
    out = tmp_dir / (weights.stem + ".expanded.pt")
    if not out.exists():
        torch.save(_expand_compact(compact), out)
    return config, out


def fixture_backbone(fx: dict, tmp_dir: Path, **kwargs) -> ClipBackbone:
    """A ClipBackbone on the fixture's CLIP, loaded through vlmad's local-checkpoint path."""
    config, weights = clip_checkpoint(fx, tmp_dir)
    return ClipBackbone(config.stem, pretrained=str(weights), model_config=str(config), **kwargs)


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Elementwise |ours - ref| <= atol + rtol*|ref|; returns the max abs deviation."""
    ours = torch.as_tensor(ours).detach().to(torch.float64).cpu()
    ref = torch.as_tensor(ref).to(torch.float64)
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    dev = (ours - ref).abs()
    bad = dev > atol + rtol * ref.abs()
    assert not bad.any(), f"{name}: max |Δ| {dev.max():.3g} exceeds atol {atol} + rtol {rtol}·|ref|"
    return float(dev.max())


def shipped_defaults(method: str) -> dict:
    """The ``method`` node of ``conf/method/<method>.yaml`` (what a user runs), without ``_target_``/``k_shot``.

    Parity tests build from these and override only the fixture's own settings (sizes, layers, temperature)
    and the documented reference switches, so a changed default cannot drift from the reference unnoticed.
    """
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(HERE.parents[1] / "conf" / "method" / f"{method}.yaml")["method"])
    node.pop("_target_")
    node.pop("k_shot", None)
    return node


def assert_rank_identical(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``ours`` equals a positive multiple of ``ref`` (a strictly monotone map: the same AUROC, AP and AUPRO).

    Returns:
        the scale c > 0 with ``c · ours ≈ ref`` (least squares), after ``assert_close(c · ours, ref)``.
    """
    ours64 = torch.as_tensor(ours).detach().to(torch.float64).cpu()
    ref64 = torch.as_tensor(ref).to(torch.float64)
    scale = float((ours64 * ref64).sum() / (ours64 * ours64).sum())
    assert scale > 0, f"{name}: the default map is anti-correlated with the reference"
    assert_close(name, ours64 * scale, ref64)
    return scale
