"""The contract every method implements; the Lightning wrapper (vlmad.engine.module) only talks to this."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlmad.backbones import ClipBackbone
from vlmad.data.references import ReferenceDraw
from vlmad.errors import ConfigError
from vlmad.methods.prompts import TextFeatureCache

# backbone family -> (its name in messages, a config that builds one)
BACKBONE_FAMILIES = {"clip": ("CLIP", "backbone=vit_l14_336"), "dinov2": ("DINOv2", "backbone=dinov2_vits14")}


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
    # True: encode_images depends on the frozen backbone and fixed settings only, so its outputs may be cached
    # (module.feature_cache; ``auto`` caches the fit set of a trained method). Opt-in: a method whose learned
    # parameters run inside the tower (VisualAD) must never be served stale features.
    cacheable: bool = False
    tensor_state: tuple[str, ...] = ()  # attributes holding plain tensors (dicts/lists of them) that follow .to()
    # backbone families the method runs on (a backbone's ``family``): the CLIP methods need its text tower or its
    # projected image embedding; the DINOv2 methods take patch tokens of a DinoBackbone
    backbone_families: tuple[str, ...] = ("clip",)

    def __init__(self, backbone: ClipBackbone, k_shot: int = 0) -> None:
        super().__init__()
        family = getattr(backbone, "family", "clip")
        if family not in self.backbone_families:
            wanted = " or ".join(BACKBONE_FAMILIES[f][0] for f in self.backbone_families)
            example = BACKBONE_FAMILIES[self.backbone_families[0]][1]
            raise ConfigError(
                f"{type(self).__name__} needs a {wanted} backbone, got the {BACKBONE_FAMILIES[family][0]} backbone "
                f"{getattr(backbone, 'model_name', '?')!r} (e.g. {example})"
            )
        self.backbone = backbone
        self.k_shot = int(k_shot)
        self.feature_cache = None  # a vlmad.backbones.cache.FeatureCache, see attach_cache
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
        if cache is not None and not self.cacheable:
            raise ValueError(f"{type(self).__name__} does not declare cacheable = True: no feature cache")
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

    def reference_draw(self, class_name: str) -> ReferenceDraw | None:
        """How the k references of a class are drawn and expanded (see ``vlmad.data.references``); None = the
        datamodule's default draw of k plain images (``AnomalyDataModule.reference_images``)."""
        return None

    def require_views(self, class_name: str, reference_images: Tensor | None, expected: int, settings: str) -> None:
        """Refuse reference views not drawn with :meth:`reference_draw` (their count says so): one clear error.

        Args:
            reference_images: (N, 3, S, S) or None; N must equal ``expected``.
            settings: the method's settings that set ``expected`` (``k_shot=4, aug_count=30``), for the message.
        """
        got = None if reference_images is None else reference_images.shape[0]
        if got != expected:
            raise ValueError(
                f"{type(self).__name__}({settings}) needs {expected} reference views for {class_name!r}, got {got}: "
                "draw them with the datamodule's reference_images(..., draw=method.reference_draw(class_name))"
            )

    def prepare(self, class_name: str, reference_images: Tensor | None = None) -> None:
        """Per-category set-up before scoring (text features, few-shot memory).

        Args:
            class_name: object name used in prompts.
            reference_images: (K, 3, S, S) normal images of the category when ``k_shot`` > 0.
        """

    def forward(self, images: Tensor, class_names: list[str], features: dict[str, Tensor] | None = None) -> Prediction:
        """Score a batch of (B, 3, S, S) normalised images of the given classes (eval path).

        Per-image methods implement :meth:`class_constants` and :meth:`score`; this groups the batch by class so
        the same code serves mixed batches, the single-class batches of evaluation and the exported graph.
        ``features`` (a precomputed :meth:`encode_images` dict of (B, ...) tensors) is passed on, split by class,
        as ``score(..., features=...)``: only for methods whose ``score`` takes it.
        """
        names = list(class_names) if len(class_names) == len(images) else [class_names[0]] * len(images)
        if len(set(names)) == 1:
            extra = {} if features is None else {"features": features}
            return self.score(images, self.class_constants(names[0]), **extra)
        scores, maps = images.new_empty(len(images)), None
        for name in dict.fromkeys(names):
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=images.device)
            extra = {} if features is None else {"features": {k: v[index] for k, v in features.items()}}
            pred = self.score(images[index], self.class_constants(name), **extra)
            maps = pred.anomaly_map.new_empty(len(images), *pred.anomaly_map.shape[1:]) if maps is None else maps
            scores = scores.to(pred.pred_score.dtype)
            scores[index], maps[index] = pred.pred_score, pred.anomaly_map
        return Prediction(scores, maps)

    def class_constants(self, class_name: str) -> dict[str, Tensor]:
        """What scoring one class needs that does not depend on the image: text prototypes, few-shot memories,
        learned-prompt text features, PCA bases... (after :meth:`prepare`). They become buffers of
        :meth:`for_class`, hence constants of an exported graph."""
        return {}

    def score(self, images: Tensor, constants: dict[str, Tensor]) -> Prediction:
        """The eval forward for (B, 3, S, S) images of one class, given its :meth:`class_constants`.

        Must be traceable with a dynamic batch axis: no Python loop over B, no data-dependent control flow,
        no chunking whose count depends on B (export traces exactly this code; there is no second copy).
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither score nor forward")

    def for_class(self, class_name: str) -> ClassView:
        """This method's eval forward for one prepared class as an ``nn.Module`` (what export traces)."""
        return ClassView(self, class_name)

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

    @classmethod
    def min_test_images(cls, settings: Mapping[str, Any]) -> tuple[int, str]:
        """Fewest test images per category this method can score with ``settings``, and why (data check).

        1 for per-image methods; a transductive method that compares the test images with each other needs more.
        """
        return 1, "a category needs a test image"

    def loss(self, batch: dict) -> dict[str, Tensor]:
        """Training losses for a batch dict (``image``, ``mask``, ``label``, ...)."""
        raise NotImplementedError(f"{type(self).__name__} has nothing to train")

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the learned parameters: one group by default (the optimizer's settings);
        a method may split them and set per-group options (``lr``, ...), as the reference's optimizer does."""
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
        return [{"params": params}]

    def before_optimizer_step(self) -> None:
        """Called after backward, before each optimizer step (gradient clipping, skipping); nothing by default."""

    def hparams_for_checkpoint(self) -> dict:
        """Settings needed to check a checkpoint fits this method (shapes, backbone)."""
        return {"method": type(self).__name__, "backbone": self.backbone.model_name}

    def feature_signature(self) -> dict:
        """Settings that determine :meth:`encode_images` (part of the feature-cache key)."""
        return self.hparams_for_checkpoint()

    def learned_state(self) -> dict[str, Tensor]:
        """state_dict without the frozen backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}


class ClassView(nn.Module):
    """``method.score`` for one class with its constants held as buffers: ``images -> (scores, maps)``.

    Exported graphs are traced from this view, so export runs the very code evaluation runs.
    """

    def __init__(self, method: AnomalyMethod, class_name: str) -> None:
        super().__init__()
        self.method, self.class_name = method, class_name
        self.names = []
        for name, value in method.class_constants(class_name).items():
            self.register_buffer(name, value.detach().clone())
            self.names.append(name)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) -> scores (B,), maps (B, S, S)."""
        pred = self.method.score(images, {name: getattr(self, name) for name in self.names})
        return pred.pred_score, pred.anomaly_map
