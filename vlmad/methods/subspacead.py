"""SubspaceAD (Lendering et al., CVPR 2026): training-free few-shot PCA residuals of frozen DINOv2 features.

Numerics follow CLendering/SubspaceAD @ 2ca687e (``main.py``, ``core/pca.py``, ``core/extractor.py``,
``post_process/scoring.py``): the mean over several tapped blocks of the raw patch tokens (no final LayerNorm,
CLS and registers dropped); k references, each followed by ``aug_count`` random rotations of the original image;
a float64 PCA whose mean comes from one pass over the augmented set and whose covariance from a second pass with
*new* rotations (the reference's generator re-draws them), centred with the first mean; components up to 99 %
explained variance; per test patch the squared reconstruction residual (float32, as the reference casts); the
grid map bilinearly resized to S x S, a 3x3 Gaussian (σ = 4) and the mean of the 1 % largest pixels as image score.
Nothing is learned, no text.

Residuals are unbounded, so vlmad emits ``s / (s + c)`` with the class's discarded reference variance c (the
expected residual of a reference patch): a strictly increasing map of the reference's maps and scores (the same
AUROC, AP, F1-max and AUPRO), in [0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmad.backbones.dino import DinoBackbone
from vlmad.data.references import ReferenceDraw, random_rotation_passes
from vlmad.methods.base import AnomalyMethod, Prediction
from vlmad.methods.ops import fp32

AGGREGATIONS = ("mean", "concat")
LAYERS = (-12, -13, -14, -15, -16, -17, -18)  # Hugging Face hidden_states indices = blocks depth-12 .. depth-18


@fp32
def gaussian_blur_cv2(maps: Tensor, ksize: int = 3, sigma: float = 4.0) -> Tensor:
    """cv2 ``GaussianBlur(ksize, sigma)`` with its default border (reflect-101): weights ∝ exp(-i²/(2σ²)).

    Args:
        maps: (B, H, W).

    Returns:
        (B, H, W) same dtype.
    """
    radius = ksize // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=maps.device)
    w = torch.exp(-(x**2) / (2 * sigma**2))
    w = (w / w.sum()).to(maps.dtype)
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")  # torch reflect = reflect-101
    out = F.conv2d(out, w.view(1, 1, 1, -1))
    return F.conv2d(out, w.view(1, 1, -1, 1))[:, 0]


def top_mean(values: Tensor, fraction: float = 0.01) -> Tensor:
    """``topk_mean``: mean of the max(1, int(fraction·n)) largest entries per row (summed in float64).

    Args:
        values: (B, n).

    Returns:
        (B,) in the input dtype.
    """
    n = max(1, int(values.shape[1] * fraction))
    return values.topk(n, dim=1).values.double().mean(1).to(values.dtype)


def fit_pca(mean_tokens: Tensor, cov_tokens: Tensor, explained: float | None = 0.99, dim: int | None = None) -> dict:
    """The reference's two-pass float64 PCA (``PCAModel.fit``), from already collected token sums.

    Args:
        mean_tokens: (T, C) tokens of pass 1 (the mean).
        cov_tokens: (T, C) tokens of pass 2 (the covariance, centred with the pass-1 mean).
        explained: cumulative explained-variance ratio to keep (used when ``dim`` is None).
        dim: number of components (overrides ``explained``).

    Returns:
        ``mean`` (C,), ``cov`` (C, C), ``eigvals_all`` (C,) descending, ``components`` (C, r), ``eigvals`` (r,),
        all float64.
    """
    acc = PcaAccumulator(mean_tokens.shape[1], mean_tokens.device)
    acc.add_mean(mean_tokens)
    acc.finish_mean(mean_tokens.shape[0])
    acc.add_cov(cov_tokens)
    return acc.solve(cov_tokens.shape[0], explained, dim)


class PcaAccumulator:
    """Streaming sums of the two passes in float64 (the reference's ``_compute_mean`` / ``_compute_covariance``)."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.mean: Tensor | None = None

    def add_mean(self, tokens: Tensor) -> None:
        """Pass 1: add (N, C) tokens to the sum."""
        self.sum += tokens.double().sum(0)

    def finish_mean(self, total: int) -> None:
        """Pass 1 done: μ = sum / T (T = tokens of one pass, as the reference divides)."""
        self.mean = self.sum / total

    def add_cov(self, tokens: Tensor) -> None:
        """Pass 2: add (x - μ)ᵀ(x - μ) of (N, C) tokens."""
        centred = tokens.double() - self.mean
        self.scatter += centred.T @ centred

    def solve(self, total: int, explained: float | None, dim: int | None) -> dict:
        """Covariance / (T - 1), eigh, descending order, r = first cumulative ratio >= ``explained`` (+1)."""
        cov = self.scatter / (total - 1)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order], evecs[:, order]
        if dim is None:
            ratio = torch.cumsum(evals, 0) / evals.sum()
            target = torch.tensor([explained], dtype=ratio.dtype, device=ratio.device)
            dim = int(torch.searchsorted(ratio, target).item()) + 1
        r = min(int(dim), evals.shape[0])
        return {"mean": self.mean, "cov": cov, "eigvals_all": evals, "components": evecs[:, :r], "eigvals": evals[:r]}


