"""MuSc (Li et al., ICLR 2024): zero-shot anomaly scores by mutual scoring of a category's unlabelled test images.

Numerics follow xrli-U/MuSc @ b76b93d (``models/musc.py``, ``modules/_LNAMD.py``, ``_MSM.py``, ``_RsCIN.py``):
raw tokens of a few blocks (before ``ln_post``) -> LNAMD (LayerNorm over each image's whole (C, G, G) map, r x r
zero-padded mean, L2 normalisation) -> MSM (each patch's distance to its nearest patch in every *other* image,
mean of the 30 % smallest) -> maps averaged over taps and r, upsampled (align_corners=True) -> image score =
max of the upsampled map -> RsCIN re-scoring over the category's image embeddings. Nothing is learned, no text.

Transductive: a score exists only once the whole test set of a category is seen, so the module feeds every
batch to :meth:`MuSc.accumulate` and calls :meth:`MuSc.score_accumulated` at the category's end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmad.backbones import ClipBackbone
from vlmad.methods.base import AnomalyMethod, Prediction
from vlmad.methods.ops import autocast_off

PROTOCOL = "transductive zero-shot (mutual scoring over each category's unlabelled test images)"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Similarity block size of the chunked distances (elements of one (chunk*L, chunk*L) matmul output).
_BLOCK_ELEMENTS = {"cpu": 2**26, "cuda": 2**30}


def lnamd(tokens: Tensor, r: int, eps: float = 1e-5) -> Tensor:
    """Layer-normalised, neighbourhood-aggregated, L2-normalised patch features (``_LNAMD.py``).

    Args:
        tokens: (N, L, C) raw patch tokens of one tap, CLS dropped, patches row-major on a square grid.
        r: odd aggregation degree (1 = no aggregation).
        eps: LayerNorm epsilon.

    Returns:
        (N, L, C) float32 unit vectors.
    """
    n, length, c = tokens.shape
    g = math.isqrt(length)
    maps = tokens.float().transpose(1, 2).reshape(n, c, g, g)
    # One mean/variance per image over the whole (C, G, G) map (a fresh nn.LayerNorm([C, H, W])), not per token.
    maps = F.layer_norm(maps, (c, g, g), eps=eps)
    if r > 1:  # the reference's unfold + adaptive_avg_pool1d = a zero-padded mean that counts the padding
        maps = F.avg_pool2d(maps, r, stride=1, padding=r // 2, count_include_pad=True)
    return F.normalize(maps.flatten(2).transpose(1, 2), dim=-1)  # (N, L, C)


def nearest_patch_distances(feats: Tensor, chunk: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """d[i, p, j] = min_q ||feats[i, p] - feats[j, q]||₂ for every image pair, as chunked matmuls.

    ||a - b||² = 2 - 2 a·b on unit vectors; the max cosine is reduced right after each block's matmul, so no
    more than one (chunk·L, chunk·L) block exists at a time. Each block of image pairs is computed once and
    serves both directions (row maxima: i's patches vs j; column maxima: j's patches vs i).

    Args:
        feats: (N, L, C) unit rows.
        chunk: images per side of one matmul block.
        dtype: matmul dtype (float32 keeps the reference's precision; bf16/fp16 trade ~1e-3 cosine error).

    Returns:
        (N, L, N) float32 distances; d[i, :, i] = inf (an image never scores itself).
    """
    n, length, c = feats.shape
    flat = feats.to(dtype)
    best = feats.new_full((n, length, n), -2.0, dtype=torch.float32)  # max cosine
    for a in range(0, n, chunk):
        rows = flat[a : a + chunk]
        na = rows.shape[0]
        for b in range(a, n, chunk):
            cols = flat[b : b + chunk]
            nb = cols.shape[0]
            sim = (rows.reshape(na * length, c) @ cols.reshape(nb * length, c).T).view(na, length, nb, length)
            best[a : a + na, :, b : b + nb] = sim.amax(3)  # (na, L, nb)
            if b != a:  # the diagonal block's pairs are all covered by its row maxima
                best[b : b + nb, :, a : a + na] = sim.amax(1).permute(1, 2, 0)  # (nb, L, na)
    dist = (2 - 2 * best).clamp_min_(0).sqrt_()
    idx = torch.arange(n, device=feats.device)
    dist[idx, :, idx] = math.inf
    return dist


def interval(n_others: int, low: float, high: float) -> tuple[int, int]:
    """Sorted positions [lo, hi) averaged by MSM over ``n_others`` images (``_MSM.py``: fractions < 1, else counts)."""
    lo = int(n_others * low) if low < 1 else int(low)
    hi = int(n_others * high) if high < 1 else int(high)
    return lo, hi


def min_set_size(low: float, high: float) -> int:
    """Smallest set for which MSM's interval of other-image distances is non-empty (5 for [0, 0.3])."""
    return next(n for n in range(2, 10**6) if interval(n - 1, low, high)[1] > interval(n - 1, low, high)[0])


class MuSc(AnomalyMethod):
    """MuSc: LNAMD + mutual scoring + RsCIN on a frozen CLIP image tower (training-free, no text, k_shot 0).

    Args:
        backbone: frozen CLIP (paper: ViT-L-14-336, exact GELU, 518 px, position table resized bicubic
            without antialias).
        feature_layers: 0-based tapped blocks (reference ``feature_layers`` [5, 11, 17, 23]: it counts 1-based
            internally after adding 1, so these are the same blocks).
        r_list: odd LNAMD aggregation degrees.
        msm_interval: (low, high) of the sorted other-image distances averaged per patch (reference [0, 0.3]).
        rscin_windows: RsCIN window sizes (a list; [0] = RsCIN off), or a table {dataset: list, default: list}
            resolved with ``dataset`` (reference ``make_category_data``: mvtec [1, 2, 3], visa [1, 8, 9]).
        dataset: name or reader target of the evaluated dataset (e.g. ``vlmad.data.VisA``), picks the windows.
        precision: image-tower autocast and stored-feature dtype: fp32, fp16 (the reference's GPU autocast), bf16.
        distance_dtype: matmul dtype of the distances (fp32 = parity; bf16/fp16 faster, ~1e-3 off).
        distance_chunk: images per side of one distance block; None = sized by the device.
        k_shot: must be 0 (MuSc has no reference-image mode).
    """

    transductive = True
    cacheable = True  # frozen tower features (the tapped layers of the image tower)
    tensor_state = ("_taps", "_global")  # accumulated features follow .to() / .cuda() (AnomalyMethod._apply)

    @classmethod
    def protocol_of(cls, settings: Mapping) -> str:
        """Always transductive (see :data:`PROTOCOL`)."""
        return PROTOCOL

    @classmethod
    def min_test_images(cls, settings: Mapping) -> tuple[int, str]:
        """MSM's interval of other-image distances must be non-empty (5 images for the reference's [0, 0.3])."""
        low, high = settings.get("msm_interval") or (0.0, 0.3)
        n = min_set_size(float(low), float(high))
        return n, f"MuSc's mutual scoring with msm_interval [{low}, {high}] needs at least {n} test images"

    def __init__(
        self,
        backbone: ClipBackbone,
        feature_layers: Sequence[int] = (5, 11, 17, 23),
        r_list: Sequence[int] = (1, 3, 5),
        msm_interval: Sequence[float] = (0.0, 0.3),
        rscin_windows: Sequence[int] | Mapping[str, Sequence[int]] = (1, 2, 3),
        dataset: str | None = None,
        precision: str = "fp32",
        distance_dtype: str = "fp32",
        distance_chunk: int | None = None,
        k_shot: int = 0,
    ) -> None:
        super().__init__(backbone, k_shot)
        self.feature_layers = [int(i) for i in feature_layers]
        self.r_list = [int(r) for r in r_list]
        self.msm_interval = (float(msm_interval[0]), float(msm_interval[1]))
        self.rscin_windows = self._windows(rscin_windows, dataset)
        if not 0 <= self.msm_interval[0] < self.msm_interval[1]:
            raise ValueError(f"MuSc: msm_interval must be (low, high) with 0 <= low < high, got {msm_interval}")
        if self.k_shot != 0:
            raise ValueError("MuSc: k_shot must be 0 (it scores test images against each other, no references)")
        if not self.feature_layers or not self.r_list or any(r < 1 or r % 2 == 0 for r in self.r_list):
            raise ValueError(f"MuSc: need feature_layers and odd r_list values >= 1, got {self.r_list}")
        for name, value in [("precision", precision), ("distance_dtype", distance_dtype)]:
            if value not in PRECISIONS:
                raise ValueError(f"MuSc: unknown {name}={value!r}; expected one of {sorted(PRECISIONS)}")
        backbone.check_layers(self.feature_layers)
        self.precision, self.distance_dtype, self.distance_chunk = precision, distance_dtype, distance_chunk
        self._name = "?"
        self._taps: list[Tensor] = []  # per batch (B, T, L, C) in the precision's dtype
        self._global: list[Tensor] = []  # per batch (B, D) normalised image embeddings

    @staticmethod
    def _windows(windows: Sequence[int] | Mapping[str, Sequence[int]], dataset: str | None) -> list[int]:
        if isinstance(windows, Mapping):
            key = (dataset or "default").rsplit(".", 1)[-1].lower()
            windows = windows.get(key, windows.get("default"))
            if windows is None:
                raise ValueError(f"MuSc: rscin_windows has no entry for {key!r} and no 'default'")
        windows = [int(k) for k in windows]
        if not windows or any(k < 0 for k in windows):
            raise ValueError(f"MuSc: rscin_windows must be non-negative sizes, got {windows}")
        return windows

    # ---------------------------------------------------------------- features
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """Frozen features of (B, 3, S, S) CLIP-normalised images.

        Returns:
            ``taps``: (B, T, L, C) raw tokens of ``feature_layers`` without CLS (stored dtype = ``precision``);
            ``global``: (B, D) float32 L2-normalised ``ln_post(CLS) @ proj`` (RsCIN input).
        """
        dtype = PRECISIONS[self.precision]
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = self.backbone.encode_image(images, self.feature_layers)
        taps = torch.stack([out.intermediates[i][:, 1:] for i in self.feature_layers], 1)
        return {"taps": taps.to(dtype), "global": F.normalize(out.embedding.float(), dim=-1)}

    def prepare(self, class_name: str, reference_images: Tensor | None = None) -> None:
        """Start a fresh accumulation for one category (``class_name`` only names it in errors)."""
        self._name, self._taps, self._global = class_name, [], []

    def accumulate(self, images: Tensor, class_names: list[str] | None = None) -> None:
        """Encode (B, 3, S, S) images and keep their tapped tokens and embeddings, in order."""
        feats = self.image_features(images)
        self._taps.append(feats["taps"].to(PRECISIONS[self.precision]))
        self._global.append(feats["global"])

    def score_accumulated(self) -> Prediction:
        """Score all images accumulated since :meth:`prepare` as one set, then clear.

        Returns:
            Prediction with (N,) scores and (N, S, S) maps, in accumulation order.
        """
        if not self._taps:
            raise RuntimeError(f"MuSc: nothing accumulated for {self._name!r}")
        taps, emb = torch.cat(self._taps), torch.cat(self._global)
        self._taps, self._global = [], []
        return self.score_set(taps, emb)

    def forward(self, images: Tensor, class_names: Sequence[str] | None = None) -> Prediction:
        """Score ``images`` as one complete set (the batch *is* the category; the module uses accumulate).

        Args:
            images: (N, 3, S, S) CLIP-normalised, every test image of one category.
            class_names: unused (MuSc uses no text).
        """
        feats = self.encode_images(images)
        return self.score_set(feats["taps"], feats["global"])

    # ---------------------------------------------------------------- scoring
    def _chunk(self, feats: Tensor) -> int:
        if self.distance_chunk:
            return int(self.distance_chunk)
        rows = math.isqrt(_BLOCK_ELEMENTS.get(feats.device.type, _BLOCK_ELEMENTS["cpu"]))
        return max(1, rows // feats.shape[1])

    def check_set_size(self, n: int) -> tuple[int, int]:
        """MSM's [lo, hi) for a set of ``n`` images; raises when it is empty (the reference returns NaN)."""
        lo, hi = interval(n - 1, *self.msm_interval)
        if hi <= lo:
            raise ValueError(
                f"MuSc: {self._name!r} has {n} test images; mutual scoring averages the sorted other-image "
                f"distances at positions [{lo}, {hi}) (msm_interval {list(self.msm_interval)}), which needs at "
                f"least {min_set_size(*self.msm_interval)} images (the reference silently returns NaN)"
            )
        return lo, hi

    def mutual_scores(self, feats: Tensor) -> Tensor:
        """MSM of one (r, tap): (N, L, C) unit features -> (N, L) float64 mean of the interval of sorted distances."""
        lo, hi = self.check_set_size(feats.shape[0])
        dist = nearest_patch_distances(feats, self._chunk(feats), PRECISIONS[self.distance_dtype])  # (N, L, N)
        nearest = dist.topk(hi, dim=-1, largest=False).values[..., lo:hi]  # sorted ascending, self (inf) last
        return nearest.mean(-1).double()

    def patch_scores(self, taps: Tensor) -> Tensor:
        """(N, T, L, C) raw tokens -> (N, L) float64: mean over taps, then over r, of the mutual scores."""
        self.check_set_size(taps.shape[0])
        per_r = [
            torch.stack([self.mutual_scores(lnamd(taps[:, t], r)) for t in range(taps.shape[1])]).mean(0)
            for r in self.r_list
        ]
        return torch.stack(per_r).mean(0)

    def pixel_maps(self, scores: Tensor) -> Tensor:
        """(N, L) patch scores -> (N, S, S) float64, bilinear with align_corners=True (no smoothing)."""
        g, size = math.isqrt(scores.shape[1]), self.backbone.image_size
        grid = scores.view(-1, 1, g, g)
        return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)[:, 0]

    def rscin(self, raw: Tensor, emb: Tensor, windows: Sequence[int] | None = None) -> Tensor:
        """RsCIN: min-max normalised raw scores re-scored over each image's k most similar images, mean over k.

        Args:
            raw: (N,) raw image scores (max of the upsampled map).
            emb: (N, D) L2-normalised image embeddings.
            windows: window sizes (default ``rscin_windows``); a 0 returns ``raw`` unchanged.

        Returns:
            (N,) float32 scores in [0, 1] (or ``raw`` when RsCIN is off).
        """
        windows = self.rscin_windows if windows is None else list(windows)
        if 0 in windows:
            return raw
        n = raw.shape[0]
        if max(windows) > n:
            raise ValueError(f"MuSc: RsCIN window {max(windows)} > {n} test images of {self._name!r}")
        span = raw.max() - raw.min()
        # Equal raw scores make the reference's min-max NaN; all-equal scores stay equal (0) here.
        s = (raw - raw.min()) / span if span > 0 else torch.zeros_like(raw)
        sim = emb.float() @ emb.float().T  # (N, N) raw cosines, no temperature
        rescored = []
        for k in windows:
            top, idx = sim.topk(k, dim=1)  # (N, k), self included
            rescored.append((top.double() / top.double().sum(1, keepdim=True) * s[idx].double()).sum(1))
        return torch.stack(rescored).mean(0).float()

    def score_set(self, taps: Tensor, emb: Tensor) -> Prediction:
        """Score one complete set.

        Args:
            taps: (N, T, L, C) raw tokens of every image of the category.
            emb: (N, D) normalised image embeddings.

        Returns:
            Prediction: (N,) scores (RsCIN in [0, 1]) and (N, S, S) maps = the reference's distances / 2 (unit
            vectors are at most 2 apart), so both lie in [0, 1]; every metric is invariant to the factor.
        """
        # distances in distance_dtype by explicit casts only: an outer bf16-mixed autocast must not lower them
        with autocast_off():
            maps = self.pixel_maps(self.patch_scores(taps))  # (N, S, S) float64
            raw = maps.amax(dim=(1, 2))  # the upsampled max, not the grid max (interior peaks are lowered)
            score = self.rscin(raw, emb)
        if 0 in self.rscin_windows:
            score = score / 2
        return Prediction(pred_score=score.float(), anomaly_map=(maps / 2).float())

    # ---------------------------------------------------------------- bookkeeping
    def feature_signature(self) -> dict:
        """Everything that shapes :meth:`encode_images` (the feature-cache key)."""
        return {
            **super().feature_signature(),
            "feature_layers": self.feature_layers,
            "image_size": self.backbone.image_size,
            "precision": self.precision,
        }
