"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic learnable prompts + DPAM V-V attention.

Reference: zqhang/AnomalyCLIP at 45ed4dd (the code, not the paper text, produced the published numbers).
Only the text prompts are learned; CLIP is frozen and the image side runs without grad, so its outputs
(:meth:`AnomalyCLIP.encode_images`) can be cached across epochs. Spec: docs ``anomalyclip.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmad.backbones import ClipBackbone
from vlmad.backbones.dpam import check_dpam_block, dpam_forward
from vlmad.methods.base import AnomalyMethod, Prediction
from vlmad.methods.ops import dice_loss, focal_loss, fp32, gaussian_blur, scaled_sigma


class AnomalyCLIP(AnomalyMethod):
    """Zero-shot anomaly detection with two learned class-agnostic prompts ([normal, anomalous]).

    Args:
        backbone: frozen ClipBackbone (position table resized with ``bilinear`` for the reference).
        k_shot: must be 0 (the reference has no few-shot mode).
        feature_layers: 0-based vision blocks whose V-V stream gives the maps (reference layer 24 = 23).
        dpam_start: first 0-based dual-path block (reference ``DPAM_layer=20`` -> 5 for ViT-L).
        n_ctx: learned context vectors per prompt (replace the "X" tokens).
        deep_prompt_depth: deep prompts overwrite positions 1..len before text blocks 1..depth-1.
        deep_prompt_len: deep prompt length (<= n_ctx).
        temperature: logits = cos / temperature (CLIP's logit_scale is not used).
        global_ln_post: apply ``ln_post`` to the global CLS (the reference does not).
        layer_reduce: ``mean`` (maps stay in [0, 1]) or ``sum`` (reference) over tapped layers.
        smoothing_sigma: Gaussian sigma at ``smoothing_reference_size`` px, scaled to the input size.
        smoothing_reference_size: map size at which ``smoothing_sigma`` applies.
        round_deep_prompts_fp16: reproduce the reference's ``.half()`` cast of the inserted deep prompts
            (values and per-copy gradients rounded to float16).
        lam: weight of the local (focal + dice) loss.
        focal_gamma: focal loss exponent.
        init_std: std of the N(0, std) prompt initialisation.
    """

    trainable = True
    cacheable = True  # encode_images is the frozen tower alone: training may cache the fit set's features

    def __init__(
        self,
        backbone: ClipBackbone,
        k_shot: int = 0,
        feature_layers: list[int] | tuple[int, ...] = (23,),
        dpam_start: int = 5,
        n_ctx: int = 12,
        deep_prompt_depth: int = 9,
        deep_prompt_len: int = 4,
        temperature: float = 0.07,
        global_ln_post: bool = False,
        layer_reduce: str = "mean",
        smoothing_sigma: float = 4.0,
        smoothing_reference_size: int = 518,
        round_deep_prompts_fp16: bool = False,
        lam: float = 4.0,
        focal_gamma: float = 2.0,
        init_std: float = 0.02,
    ) -> None:
        if k_shot != 0:
            raise ValueError(f"AnomalyCLIP is zero-shot only (the reference has no few-shot mode): k_shot={k_shot}")
        super().__init__(backbone, k_shot)
        self.feature_layers = [int(i) for i in feature_layers]
        self.dpam_start = int(dpam_start)
        self.n_ctx = int(n_ctx)
        self.deep_prompt_depth = int(deep_prompt_depth)
        self.deep_prompt_len = int(deep_prompt_len)
        self.temperature = float(temperature)
        self.global_ln_post = bool(global_ln_post)
        self.layer_reduce = layer_reduce
        self.smoothing_sigma, self.smoothing_reference_size = float(smoothing_sigma), int(smoothing_reference_size)
        self.round_deep_prompts_fp16 = bool(round_deep_prompts_fp16)
        self.lam, self.focal_gamma = float(lam), float(focal_gamma)
        self._check_config()

        clip = backbone.model
        width = clip.token_embedding.weight.shape[1]
        prompts = [" ".join(["X"] * self.n_ctx) + " object.", " ".join(["X"] * self.n_ctx) + " damaged object."]
        tokens = backbone.tokenize(prompts)  # (2, 77)
        if int(tokens.argmax(-1).max()) >= tokens.shape[1] - 1:  # the tokenizer truncated the prompt
            raise ValueError(f"n_ctx={self.n_ctx} does not fit the text context of {tokens.shape[1]} tokens")
        self.register_buffer("tokens", tokens, persistent=False)
        with torch.no_grad():
            self.register_buffer("token_embeddings", clip.token_embedding(tokens), persistent=False)  # (2, 77, Dt)
        # ctx_pos belongs to the normal prompt (row 0), ctx_neg to the anomalous one (row 1), as in the reference.
        self.ctx_pos = nn.Parameter(torch.empty(self.n_ctx, width).normal_(std=init_std))
        self.ctx_neg = nn.Parameter(torch.empty(self.n_ctx, width).normal_(std=init_std))
        if self.deep_prompt_depth > 1:
            deep = torch.empty(self.deep_prompt_depth - 1, self.deep_prompt_len, width).normal_(std=init_std)
            self.deep_prompts = nn.Parameter(deep)
        else:
            self.register_parameter("deep_prompts", None)
        self._text_cache: tuple[tuple, Tensor] | None = None

    def _check_config(self) -> None:
        backbone, depth = self.backbone, self.backbone.depth
        text_depth = len(backbone.model.transformer.resblocks)
        if not self.feature_layers or any(not 0 <= i < depth for i in self.feature_layers):
            raise ValueError(
                f"feature_layers {self.feature_layers} out of range for {backbone.model_name} with {depth} "
                f"vision blocks: 0-based block indices 0..{depth - 1} (reference layer 24 = block 23)"
            )
        if not 0 <= self.dpam_start <= depth:
            raise ValueError(
                f"dpam_start {self.dpam_start} must be a 0-based vision block index in 0..{depth} "
                f"({depth} = no DPAM; reference DPAM_layer=20 on ViT-L = dpam_start 5)"
            )
        if not 1 <= self.deep_prompt_depth <= text_depth:
            raise ValueError(
                f"deep_prompt_depth {self.deep_prompt_depth} must be in 1..{text_depth} (text encoder blocks): "
                f"deep prompts overwrite tokens before 0-based text blocks 1..depth-1"
            )
        if self.n_ctx < 1 or not 1 <= self.deep_prompt_len <= self.n_ctx:
            raise ValueError(
                f"need n_ctx >= 1 and 1 <= deep_prompt_len <= n_ctx, got {self.n_ctx}, {self.deep_prompt_len}"
            )
        if self.layer_reduce not in ("mean", "sum"):
            raise ValueError(f"layer_reduce must be 'mean' or 'sum', got {self.layer_reduce!r}")
        for i in range(self.dpam_start, depth):  # fail at construction, not mid-run, if open_clip changed
            check_dpam_block(backbone.visual.transformer.resblocks[i], i)
        if getattr(backbone.model, "text_pool_type", "argmax") != "argmax":
            raise ValueError("AnomalyCLIP pools the EOT token by argmax of token ids; this CLIP pools differently")

    # ---------------------------------------------------------------- text side
    def prompt_embeddings(self) -> Tensor:
        """(2, 77, Dt) token embeddings with positions 1..n_ctx replaced by [ctx_pos; ctx_neg]."""
        ctx = torch.stack([self.ctx_pos, self.ctx_neg])  # (2, n_ctx, Dt)
        emb = self.token_embeddings
        return torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + self.n_ctx :]], dim=1)  # (2, 77, Dt)

    @fp32  # two prompts: negligible cost, and the learned prompts' gradients stay fp32 under mixed precision
    def text_features(self, normalize: bool = True) -> Tensor:
        """Text features of the two prompts, computed now (with grad if grad mode is on), in float32.

        Returns:
            (2, D) rows [normal, anomalous], L2-normalised unless ``normalize`` is False.
        """
        clip = self.backbone.model
        x = self.prompt_embeddings() + clip.positional_embedding  # (2, 77, Dt)
        for i, block in enumerate(clip.transformer.resblocks):
            if 1 <= i < self.deep_prompt_depth:
                # The reference overwrites (not inserts) positions 1..len before text blocks 1..depth-1.
                deep = self.deep_prompts[i - 1].expand(x.shape[0], -1, -1)  # (2, len, Dt)
                if self.round_deep_prompts_fp16:  # reference quirk: .half() per copy, also rounds its gradient
                    deep = deep.half()
                deep = deep.to(x.dtype)
                x = torch.cat([x[:, :1], deep, x[:, 1 + self.deep_prompt_len :]], dim=1)
            x = block(x, attn_mask=clip.attn_mask)  # (2, 77, Dt), causal
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self.tokens.argmax(dim=-1)]  # (2, Dt) EOT token
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (2, D)
        return F.normalize(x, dim=-1) if normalize else x

    def _cache_key(self) -> tuple:
        params = [p for p in (self.ctx_pos, self.ctx_neg, self.deep_prompts) if p is not None]
        return tuple((p.data_ptr(), p._version, p.device) for p in params)

    def _eval_text_features(self) -> Tensor:
        """Cached (2, D) text features; recomputed when a prompt parameter changed (in-place version)."""
        key = self._cache_key()
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                self._text_cache = (key, self.text_features())
        return self._text_cache[1]

    def train(self, mode: bool = True) -> AnomalyCLIP:
        """Switch mode; entering training drops the cached text features."""
        if mode:
            self._text_cache = None
        return super().train(mode)

    def prepare(self, class_name: str, reference_images: Tensor | None = None) -> None:
        """Cache the text features for evaluation (object-agnostic: ``class_name`` is unused)."""
        if not self.training:
            self._eval_text_features()

    # ---------------------------------------------------------------- image side
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """Frozen image features (cacheable: no augmentation, no learned part).

        Args:
            images: (B, 3, S, S) CLIP-normalised.

        Returns:
            ``global``: (B, D) original-stream CLS @ proj (no ``ln_post`` unless ``global_ln_post``);
            ``patch``: (B, L, 1+P, D) ``ln_post`` + proj of the tapped layers' V-V streams, CLS first.
        """
        final, taps = dpam_forward(self.backbone, images, self.dpam_start, self.feature_layers)
        visual = self.backbone.visual
        cls = visual.ln_post(final[:, 0]) if self.global_ln_post else final[:, 0]  # (B, W)
        patch = torch.stack([self.backbone.project(taps[i]) for i in self.feature_layers], dim=1)
        return {"global": cls @ visual.proj, "patch": patch}

    @fp32
    def image_logits(self, features: dict[str, Tensor], text: Tensor) -> Tensor:
        """(B, 2) cos(global, text) / temperature, per image."""
        return F.normalize(features["global"], dim=-1) @ text.T / self.temperature

    @fp32
    def similarity(self, features: dict[str, Tensor], text: Tensor) -> Tensor:
        """(B, L, 1+P, 2) per-token softmax over [normal, anomalous] (CLS included, dropped later)."""
        return (F.normalize(features["patch"], dim=-1) @ text.T / self.temperature).softmax(dim=-1)

    def upsampled_probabilities(self, similarity: Tensor) -> Tensor:
        """Patch probabilities reshaped to the grid, then bilinearly upsampled (align_corners=False).

        Args:
            similarity: (B, L, 1+P, 2).

        Returns:
            (B, L, 2, S, S).
        """
        layers, side, size = similarity.shape[1], self.backbone.grid_size, self.backbone.image_size
        grid = similarity[:, :, 1:].reshape(-1, side, side, 2).permute(0, 3, 1, 2)  # (BL, 2, g, g)
        up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)  # (BL, 2, S, S)
        return up.reshape(-1, layers, 2, size, size)

    def class_constants(self, class_name: str = "") -> dict[str, Tensor]:
        """``text`` (2, D): the two learned prompts' text features (object-agnostic: ``class_name`` is unused).

        In training mode they are computed now, with grad; in eval mode cached until a prompt parameter changes.
        """
        return {"text": self.text_features() if self.training else self._eval_text_features()}

    def score(
        self, images: Tensor, constants: dict[str, Tensor], features: dict[str, Tensor] | None = None
    ) -> Prediction:
        """The eval forward of a batch (what export traces, with the text features as constants).

        Args:
            images: (B, 3, S, S) CLIP-normalised.
            constants: :meth:`class_constants`.
            features: precomputed :meth:`encode_images` output (same result as computing it here).

        Returns:
            Prediction with (B,) image scores (global feature only) and (B, S, S) smoothed maps.
        """
        features = self.image_features(images) if features is None else features
        text = constants["text"]  # (2, D)
        score = self.image_logits(features, text).softmax(dim=-1)[:, 1]  # (B,)
        maps = self.upsampled_probabilities(self.similarity(features, text))[:, :, 1]  # (B, L, S, S)
        maps = maps.mean(dim=1) if self.layer_reduce == "mean" else maps.sum(dim=1)  # (B, S, S)
        sigma = scaled_sigma(self.smoothing_sigma, self.backbone.image_size, self.smoothing_reference_size)
        return Prediction(pred_score=score, anomaly_map=gaussian_blur(maps, sigma))

    def forward(
        self, images: Tensor, class_names: list[str] | None = None, features: dict[str, Tensor] | None = None
    ) -> Prediction:
        """Score a batch: :meth:`score`; ``class_names`` is unused (object-agnostic prompts).

        Args:
            images: (B, 3, S, S) CLIP-normalised.
            class_names: ignored.
            features: precomputed :meth:`encode_images` output (same result as computing it here).
        """
        return self.score(images, self.class_constants(), features)

    # ---------------------------------------------------------------- training
    def local_loss_parts(self, probs: Tensor, gt: Tensor) -> Tensor:
        """Per tapped layer [focal(M, gt), dice(M_anom, gt), dice(M_norm, 1 - gt)], before ``lam``.

        Args:
            probs: (B, L, 2, S, S) upsampled probabilities (no smoothing).
            gt: (B, S, S) {0, 1}.

        Returns:
            (L, 3).
        """
        parts = [
            torch.stack(
                [
                    focal_loss(m, gt, gamma=self.focal_gamma),
                    dice_loss(m[:, 1], gt),
                    dice_loss(m[:, 0], 1 - gt),
                ]
            )
            for m in probs.unbind(dim=1)
        ]
        return torch.stack(parts)  # (L, 3)

    def loss(self, batch: dict, features: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """AnomalyCLIP loss: CE(global) + lam * sum over layers of focal + 2 dice terms.

        Images whose ``has_mask`` is False (no ground-truth mask) contribute only to the CE term.

        Args:
            batch: ``image`` (B, 3, S, S), ``mask`` (B, S, S) in {0, 1}, ``label`` (B,), ``has_mask`` (B,) bool.
            features: precomputed :meth:`encode_images` output for ``batch["image"]``.

        Returns:
            ``loss`` (total), ``image_loss``, ``local_loss`` (lam * sum), ``focal``, ``dice_anomalous``,
            ``dice_normal`` (the last three summed over layers, before lam); scalars.
        """
        features = self.image_features(batch["image"]) if features is None else features
        text = self.text_features()  # (2, D), with grad
        image_loss = F.cross_entropy(self.image_logits(features, text), batch["label"].long())
        has_mask = batch.get("has_mask")
        if has_mask is None:
            has_mask = torch.ones(len(batch["label"]), dtype=torch.bool, device=image_loss.device)
        has_mask = has_mask.to(image_loss.device).bool()
        if has_mask.any():
            sel = {k: v[has_mask] for k, v in features.items()}
            probs = self.upsampled_probabilities(self.similarity(sel, text))  # (B', L, 2, S, S)
            gt = (batch["mask"][has_mask].reshape(probs.shape[0], *probs.shape[-2:]) > 0.5).to(probs.dtype)
            parts = self.local_loss_parts(probs, gt).sum(dim=0)  # (3,)
        else:
            parts = image_loss.new_zeros(3)
        local_loss = self.lam * parts.sum()
        return {
            "loss": local_loss + image_loss,
            "image_loss": image_loss,
            "local_loss": local_loss,
            "focal": parts[0],
            "dice_anomalous": parts[1],
            "dice_normal": parts[2],
        }

    # ---------------------------------------------------------------- checkpoints
    def hparams_for_checkpoint(self) -> dict:
        """Shapes and settings a learned state must match."""
        return {
            **super().hparams_for_checkpoint(),
            "n_ctx": self.n_ctx,
            "deep_prompt_depth": self.deep_prompt_depth,
            "deep_prompt_len": self.deep_prompt_len,
            "text_width": self.ctx_pos.shape[1],
            "feature_layers": list(self.feature_layers),
            "dpam_start": self.dpam_start,
            "global_ln_post": self.global_ln_post,
            "round_deep_prompts_fp16": self.round_deep_prompts_fp16,
        }

    @staticmethod
    def convert_official_checkpoint(state: dict) -> dict[str, Tensor]:
        """Official prompt-learner state (``.pth``) -> our learned state.

        Args:
            state: ``{"prompt_learner": sd}`` or ``sd`` with ``ctx_pos``/``ctx_neg`` (1, 1, n_ctx, Dt) and
                ``compound_prompts_text.{i}`` (len, Dt); the unused projections and token buffers are ignored.

        Returns:
            ``ctx_pos``, ``ctx_neg`` (n_ctx, Dt) and, if any, ``deep_prompts`` (depth-1, len, Dt).
        """
        state = state.get("prompt_learner", state)
        out = {}
        for key in ("ctx_pos", "ctx_neg"):
            ctx = state[key]
            if ctx.dim() < 2 or ctx.shape[:-2].numel() != 1:
                raise ValueError(f"official {key} has shape {tuple(ctx.shape)}; expected (1, 1, n_ctx, dim)")
            out[key] = ctx.reshape(ctx.shape[-2:]).float().clone()
        prefix = "compound_prompts_text."
        deep = sorted((int(k[len(prefix) :]), v) for k, v in state.items() if k.startswith(prefix))
        if deep:
            out["deep_prompts"] = torch.stack([v.float() for _, v in deep])
        return out