@fp32
def reconstruction_residual(features: Tensor, mean: Tensor, basis: Tensor) -> Tensor:
    """Squared PCA reconstruction residual per patch, in the reference's order of operations.

    ``x - ((x - μ) B Bᵀ + μ)`` summed squared, with μ and B cast to the features' dtype (float32).

    Args:
        features: (B, L, C).
        mean: (C,).
        basis: (C, r).

    Returns:
        (B, L).
    """
    mean, basis = mean.to(features.dtype), basis.to(features.dtype)
    recon = ((features - mean) @ basis) @ basis.T + mean
    return ((features - recon) ** 2).sum(-1)


class SubspaceAD(AnomalyMethod):
    """SubspaceAD: PCA subspace of augmented few-shot DINOv2 features, squared residuals; training-free, no text.

    Args:
        backbone: frozen DINOv2 (paper: ViT-g/14 with 4 registers at 672 px, transformers' position resize).
        k_shot: references per class (1, 2, 4; >= 1).
        feature_layers: tapped blocks, 0-based or negative from the end (reference ``--layers -12..-18``).
        aggregation: ``mean`` over the taps (reference default) or ``concat``.
        aug_count: random rotations per reference (reference 30; 0 = none).
        rotation_degrees: (low, high) of the uniform rotation angle (torchvision ``RandomRotation((0, 345))``).
        no_aug_classes: classes whose references are not augmented (reference ``--no_aug_categories``: transistor).
        pca_ev: explained-variance ratio kept.
        pca_dim: a fixed number of components instead (overrides ``pca_ev``).
        top_fraction: share of the largest pixels averaged into the image score (``mtop1p``).
        blur_kernel: cv2 Gaussian kernel size on the upsampled map.
        blur_sigma: its σ.
        reference_batch: reference images encoded per backbone call.
    """

    tensor_state = ("subspaces",)  # PCA bases follow .to() / .cuda() (AnomalyMethod._apply)
    backbone_families = ("dinov2",)
    cacheable = True  # encode_images depends on the frozen backbone and fixed settings only

    def __init__(
        self,
        backbone: DinoBackbone,
        k_shot: int = 1,
        feature_layers: Sequence[int] = LAYERS,
        aggregation: str = "mean",
        aug_count: int = 30,
        rotation_degrees: Sequence[float] = (0.0, 345.0),
        no_aug_classes: Sequence[str] = ("transistor",),
        pca_ev: float = 0.99,
        pca_dim: int | None = None,
        top_fraction: float = 0.01,
        blur_kernel: int = 3,
        blur_sigma: float = 4.0,
        reference_batch: int = 8,
    ) -> None:
        super().__init__(backbone, k_shot)
        if self.k_shot < 1:
            raise ValueError(f"SubspaceAD: k_shot must be >= 1 (a few-shot method), got {k_shot}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"SubspaceAD: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if aug_count < 0 or not 0 < pca_ev <= 1 or not 0 < top_fraction <= 1 or blur_kernel % 2 == 0:
            raise ValueError(
                "SubspaceAD: need aug_count >= 0, 0 < pca_ev <= 1, 0 < top_fraction <= 1 and an odd blur_kernel "
                f"(got {aug_count}, {pca_ev}, {top_fraction}, {blur_kernel})"
            )
        self.feature_layers = [int(i) for i in feature_layers]
        self.blocks = backbone.resolve_layers(self.feature_layers)  # 0-based, in the configured order
        if not self.blocks:
            raise ValueError("SubspaceAD: feature_layers is empty")
        self.aggregation = aggregation
        self.aug_count = int(aug_count)
        self.rotation_degrees = (float(rotation_degrees[0]), float(rotation_degrees[1]))
        self.no_aug_classes = frozenset(str(c) for c in no_aug_classes)
        self.pca_ev, self.pca_dim = float(pca_ev), None if pca_dim is None else int(pca_dim)
        self.top_fraction = float(top_fraction)
        self.blur_kernel, self.blur_sigma = int(blur_kernel), float(blur_sigma)
        self.reference_batch = int(reference_batch)
        self.subspaces: dict[str, dict[str, Tensor]] = {}  # class name -> mean, basis, scale

    # ---------------------------------------------------------------- references
    def augments(self, class_name: str) -> bool:
        """Whether this class's references get the random rotations."""
        excluded = class_name in self.no_aug_classes or class_name.replace(" ", "_") in self.no_aug_classes
        return self.aug_count > 0 and not excluded

    def reference_draw(self, class_name: str) -> ReferenceDraw:
        """The reference's seeded shuffle; per PCA pass, each reference and ``aug_count`` fresh rotations."""
        if not self.augments(class_name):
            return ReferenceDraw("shuffle")
        low, high = self.rotation_degrees
        views = random_rotation_passes(self.aug_count, passes=2, degrees=self.rotation_degrees)
        return ReferenceDraw("shuffle", views, f"2 passes x (1 + {self.aug_count} rotations in [{low:g}, {high:g}))")

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """Aggregated raw patch tokens of the tapped blocks (the backbone stops after the deepest tap).

        Args:
            images: (B, 3, S, S) ImageNet-normalised.

        Returns:
            ``fused``: (B, P, C) mean over the taps (``concat``: (B, P, C·T) in the configured tap order).
        """
        out = self.backbone.encode_image(images, self.blocks, final=False)
        taps = [out.intermediates[b] for b in self.blocks]
        if self.aggregation == "concat":
            return {"fused": torch.cat(taps, dim=-1)}
        return {"fused": torch.stack(taps).float().mean(0)}

    def _encoded(self, images: Tensor) -> Iterator[Tensor]:
        """(n·P, C) float32 tokens per chunk of ``reference_batch`` images, one chunk in memory at a time."""
        for chunk in images.split(self.reference_batch):
            yield self.encode_images(chunk)["fused"].float().flatten(0, 1)

    def prepare(self, class_name: str, reference_images: Tensor | None = None) -> None:
        """Fit the class's PCA subspace on its (augmented) reference views.

        Args:
            class_name: class (prompt) name; picks augmentation.
            reference_images: from ``datamodule.reference_images(..., draw=reference_draw())``: two passes of
                k·(1 + aug_count) views (pass-major), or the k references themselves for a class without
                augmentation (both passes then see the same images, as in the reference).
        """
        per_pass = self.k_shot * (1 + self.aug_count) if self.augments(class_name) else self.k_shot
        expected = 2 * per_pass if self.augments(class_name) else per_pass
        self.require_views(class_name, reference_images, expected, f"k_shot={self.k_shot}, aug_count={self.aug_count}")
        first = list(self._encoded(reference_images[:per_pass])) if expected == per_pass else None
        acc, total = None, 0
        for tokens in first or self._encoded(reference_images[:per_pass]):  # pass 1: the mean
            acc = acc or PcaAccumulator(tokens.shape[1], tokens.device)
            acc.add_mean(tokens)
            total += tokens.shape[0]
        acc.finish_mean(total)
        for tokens in first or self._encoded(reference_images[per_pass:]):  # pass 2: new rotations (or the same)
            acc.add_cov(tokens)
        self.set_subspace(class_name, acc.solve(total, self.pca_ev, self.pca_dim))

    def set_subspace(self, class_name: str, pca: dict) -> None:
        """Store a fitted PCA (:func:`fit_pca` output) as the class's scoring constants."""
        evals = pca["eigvals_all"]
        r = pca["components"].shape[1]
        # expected residual of a reference patch: the variance outside the kept subspace (floored for r = C)
        scale = evals[r:].clamp_min(0).sum().clamp_min(1e-12 * evals.abs().sum().clamp_min(1e-30))
        self.subspaces[class_name] = {
            "mean": pca["mean"].float(),
            "basis": pca["components"].float(),
            "scale": scale.float(),
        }

    def class_constants(self, class_name: str) -> dict[str, Tensor]:
        """``mean`` (C,), ``basis`` (C, r) float32 (the reference casts both), ``scale`` () for the [0, 1) map."""
        if class_name not in self.subspaces:
            raise RuntimeError(f"SubspaceAD: no subspace for {class_name!r}; call prepare() with its references")
        return dict(self.subspaces[class_name])

    # ---------------------------------------------------------------- scoring
    def raw_maps(self, residual: Tensor, size: tuple[int, int]) -> Tensor:
        """``post_process_map``: cv2 bilinear to ``size``, then the 3x3 Gaussian.

        Args:
            residual: (B, g, g) squared residuals.

        Returns:
            (B, H, W) in residual units.
        """
        up = F.interpolate(residual[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur_cv2(up, self.blur_kernel, self.blur_sigma)

    def raw_score(
        self, images: Tensor, constants: dict[str, Tensor], features: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """The reference's numbers: (B,) image scores and (B, S, S) maps in residual units."""
        fused = (features or self.image_features(images))["fused"].float()  # (B, L, C)
        g = math.isqrt(fused.shape[1])
        residual = reconstruction_residual(fused, constants["mean"], constants["basis"]).view(-1, g, g)
        maps = self.raw_maps(residual, tuple(images.shape[-2:]))
        return top_mean(maps.flatten(1), self.top_fraction), maps

    def score(
        self, images: Tensor, constants: dict[str, Tensor], features: dict[str, Tensor] | None = None
    ) -> Prediction:
        """Score (B, 3, S, S) images of one class: s / (s + c) of the reference's scores and maps, in [0, 1).

        ``features``: their :meth:`encode_images` output when already computed.
        """
        score, maps = self.raw_score(images, constants, features)
        c = constants["scale"]
        return Prediction(pred_score=score / (score + c), anomaly_map=maps / (maps + c))

    def feature_signature(self) -> dict:
        """Settings that determine :meth:`encode_images` (taps and their aggregation)."""
        return {
            "method": type(self).__name__,
            "backbone": self.backbone.model_name,
            "blocks": list(self.blocks),
            "aggregation": self.aggregation,
        }

    def hparams_for_checkpoint(self) -> dict:
        """Nothing is learned; the backbone and the scoring settings identify a run."""
        return {"method": type(self).__name__, "backbone": self.backbone.model_name, "k_shot": self.k_shot}
