"""APRIL-GAN (Chen et al., VAND 2023): per-stage learned linear maps of CLIP patch tokens + k-shot memory.

Numerics follow ByChelsea/VAND-APRIL-GAN (``model.py``, ``test.py``, ``train.py``, ``few_shot.py``): raw
residual tokens of a few blocks (no ``ln_post``) -> ``Linear_s`` -> cosine with a fixed prompt ensemble ->
logits upsampled bilinearly (align_corners=True) *before* the 2-way softmax. Only the projections learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmad.backbones import ClipBackbone
from vlmad.methods.base import AnomalyMethod, Prediction
from vlmad.methods.ops import autocast_off, dice_loss, focal_loss, fp32, gaussian_blur, min_cosine_distance
from vlmad.methods.prompts import get_prompt_set

STAGE_REDUCE = ("sum", "mean")
IMAGE_SCORES = ("text", "map_max", "fusion")
IMAGE_FUSIONS = ("fixed", "transductive_minmax")
# One text cache per backbone object, shared by every AprilGAN on it and freed with it (keying a global cache
# by id() could hand a new random-weights backbone the features of a collected one).


class AprilGAN(AnomalyMethod):
    """APRIL-GAN zero-shot (trained projections) and k-shot (raw-token memory) anomaly detection.

    Args:
        backbone: frozen CLIP; ``image_size`` already set (518 for the paper).
        k_shot: reference images per category (0 = zero-shot).
        feature_layers: 0-based blocks feeding the projections (paper: 5, 11, 17, 23 = "layers 6..24").
        few_shot_layers: 0-based blocks of the memory; None = ``feature_layers`` (the reference's setting).
        prompts: prompt-set name in ``vlmad.methods.prompts.PROMPT_SETS`` or a dict of state/template lists.
        temperature: logits = cos / temperature (reference: fixed 100, not CLIP's logit_scale).
        upsample_align_corners: bilinear upsampling of logits and few-shot grids (reference: True).
        stage_reduce: ``sum`` = reference map (range [0, n], k-shot [0, n + 2 n_fs]); ``mean`` divides it by
            that range, keeping the map in [0, 1] with the reference's exact ranking.
        smoothing_sigma: Gaussian smoothing of the map in pixels (reference: none).
        image_score: ``text`` = global CLIP text probability (zero-shot) and the reference's fused score in
            k-shot mode; ``map_max`` = max of the [0, 1] map; ``fusion`` = ½(text + map max) also zero-shot.
        image_fusion: k-shot fusion. ``fixed`` = ½(text + max of the [0, 1] map), per image;
            ``transductive_minmax`` = the reference's min-max of the map maxima over the whole test set of
            a category (parity only, see :meth:`fuse_scores_minmax`): scored on the category-level path
            (:meth:`accumulate`, :meth:`score_accumulated`); ``forward`` refuses it.
        class_names: map ``batch["category"]`` -> prompt name, used by ``loss`` when the batch has no
            ``class_name`` entry (identity for categories not in it).
    """

    trainable = True
    cacheable = True  # encode_images is the frozen tower alone (the learned linear layers sit on its taps)
    tensor_state = ("_memory", "_parts")  # few-shot memories follow .to() / .cuda() (AnomalyMethod._apply)

    @classmethod
    def protocol_of(cls, settings: Mapping) -> str | None:
        """``transductive_minmax`` k-shot scores depend on the category's other test images: label them."""
        fused = settings.get("k_shot") and settings.get("image_score", "text") == "text"
        if fused and settings.get("image_fusion") == "transductive_minmax":
            return "transductive k-shot (image scores min-max normalised over each category's test images)"
        return None

    def __init__(
        self,
        backbone: ClipBackbone,
        k_shot: int = 0,
        feature_layers: Sequence[int] = (5, 11, 17, 23),
        few_shot_layers: Sequence[int] | None = None,
        prompts: str | dict = "aprilgan",
        temperature: float = 0.01,
        upsample_align_corners: bool = True,
        stage_reduce: str = "mean",
        smoothing_sigma: float = 0.0,
        image_score: str = "text",
        image_fusion: str = "fixed",
        class_names: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(backbone, k_shot)
        self.feature_layers = [int(i) for i in feature_layers]
        fs_layers = self.feature_layers if few_shot_layers is None else few_shot_layers
        self.few_shot_layers = [int(i) for i in fs_layers]
        for name, value, allowed in [
            ("stage_reduce", stage_reduce, STAGE_REDUCE),
            ("image_score", image_score, IMAGE_SCORES),
            ("image_fusion", image_fusion, IMAGE_FUSIONS),
        ]:
            if value not in allowed:
                raise ValueError(f"AprilGAN: unknown {name}={value!r}; expected one of {allowed}")
        if not self.feature_layers or not self.few_shot_layers:
            raise ValueError("AprilGAN: feature_layers and few_shot_layers must not be empty")
        if self.k_shot < 0 or temperature <= 0 or smoothing_sigma < 0:
            raise ValueError(
                f"AprilGAN: need k_shot >= 0, temperature > 0, smoothing_sigma >= 0 "
                f"(got {k_shot}, {temperature}, {smoothing_sigma})"
            )
        backbone.check_layers(self.feature_layers)
        backbone.check_layers(self.few_shot_layers)
        self.prompt_set = get_prompt_set(prompts)
        self.prompts_name = prompts if isinstance(prompts, str) else "custom"
        self.temperature = float(temperature)
        self.align_corners = bool(upsample_align_corners)
        self.stage_reduce = stage_reduce
        self.smoothing_sigma = float(smoothing_sigma)
        self.image_score = image_score
        self.image_fusion = image_fusion
        self.class_names = dict(class_names or {})
        self.projections = nn.ModuleList(
            nn.Linear(backbone.width, backbone.embed_dim, bias=True) for _ in self.feature_layers
        )
        self._memory: dict[str, Tensor] = {}  # class name -> (n_fs, K*P, W) raw reference tokens
        self._parts: list[tuple[Tensor, Tensor, Tensor]] = []  # transductive_minmax: per batch (maps, text, max)

    # ---------------------------------------------------------------- set-up
    def text_features(self, class_name: str) -> Tensor:
        """Prompt-ensemble prototypes of one object name, encoded once per name (and backbone).

        Returns:
            (2, D) L2-normalised rows [normal, anomalous].
        """
        # Each sentence normalised, group mean re-normalised (reference prompt_ensemble.py).
        with autocast_off():  # cached and reused by fp32 runs: never encode them in bf16
            feats = self.text_cache.get(self.backbone, self.prompt_set, class_name, True, True)
        return feats.to(self.projections[0].weight.device)

    def _batch_text_features(self, class_names: Sequence[str]) -> Tensor:
        # Each image gets its own class (the reference takes the batch's first class: only right at batch 1).
        return torch.stack([self.text_features(name) for name in class_names])  # (B, 2, D)

    def prepare(self, class_name: str, reference_images: Tensor | None = None) -> None:
        """Encode the class prompts and, when ``k_shot`` > 0, store the reference tokens as memory.

        Args:
            class_name: object name used in prompts.
            reference_images: (K, 3, S, S) normal images of the category (needed when ``k_shot`` > 0).
        """
        self.text_features(class_name)
        self._parts = []
        if self.k_shot == 0:
            return
        if reference_images is None or reference_images.shape[0] == 0:
            raise ValueError(f"AprilGAN(k_shot={self.k_shot}) needs reference images for {class_name!r}")
        tokens = self._few_shot_tokens(self.image_features(reference_images))  # (K, n_fs, P, W)
        # All K images' patches concatenated per stage, reference image 0 first (few_shot.py).
        self._memory[class_name] = tokens.transpose(0, 1).flatten(1, 2)  # (n_fs, K*P, W)

    # ---------------------------------------------------------------- frozen image side
    def _few_shot_separate(self) -> bool:
        return self.k_shot > 0 and self.few_shot_layers != self.feature_layers

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """Frozen CLIP features, the only image-dependent input of ``forward`` and ``loss``.

        Args:
            images: (B, 3, S, S) CLIP-normalised.

        Returns:
            ``global``: (B, D) ``ln_post(CLS) @ proj``; ``stages``: (B, n_stages, P, W) raw tapped tokens
            without CLS; ``few_shot_stages``: (B, n_fs, P, W), only if the few-shot taps differ.
        """
        taps = sorted(set(self.feature_layers) | (set(self.few_shot_layers) if self.k_shot else set()))
        out = self.backbone.encode_image(images, taps)
        feats = {
            "global": out.embedding,  # (B, D)
            "stages": torch.stack([out.intermediates[i][:, 1:] for i in self.feature_layers], 1),
        }
        if self._few_shot_separate():
            feats["few_shot_stages"] = torch.stack([out.intermediates[i][:, 1:] for i in self.few_shot_layers], 1)
        return feats

    def _few_shot_tokens(self, features: dict[str, Tensor]) -> Tensor:
        return features["few_shot_stages"] if self._few_shot_separate() else features["stages"]

    # ---------------------------------------------------------------- maps
    def _upsample(self, grids: Tensor) -> Tensor:
        size = self.backbone.image_size
        return F.interpolate(grids, size=(size, size), mode="bilinear", align_corners=self.align_corners)

    @fp32  # the projections too: cos / 0.01 turns a bf16 cosine error of ~4e-3 into 0.4 of logit
    def stage_logits(self, stage_tokens: Tensor, text_feats: Tensor) -> Tensor:
        """Patch logits of every stage before upsampling.

        Args:
            stage_tokens: (B, n_stages, P, W) raw tokens.
            text_feats: (B, 2, D) normalised prototypes per image.

        Returns:
            (B, n_stages, P, 2) logits = cos / temperature, channels [normal, anomalous].
        """
        weight = self.projections[0].weight
        projected = torch.stack(
            [proj(stage_tokens[:, s].to(weight.dtype)) for s, proj in enumerate(self.projections)], 1
        )  # (B, n, P, D)
        projected = F.normalize(projected, dim=-1)
        return torch.einsum("bnpd,bcd->bnpc", projected, text_feats.to(weight.dtype)) / self.temperature

    def stage_maps(self, stage_tokens: Tensor, text_feats: Tensor) -> Tensor:
        """Per-stage normal/anomalous probabilities at image resolution.

        Args:
            stage_tokens: (B, n_stages, P, W) raw tokens.
            text_feats: (B, 2, D) normalised prototypes per image.

        Returns:
            (B, n_stages, 2, S, S) probabilities (softmax over the 2 channels).
        """
        logits = self.stage_logits(stage_tokens, text_feats)  # (B, n, P, 2)
        b, n = logits.shape[:2]
        g = self.backbone.grid_size
        grids = logits.permute(0, 1, 3, 2).reshape(b * n, 2, g, g)  # row-major patches
        # Reference quirk kept: logits (not probabilities) are upsampled, softmax after.
        probs = self._upsample(grids).softmax(dim=1)  # (B*n, 2, S, S)
        return probs.reshape(b, n, 2, *probs.shape[-2:])

    def few_shot_distances(self, stage_tokens: Tensor, class_names: Sequence[str] | None = None) -> Tensor:
        """Per-stage distance of each patch to its class memory (few_shot.py), before upsampling.

        Args:
            stage_tokens: (B, n_fs, P, W) raw tokens at ``few_shot_layers``.
            class_names: class of each image; None is allowed when exactly one class is prepared.

        Returns:
            (B, n_fs, P) min over the memory of (1 - cos), in [0, 2] (no /2, as the reference).
        """
        b, n, p, _ = stage_tokens.shape
        if class_names is None:
            if len(self._memory) != 1:
                raise ValueError(f"few_shot_maps needs class_names: memory holds {sorted(self._memory)}")
            class_names = list(self._memory) * b
        dist = stage_tokens.new_empty(b, n, p, dtype=torch.promote_types(stage_tokens.dtype, torch.float32))
        for name in dict.fromkeys(class_names):
            idx = [i for i, c in enumerate(class_names) if c == name]
            dist[idx] = self.memory_distances(stage_tokens[idx], self._class_memory(name)).to(dist.dtype)
        return dist

    def _class_memory(self, class_name: str) -> Tensor:
        if class_name not in self._memory:
            raise RuntimeError(f"AprilGAN: no few-shot memory for {class_name!r}; call prepare() with references")
        return self._memory[class_name]

    def memory_distances(self, stage_tokens: Tensor, memory: Tensor) -> Tensor:
        """Per-stage distance of each patch to one class's memory, before upsampling.

        Args:
            stage_tokens: (B, n_fs, P, W) raw tokens at ``few_shot_layers``.
            memory: (n_fs, K*P, W) the class's reference tokens from :meth:`prepare`.

        Returns:
            (B, n_fs, P) min over the memory of (1 - cos), in [0, 2], float32 or wider.
        """
        p, dtype = stage_tokens.shape[2], torch.promote_types(stage_tokens.dtype, torch.float32)
        stages = zip(stage_tokens.unbind(1), memory.to(stage_tokens.device).unbind(0), strict=True)
        dist = [min_cosine_distance(tokens.flatten(0, 1), mem).view(-1, p).to(dtype) for tokens, mem in stages]
        return torch.stack(dist, dim=1)  # (B, n_fs, P)

    def few_shot_maps(self, stage_tokens: Tensor, class_names: Sequence[str] | None = None) -> Tensor:
        """:meth:`few_shot_distances` on the patch grid, upsampled bilinearly to the image size.

        Returns:
            (B, n_fs, S, S) distances in [0, 2].
        """
        return self._upsample_distances(self.few_shot_distances(stage_tokens, class_names))

    def _upsample_distances(self, dist: Tensor) -> Tensor:
        """(B, n, P) patch distances -> (B, n, S, S) bilinearly upsampled."""
        n, g, size = dist.shape[1], self.backbone.grid_size, self.backbone.image_size
        return self._upsample(dist.reshape(-1, 1, g, g)).view(-1, n, size, size)

    # ---------------------------------------------------------------- scores
    @fp32
    def text_probs(self, global_emb: Tensor, text_feats: Tensor) -> Tensor:
        """Plain CLIP zero-shot probabilities from the global embedding (the projections are not used).

        Args:
            global_emb: (B, D) ``ln_post(CLS) @ proj``, not normalised.
            text_feats: (B, 2, D) per-image prototypes.

        Returns:
            (B, 2) softmax over [normal, anomalous].
        """
        g = F.normalize(global_emb, dim=-1)
        return (torch.einsum("bd,bcd->bc", g, text_feats.to(g.dtype)) / self.temperature).softmax(dim=-1)

    @staticmethod
    def fuse_scores_minmax(text_probs: Tensor, map_max: Tensor) -> Tensor:
        """Reference k-shot image score: ½(text prob + min-max of the map maxima over the given images).

        Transductive: the normalisation uses every test image of a category, so it is only valid on the full
        set of a category's scores, never per batch. Equal maxima give NaN, as in the reference.

        Args:
            text_probs: (N,) anomalous text probability of every test image of one category.
            map_max: (N,) per-image max of the reference's summed k-shot map.

        Returns:
            (N,) float64 fused scores.
        """
        m = map_max.double()
        return 0.5 * (text_probs.double() + (m - m.min()) / (m.max() - m.min()))

    def _score_mode(self) -> str:
        """``text`` / ``map_max`` / ``fusion``: the per-image score (refuses the transductive k-shot fusion)."""
        # The reference's k-shot score is the fusion; image_score="text" means "as the reference".
        mode = "fusion" if self.k_shot and self.image_score == "text" else self.image_score
        if mode == "fusion" and self.transductive:
            raise RuntimeError(
                "image_fusion='transductive_minmax' normalises over all test images of a category; it cannot "
                "score a batch: accumulate every batch of the category, then score_accumulated (the module does), "
                "or call fuse_scores_minmax on the whole category's text probabilities and map maxima."
            )
        return mode

    def class_constants(self, class_name: str) -> dict[str, Tensor]:
        """``text`` (2, D) prompt prototypes; with ``k_shot`` > 0 ``memory`` (n_fs, K*P, W) reference tokens."""
        constants = {"text": self.text_features(class_name)}
        if self.k_shot:
            constants["memory"] = self._class_memory(class_name)
        return constants

    def score(
        self, images: Tensor, constants: dict[str, Tensor], features: dict[str, Tensor] | None = None
    ) -> Prediction:
        """The eval forward of (B, 3, S, S) images of one class (what export traces).

        Args:
            images: (B, 3, S, S) CLIP-normalised (unused when ``features`` are given).
            constants: :meth:`class_constants` of their class.
            features: optional output of :meth:`encode_images` for these images.

        Returns:
            Prediction with (B,) scores and (B, S, S) maps ([0, 1] unless ``stage_reduce="sum"``).
        """
        mode = self._score_mode()
        feats = self.image_features(images) if features is None else features
        text_feats = constants["text"].expand(feats["global"].shape[0], -1, -1)  # (B, 2, D)
        dist = None
        if self.k_shot:
            dist = self._upsample_distances(self.memory_distances(self._few_shot_tokens(feats), constants["memory"]))
        amap, text_score, map_max = self._combine(feats, text_feats, dist)
        score = {"text": text_score, "map_max": map_max, "fusion": 0.5 * (text_score + map_max)}[mode]
        return Prediction(pred_score=score, anomaly_map=amap)

    def forward(
        self, images: Tensor, class_names: Sequence[str], features: dict[str, Tensor] | None = None
    ) -> Prediction:
        """Score a batch: :meth:`score` per class (batches may mix classes).

        Args:
            images: (B, 3, S, S) CLIP-normalised (unused when ``features`` are given).
            class_names: prompt name of each image (``batch["class_name"]``).
            features: optional output of :meth:`encode_images` for these images.

        Returns:
            Prediction with (B,) scores and (B, S, S) maps ([0, 1] unless ``stage_reduce="sum"``).
        """
        self._score_mode()  # the transductive refusal comes before any class look-up
        features = self.image_features(images) if features is None else features  # one pass for a mixed batch
        return super().forward(images, list(class_names), features)

    @property
    def transductive(self) -> bool:
        """True for the reference's k-shot fusion with ``transductive_minmax`` (scored per category)."""
        return bool(self.k_shot) and self.image_score == "text" and self.image_fusion == "transductive_minmax"

    def accumulate(self, images: Tensor, class_names: list[str] | None = None) -> None:
        """Keep the maps, text probabilities and map maxima of (B, 3, S, S) images until the category ends."""
        if class_names is None:
            raise ValueError("AprilGAN.accumulate needs the class (prompt) name of every image")
        self._parts.append(self._batch_parts(images, class_names))

    def score_accumulated(self) -> Prediction:
        """Fuse all accumulated images with :meth:`fuse_scores_minmax` (min-max over the category), then clear."""
        if not self._parts:
            raise RuntimeError("AprilGAN: nothing accumulated since prepare()")
        maps, text, maxima = (torch.cat(p) for p in zip(*self._parts, strict=True))
        self._parts = []
        # The [0, 1] map is the reference's summed map over a constant: min-max of the maxima is the same.
        return Prediction(pred_score=self.fuse_scores_minmax(text, maxima).to(text.dtype), anomaly_map=maps)

    def _batch_parts(
        self, images: Tensor, class_names: Sequence[str], features: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, S, S) output map, (B,) anomalous text probability and (B,) max of the [0, 1] map of a batch."""
        feats = self.image_features(images) if features is None else features
        dist = self.few_shot_maps(self._few_shot_tokens(feats), class_names) if self.k_shot else None
        return self._combine(feats, self._batch_text_features(class_names), dist)

    def _combine(
        self, feats: dict[str, Tensor], text_feats: Tensor, dist: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Maps and scores from :meth:`encode_images` features, (B, 2, D) prototypes and (B, n_fs, S, S) distances.

        Returns:
            (B, S, S) output map, (B,) anomalous text probability, (B,) max of the [0, 1] map.
        """
        zero_shot = self.stage_maps(feats["stages"], text_feats)[:, :, 1]  # (B, n, S, S)
        unit_map, sum_map = zero_shot.mean(1), zero_shot.sum(1)  # (B, S, S)
        if dist is not None:
            # Reference: Σ P_s + Σ d_s, range [0, n + 2 n_fs]. The [0, 1] map divides that sum by its range, a
            # positive constant: the same ranking (AUROC, AP, AUPRO) as the reference's map.
            sum_map = sum_map + dist.sum(1)
            unit_map = sum_map / (zero_shot.shape[1] + 2 * dist.shape[1])
        unit_map = gaussian_blur(unit_map, self.smoothing_sigma)
        amap = gaussian_blur(sum_map, self.smoothing_sigma) if self.stage_reduce == "sum" else unit_map
        text_score = self.text_probs(feats["global"], text_feats)[:, 1]  # (B,)
        # Map-based scores always use the [0, 1] map, so they stay per-image and bounded.
        return amap, text_score, unit_map.amax(dim=(1, 2))  # (B,)

    # ---------------------------------------------------------------- training
    def loss_parts(self, stage_probs: Tensor, gt: Tensor) -> Tensor:
        """Per-stage focal and Dice losses (train.py; no image-level term, no normal-class Dice).

        Args:
            stage_probs: (B, n_stages, 2, S, S) from :meth:`stage_maps`.
            gt: (B, S, S) {0, 1} masks.

        Returns:
            (n_stages, 2) rows [focal, dice].
        """
        parts = [
            torch.stack([focal_loss(stage_probs[:, s], gt), dice_loss(stage_probs[:, s, 1], gt)])
            for s in range(stage_probs.shape[1])
        ]
        return torch.stack(parts)

    def loss(self, batch: dict, features: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Σ_stages focal(P_s, gt) + dice(P_s[:, 1], gt) with each image's own class prompts.

        Args:
            batch: ``image`` (B, 3, S, S), ``mask`` (B, S, S) or (B, 1, S, S), and ``class_name`` (B,) prompt
                names or, without it, ``category`` (B,) mapped by ``class_names``.
            features: optional :meth:`encode_images` output for ``batch["image"]``.

        Returns:
            ``loss`` (scalar), ``focal`` and ``dice`` (summed over stages).
        """
        feats = self.image_features(batch["image"]) if features is None else features
        mask = batch["mask"]
        mask = mask[:, 0] if mask.dim() == 4 else mask
        size = self.backbone.image_size
        if tuple(mask.shape[-2:]) != (size, size):
            raise ValueError(f"AprilGAN.loss: mask size {tuple(mask.shape[-2:])} != image size {size}")
        gt = mask > 0.5  # (B, S, S)
        names = batch.get("class_name") or [self.class_names.get(c, c) for c in batch["category"]]
        probs = self.stage_maps(feats["stages"], self._batch_text_features(names))  # (B, n, 2, S, S)
        parts = self.loss_parts(probs, gt).sum(0)  # (2,)
        return {"loss": parts.sum(), "focal": parts[0], "dice": parts[1]}

    # ---------------------------------------------------------------- checkpoints
    def feature_signature(self) -> dict:
        """Everything that shapes :meth:`encode_images` (the feature-cache key)."""
        return {**self.hparams_for_checkpoint(), "k_shot": self.k_shot, "few_shot_layers": list(self.few_shot_layers)}

    def hparams_for_checkpoint(self) -> dict:
        """Settings a checkpoint must match (the k-shot memory is not learned: zero-shot projections serve k > 0)."""
        return {
            **super().hparams_for_checkpoint(),
            "feature_layers": list(self.feature_layers),
            "width": self.backbone.width,
            "embed_dim": self.backbone.embed_dim,
            "image_size": self.backbone.image_size,
            "prompts": self.prompts_name,
            "temperature": self.temperature,
        }

    @staticmethod
    def convert_official_checkpoint(state: dict) -> dict[str, Tensor]:
        """Map the reference checkpoint to :meth:`learned_state` keys.

        Args:
            state: ``torch.load`` of ``*_pretrained.pth``: ``{"trainable_linearlayer": {"fc.i.weight", ...}}``
                (the inner dict is accepted too).

        Returns:
            ``{"projections.i.weight": (D, W), "projections.i.bias": (D,)}``.
        """
        inner = state.get("trainable_linearlayer", state)
        out = {}
        for key, value in inner.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "fc" or parts[2] not in ("weight", "bias"):
                raise ValueError(f"unexpected key {key!r} in APRIL-GAN checkpoint (expected fc.<i>.weight/bias)")
            out[f"projections.{int(parts[1])}.{parts[2]}"] = value
        return out
