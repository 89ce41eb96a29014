"""AnomalyDINO (Damm et al., WACV 2025): training-free few-shot patch kNN on frozen DINOv2 features.

Numerics follow dammsi/AnomalyDINO @ b3435f0 (``src/detection.py``, ``src/backbones.py``, ``src/utils.py``): final
normed DINOv2 patch tokens; a memory bank of the L2-normalised patches of k references (optionally each rotated by
0, 45, ..., 315° at its original resolution); per test patch the cosine distance to its nearest bank patch; a
zero-shot foreground mask from the first principal component of the test image's own patches for the classes that
use it (background patches score 0); image score = mean of the 1 % largest patch distances; pixel map = bilinear
upsampling + Gaussian σ = 4. Nothing is learned, no text.

vlmad emits distances / 2 (cosine distances lie in [0, 2]), so scores and maps are in [0, 1] with the reference's
ranking. Maps are at the input resolution S (the reference evaluates at each image's original size; σ is in
output pixels either way), and inputs are squashed to S x S (the reference keeps the aspect ratio: the same for
square images such as MVTec-AD's; VisA's are squashed here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmad.backbones.dino import DinoBackbone
from vlmad.data.references import ReferenceDraw, fixed_rotations
from vlmad.methods.base import AnomalyMethod, Prediction
from vlmad.methods.ops import fp32, gaussian_blur

ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SQUARINGS, _REFINE = 10, 2  # first principal direction: A -> A^(2^10), then 2 power steps (see first_component)


def class_set(setting: Any, dataset: str | None, what: str) -> bool | frozenset[str]:
    """A per-class switch from config: ``all`` / ``none`` / a list of class names, or a table of those per dataset.

    Args:
        setting: ``all`` | ``none`` | [names] | {dataset key: one of those, default: one of those}.
        dataset: reader name or target (``vlmad.data.MVTec`` -> ``mvtec``) picking the table entry.
        what: setting name for the error message.

    Returns:
        True (all classes), False (none) or the set of class names.
    """
    if isinstance(setting, Mapping):
        key = (dataset or "default").rsplit(".", 1)[-1].lower()
        if key not in setting and "default" not in setting:
            raise ValueError(f"AnomalyDINO: {what} has no entry for {key!r} and no 'default'")
        setting = setting.get(key, setting.get("default"))
    if isinstance(setting, bool):
        return setting
    if setting is None or setting == "none":
        return False
    if setting == "all":
        return True
    if isinstance(setting, str) or not isinstance(setting, Sequence):
        raise ValueError(f"AnomalyDINO: {what} must be 'all', 'none', a list of class names or a table, got {setting}")
    return frozenset(str(s) for s in setting)


def _member(selection: bool | frozenset[str], class_name: str) -> bool:
    if isinstance(selection, bool):
        return selection
    return class_name in selection or class_name.replace(" ", "_") in selection


@fp32
def first_component(features: Tensor) -> tuple[Tensor, Tensor]:
    """First principal component of each image's own patches (sklearn PCA(1) with sklearn >= 1.5's sign rule).

    The direction is the top eigenvector of the centred scatter matrix, by repeated squaring (A <- A² / tr A²,
    10 times, so the top eigenvalue dominates by (λ1/λ2)^1024) plus two power steps: matmuls only, so the same
    code runs batched and traces for export. Sign: the entry of largest magnitude is positive.

    Args:
        features: (B, L, C) patch features.

    Returns:
        scores (B, L) = (F - mean) · v; direction v (B, C).
    """
    centred = features - features.mean(1, keepdim=True)
    scatter = centred.transpose(1, 2) @ centred  # (B, C, C)

    def normalised(a: Tensor) -> Tensor:
        return a / a.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)[:, None, None]

    power = normalised(scatter)
    for _ in range(_SQUARINGS):
        power = normalised(power @ power)  # -> v vᵀ
    column = power.diagonal(dim1=-2, dim2=-1).argmax(-1)  # the column of v vᵀ with the largest |v_j|
    v = torch.gather(power, 2, column[:, None, None].expand(-1, power.shape[1], 1))[..., 0]
    for _ in range(_REFINE):
        v = F.normalize((scatter @ v[..., None])[..., 0], dim=-1)
    largest = v.abs().argmax(-1, keepdim=True)
    v = v * torch.sign(torch.gather(v, 1, largest))
    return (centred @ v[..., None])[..., 0], v


def foreground_mask(
    scores: Tensor,
    grid: tuple[int, int],
    threshold: float = 10.0,
    border: float = 0.2,
    keep_fraction: float = 0.35,
    kernel: int = 3,
) -> Tensor:
    """AnomalyDINO's zero-shot mask from first-component scores (``compute_background_mask``).

    fg = score > threshold; if at most ``keep_fraction`` of the central window (``border`` cut from each side) is
    fg, fg = -score > threshold instead. Then a ``kernel`` dilation and a closing, both on the (L, 1) column the
    reference keeps (1-D over the row-major patch index, wrapping across grid rows; out-of-range neighbours ignored).

    Args:
        scores: (B, L) first-component scores.
        grid: (gh, gw) with gh·gw = L.

    Returns:
        (B, L) bool.
    """
    gh, gw = grid
    fg = scores > threshold
    centre = fg.view(-1, gh, gw)[
        :, int(gh * border) : int(gh * (1 - border)), int(gw * border) : int(gw * (1 - border))
    ]
    size = centre.shape[1] * centre.shape[2]
    flip = centre.flatten(1).sum(1) <= size * keep_fraction  # (B,)
    fg = torch.where(flip[:, None], (-scores > threshold).float(), fg.float())[:, None]  # (B, 1, L); float: ONNX
    # Runtime has no bool Where
    pad = kernel // 2
    dilated = F.max_pool1d(fg, kernel, stride=1, padding=pad)  # max_pool pads with -inf: the border is ignored
    dilated = F.max_pool1d(dilated, kernel, stride=1, padding=pad)  # closing = dilate ...
    closed = -F.max_pool1d(-dilated, kernel, stride=1, padding=pad)  # ... then erode
    return closed[:, 0] > 0.5


@fp32
def nearest_distances(
    queries: Tensor, bank: Tensor, knn: int = 1, chunk: int = 8192, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Cosine distance of every query to its nearest bank rows (faiss ``IndexFlatL2`` on unit vectors, halved).

    Args:
        queries: (N, C) features (normalised here).
        bank: (M, C) unit rows.
        knn: neighbours averaged (the reference averages the k squared L2 distances, then halves: mean(1 - cos)).
        chunk: bank rows per matmul (bounds memory; the count depends on M only, never on N).
        dtype: similarity matmul dtype (float32 = the reference; bf16/fp16 are faster, ~1e-3 off in cosine).

    Returns:
        distances (N,) in [0, 2] float32; index (N,) of the nearest bank row.
    """
    q = F.normalize(queries, dim=-1).to(dtype)
    best, index = None, None
    for start in range(0, bank.shape[0], chunk):
        sims, idx = (q @ bank[start : start + chunk].to(dtype).T).float().topk(knn, dim=1)  # (N, knn)
        idx = idx + start
        if best is None:
            best, index = sims, idx
        else:
            best, order = torch.cat([best, sims], 1).topk(knn, dim=1)
            index = torch.gather(torch.cat([index, idx], 1), 1, order)
    return (1 - best).mean(1), index[:, 0]


