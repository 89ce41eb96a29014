"""Small tensor operations shared by the methods: fp32 guards, Gaussian smoothing and the segmentation losses."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

_AUTOCAST_DEVICES = ("cpu", "cuda")
_F = TypeVar("_F", bound=Callable[..., Any])


def autocast_active() -> bool:
    """True inside a ``torch.autocast`` region (e.g. Lightning's ``bf16-mixed`` / ``16-mixed``) on CPU or CUDA."""
    return any(torch.is_autocast_enabled(d) for d in _AUTOCAST_DEVICES)


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Leave any surrounding autocast region: ops inside run in their inputs' dtype (a no-op outside autocast)."""
    if not autocast_active():  # outside autocast: no context at all, so traced/exported graphs are unchanged
        yield
        return
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def to_float32(value: Any) -> Any:
    """Floating tensors (also inside dicts, lists, tuples) as float32; anything else unchanged."""
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float64 else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_float32(v) for v in value)
    return value


def fp32(fn: _F) -> _F:
    """Decorator for numerically delicate steps: run ``fn`` with autocast off on float32 inputs.

    Under mixed precision the backbone runs in bf16/fp16, but cosines divided by a 0.01-0.07 temperature,
    softmaxes, harmonic means, min-distances and the Gaussian blur need float32 (a bf16 cosine is off by ~4e-3,
    i.e. 0.4 in a logit at temperature 0.01). Outside autocast the wrapped function runs unchanged.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not autocast_active():
            return fn(*args, **kwargs)
        with autocast_off():
            return fn(*to_float32(args), **to_float32(kwargs))

    return wrapper  # type: ignore[return-value]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device: torch.device | str | None = None) -> Tensor:
    """scipy.ndimage's 1-D Gaussian weights: radius = int(truncate*sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)  # built where it is used
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


@fp32
def gaussian_blur(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian smoothing with scipy.ndimage.gaussian_filter semantics (mode ``reflect``).

    Args:
        maps: (B, H, W) float maps.
        sigma: standard deviation in pixels; <= 0 returns the input unchanged.
        truncate: kernel radius in standard deviations (scipy's default 4.0).

    Returns:
        (B, H, W) smoothed maps, same dtype (float32 under autocast).
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate, maps.device).to(maps.dtype)
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


@fp32
def min_cosine_distance(queries: Tensor, memory: Tensor, chunk: int = 8192) -> Tensor:
    """min over memory of (1 - cos) for every query.

    The memory rows are taken ``chunk`` at a time (a step holds N × chunk cosines): their count is fixed by the
    memory, never by the number of queries, so a traced graph keeps a dynamic batch axis. A max over chunks of
    row maxima is the max of the row, so chunking does not change any value.

    Args:
        queries: (N, C).
        memory: (M, C), M >= 1.
        chunk: memory rows per step.

    Returns:
        (N,) distances in [0, 2].
    """
    if memory.shape[0] == 0:
        raise ValueError("min_cosine_distance: empty memory")
    q = F.normalize(queries, dim=-1)
    best = None
    for rows in F.normalize(memory, dim=-1).split(chunk):  # (c, C)
        sim = (q @ rows.T).amax(dim=1)  # (N,)
        best = sim if best is None else torch.maximum(best, sim)
    return 1 - best


__all__ = [
    "autocast_active",
    "autocast_off",
    "dice_loss",
    "focal_loss",
    "fp32",
    "gaussian_blur",
    "gaussian_kernel1d",
    "min_cosine_distance",
    "scaled_sigma",
    "to_float32",
]
