"""The contract every method implements; the Lightning wrapper (vlmad.module) only talks to this."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from vlmad.backbones import ClipBackbone
from vlmad.prompts import TextFeatureCache


def _apply_nested(fn: Callable[[Tensor], Tensor], value: Any) -> Any:
    """``fn`` on every tensor inside dicts, lists and tuples."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _apply_nested(fn, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_apply_nested(fn, v) for v in value)
    return value


@dataclass
class Prediction:
    """Method output for a batch.

    Attributes:
        pred_score: (B,) image anomaly scores in [0, 1].
        anomaly_map: (B, H, W) pixel anomaly scores in [0, 1] at the input resolution.
    """

    pred_score: Tensor
    anomaly_map: Tensor


class AnomalyMethod(nn.Module):
    """Base class: an algorithm on a frozen CLIP, usable without Lightning.

    Subclasses set ``trainable`` when they have learned parameters (``loss`` then returns a dict with a
    ``loss`` entry) and ``k_shot`` > 0 when ``prepare`` needs reference images. Learned parameters are
    everything in ``state_dict()`` outside ``backbone.*``; checkpoints never hold the backbone.

    ``transductive`` methods score a category only once all its test images are seen: the caller feeds every
    batch to :meth:`accumulate` after ``prepare`` and calls :meth:`score_accumulated` at the category's end.
    """

    trainable: bool = False
    transductive: bool = False
    tensor_state: tuple[str, ...] = ()  # attributes holding plain tensors (dicts/lists of them) that follow .to()

    def __init__(self, backbone: ClipBackbone, k_shot: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.k_shot = int(k_shot)
        self.feature_cache = None  # a vlmad.cache.FeatureCache, see attach_cache
        self.text_cache = TextFeatureCache()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> AnomalyMethod:
        """nn.Module's ``.to()`` / ``.cuda()`` / ``.double()`` hook, extended to ``tensor_state`` (few-shot memories,
        accumulated features): they are not buffers (their keys vary by class), yet must follow the module."""
        super()._apply(fn, recurse)
        for name in self.tensor_state:
            setattr(self, name, _apply_nested(fn, getattr(self, name)))
        return self

    def attach_cache(self, cache: object | None) -> None:
        """Encode images through ``cache`` (a FeatureCache); a disk cache also keeps the text prototypes."""
        self.feature_cache = cache
        directory = getattr(cache, "directory", None)
        if directory is not None:
            self.text_cache.directory = directory / "text"

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """Frozen image-side features of (B, 3, S, S) images: a dict of (B, ...) tensors, no grad."""
        raise NotImplementedError

    def image_features(self, images: Tensor) -> dict[str, Tensor]:
        """:meth:`encode_images`, through the attached feature cache when there is one."""
        if self.feature_cache is None:
            return self.encode_images(images)
        return self.feature_cache.fetch(self, images)

    def prepare(self, class_name: str, reference_images: Tensor | None = None) -> None:
        """Per-category set-up before scoring (text features, few-shot memory).

        Args:
            class_name: object name used in prompts.
            reference_images: (K, 3, S, S) normal images of the category when ``k_shot`` > 0.
        """

    def forward(self, images: Tensor, class_names: list[str]) -> Prediction:
        """Score a batch of (B, 3, S, S) CLIP-normalised images of the given classes."""
        raise NotImplementedError

    def accumulate(self, images: Tensor, class_names: list[str] | None = None) -> None:
        """Store what the category-level score needs for (B, 3, S, S) images, in order (transductive methods)."""
        raise NotImplementedError(f"{type(self).__name__} is not transductive: call forward per batch")

    def score_accumulated(self) -> Prediction:
        """Score every image accumulated since ``prepare``: (N,) scores, (N, S, S) maps in order; then clear."""
        raise NotImplementedError(f"{type(self).__name__} is not transductive: call forward per batch")

    @classmethod
    def protocol_of(cls, settings: Mapping[str, Any]) -> str | None:
        """Protocol label every result of this method with ``settings`` (its config node) must carry.

        None for per-image methods; methods whose scores depend on the other test images return their label.
        """
        return None

    def loss(self, batch: dict) -> dict[str, Tensor]:
        """Training losses for a batch dict (``image``, ``mask``, ``label``, ...)."""
        raise NotImplementedError(f"{type(self).__name__} has nothing to train")

    def hparams_for_checkpoint(self) -> dict:
        """Settings needed to check a checkpoint fits this method (shapes, backbone)."""
        return {"method": type(self).__name__, "backbone": self.backbone.model_name}

    def feature_signature(self) -> dict:
        """Settings that determine :meth:`encode_images` (part of the feature-cache key)."""
        return self.hparams_for_checkpoint()

    def learned_state(self) -> dict[str, Tensor]:
        """state_dict without the frozen backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