def top_mean(values: Tensor, fraction: float = 0.01) -> Tensor:
    """Mean of the ``int(fraction·n)`` largest entries per row (``mean_top1p``; the max when that is 0).

    Args:
        values: (B, n).

    Returns:
        (B,) float32 (summed in float64).
    """
    n = int(values.shape[1] * fraction)
    if n == 0:
        return values.amax(1)
    return values.topk(n, dim=1).values.double().mean(1).to(values.dtype)


class AnomalyDINO(AnomalyMethod):
    """AnomalyDINO: kNN of DINOv2 patches against a bank of (rotated) few-shot references; training-free, no text.

    Args:
        backbone: frozen DINOv2 (paper: ViT-S/14 without registers, 448 px, hub position resize).
        k_shot: references per class (1, 2, 4; >= 1).
        rotation: classes whose references are rotated (``all`` = the reference's "agnostic" preprocessing,
            ``[hazelnut, screw]`` its "informed" one, ``none``), or a table per dataset.
        rotation_angles: degrees, every reference contributes one image per angle (0 included).
        masking: classes scored with the zero-shot foreground mask, or a table per dataset (reference: MVTec-AD
            capsule, hazelnut, pill, screw, toothbrush; VisA all).
        dataset: name or reader target of the evaluated dataset (picks the table entries).
        mask_references: also mask the references' patches (reference ``mask_ref_images``, off).
        mask_threshold: |first-component score| above which a patch is foreground.
        mask_border: fraction cut from each side for the centre check.
        mask_keep_fraction: centre foreground share at or below which the sign is flipped.
        mask_kernel: dilation / closing width.
        knn: neighbours averaged per patch.
        top_fraction: share of the largest patch distances averaged into the image score.
        smoothing_sigma: Gaussian σ in map pixels (scipy semantics, truncate 4).
        reference_batch: reference views encoded per backbone call.
        distance_chunk: bank rows per similarity matmul.
        distance_dtype: ``fp32`` (the reference), ``bf16`` or ``fp16`` for the similarity matmuls (k = 4 with
            rotations: 32 banks of patches per test image, ~40 % of ViT-S's FLOPs at 448 px in fp32).
    """

    tensor_state = ("memory",)  # banks follow .to() / .cuda() (AnomalyMethod._apply)
    backbone_families = ("dinov2",)
    cacheable = True  # encode_images depends on the frozen backbone and fixed settings only

    def __init__(
        self,
        backbone: DinoBackbone,
        k_shot: int = 1,
        rotation: Any = "all",
        rotation_angles: Sequence[float] = ANGLES,
        masking: Any = None,
        dataset: str | None = None,
        mask_references: bool = False,
        mask_threshold: float = 10.0,
        mask_border: float = 0.2,
        mask_keep_fraction: float = 0.35,
        mask_kernel: int = 3,
        knn: int = 1,
        top_fraction: float = 0.01,
        smoothing_sigma: float = 4.0,
        reference_batch: int = 16,
        distance_chunk: int = 8192,
        distance_dtype: str = "fp32",
    ) -> None:
        super().__init__(backbone, k_shot)
        if self.k_shot < 1:
            raise ValueError(f"AnomalyDINO: k_shot must be >= 1 (a few-shot method), got {k_shot}")
        if knn < 1 or mask_kernel < 1 or mask_kernel % 2 == 0 or not 0 < top_fraction <= 1 or smoothing_sigma < 0:
            raise ValueError(
                "AnomalyDINO: need knn >= 1, an odd mask_kernel >= 1, 0 < top_fraction <= 1, smoothing_sigma >= 0 "
                f"(got {knn}, {mask_kernel}, {top_fraction}, {smoothing_sigma})"
            )
        self.rotation = class_set(rotation, dataset, "rotation")
        self.rotation_angles = tuple(float(a) for a in rotation_angles)
        if not self.rotation_angles:
            raise ValueError("AnomalyDINO: rotation_angles is empty")
        self.masking = class_set(masking, dataset, "masking")
        self.mask_references = bool(mask_references)
        self.mask_settings = {
            "threshold": float(mask_threshold),
            "border": float(mask_border),
            "keep_fraction": float(mask_keep_fraction),
            "kernel": int(mask_kernel),
        }
        self.knn, self.top_fraction = int(knn), float(top_fraction)
        self.smoothing_sigma = float(smoothing_sigma)
        self.reference_batch, self.distance_chunk = int(reference_batch), int(distance_chunk)
        if distance_dtype not in DTYPES:
            raise ValueError(f"AnomalyDINO: distance_dtype must be one of {list(DTYPES)}, got {distance_dtype!r}")
        self.distance_dtype = distance_dtype
        self.memory: dict[str, Tensor] = {}  # class name -> (M, C) unit reference patches
        self._masked: dict[str, bool] = {}

    # ---------------------------------------------------------------- references
    def rotates(self, class_name: str) -> bool:
        """Whether this class's references are expanded by the rotations."""
        return _member(self.rotation, class_name)

    def masks(self, class_name: str) -> bool:
        """Whether this class's test patches are masked by the zero-shot foreground mask."""
        return _member(self.masking, class_name)

    def reference_draw(self, class_name: str) -> ReferenceDraw:
        """The reference's pick (``sorted(train/good)[seed·k:(seed+1)·k]``) and, if the class rotates, 8 views each."""
        if self.rotates(class_name):
            angles = ", ".join(f"{a:g}" for a in self.rotation_angles)
            return ReferenceDraw("sorted_slice", fixed_rotations(self.rotation_angles), f"rotated by {angles} deg")
        return ReferenceDraw("sorted_slice")

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """Final normed DINOv2 patch tokens.

        Args:
            images: (B, 3, S, S) ImageNet-normalised.

        Returns:
            ``patches``: (B, P, C).
        """
        return {"patches": self.backbone.encode_image(images).tokens}

    def prepare(self, class_name: str, reference_images: Tensor | None = None) -> None:
        """Build the class's memory bank from its reference views.

        Args:
            class_name: class (prompt) name; picks rotation and masking.
            reference_images: (k·V, 3, S, S) views from ``datamodule.reference_images(..., draw=reference_draw())``:
                V = len(rotation_angles) for a rotating class, else 1.
        """
        views = len(self.rotation_angles) if self.rotates(class_name) else 1
        self.require_views(class_name, reference_images, self.k_shot * views, f"k_shot={self.k_shot}, {views} views")
        feats = torch.cat(
            [self.encode_images(chunk)["patches"] for chunk in reference_images.split(self.reference_batch)]
        )
        feats = feats.float()
        if self.mask_references and self.masks(class_name):
            keep = foreground_mask(first_component(feats)[0], self._grid(feats), **self.mask_settings)
            bank = feats[keep]
        else:
            bank = feats.flatten(0, 1)
        self.memory[class_name] = F.normalize(bank, dim=-1)  # (M, C)
        self._masked[class_name] = self.masks(class_name)

    def _grid(self, feats: Tensor) -> tuple[int, int]:
        g = self.backbone.grid_size
        if g * g != feats.shape[1]:
            raise ValueError(f"AnomalyDINO: {feats.shape[1]} patches do not form the backbone's {g}x{g} grid")
        return g, g

    def class_constants(self, class_name: str) -> dict[str, Tensor]:
        """``bank`` (M, C) unit reference patches; ``masking`` (a 0-d flag) only for a masked class."""
        if class_name not in self.memory:
            raise RuntimeError(f"AnomalyDINO: no memory bank for {class_name!r}; call prepare() with its references")
        constants = {"bank": self.memory[class_name]}
        if self._masked[class_name]:
            constants["masking"] = torch.ones((), dtype=torch.bool, device=self.memory[class_name].device)
        return constants

    # ---------------------------------------------------------------- scoring
    def patch_distances(self, feats: Tensor, constants: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Cosine distances of each patch to the bank, 0 on background patches.

        Args:
            feats: (B, L, C) patch features.
            constants: :meth:`class_constants` of their class.

        Returns:
            distances (B, L) (0 on background); nearest bank index (B, L); foreground (B, L) bool.
        """
        b, length, c = feats.shape
        queries, dtype = feats.reshape(b * length, c), DTYPES[self.distance_dtype]
        dist, index = nearest_distances(queries, constants["bank"], self.knn, self.distance_chunk, dtype)
        dist, index = dist.view(b, length), index.view(b, length)
        if "masking" in constants:
            fg = foreground_mask(first_component(feats.float())[0], self._grid(feats), **self.mask_settings)
        else:
            fg = torch.ones_like(dist, dtype=torch.bool)
        return torch.where(fg, dist, torch.zeros_like(dist)), index, fg

    def pixel_maps(self, patch_dist: Tensor, size: tuple[int, int]) -> Tensor:
        """``dists2map``: bilinear (half-pixel centres, edge clamp) to ``size``, then Gaussian σ (reflect, truncate 4).

        Args:
            patch_dist: (B, gh, gw) distances.
            size: (H, W) output size.

        Returns:
            (B, H, W) maps in distance units.
        """
        up = F.interpolate(patch_dist[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(up, self.smoothing_sigma)

    def score(
        self, images: Tensor, constants: dict[str, Tensor], features: dict[str, Tensor] | None = None
    ) -> Prediction:
        """Score (B, 3, S, S) images of one class: (B,) scores and (B, S, S) maps, both distance / 2 in [0, 1].

        ``features``: their :meth:`encode_images` output when already computed.
        """
        feats = (features or self.image_features(images))["patches"].float()  # (B, L, C)
        dist, _, _ = self.patch_distances(feats, constants)
        g = self.backbone.grid_size
        image = top_mean(dist, self.top_fraction)
        maps = self.pixel_maps(dist.view(-1, g, g), tuple(images.shape[-2:]))
        return Prediction(pred_score=(image / 2).clamp(0, 1), anomaly_map=(maps / 2).clamp(0, 1))

    def feature_signature(self) -> dict:
        """Settings that determine :meth:`encode_images` (final tokens of this backbone)."""
        return {"method": type(self).__name__, "backbone": self.backbone.model_name, "tokens": "final_norm"}

    def hparams_for_checkpoint(self) -> dict:
        """Nothing is learned; the backbone and the scoring settings identify a run."""
        return {"method": type(self).__name__, "backbone": self.backbone.model_name, "k_shot": self.k_shot}
