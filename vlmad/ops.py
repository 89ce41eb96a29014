"""Small tensor operations shared by the methods: Gaussian smoothing and the segmentation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """scipy.ndimage's 1-D Gaussian weights: radius = int(truncate*sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _symmetric_pad_1d(x: Tensor, radius: int, dim: int) -> Tensor:
    # scipy's mode="reflect" repeats the edge sample (numpy "symmetric"); torch's "reflect" is scipy's
    # "mirror", so pad explicitly. Maps smaller than the radius are reflected repeatedly.
    n = x.shape[dim]
    idx = torch.arange(-radius, n + radius, device=x.device)
    period = 2 * n
    idx = idx % period
    idx = torch.where(idx >= n, period - 1 - idx, idx)
    return x.index_select(dim, idx)


def gaussian_blur(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian smoothing with scipy.ndimage.gaussian_filter semantics (mode ``reflect``).

    Args:
        maps: (B, H, W) float maps.
        sigma: standard deviation in pixels; <= 0 returns the input unchanged.
        truncate: kernel radius in standard deviations (scipy's default 4.0).

    Returns:
        (B, H, W) smoothed maps, same dtype.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate).to(maps.device, maps.dtype)
    radius = (kernel.numel() - 1) // 2
    x = maps[:, None]  # (B, 1, H, W)
    x = F.conv2d(_symmetric_pad_1d(x, radius, 3), kernel.view(1, 1, 1, -1))  # along W
    x = F.conv2d(_symmetric_pad_1d(x, radius, 2), kernel.view(1, 1, -1, 1))  # along H
    return x[:, 0]


def scaled_sigma(sigma: float, image_size: int, reference_size: int = 518) -> float:
    """A smoothing sigma given at ``reference_size`` px, scaled to another map size."""
    return sigma * image_size / reference_size if sigma > 0 else 0.0


def focal_loss(probs: Tensor, target: Tensor, gamma: float = 2.0, eps: float = 1e-5) -> Tensor:
    """Focal loss on probabilities, as AnomalyCLIP's and APRIL-GAN's ``FocalLoss`` (alpha=None).

    Args:
        probs: (B, C, H, W) class probabilities (softmax already applied).
        target: (B, H, W) integer class map (0 normal, 1 anomalous).

    Returns:
        scalar mean over all pixels of -(1 - p_t)^gamma log p_t, one-hot clamped to [eps, 1 - eps].
    """
    num_classes = probs.shape[1]
    onehot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(probs.dtype)  # (B, C, H, W)
    onehot = onehot.clamp(eps, 1.0 - eps)
    pt = (onehot * probs).sum(dim=1) + eps  # (B, H, W)
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(pred: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Binary Dice loss per image, averaged: 1 - mean_b (2 sum(p g) + s) / (sum p + sum g + s).

    Args:
        pred: (B, H, W) probabilities of one class.
        target: (B, H, W) {0, 1}.
    """
    pred = pred.flatten(1)
    target = target.flatten(1).to(pred.dtype)
    dice = (2 * (pred * target).sum(1) + smooth) / (pred.sum(1) + target.sum(1) + smooth)
    return 1 - dice.mean()


def min_cosine_distance(queries: Tensor, memory: Tensor, chunk: int = 8192) -> Tensor:
    """min over memory of (1 - cos) for every query.

    Args:
        queries: (N, C).
        memory: (M, C).

    Returns:
        (N,) distances in [0, 2].
    """
    q = F.normalize(queries, dim=-1)
    m = F.normalize(memory, dim=-1)
    out = [1 - (q[i : i + chunk] @ m.T).max(dim=1).values for i in range(0, q.shape[0], chunk)]
    return torch.cat(out) if out else q.new_zeros(0)


__all__ = [
    "dice_loss",
    "focal_loss",
    "gaussian_blur",
    "gaussian_kernel1d",
    "min_cosine_distance",
    "scaled_sigma",
]
