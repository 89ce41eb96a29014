"""Few-shot reference drawing rules and reference-image views (augmented copies made at the original resolution).

A method says how its references are drawn with a :class:`ReferenceDraw` (``AnomalyMethod.reference_draw``); the
datamodule applies it (``AnomalyDataModule.reference_images``): which k normal training images, then which views of
them (rotated copies for AnomalyDINO and SubspaceAD), each view preprocessed like a test image.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

RULES = ("random", "sorted_slice", "shuffle")
# views(images, generator): the k drawn references as (H, W, 3) uint8 RGB arrays at their original size -> every
# image the method wants, in the method's order (it knows the layout it asked for)
Views = Callable[[list[np.ndarray], torch.Generator], list[np.ndarray]]


@dataclass(frozen=True)
class ReferenceDraw:
    """How one category's k few-shot references are chosen and expanded.

    Attributes:
        rule: ``random`` (vlmad: a permutation seeded by crc32(category) + seed), ``sorted_slice``
            (AnomalyDINO: ``sorted(train/good)[seed·k:(seed+1)·k]``) or ``shuffle`` (SubspaceAD: Python
            ``random.seed(seed)`` once per run, then ``random.shuffle`` of each category's sorted list in sorted
            category order, first k).
        views: optional expansion of the drawn originals into the images the method encodes (e.g. 8 rotations
            per reference); None = the references themselves.
        tag: short description written to the reference list (which views were made).
    """

    rule: str = "random"
    views: Views | None = None
    tag: str = ""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown reference rule {self.rule!r} (expected one of {RULES})")


def sorted_slice(n: int, k: int, seed: int) -> list[int]:
    """Positions ``seed·k .. (seed+1)·k - 1`` of the sorted list (AnomalyDINO's deterministic few-shot pick)."""
    return list(range(seed * k, min((seed + 1) * k, n)))


def shuffle_pick(sizes: dict[str, int], category: str, k: int, seed: int) -> list[int]:
    """SubspaceAD's pick: one Python ``random`` stream seeded once, one ``shuffle`` per category in sorted order.

    The reference seeds ``random`` at the start of the run and shuffles each category's sorted train list (only
    when k does not exceed it), so a category's pick depends on the categories before it; the earlier shuffles
    are replayed here (a shuffle's draws depend only on the list length).

    Args:
        sizes: category -> number of normal training images, for every category of the run.
        category: the category drawn now.
        k: references per category.
        seed: the run seed (reference default 42).

    Returns:
        k positions into the category's sorted normal training list.
    """
    rng = random.Random(seed)
    for name in sorted(sizes):
        n = sizes[name]
        if n == 0:  # the reference skips a category without training images before sampling
            continue
        order = list(range(n))
        if k <= n:
            rng.shuffle(order)
        if name == category:
            return order[:k]
    raise KeyError(f"category {category!r} not in {sorted(sizes)}")


def rotate_reflect(image: np.ndarray, angle: float) -> np.ndarray:
    """AnomalyDINO's ``rotate_image``: cv2 ``warpAffine`` about (W/2, H/2), bilinear, BORDER_REFLECT_101, same size.

    cv2 directly, not albumentations: ``A.Rotate``/``A.Affine`` rotate about (W/2 - 0.5, H/2 - 0.5), a half-pixel
    shift that changes every rotated pixel.
    """
    import cv2

    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), float(angle), 1.0)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def rotate_nearest(image: np.ndarray, angle: float) -> np.ndarray:
    """SubspaceAD's ``RandomRotation`` step: torchvision ``rotate`` of the PIL image, nearest, centre, black fill.

    torchvision's functional ``rotate`` on the PIL image (PIL's affine sampling), not albumentations (cv2 sampling
    about another centre): bit-identical to the reference.
    """
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    out = TF.rotate(Image.fromarray(image), float(angle), InterpolationMode.NEAREST, expand=False, center=None, fill=0)
    return np.asarray(out)


def random_angles(n: int, low: float, high: float, generator: torch.Generator) -> list[float]:
    """``n`` angles as torchvision's ``RandomRotation.get_params`` draws them (uniform on [low, high))."""
    return [float(torch.empty(1).uniform_(low, high, generator=generator).item()) for _ in range(n)]


def fixed_rotations(angles: Sequence[float]) -> Views:
    """Views: every reference rotated by each angle in turn (AnomalyDINO: 0, 45, ..., 315; 0 included)."""

    def views(images: list[np.ndarray], generator: torch.Generator) -> list[np.ndarray]:
        return [rotate_reflect(image, a) for image in images for a in angles]

    return views


def random_rotation_passes(count: int, passes: int, degrees: tuple[float, float] = (0.0, 345.0)) -> Views:
    """Views: per pass, each reference followed by ``count`` random rotations (SubspaceAD's feature generator).

    The reference iterates its generator once per PCA pass and re-draws the rotations each time; the result is
    ``passes`` blocks of k·(1 + count) images, pass-major, angles drawn in that order from ``generator``.
    """

    def views(images: list[np.ndarray], generator: torch.Generator) -> list[np.ndarray]:
        out = []
        for _ in range(passes):
            for image in images:
                out.append(image)
                out += [rotate_nearest(image, a) for a in random_angles(count, *degrees, generator)]
        return out

    return views
