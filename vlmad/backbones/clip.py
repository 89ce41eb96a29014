"""A frozen open_clip CLIP with the token-level access the anomaly methods need.

Layer convention: every layer index in vlmad is a **0-based transformer block index**, as in open_clip's
``forward_intermediates``: layer ``i`` is the residual stream *after* block ``i``. The references count
1-based ("layer 24" of ViT-L = block 23); configs convert with a comment.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmad.errors import ConfigError

log = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_config(path: str | Path) -> str:
    """Register an open_clip model config JSON; returns the model name (the file stem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config not found: {path}")
    open_clip.add_model_config(path)
    return path.stem


for _cfg in sorted(_CONFIG_DIR.glob("*.json")):
    register_model_config(_cfg)


@dataclass
class ImageFeatures:
    """Outputs of one image pass.

    Attributes:
        embedding: (B, D) ``ln_post(CLS) @ proj`` (not normalised).
        tokens: (B, 1+P, W) ``ln_post`` of the last block's tokens, CLS first, not projected.
        intermediates: 0-based block index -> (B, 1+P, W) raw residual stream after that block.
    """

    embedding: Tensor
    tokens: Tensor
    intermediates: dict[int, Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def _drop_root_log(prefix: str) -> Iterator[None]:
    """Drop root-logger records starting with ``prefix`` (open_clip logs through the root logger)."""
    drop = logging.Filter()
    drop.filter = lambda record: not record.getMessage().startswith(prefix)
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(path: Path) -> str:
    """sha256 of a whole weights file, computed once per (file, size, mtime) in 16 MiB chunks (~1-2 s per GB)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def weights_identity(pretrained: str | None, sha256: str | None, model: torch.nn.Module) -> str:
    """Which weights these are: the tag, ``sha256:<hex>`` of a local file, or ``random:<sha1>``.

    Random weights are only equal within one seeded build, so their values are fingerprinted (a strided sample
    per tensor: milliseconds, not a pass over GBs). A checkpoint records it (``vlmad.engine.checkpoint``).
    """
    if sha256 is not None:
        return f"sha256:{sha256}"
    if pretrained:
        return str(pretrained)
    digest = hashlib.sha1()
    for p in model.parameters():
        flat = p.detach().flatten()
        digest.update(flat[:: max(1, flat.numel() // 4096)].cpu().numpy().tobytes())
    return "random:" + digest.hexdigest()


def _is_torchscript(path: Path) -> bool:
    """OpenAI's ``*.pt`` files are TorchScript archives (a zip with ``constants.pkl``); torch.save zips have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _not_a_weights_file(err: BaseException) -> bool:
    """Whether loading failed because the file holds no checkpoint at all (garbage, text, a truncated archive)."""
    import pickle

    text = str(err).lower()
    unreadable = ("weights only load failed", "invalid load key", "central directory", "magic number", "eof")
    return isinstance(err, (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile)) or any(
        w in text for w in unreadable
    )


def _load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local checkpoint strictly into ``model``: an open_clip/torch file or an OpenAI TorchScript archive."""
    try:
        if _is_torchscript(path):
            # open_clip's load_checkpoint cannot read TorchScript; OpenAI's archive holds the open_clip key layout
            # plus three int metadata entries (open_clip's build_model_from_openai_state_dict drops the same ones).
            with warnings.catch_warnings():  # torch >= 2.9 flags torch.jit.load as deprecated: only reading here
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
            model.load_state_dict(state, strict=True)  # fp16 archive values are copied into the fp32 model
        else:
            open_clip.load_checkpoint(model, str(path), strict=True)
    except Exception as err:  # torch/zip/pickle/shape errors: one line naming the file, the cause chained
        if _not_a_weights_file(err):  # not torch's "re-run with weights_only=False" advice: the file is wrong
            raise ConfigError(
                f"{path} is not a weights file (no torch / open_clip checkpoint or TorchScript archive could be "
                f"read from it: {type(err).__name__}); point backbone.pretrained at the model's checkpoint"
            ) from err
        raise RuntimeError(f"could not load weights file {path}: {str(err).strip().splitlines()[0]}") from err
    n_tensors = len(model.state_dict())
    log.info("loaded weights from %s (sha256 %s, %d tensors)", path, weights_sha256(path)[:12], n_tensors)


@contextlib.contextmanager
def seeded_random_init(seed: int | None) -> Iterator[None]:
    """Build random weights from ``seed`` (the backbone's ``random_seed``), not from the run's seed.

    The global torch RNG is forked, so the build neither depends on nor changes the run's random state: a train
    run (seed 111) and an evaluate run (seed 0) build the same random backbone. ``seed=None`` draws from the
    global RNG as it stands. Any backbone with a random-weights option can wrap its construction in this.

    Args:
        seed: the weights' seed, or None for the caller's current RNG state.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _load_model(
    model_name: str, pretrained: str | None, force_quick_gelu: bool, cache_dir: str | None, random_seed: int | None
) -> nn.Module:
    if pretrained is None:
        warnings.warn(
            f"backbone {model_name!r} has RANDOM weights (backbone.pretrained=null, backbone.random_seed="
            f"{random_seed}): scores show the pipeline, not the method's quality.",
            stacklevel=2,  # ClipBackbone(...) in vlmad, not the caller (often Hydra's instantiate)
        )
        with seeded_random_init(random_seed):
            return open_clip.create_model(model_name, pretrained=None, force_quick_gelu=force_quick_gelu)
    if Path(pretrained).expanduser().is_file():
        with _drop_root_log("No pretrained weights loaded"):  # open_clip's notice is wrong: the file comes next
            model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=force_quick_gelu)
        _load_weights_file(model, Path(pretrained).expanduser())
        return model
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ValueError(
            f"backbone.pretrained={pretrained!r} is neither an existing checkpoint file nor an open_clip tag of "
            f"{model_name!r} (tags: {tags})."
        )
    try:
        return open_clip.create_model(
            model_name, pretrained=pretrained, force_quick_gelu=force_quick_gelu, cache_dir=cache_dir
        )
    except Exception as err:  # network errors come from several libraries (urllib, requests, huggingface_hub)
        raise RuntimeError(
            f"Could not load the {model_name!r} weights tagged {pretrained!r}: {err}\n"
            "They are downloaded on first use, which needs network access. Without network, download the "
            "checkpoint elsewhere and point backbone.pretrained at the local file, e.g. "
            f"backbone.pretrained=/path/to/{model_name}-{pretrained}.bin (or set backbone.cache_dir to a "
            "folder that already holds the open_clip/Hugging Face cache)."
        ) from err


def resize_positional_embedding(visual: nn.Module, image_size: int, mode: str = "bicubic") -> None:
    """Resize the ViT position table to a new square input size, once, from the loaded table.

    Args:
        visual: open_clip ``VisionTransformer``; modified in place (a fresh parameter).
        image_size: new input side in pixels (a multiple of the patch size).
        mode: ``bicubic`` = open_clip's ``resize_pos_embed`` (antialiased; APRIL-GAN loads this way),
            ``bilinear`` = AnomalyCLIP's in-forward resize (no antialias) or ``bicubic_no_antialias`` = MuSc's
            vendored ``resize_pos_embed`` (its ``antialias`` argument is never passed on), all align_corners=False.
    """
    patch = visual.patch_size[0]
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    grid = image_size // patch
    pos = visual.positional_embedding.data  # (1+g*g, W)
    old = round((pos.shape[0] - 1) ** 0.5)
    if grid != old:
        table = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, W, g, g)
        antialias = mode == "bicubic"
        interp = "bicubic" if mode == "bicubic_no_antialias" else mode
        table = F.interpolate(table, size=(grid, grid), mode=interp, antialias=antialias, align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(grid * grid, -1)
        visual.positional_embedding = nn.Parameter(torch.cat([pos[:1], table]), requires_grad=False)
    visual.image_size = (image_size, image_size)
    visual.grid_size = (grid, grid)


class ClipBackbone(nn.Module):
    """Frozen open_clip CLIP (always eval, no grad on its parameters).

    Args:
        model_name: open_clip architecture name, e.g. ``ViT-B-16-plus-240``, ``ViT-L-14-336-quickgelu``,
            ``vlmad-tiny`` (shipped random-weights test model).
        pretrained: open_clip tag (``openai``, ``laion400m_e31``), a local checkpoint path, or None (random).
        image_size: input side the methods run at; the position table is resized once here if needed.
        pos_embed_interpolation: ``bicubic`` (open_clip), ``bilinear`` (AnomalyCLIP reference) or
            ``bicubic_no_antialias`` (MuSc reference).
        model_config: optional path to an open_clip model config JSON registered before building.
        force_quick_gelu: build with QuickGELU (needed for OpenAI weights under a non ``-quickgelu`` name).
        cache_dir: open_clip download cache.
        random_seed: seed of random weights (``pretrained=None`` only): the same seed builds the same weights
            whatever the run's seed, so a checkpoint trained on them evaluates; None draws from the global RNG.
    """

    family = "clip"  # methods check it (AnomalyMethod.backbone_families); DinoBackbone's is "dinov2"

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        image_size: int | None = None,
        pos_embed_interpolation: str = "bicubic",
        model_config: str | None = None,
        force_quick_gelu: bool = False,
        cache_dir: str | None = None,
        random_seed: int | None = 0,
    ) -> None:
        super().__init__()
        if model_config is not None:
            register_model_config(model_config)
        self.model_name = model_name
        self.pretrained = pretrained
        self.force_quick_gelu = bool(force_quick_gelu)
        self.pos_embed_interpolation = pos_embed_interpolation
        self.random_seed = random_seed
        model = _load_model(model_name, pretrained, force_quick_gelu, cache_dir, random_seed)
        local = Path(pretrained).expanduser() if pretrained else None
        # content hash of a local weights file, taken at load (cached: the load already hashed it for its log line)
        self.weights_sha256 = weights_sha256(local) if local is not None and local.is_file() else None
        visual = model.visual
        if not getattr(visual.transformer, "batch_first", False):
            # open_clip >= 2.26 is batch-first; an old sequence-first build would silently break window scoring.
            raise RuntimeError("vlmad needs open_clip_torch>=3.0 (batch-first transformer).")
        if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok":
            raise ValueError(f"{model_name}: only CLS-token ViT CLIPs are supported")
        if image_size is not None:
            resize_positional_embedding(visual, int(image_size), pos_embed_interpolation)
        model.requires_grad_(False)
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        pp = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
        self.mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))

    def train(self, mode: bool = True) -> ClipBackbone:
        """Keep the backbone in eval mode whatever the caller asks."""
        return super().train(False)

    # ---------------------------------------------------------------- geometry
    @property
    def visual(self) -> nn.Module:
        """The open_clip ``VisionTransformer``."""
        return self.model.visual

    @property
    def image_size(self) -> int:
        """Input side in pixels."""
        return self.visual.image_size[0]

    @property
    def patch_size(self) -> int:
        """Patch side in pixels."""
        return self.visual.patch_size[0]

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.visual.grid_size[0]

    @property
    def depth(self) -> int:
        """Number of vision transformer blocks."""
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        """Vision transformer width."""
        return self.visual.transformer.width

    @property
    def embed_dim(self) -> int:
        """Joint embedding dimension."""
        return self.visual.proj.shape[1]

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.visual.proj.device

    def weights_id(self) -> str:
        """Which weights these are: the open_clip tag, ``sha256:<hex>`` of a local file, or ``random:<sha1>``
        (:func:`weights_identity`, computed once)."""
        if getattr(self, "_weights_id", None) is None:
            self._weights_id = weights_identity(self.pretrained, self.weights_sha256, self.model)
        return self._weights_id

    def preprocess_config(self) -> dict[str, Any]:
        """The one source of preprocessing: ``image_size`` (S), ``mean`` and ``std`` (the weights' normalisation).

        The datamodule, predict and export all take these (as open_clip's ``create_model_and_transforms`` pairs
        a model with its transform), never a parallel config value.
        """
        return {"image_size": self.image_size, "mean": tuple(self.mean), "std": tuple(self.std)}

    def signature(self) -> str:
        """Hash of every setting that changes the features.

        Architecture (name, the registered open_clip config, QuickGELU), weights (tag, file content hash, or
        sampled random values), input size and position-table interpolation. ``cache_dir`` is left out: it only
        says where a tag's (identical) weights are stored.
        """
        if getattr(self, "_signature", None) is None:
            source = self.weights_id()
            architecture = open_clip.get_model_config(self.model_name)  # a re-registered JSON may change it
            parts = [
                self.model_name,
                architecture,
                self.force_quick_gelu,
                source,
                self.image_size,
                self.visual.positional_embedding.shape,
                self.pos_embed_interpolation,
            ]
            self._signature = hashlib.sha1(repr(parts).encode()).hexdigest()[:16]
        return self._signature

    # ---------------------------------------------------------------- text
    def tokenize(self, texts: list[str]) -> Tensor:
        """CLIP BPE token ids (N, 77)."""
        return self.tokenizer(texts).to(self.device)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Projected text embeddings (N, D), not normalised."""
        return self.model.encode_text(tokens)

    # ---------------------------------------------------------------- image
    def embed(self, images: Tensor) -> Tensor:
        """Patch embedding + CLS + positional embedding, before ``ln_pre``.

        Args:
            images: (B, 3, S, S) CLIP-normalised, S = ``image_size``.

        Returns:
            (B, 1+P, W) tokens, CLS first, patches row-major.
        """
        visual = self.visual
        x = visual.conv1(images)  # (B, W, g, g)
        # The residual stream keeps the weights' dtype: under autocast conv1 returns bf16/fp16, and a low-precision
        # stream doubles the drift over 24 blocks (matmuls inside the blocks still run in bf16/fp16).
        x = x.flatten(2).transpose(1, 2).to(visual.positional_embedding.dtype)  # (B, P, W)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)

    def blocks(self, tokens: Tensor, layers: tuple[int, ...] | list[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """Run ``ln_pre`` and all blocks in open_clip's native batch-first layout.

        Args:
            tokens: (N, L, W) from :meth:`embed` (or any subset of its tokens, e.g. WinCLIP windows).
            layers: 0-based block indices whose raw outputs are returned.

        Returns:
            final (N, L, W) output of the last block; dict block index -> (N, L, W).
        """
        self.check_layers(layers)
        x = self.visual.ln_pre(tokens)
        taps: dict[int, Tensor] = {}
        for i, block in enumerate(self.visual.transformer.resblocks):
            x = block(x)  # (N, L, W), batch-first
            if i in layers:
                taps[i] = x
        return x, taps

    def project(self, tokens: Tensor) -> Tensor:
        """``ln_post`` then ``proj``: (..., W) -> (..., D)."""
        return self.visual.ln_post(tokens) @ self.visual.proj

    def encode_image(self, images: Tensor, layers: tuple[int, ...] | list[int] = ()) -> ImageFeatures:
        """One full-image pass.

        Args:
            images: (B, 3, S, S) CLIP-normalised.
            layers: 0-based block indices to tap (raw residual stream).
        """
        final, taps = self.blocks(self.embed(images), layers)
        tokens = self.visual.ln_post(final)  # (B, 1+P, W)
        return ImageFeatures(embedding=tokens[:, 0] @ self.visual.proj, tokens=tokens, intermediates=taps)

    def check_layers(self, layers: tuple[int, ...] | list[int]) -> None:
        """Raise if a 0-based layer index is outside the backbone."""
        bad = [i for i in layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"layer indices {bad} out of range for {self.model_name} with {self.depth} blocks "
                f"(vlmad uses 0-based block indices: 0..{self.depth - 1})"
            )
