"""WinCLIP / WinCLIP+ (Jeong et al., CVPR 2023): training-free zero-/few-shot anomaly scoring.

Behavioural reference: anomalib 2.7.0 ``WinClipModel`` (spec: docs ``winclip.md``). Window embeddings are
*re-encoded* windows (CLS + k×k patch tokens through the whole ViT), not pooled patch tokens; the
transformer is called in open_clip 3.x's native batch-first layout (anomalib's sequence-first permute
makes every window identical there, anomalib issue #2571).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmad.backbones import ClipBackbone
from vlmad.methods.base import AnomalyMethod, Prediction
from vlmad.methods.ops import autocast_off, fp32, gaussian_blur, min_cosine_distance
from vlmad.methods.prompts import PromptSet, get_prompt_set

IMAGE_SCORES = ("text", "map_max")
HARMONIC_ON = ("anomaly", "normality")
FUSIONS = ("mean", "harmonic")


def window_layout(grid: int, scale: int, stride: int) -> tuple[Tensor, Tensor]:
    """Window patch indices and the patch-window coverage matrix of one scale.

    Args:
        grid: patches per side G.
        scale: window side k in patches.
        stride: step between window corners in patches.

    Returns:
        indices (n_win, k²) row-major patch indices, windows row-major over their top-left corner;
        coverage (P, n_win) float 0/1, ``coverage[p, w] = 1`` when window w contains patch p.
    """
    corners = torch.arange(0, grid - scale + 1, stride)
    offsets = torch.arange(scale)
    rows = corners[:, None, None, None] + offsets[None, None, :, None]  # (n, 1, k, 1)
    cols = corners[None, :, None, None] + offsets[None, None, None, :]  # (1, n, 1, k)
    indices = (rows * grid + cols).reshape(-1, scale * scale)  # (n_win, k²)
    coverage = torch.zeros(grid * grid, indices.shape[0])
    coverage.scatter_(0, indices.T, 1.0)  # (P, n_win)
    return indices, coverage


def _safe_inverse(x: Tensor) -> tuple[Tensor, Tensor]:
    """1/x with non-finite results zeroed, and the mask of where they were (zero scores)."""
    inv = 1.0 / x
    bad = ~torch.isfinite(inv)
    return inv.masked_fill(bad, 0.0), bad


class WinCLIP(AnomalyMethod):
    """WinCLIP (zero-shot) and WinCLIP+ (``k_shot`` > 0).

    Args:
        backbone: frozen CLIP (ViT with CLS pooling).
        k_shot: number of normal reference images per class; 0 = zero-shot.
        scales: window sides in patches.
        window_stride: step between windows in patches.
        prompts: prompt-set name (``winclip_anomalib``, ``winclip_22``) or a dict of state/template lists.
        normalize_prompts: L2-normalise every sentence embedding before averaging (anomalib does not).
        temperature: softmax temperature of the class score (anomalib 0.07; caoyunkang/WinClip 0.01).
        image_score: ``text`` (anomalib: class score of the full image) or ``map_max`` (caoyunkang/WinClip:
            max of the final grid map).
        harmonic_on: harmonic zero-shot aggregation of ``anomaly`` scores (anomalib) or of ``normality``
            scores, reported as 1 - result (caoyunkang/WinClip).
        few_shot_levels: memory levels, ``patch`` and/or window scales.
        fusion: zero-/few-shot fusion, ``mean`` (anomalib) or ``harmonic`` 1/(1/a + 1/b) (caoyunkang/WinClip).
        smoothing_sigma: Gaussian sigma in pixels on the upsampled map (scipy semantics); 0 = off (anomalib).
        window_chunk: max windows per image in one transformer call (bounds memory: a call holds B × this
            many window sequences). The number of calls depends only on the window count, never on the batch
            size, so the exported graph keeps a dynamic batch axis. The default 512 keeps every scale of
            ViT-B/16+ at 240 px in one call; 512 × the default batch of 8 is the former 4096-sequence bound.
    """

    cacheable = True  # frozen tower features: a k-shot sweep encodes each test image once with a disk cache
    tensor_state = ("memory",)  # few-shot memories follow .to() / .cuda() (AnomalyMethod._apply)

    def __init__(
        self,
        backbone: ClipBackbone,
        k_shot: int = 0,
        scales: tuple[int, ...] = (2, 3),
        window_stride: int = 1,
        prompts: str | dict = "winclip_anomalib",
        normalize_prompts: bool = False,
        temperature: float = 0.07,
        image_score: str = "text",
        harmonic_on: str = "anomaly",
        few_shot_levels: tuple = ("patch", 2, 3),
        fusion: str = "mean",
        smoothing_sigma: float = 0.0,
        window_chunk: int = 512,
    ) -> None:
        super().__init__(backbone, k_shot)
        grid = backbone.grid_size
        self.scales = tuple(int(k) for k in scales)
        self.few_shot_levels = tuple(lvl if lvl == "patch" else int(lvl) for lvl in few_shot_levels)
        for name, value, allowed in [
            ("image_score", image_score, IMAGE_SCORES),
            ("harmonic_on", harmonic_on, HARMONIC_ON),
            ("fusion", fusion, FUSIONS),
        ]:
            if value not in allowed:
                raise ValueError(f"WinCLIP: unknown {name}={value!r}; expected one of {allowed}")
        if self.k_shot < 0:
            raise ValueError(f"WinCLIP: k_shot must be >= 0, got {k_shot}")
        if not self.scales or any(not 1 <= k <= grid for k in self.scales) or len(set(self.scales)) < len(scales):
            raise ValueError(f"WinCLIP: scales {self.scales} must be distinct and in 1..{grid} (the patch grid)")
        if window_stride < 1 or window_chunk < 1 or temperature <= 0 or smoothing_sigma < 0:
            raise ValueError(
                "WinCLIP: need window_stride >= 1, window_chunk >= 1, temperature > 0, smoothing_sigma >= 0"
            )
        if any((grid - k) % window_stride for k in self.scales):
            # anomalib would silently score uncovered border patches 0 (nan_to_num of 0/0).
            raise ValueError(f"WinCLIP: window_stride {window_stride} leaves border patches of a {grid}-grid uncovered")
        bad_levels = [lvl for lvl in self.few_shot_levels if lvl != "patch" and lvl not in self.scales]
        if bad_levels or not self.few_shot_levels:
            raise ValueError(f"WinCLIP: few_shot_levels must be 'patch' or scales in {self.scales}, got {bad_levels}")
        self.window_stride = int(window_stride)
        self.prompt_set: PromptSet = get_prompt_set(prompts)
        self.normalize_prompts = bool(normalize_prompts)
        self.temperature = float(temperature)
        self.image_score, self.harmonic_on, self.fusion = image_score, harmonic_on, fusion
        self.smoothing_sigma = float(smoothing_sigma)
        self.window_chunk = int(window_chunk)
        self.memory: dict[str, dict[str | int, Tensor]] = {}  # class name -> level -> (K·n, C)
        for k in self.scales:
            indices, coverage = (t.to(backbone.device) for t in window_layout(grid, k, self.window_stride))
            # CLS is token 0 of every window sequence; patch tokens are shifted by one.
            sequence = torch.cat([torch.zeros_like(indices[:, :1]), indices + 1], dim=1)
            self.register_buffer(f"window_indices_{k}", indices, persistent=False)  # (n_win, k²)
            self.register_buffer(f"window_sequence_{k}", sequence, persistent=False)  # (n_win, 1+k²)
            self.register_buffer(f"coverage_{k}", coverage, persistent=False)  # (P, n_win)

    # ---------------------------------------------------------------- set-up
    def text_prototypes(self, class_name: str) -> Tensor:
        """(2, D) [normal, anomalous] prompt-ensemble prototypes, encoded once per class name (in fp32)."""
        with autocast_off():  # cached and reused by fp32 runs: never encode them in bf16
            protos = self.text_cache.get(self.backbone, self.prompt_set, class_name, self.normalize_prompts, False)
        return protos.to(self.backbone.device)  # no-op unless the method was moved after encoding

    @torch.no_grad()
    def prepare(self, class_name: str, reference_images: Tensor | None = None) -> None:
        """Cache the class's text prototypes and, for WinCLIP+, build its memory from normal references.

        Args:
            class_name: object name used in the prompts.
            reference_images: (K, 3, S, S) CLIP-normalised normal images; required when ``k_shot`` > 0.
        """
        self.text_prototypes(class_name)
        if self.k_shot == 0:
            return
        if reference_images is None or reference_images.shape[0] != self.k_shot:
            got = None if reference_images is None else reference_images.shape[0]
            raise ValueError(f"WinCLIP: k_shot={self.k_shot} needs {self.k_shot} reference images, got {got}")
        window_scales = tuple(lvl for lvl in self.few_shot_levels if lvl != "patch")
        _, patch_tokens, window_emb = self._unpack(self.image_features(reference_images))
        memory: dict[str | int, Tensor] = {k: window_emb[k].flatten(0, 1) for k in window_scales}  # (K·n_win, D)
        if "patch" in self.few_shot_levels:
            memory["patch"] = patch_tokens.flatten(0, 1)  # (K·P, W)
        self.memory[class_name] = memory

    # ---------------------------------------------------------------- features
    def window_embeddings(self, tokens: Tensor, scale: int) -> Tensor:
        """Re-encode every k×k window (CLS + its patch tokens) through the whole vision transformer.

        Args:
            tokens: (B, 1+P, W) tokens before ``ln_pre`` (positional embedding added), from ``backbone.embed``.
            scale: window side k.

        Returns:
            (B, n_win, D) ``ln_post(CLS) @ proj`` of every window.
        """
        sequence = getattr(self, f"window_sequence_{scale}")  # (n_win, 1+k²)
        cls = []
        # Chunks of windows, each for every image at once: the chunk count does not depend on B (export traces
        # this code with a dynamic batch axis). blocks() keeps open_clip's batch-first layout.
        for chunk in sequence.split(self.window_chunk):  # (c, 1+k²)
            windows = tokens[:, chunk].flatten(0, 1)  # (B·c, 1+k², W)
            cls.append(self.backbone.blocks(windows)[0][:, 0].view(-1, len(chunk), tokens.shape[-1]))  # (B, c, W)
        return self.backbone.project(torch.cat(cls, dim=1))  # (B, n_win, D)

    def encode(self, images: Tensor, scales: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """Full-image embedding, patch tokens and window embeddings.

        Args:
            images: (B, 3, S, S) CLIP-normalised.
            scales: window scales to encode (default: all).

        Returns:
            embedding (B, D) ``ln_post(CLS) @ proj``; patch tokens (B, P, W) ``ln_post``, unprojected;
            scale -> (B, n_win, D) window embeddings.
        """
        tokens = self.backbone.embed(images)  # (B, 1+P, W)
        final, _ = self.backbone.blocks(tokens)
        final = self.backbone.visual.ln_post(final)  # (B, 1+P, W)
        embedding = final[:, 0] @ self.backbone.visual.proj  # (B, D)
        scales = self.scales if scales is None else scales
        return embedding, final[:, 1:], {k: self.window_embeddings(tokens, k) for k in scales}

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """:meth:`encode` as a dict of (B, ...) tensors (what a feature cache stores)."""
        embedding, patch_tokens, windows = self.encode(images)
        return {"embedding": embedding, "patch_tokens": patch_tokens, **{f"window_{k}": e for k, e in windows.items()}}

    def _unpack(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        windows = {k: features[f"window_{k}"] for k in self.scales}
        return features["embedding"], features["patch_tokens"], windows

    def feature_signature(self) -> dict:
        """Settings that determine the frozen features (the feature-cache key); k_shot is not one of them."""
        return {**super().feature_signature(), "scales": list(self.scales), "window_stride": self.window_stride}

    # ---------------------------------------------------------------- scoring
    @fp32
    def class_scores(self, embeddings: Tensor, prototypes: Tensor) -> Tensor:
        """Anomalous-class probability softmax([cos(e, g0), cos(e, g1)] / τ)[1].

        Args:
            embeddings: (B, N, D).
            prototypes: (B, 2, D) per-image [normal, anomalous] prototypes, or (2, D) shared.

        Returns:
            (B, N) scores in [0, 1].
        """
        protos = F.normalize(prototypes, dim=-1).expand(embeddings.shape[0], 2, -1)  # (B, 2, D)
        cos = F.normalize(embeddings, dim=-1) @ protos.transpose(1, 2)  # (B, N, 2)
        return (cos / self.temperature).softmax(dim=-1)[..., 1]

    @fp32
    def harmonic_aggregate(self, window_scores: Tensor, scale: int) -> Tensor:
        """Per-patch harmonic mean of the scores of the windows covering it: M(p) = |W_p| / Σ 1/s_w.

        A zero score (or an uncovered patch) gives 0, as anomalib's ``nan_to_num(posinf=0)``.

        Args:
            window_scores: (B, n_win) in [0, 1].
            scale: window side k.

        Returns:
            (B, G, G) grid map.
        """
        coverage = getattr(self, f"coverage_{scale}")  # (P, n_win)
        inv, zero = _safe_inverse(window_scores)  # (B, n_win)
        # inf·0 in the matmul would poison every patch, so zero scores are masked out and flagged instead.
        hits_zero = (zero.to(coverage.dtype) @ coverage.T) > 0  # (B, P)
        grid_map = (coverage.sum(1) / (inv @ coverage.T)).nan_to_num(nan=0.0, posinf=0.0)  # (B, P)
        grid = self.backbone.grid_size
        return grid_map.masked_fill(hits_zero, 0.0).view(-1, grid, grid)

    def zero_shot_grid(self, image_scores: Tensor, window_scores: dict[int, Tensor]) -> Tensor:
        """Multi-scale harmonic map M0 = (n+1) / (1/s_img + Σ_k 1/M_k).

        Args:
            image_scores: (B,) class scores of the full images.
            window_scores: scale -> (B, n_win) class scores of the windows.

        Returns:
            (B, G, G) zero-shot grid map.
        """
        flip = self.harmonic_on == "normality"  # caoyunkang/WinClip averages P(normal), reports 1 - result
        img = 1 - image_scores if flip else image_scores
        inv_sum = 1.0 / img.view(-1, 1, 1)  # (B, 1, 1)
        for k in self.scales:
            scores = 1 - window_scores[k] if flip else window_scores[k]
            inv_sum = inv_sum + 1.0 / self.harmonic_aggregate(scores, k)  # (B, G, G)
        grid_map = (len(self.scales) + 1) / inv_sum  # inf (a zero score) -> 0
        grid_map = grid_map.expand(-1, self.backbone.grid_size, self.backbone.grid_size)
        return 1 - grid_map if flip else grid_map

    def association_scores(self, queries: Tensor, memory: Tensor) -> Tensor:
        """a(q) = min_r (1 - cos(q, r)) / 2 against one flattened memory level.

        Args:
            queries: (B, N, C).
            memory: (M, C).

        Returns:
            (B, N) scores in [0, 1].
        """
        return (min_cosine_distance(queries.flatten(0, 1), memory) / 2).view(queries.shape[:2])

    def few_shot_level_maps(
        self, patch_tokens: Tensor, window_emb: dict[int, Tensor], memory: dict[str | int, Tensor]
    ) -> dict[str | int, Tensor]:
        """Per-level few-shot grid maps against one class's memory.

        Args:
            patch_tokens: (B, P, W) ``ln_post`` patch tokens.
            window_emb: scale -> (B, n_win, D).
            memory: level -> (K·n, C) from :meth:`prepare`.

        Returns:
            level -> (B, G, G).
        """
        grid = self.backbone.grid_size
        maps: dict[str | int, Tensor] = {}
        for level in self.few_shot_levels:
            if level == "patch":
                maps[level] = self.association_scores(patch_tokens, memory[level]).view(-1, grid, grid)
            else:
                maps[level] = self.harmonic_aggregate(self.association_scores(window_emb[level], memory[level]), level)
        return maps

    def few_shot_mean(
        self, patch_tokens: Tensor, window_emb: dict[int, Tensor], memory: dict[str | int, Tensor]
    ) -> Tensor:
        """M_few of one class: arithmetic mean of the :meth:`few_shot_level_maps`, (B, G, G) in float32 or wider."""
        grid_map = torch.stack(list(self.few_shot_level_maps(patch_tokens, window_emb, memory).values())).mean(dim=0)
        return grid_map.to(torch.promote_types(grid_map.dtype, torch.float32))

    def few_shot_grid(self, patch_tokens: Tensor, window_emb: dict[int, Tensor], class_names: list[str]) -> Tensor:
        """M_few: arithmetic mean of the level maps, each image against its own class's memory.

        Args:
            patch_tokens: (B, P, W).
            window_emb: scale -> (B, n_win, D).
            class_names: B class names, each prepared with references.

        Returns:
            (B, G, G).
        """
        grid = self.backbone.grid_size
        dtype = torch.promote_types(patch_tokens.dtype, torch.float32)  # bf16 tokens under autocast: fp32 map
        out = patch_tokens.new_empty(len(class_names), grid, grid, dtype=dtype)
        for name in dict.fromkeys(class_names):
            if name not in self.memory:
                raise ValueError(f"WinCLIP: k_shot={self.k_shot} but prepare({name!r}, references) was not called")
            sel = torch.tensor([i for i, n in enumerate(class_names) if n == name], device=out.device)
            out[sel] = self.few_shot_mean(
                patch_tokens[sel], {k: e[sel] for k, e in window_emb.items()}, self.memory[name]
            ).to(dtype)
        return out

    def _fuse(self, zero_shot: Tensor, few_shot: Tensor) -> Tensor:
        if self.fusion == "mean":
            return (zero_shot + few_shot) / 2
        return (1.0 / (1.0 / zero_shot + 1.0 / few_shot)).nan_to_num(nan=0.0)  # caoyunkang/WinClip

    def class_constants(self, class_name: str) -> dict[str, Tensor]:
        """``prototypes`` (2, D) [normal, anomalous] text prototypes; for WinCLIP+ ``memory_<level>`` (K·n, C)."""
        constants = {"prototypes": self.text_prototypes(class_name)}
        if self.k_shot > 0:
            if class_name not in self.memory:
                raise ValueError(
                    f"WinCLIP: k_shot={self.k_shot} but prepare({class_name!r}, references) was not called"
                )
            constants.update({f"memory_{level}": m for level, m in self.memory[class_name].items()})
        return constants

    def grid_scores(self, features: dict[str, Tensor], constants: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Image scores and grid maps of one class before upsampling.

        Args:
            features: :meth:`encode_images` output of B images.
            constants: :meth:`class_constants` of their class.

        Returns:
            scores (B,); grid maps (B, G, G) (zero-shot M0, or the fused map for WinCLIP+).
        """
        embedding, patch_tokens, window_emb = self._unpack(features)
        protos = constants["prototypes"]  # (2, D), shared by the batch
        image_scores = self.class_scores(embedding[:, None], protos)[:, 0]  # (B,)
        window_scores = {k: self.class_scores(e, protos) for k, e in window_emb.items()}  # (B, n_win)
        grid_map = self.zero_shot_grid(image_scores, window_scores)  # (B, G, G)
        scores = image_scores
        if self.k_shot > 0:
            memory = {level: constants[f"memory_{level}"] for level in self.few_shot_levels}
            few = self.few_shot_mean(patch_tokens, window_emb, memory)  # (B, G, G)
            grid_map = self._fuse(grid_map, few)
            scores = self._fuse(image_scores, few.flatten(1).amax(dim=1))  # max on the grid, as anomalib
        if self.image_score == "map_max":
            scores = grid_map.flatten(1).amax(dim=1)
        return scores, grid_map

    @torch.no_grad()
    def predict_grid(self, images: Tensor, class_names: list[str]) -> tuple[Tensor, Tensor]:
        """:meth:`grid_scores` of (B, 3, S, S) images of one class (``class_names``: B copies of its name)."""
        if len(class_names) != images.shape[0] or len(set(class_names)) != 1:
            raise ValueError(f"WinCLIP.predict_grid: {images.shape[0]} images of one class, got names {class_names}")
        return self.grid_scores(self.image_features(images), self.class_constants(class_names[0]))

    @torch.no_grad()
    def score(
        self, images: Tensor, constants: dict[str, Tensor], features: dict[str, Tensor] | None = None
    ) -> Prediction:
        """The eval forward of (B, 3, S, S) CLIP-normalised images of one class (what export traces).

        Args:
            images: (B, 3, S, S) CLIP-normalised.
            constants: :meth:`class_constants` of their class.
            features: their :meth:`encode_images` output when already computed.

        Returns:
            Prediction with pred_score (B,) and anomaly_map (B, S, S), both clamped to [0, 1].
        """
        features = self.image_features(images) if features is None else features
        scores, grid_map = self.grid_scores(features, constants)
        pixel = F.interpolate(grid_map[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        pixel = gaussian_blur(pixel, self.smoothing_sigma)  # (B, S, S)
        return Prediction(pred_score=scores.clamp(0, 1), anomaly_map=pixel.clamp(0, 1))

    @torch.no_grad()
    def forward(self, images: Tensor, class_names: list[str]) -> Prediction:
        """Score a batch: :meth:`score` per class (batches may mix classes), then a finite check.

        Args:
            images: (B, 3, S, S) CLIP-normalised.
            class_names: B class names.

        Returns:
            Prediction with pred_score (B,) and anomaly_map (B, S, S), both in [0, 1].
        """
        if len(class_names) != images.shape[0]:
            raise ValueError(f"WinCLIP: {images.shape[0]} images but {len(class_names)} class names")
        pred = super().forward(images, class_names, self.image_features(images))  # one pass for a mixed batch
        if not (torch.isfinite(pred.pred_score).all() and torch.isfinite(pred.anomaly_map).all()):
            raise FloatingPointError("WinCLIP produced non-finite scores")
        return pred
