"""VisualAD (Hou et al., CVPR 2026): language-free zero-shot anomaly detection with two learned tokens in the ViT.

Reference: 7HHHHH/VisualAD at 8479132 (no licence file: re-implemented from the spec ``visualad.md``, no code
copied; where its README and code differ the code is followed). Two learned tokens (anomaly, normal) are inserted
before CLS in the frozen CLIP image tower, so they attend to, and change, every patch token; the text tower is
unused. Per tapped layer a spatial cross-attention (SCA) turns the final tokens into layer tokens and a feature
transform (SAF, a plain MLP) recalibrates the patches; the map is cos(patch, anomaly) - cos(patch, normal).
Gradients flow through the frozen tower into the tokens, so the image side cannot be cached
(``cacheable = False``).

Reference behaviours kept, each switchable: the trained ``ln_post`` is used in training only (the official test
script never reloads it: ``test_ln_post: clip``); maps are summed over layers (raw range [-2L, 2L];
``output_scale: unit`` maps it affinely onto [0, 1], same ranking). Positions: the backbone must resize its
position table bilinearly without antialias (``pos_embed_interpolation: bilinear``, as ``backbone=vit_l14_336``)
to match the reference's in-forward resize.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmad.backbones import ClipBackbone
from vlmad.errors import ConfigError
from vlmad.methods.base import AnomalyMethod, Prediction
from vlmad.methods.ops import dice_loss, focal_loss, fp32, gaussian_blur, scaled_sigma

log = logging.getLogger(__name__)

COS_EPS = 1e-8
PATCH_START = 3  # sequence [anomaly, normal, CLS, patches...]


class SpatialCrossAttention(nn.Module):
    """SCA of one tapped layer: anchor-query attention over the patches, gated by the token, scaled residual.

    Args:
        width: token width C.
        num_anchors: anchor queries A.
        max_patches: rows of the learned patch position table (N must not exceed it).
        dropout: p of the one dropout used on the attention weights and on the output.
        res_scale_init: initial residual scale.
    """

    def __init__(
        self,
        width: int,
        num_anchors: int = 4,
        max_patches: int = 1536,
        dropout: float = 0.1,
        res_scale_init: float = 0.01,
    ) -> None:
        super().__init__()
        self.anchor_queries = nn.Parameter(0.02 * torch.randn(num_anchors, width))
        self.pos_encoding = nn.Parameter(0.02 * torch.randn(1, max_patches, width))
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_norm = nn.LayerNorm(width)
        self.k_norm = nn.LayerNorm(width)
        self.gate = nn.Sequential(nn.Linear(width, num_anchors), nn.Sigmoid())
        self.out_proj = nn.Linear(width, width)
        self.res_scale = nn.Parameter(torch.full((1,), float(res_scale_init)))
        self.dropout = nn.Dropout(dropout)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, patches: Tensor, *tokens: Tensor) -> tuple[Tensor, ...]:
        """Layer tokens ``t + res_scale * out`` of each given token.

        The attention over the patches does not depend on the token (only the gate does), so it is computed once
        for all tokens (the reference calls the module once per token: the same values); with dropout active each
        token draws its own masks, in the reference's order (attention then output, token by token).

        Args:
            patches: (B, N, C) the layer's patch tokens after ``ln_post`` (untransformed).
            tokens: (B, C) final-layer tokens (anomaly, normal).

        Returns:
            one (B, C) layer token per input token.
        """
        n = patches.shape[1]
        queries = self.q_norm(self.q_proj(self.anchor_queries))  # (A, C)
        keys = self.k_norm(self.k_proj(patches + self.pos_encoding[:, :n]))  # (B, N, C)
        values = self.v_proj(patches)  # (B, N, C)
        attn = (queries @ keys.transpose(1, 2) * keys.shape[-1] ** -0.5).softmax(dim=-1)  # (B, A, N)
        shared = None if self.training and self.dropout.p > 0 else attn @ values  # (B, A, C) when dropout is off
        out = []
        for token in tokens:
            agg = self.dropout(attn) @ values if shared is None else shared  # (B, A, C)
            gates = self.gate(token)  # (B, A)
            mixed = self.dropout(self.out_proj((gates.unsqueeze(-1) * agg).sum(dim=1)))  # (B, C)
            out.append(token + self.res_scale * mixed)
        return tuple(out)


class FeatureTransform(nn.Module):
    """SAF of one tapped layer: Linear -> GELU (erf) -> Dropout -> Linear -> Dropout, no residual."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width), nn.Dropout(dropout)
        )
        for index in (0, 3):
            nn.init.xavier_uniform_(self.mlp[index].weight)
            nn.init.zeros_(self.mlp[index].bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.mlp(tokens)


class LayerCrossAttentions(nn.Module):
    """The per-layer SCA modules (``layer_attentions.layer_<l>``, l 1-based as in the reference's state dict)."""

    def __init__(self, keys: list[str], **kwargs: Any) -> None:
        super().__init__()
        self.layer_attentions = nn.ModuleDict({key: SpatialCrossAttention(**kwargs) for key in keys})


class VisualAD(AnomalyMethod):
    """Zero-shot anomaly detection with learned anomaly/normal tokens inside the frozen CLIP image tower.

    Learned-state keys follow the reference's state dict (SCA/SAF modules named ``layer_<l>`` with l 1-based =
    0-based block + 1), so its tensors load by name.

    Args:
        backbone: frozen ClipBackbone (position table resized ``bilinear`` for the reference).
        k_shot: must be 0 (zero-shot, trained on an auxiliary dataset).
        feature_layers: 0-based tapped blocks (reference ``features_list`` 6, 12, 18, 24 = 5, 11, 17, 23).
        num_anchors: SCA anchor queries.
        sca_max_patches: rows of each SCA position table (the patch count N may not exceed it).
        res_scale_init: initial SCA residual scale.
        dropout: SCA and SAF dropout (active in training only).
        transform_hidden_dim: SAF hidden width; None = the ViT width.
        token_init_scale: tokens start at ``scale * width**-0.5 * N(0, 1)``.
        test_ln_post: ``clip`` (reference: evaluation uses CLIP's frozen ``ln_post``, the trained copy only in
            training) or ``trained`` (the trained copy everywhere).
        smoothing_sigma: Gaussian sigma of the evaluated map at ``smoothing_reference_size`` px, scaled to others.
        smoothing_reference_size: size at which ``smoothing_sigma`` applies (the reference: 4 px at 518).
        topk_ratio: image score = mean of the top ``ceil(ratio * S * S)`` map values (at least 1).
        contrastive_margin: token loss ``mean(max(0, cos(a, n) + margin))`` on the last tapped layer.
        focal_gamma: focal loss exponent of the per-layer segmentation loss.
        token_lr: learning rate of the two token groups (the other groups take the optimizer's lr).
        token_grad_clip: each token's gradient is clipped to this norm before the step (None: off).
        output_scale: ``unit`` ((sum / L + 2) / 4 in [0, 1], the vlmad contract; same ranking) or ``raw``
            (the reference's layer sum and top-k score).
    """

    trainable = True
    cacheable = False  # the learned tokens run inside the tower: no frozen image features exist

    def __init__(
        self,
        backbone: ClipBackbone,
        k_shot: int = 0,
        feature_layers: list[int] | tuple[int, ...] = (5, 11, 17, 23),
        num_anchors: int = 4,
        sca_max_patches: int = 1536,
        res_scale_init: float = 0.01,
        dropout: float = 0.1,
        transform_hidden_dim: int | None = None,
        token_init_scale: float = 0.1,
        test_ln_post: str = "clip",
        smoothing_sigma: float = 4.0,
        smoothing_reference_size: int = 518,
        topk_ratio: float = 0.01,
        contrastive_margin: float = 0.5,
        focal_gamma: float = 2.0,
        token_lr: float = 1e-3,
        token_grad_clip: float | None = 1.0,
        output_scale: str = "unit",
    ) -> None:
        if not isinstance(backbone, ClipBackbone):
            raise ConfigError(
                f"VisualAD inserts its tokens into open_clip's CLIP ViT; backbone {type(backbone).__name__} is not a "
                "ClipBackbone (use backbone=vit_l14_336 or backbone=tiny)"
            )
        if k_shot != 0:
            raise ValueError(f"VisualAD is zero-shot only (trained on an auxiliary dataset): k_shot={k_shot}")
        super().__init__(backbone, k_shot)
        self.feature_layers = [int(i) for i in feature_layers]
        self.num_anchors, self.sca_max_patches = int(num_anchors), int(sca_max_patches)
        self.test_ln_post, self.output_scale = test_ln_post, output_scale
        self.smoothing_sigma, self.smoothing_reference_size = float(smoothing_sigma), int(smoothing_reference_size)
        self.topk_ratio, self.contrastive_margin = float(topk_ratio), float(contrastive_margin)
        self.focal_gamma, self.token_lr = float(focal_gamma), float(token_lr)
        self.token_grad_clip = None if token_grad_clip is None else float(token_grad_clip)
        self._check_config()

        width = backbone.width
        hidden = int(transform_hidden_dim or width)
        self.transform_hidden_dim = hidden
        self.anomaly_token = nn.Parameter(token_init_scale * width**-0.5 * torch.randn(width))
        self.normal_token = nn.Parameter(token_init_scale * width**-0.5 * torch.randn(width))
        clip_ln = backbone.visual.ln_post
        self.ln_post = nn.LayerNorm(width, eps=clip_ln.eps)  # trainable copy of CLIP's
        with torch.no_grad():
            self.ln_post.weight.copy_(clip_ln.weight), self.ln_post.bias.copy_(clip_ln.bias)
        keys = [self.layer_key(i) for i in self.feature_layers]
        self.layer_transforms = nn.ModuleDict({key: FeatureTransform(width, hidden, dropout) for key in keys})
        self.cross_attn = LayerCrossAttentions(
            keys,
            width=width,
            num_anchors=self.num_anchors,
            max_patches=self.sca_max_patches,
            dropout=dropout,
            res_scale_init=res_scale_init,
        )

    @staticmethod
    def layer_key(block: int) -> str:
        """State-dict key of a 0-based tapped block: ``layer_<block + 1>`` (the reference counts 1-based)."""
        return f"layer_{block + 1}"

    def _check_config(self) -> None:
        backbone = self.backbone
        backbone.check_layers(self.feature_layers)
        if not self.feature_layers or len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"feature_layers must be distinct 0-based blocks, got {self.feature_layers}")
        if backbone.grid_size**2 > self.sca_max_patches:
            raise ValueError(
                f"{backbone.grid_size**2} patches at {backbone.image_size} px exceed sca_max_patches="
                f"{self.sca_max_patches} (rows of the SCA position table)"
            )
        if self.test_ln_post not in ("clip", "trained"):
            raise ValueError(f"test_ln_post must be 'clip' or 'trained', got {self.test_ln_post!r}")
        if self.output_scale not in ("unit", "raw"):
            raise ValueError(f"output_scale must be 'unit' or 'raw', got {self.output_scale!r}")
        if not 0 < self.topk_ratio <= 1:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")

    # ---------------------------------------------------------------- image tower with the tokens
    def token_sequence(self, images: Tensor) -> Tensor:
        """[anomaly, normal, CLS, patches] plus positions (the class row for all three tokens), before ``ln_pre``.

        Args:
            images: (B, 3, S, S) CLIP-normalised.

        Returns:
            (B, 3 + N, W).
        """
        embedded = self.backbone.embed(images)  # (B, 1 + N, W): CLS + class row, patches + their rows
        pos_cls = self.backbone.visual.positional_embedding[0].to(embedded.dtype)  # (W,)
        tokens = torch.stack([self.anomaly_token, self.normal_token]).to(embedded.dtype) + pos_cls  # (2, W)
        return torch.cat([tokens.expand(embedded.shape[0], -1, -1), embedded], dim=1)  # no len(): traced batch axis

    def active_ln_post(self) -> nn.Module:
        """The trained ``ln_post`` in training (and with ``test_ln_post: trained``), else CLIP's frozen one."""
        if self.training or self.test_ln_post == "trained":
            return self.ln_post
        return self.backbone.visual.ln_post

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """The tower with the tokens inserted (with grad when grad mode is on: the tokens are learned).

        Args:
            images: (B, 3, S, S) CLIP-normalised.

        Returns:
            ``anomaly``, ``normal``, ``class``: (B, W) ``ln_post`` of tokens 0, 1, 2 after the last block;
            ``tokens``: (B, L, 3 + N, W) ``ln_post`` of every tapped stream (all tokens).
        """
        final, taps = self.backbone.blocks(self.token_sequence(images), self.feature_layers)
        ln = self.active_ln_post()
        return {
            "anomaly": ln(final[:, 0]),
            "normal": ln(final[:, 1]),
            "class": ln(final[:, 2]),
            "tokens": torch.stack([ln(taps[i]) for i in self.feature_layers], dim=1),
        }

    # ---------------------------------------------------------------- maps
    @fp32  # cosines of nearly equal vectors: float32 under mixed precision (the modules are ~5 % of the FLOPs)
    def layer_outputs(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """SCA tokens and grid maps of every tapped layer.

        Args:
            features: :meth:`encode_images` output.

        Returns:
            ``sca_anomaly``, ``sca_normal``: (B, L, W) layer tokens before normalisation;
            ``grid_map``: (B, L, g, g) cos(Q, a) - cos(Q, n) on the transformed patches, in [-2, 2].
        """
        tokens = features["tokens"]
        side = self.backbone.grid_size
        sca_a, sca_n, grids = [], [], []
        for j, block in enumerate(self.feature_layers):
            key = self.layer_key(block)
            layer = tokens[:, j]  # (B, 3 + N, W)
            patches = layer[:, PATCH_START:]  # SCA reads the untransformed patches
            a, n = self.cross_attn.layer_attentions[key](patches, features["anomaly"], features["normal"])
            q = self.layer_transforms[key](layer)[:, PATCH_START:]  # (B, N, W); the 3 leading outputs dropped
            a_hat, n_hat = F.normalize(a, dim=-1, eps=COS_EPS), F.normalize(n, dim=-1, eps=COS_EPS)
            cos_a = F.cosine_similarity(q, a_hat[:, None], dim=-1, eps=COS_EPS)  # (B, N)
            cos_n = F.cosine_similarity(q, n_hat[:, None], dim=-1, eps=COS_EPS)
            sca_a.append(a), sca_n.append(n), grids.append((cos_a - cos_n).reshape(-1, side, side))
        stack = functools.partial(torch.stack, dim=1)
        return {"sca_anomaly": stack(sca_a), "sca_normal": stack(sca_n), "grid_map": stack(grids)}

    @fp32
    def upsample(self, grid_maps: Tensor) -> Tensor:
        """(B, L, g, g) -> (B, L, S, S) bilinear, align_corners=False."""
        size = self.backbone.image_size
        return F.interpolate(grid_maps, size=(size, size), mode="bilinear", align_corners=False)

    def topk(self, side: int) -> int:
        """Number of map values the image score averages: max(1, ceil(topk_ratio * S * S))."""
        return max(1, math.ceil(self.topk_ratio * side * side))

    def topk_mean(self, maps: Tensor) -> Tensor:
        """(B, S, S) -> (B,) mean of the top-k values."""
        return maps.flatten(1).topk(self.topk(maps.shape[-1]), dim=1).values.mean(dim=1)

    def to_unit(self, raw: Tensor) -> Tensor:
        """Affine map of a layer-summed value in [-2L, 2L] onto [0, 1] (the ranking is unchanged)."""
        return (raw / len(self.feature_layers) + 2) / 4

    def class_constants(self, class_name: str) -> dict[str, Tensor]:
        """Nothing: VisualAD is language-free and class-agnostic (the learned tokens are parameters)."""
        return {}

    def score(self, images: Tensor, constants: dict[str, Tensor] | None = None) -> Prediction:
        """The eval forward of (B, 3, S, S) images (class-agnostic).

        Returns:
            Prediction: (B,) top-k mean of the smoothed map and (B, S, S) Gaussian-smoothed layer-summed maps,
            affinely onto [0, 1] with ``output_scale: unit``.
        """
        maps = self.upsample(self.layer_outputs(self.encode_images(images))["grid_map"]).sum(dim=1)  # (B, S, S)
        sigma = scaled_sigma(self.smoothing_sigma, maps.shape[-1], self.smoothing_reference_size)
        maps = gaussian_blur(maps, sigma)
        scores = self.topk_mean(maps)
        if self.output_scale == "unit":
            maps, scores = self.to_unit(maps), self.to_unit(scores)
        return Prediction(pred_score=scores, anomaly_map=maps)

    def forward(self, images: Tensor, class_names: list[str] | None = None) -> Prediction:
        """Score a batch; ``class_names`` is unused (language-free, class-agnostic)."""
        return self.score(images, {})

    # ---------------------------------------------------------------- training
    @fp32
    def seg_loss_parts(self, up_maps: Tensor, gt: Tensor) -> Tensor:
        """Per tapped layer [focal, dice] on p = sigmoid(map).

        Args:
            up_maps: (B, L, S, S) unsmoothed upsampled layer maps.
            gt: (B, S, S) {0, 1}.

        Returns:
            (L, 2).
        """
        parts = []
        for layer in up_maps.unbind(dim=1):
            p = layer.sigmoid()
            focal = focal_loss(torch.stack([1 - p, p], dim=1), gt, gamma=self.focal_gamma)
            parts.append(torch.stack([focal, dice_loss(p, gt)]))
        return torch.stack(parts)

    @fp32
    def contrastive_loss(self, anomaly: Tensor, normal: Tensor) -> Tensor:
        """mean(max(0, cos(a, n) + margin)) of (B, W) layer tokens (normalised first, as the reference)."""
        a, n = F.normalize(anomaly, dim=-1, eps=COS_EPS), F.normalize(normal, dim=-1, eps=COS_EPS)
        return (F.cosine_similarity(a, n, dim=-1, eps=COS_EPS) + self.contrastive_margin).clamp(min=0).mean()

    def loss(self, batch: dict) -> dict[str, Tensor]:
        """VisualAD loss: BCE(top-k of the summed map) + token margin + per-layer focal + dice (weights 1).

        Images without a ground-truth mask (``has_mask`` False) enter only the image and token terms.

        Args:
            batch: ``image`` (B, 3, S, S), ``mask`` (B, S, S) in {0, 1}, ``label`` (B,), ``has_mask`` (B,) bool.

        Returns:
            ``loss`` (total), ``image_loss``, ``contrastive_loss``, ``seg_loss``, ``focal``, ``dice`` (the last two
            summed over layers); scalars.
        """
        out = self.layer_outputs(self.encode_images(batch["image"]))
        up = self.upsample(out["grid_map"])  # (B, L, S, S)
        seg_scores = self.topk_mean(up.sum(dim=1))  # (B,)
        image_loss = F.binary_cross_entropy_with_logits(seg_scores, batch["label"].to(seg_scores))
        contrastive = self.contrastive_loss(out["sca_anomaly"][:, -1], out["sca_normal"][:, -1])
        has_mask = batch.get("has_mask")
        has_mask = torch.ones_like(seg_scores, dtype=torch.bool) if has_mask is None else has_mask.bool()
        has_mask = has_mask.to(seg_scores.device)
        if has_mask.any():
            gt = (batch["mask"][has_mask].reshape(-1, *up.shape[-2:]) > 0.5).float()
            parts = self.seg_loss_parts(up[has_mask], gt)  # (L, 2)
        else:
            parts = up.new_zeros(len(self.feature_layers), 2)
        seg = parts.sum()
        return {
            "loss": image_loss + contrastive + seg,
            "image_loss": image_loss,
            "contrastive_loss": contrastive,
            "seg_loss": seg,
            "focal": parts[:, 0].sum(),
            "dice": parts[:, 1].sum(),
        }

    def param_groups(self) -> list[dict[str, Any]]:
        """The reference's AdamW groups: each token (``token_lr``), ``ln_post``, each SAF, all SCA (optimizer lr)."""
        groups = [
            {"name": "anomaly_token", "params": [self.anomaly_token], "lr": self.token_lr},
            {"name": "normal_token", "params": [self.normal_token], "lr": self.token_lr},
            {"name": "ln_post", "params": list(self.ln_post.parameters())},
        ]
        for key, transform in self.layer_transforms.items():
            groups.append({"name": f"layer_transforms.{key}", "params": list(transform.parameters())})
        groups.append({"name": "cross_attn", "params": list(self.cross_attn.parameters())})
        return groups

    def before_optimizer_step(self) -> None:
        """Skip a step with a non-finite gradient (all grads dropped); clip each token's gradient norm."""
        learned = [p for p in self.parameters() if p.requires_grad and p.grad is not None]
        if learned and not torch.stack([p.grad.isfinite().all() for p in learned]).all():
            log.warning("VisualAD: non-finite gradient, optimizer step skipped")
            for p in learned:
                p.grad = None
            return
        if self.token_grad_clip is not None:
            for token in (self.anomaly_token, self.normal_token):
                if token.grad is not None:
                    nn.utils.clip_grad_norm_(token, self.token_grad_clip)

    # ---------------------------------------------------------------- checkpoints
    def hparams_for_checkpoint(self) -> dict:
        """Shapes and settings a learned state must match (the SCA position rows are laid out on the grid)."""
        return {
            **super().hparams_for_checkpoint(),
            "width": self.backbone.width,
            "grid_size": self.backbone.grid_size,
            "feature_layers": list(self.feature_layers),
            "num_anchors": self.num_anchors,
            "sca_max_patches": self.sca_max_patches,
            "transform_hidden_dim": self.transform_hidden_dim,
        }
