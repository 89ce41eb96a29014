"""A frozen DINOv2 (timm) with tapped patch tokens: the second backbone family, for AnomalyDINO and SubspaceAD.

Layer convention as in ``vlmad.backbones.clip``: layer ``i`` is the raw residual stream *after* 0-based block ``i``;
a negative ``i`` counts from the end (``-1`` = last block), which is exactly Hugging Face's ``hidden_states[i]``
for negative ``i`` (SubspaceAD's ``-12..-18`` on the 40-block giant = blocks 28..22). Returned tokens never hold
CLS or register tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmad.backbones.clip import seeded_random_init, weights_identity, weights_sha256

log = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "dino_configs"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_EMBED_INTERPOLATIONS = ("timm", "dinov2_hub")
IMAGE_RESIZE = ("pil", "torchvision")  # as vlmad.data.transforms.IMAGE_RESIZE


@dataclass
class DinoFeatures:
    """Outputs of one DINOv2 pass.

    Attributes:
        tokens: (B, P, C) final block output after the final LayerNorm, patches only (None when not computed).
        intermediates: 0-based block index -> (B, P, C) raw residual stream after that block, patches only.
    """

    tokens: Tensor | None
    intermediates: dict[int, Tensor] = field(default_factory=dict)


def read_model_config(path: str | Path) -> dict[str, Any]:
    """A DINOv2 architecture JSON ``{"model_name": <timm name>, "kwargs": {...}}`` (the fixtures' format)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2 model config not found: {path}")
    try:
        config = json.loads(path.read_text())
        return {"model_name": str(config["model_name"]), "kwargs": dict(config.get("kwargs", {}))}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a DINOv2 model config ({{'model_name', 'kwargs'}}): {err}") from err


SHIPPED_CONFIGS = {p.stem: p for p in sorted(_CONFIG_DIR.glob("*.json"))}


def hub_resize_pos_embed(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """The dinov2 hub code's position-table resize (``interpolate_pos_encoding``, AnomalyDINO's backbone).

    Bicubic by *scale factor* ``(g + 0.1) / M`` (``interpolate_offset`` 0.1), ``antialias=False``,
    ``align_corners=False``: source coordinate ``(dst + 0.5) · M / (g + 0.1) − 0.5``. timm's own resample is
    size-based and antialiased (what transformers and SubspaceAD do).

    Args:
        table: (1, M*M, C) patch rows of the table (no CLS row).
        grid: (gh, gw) target grid.

    Returns:
        (1, gh*gw, C) float32.
    """
    n, c = table.shape[1], table.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position table with {n} patch rows is not square")
    if (m, m) == tuple(grid):
        return table
    maps = table.float().reshape(1, m, m, c).permute(0, 3, 1, 2)  # (1, C, M, M)
    scale = ((grid[0] + 0.1) / m, (grid[1] + 0.1) / m)
    out = F.interpolate(maps, scale_factor=scale, mode="bicubic", antialias=False, align_corners=False)
    if tuple(out.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"hub position resize gave {tuple(out.shape[-2:])}, expected {tuple(grid)}")
    return out.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c)


def convert_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` weights -> timm layout.

    Handles transformers 4 (``attention.attention.{query,key,value}``, ``mlp.weights_in/out`` or ``mlp.fc1/fc2``)
    and 5 (``q_proj/k_proj/v_proj``, ``o_proj``, ``gate_proj/up_proj/down_proj``) key names, with or without a
    ``dinov2.`` prefix. With registers, CLS gets position row 0 added (timm adds no position to CLS/registers).
    """
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    pos = state["embeddings.position_embeddings"]  # (1, 1+N, C)
    if "embeddings.register_tokens" in state:
        out["cls_token"] = state["embeddings.cls_token"] + pos[:, :1]
        out["reg_token"] = state["embeddings.register_tokens"]
        out["pos_embed"] = pos[:, 1:]
    else:
        out["cls_token"], out["pos_embed"] = state["embeddings.cls_token"], pos
    out["patch_embed.proj.weight"] = state["embeddings.patch_embeddings.projection.weight"]
    out["patch_embed.proj.bias"] = state["embeddings.patch_embeddings.projection.bias"]
    out["norm.weight"], out["norm.bias"] = state["layernorm.weight"], state["layernorm.bias"]
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})

    def first(prefix: str, *names: str) -> str:
        for name in names:
            if f"{prefix}{name}.weight" in state:
                return f"{prefix}{name}"
        raise KeyError(f"none of {names} under {prefix!r}")

    for i in blocks:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        q = first(src, "attention.q_proj", "attention.attention.query")
        k = first(src, "attention.k_proj", "attention.attention.key")
        v = first(src, "attention.v_proj", "attention.attention.value")
        o = first(src, "attention.o_proj", "attention.output.dense")
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([state[f"{n}.{kind}"] for n in (q, k, v)])
            out[f"{dst}attn.proj.{kind}"] = state[f"{o}.{kind}"]
            out[f"{dst}norm1.{kind}"] = state[f"{src}norm1.{kind}"]
            out[f"{dst}norm2.{kind}"] = state[f"{src}norm2.{kind}"]
            if f"{src}mlp.gate_proj.{kind}" in state:  # transformers 5 SwiGLU: fc1 = cat(gate, up)
                gate, up = state[f"{src}mlp.gate_proj.{kind}"], state[f"{src}mlp.up_proj.{kind}"]
                out[f"{dst}mlp.fc1.{kind}"] = torch.cat([gate, up])
                out[f"{dst}mlp.fc2.{kind}"] = state[f"{src}mlp.down_proj.{kind}"]
            elif f"{src}mlp.weights_in.{kind}" in state:  # transformers 4 SwiGLU: already packed
                out[f"{dst}mlp.fc1.{kind}"] = state[f"{src}mlp.weights_in.{kind}"]
                out[f"{dst}mlp.fc2.{kind}"] = state[f"{src}mlp.weights_out.{kind}"]
            else:
                out[f"{dst}mlp.fc1.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
                out[f"{dst}mlp.fc2.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
        out[f"{dst}ls1.gamma"] = state[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = state[f"{src}layer_scale2.lambda1"]
    return out


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):  # common wrappers (the DINOv2 training checkpoints use teacher)
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError("not a state dict")
    return state


def _load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local file strictly: timm layout, the dinov2 hub layout (timm's filter) or Hugging Face layout."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = _read_state_dict(path)
        if any(k.removeprefix("dinov2.").startswith("embeddings.") for k in state):
            state = convert_hf_state_dict(state)
        else:  # timm keys pass unchanged; hub keys (mask_token, register_tokens, w12/w3) are converted
            state = checkpoint_filter_fn(state, model)
        model.load_state_dict(state, strict=True)
    except Exception as err:  # torch/zip/pickle/shape errors: one line naming the file, the cause chained
        raise RuntimeError(f"could not load weights file {path}: {str(err).strip().splitlines()[0]}") from err
    log.info("loaded weights from %s (sha256 %s)", path, weights_sha256(path)[:12])


def _create(
    name: str, arch: str, kwargs: dict[str, Any], pretrained: str | None, cache_dir: str | None, random_seed: int | None
) -> nn.Module:
    import timm

    if pretrained is None:
        warnings.warn(
            f"backbone {name!r} has RANDOM weights (backbone.pretrained=null, backbone.random_seed={random_seed}): "
            "scores show the pipeline, not the method's quality.",
            stacklevel=3,  # DinoBackbone(...) in vlmad, not the caller (often Hydra's instantiate)
        )
        with seeded_random_init(random_seed):  # the weights' own seed: the run's RNG is neither read nor moved
            return timm.create_model(arch, pretrained=False, **kwargs)
    local = Path(pretrained).expanduser()
    if local.is_file():
        model = timm.create_model(arch, pretrained=False, **kwargs)
        _load_weights_file(model, local)
        return model
    tags = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{arch}.*")]
    if pretrained not in tags:
        raise ValueError(
            f"backbone.pretrained={pretrained!r} is neither an existing weights file nor a timm tag of {arch!r} "
            f"(tags: {tags})."
        )
    try:
        return timm.create_model(f"{arch}.{pretrained}", pretrained=True, cache_dir=cache_dir, **kwargs)
    except Exception as err:  # network errors come from several libraries (urllib, requests, huggingface_hub)
        raise RuntimeError(
            f"Could not load the {arch!r} weights tagged {pretrained!r}: {err}\n"
            "They are downloaded on first use, which needs network access. Without network, download the "
            "checkpoint elsewhere (timm, the dinov2 hub .pth or a Hugging Face model.safetensors) and point "
            f"backbone.pretrained at the local file, e.g. backbone.pretrained=/path/to/{arch}.safetensors (or set "
            "backbone.cache_dir to a folder that already holds the Hugging Face cache)."
        ) from err


class DinoBackbone(nn.Module):
    """Frozen DINOv2 ViT built with timm (always eval, no grad), ImageNet-normalised square inputs.

    Args:
        model_name: a timm DINOv2 architecture (``vit_small_patch14_dinov2``, ``vit_giant_patch14_reg4_dinov2``,
            ...), a shipped config name (``vlmad-tiny-dinov2``), or the stem of ``model_config``.
        pretrained: timm tag (``lvd142m``), a local weights file (timm, dinov2-hub or Hugging Face layout;
            ``.safetensors`` or a torch state dict), or None (random weights, with a loud warning).
        image_size: input side S (a multiple of the patch size); the position table is resized once here.
        pos_embed_interpolation: ``timm`` (size-based bicubic with antialias = transformers = SubspaceAD) or
            ``dinov2_hub`` (scale-factor bicubic with the +0.1 offset, no antialias = the dinov2 hub code that
            AnomalyDINO runs).
        model_config: optional JSON ``{"model_name": <timm arch>, "kwargs": {...}}``; its stem names the model.
        cache_dir: timm / Hugging Face download cache.
        image_resize: how images are resized for these weights (``Preprocess``): ``pil`` (PIL bicubic, the dinov2
            hub transform AnomalyDINO uses) or ``torchvision`` (antialiased bicubic on the uint8 tensor,
            transformers 5's DINOv2 image processor, SubspaceAD's).
        random_seed: seed of random weights (``pretrained=None`` only): the same seed builds the same weights
            whatever the run's seed; None draws from the global RNG.
    """

    family = "dinov2"

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        image_size: int | None = None,
        pos_embed_interpolation: str = "timm",
        model_config: str | None = None,
        cache_dir: str | None = None,
        image_resize: str = "pil",
        random_seed: int | None = 0,
    ) -> None:
        super().__init__()
        if image_resize not in IMAGE_RESIZE:
            raise ValueError(f"DinoBackbone: image_resize must be one of {IMAGE_RESIZE}, got {image_resize!r}")
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(
                f"DinoBackbone: pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, "
                f"got {pos_embed_interpolation!r}"
            )
        config_path = Path(model_config).expanduser() if model_config else SHIPPED_CONFIGS.get(model_name)
        if config_path is not None:
            config = read_model_config(config_path)
            arch, kwargs = config["model_name"], config["kwargs"]
        else:
            arch, kwargs = model_name, {}
        if "dinov2" not in arch:
            raise ValueError(f"DinoBackbone: {arch!r} is not a timm DINOv2 architecture (vit_*_dinov2)")
        self.model_name = model_name
        self.arch, self.arch_kwargs = arch, dict(kwargs)
        self.pretrained = pretrained
        self.pos_embed_interpolation = pos_embed_interpolation
        # built at its native size, weights as stored
        model = _create(model_name, arch, kwargs, pretrained, cache_dir, random_seed)
        local = Path(pretrained).expanduser() if pretrained else None
        self.weights_sha256 = weights_sha256(local) if local is not None and local.is_file() else None
        if image_size is not None:
            self._resize(model, int(image_size))
        model.requires_grad_(False)
        self.model = model.eval()
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.image_resize = image_resize

    @staticmethod
    def _check_size(model: nn.Module, image_size: int) -> tuple[int, int]:
        patch = model.patch_embed.patch_size[0]
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        return image_size // patch, image_size // patch

    def _resize(self, model: nn.Module, image_size: int) -> None:
        grid = self._check_size(model, image_size)
        native = model.pos_embed.detach().clone()  # (1, [1+]M*M, C) as loaded
        with _quiet("timm"):
            model.set_input_size(img_size=(image_size, image_size))  # timm's resample (= transformers')
        if self.pos_embed_interpolation == "dinov2_hub":
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            table = hub_resize_pos_embed(native[:, prefix:], grid)
            model.pos_embed.data = torch.cat([native[:, :prefix], table.to(native.dtype)], dim=1)

    def train(self, mode: bool = True) -> DinoBackbone:
        """Keep the backbone in eval mode whatever the caller asks."""
        return super().train(False)

    # ---------------------------------------------------------------- geometry
    @property
    def image_size(self) -> int:
        """Input side in pixels."""
        return int(self.model.patch_embed.img_size[0])

    @property
    def patch_size(self) -> int:
        """Patch side in pixels."""
        return int(self.model.patch_embed.patch_size[0])

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return int(self.model.patch_embed.grid_size[0])

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.model.blocks)

    @property
    def width(self) -> int:
        """Token width C."""
        return int(self.model.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register tokens in front of the patches (1 or 5)."""
        return int(self.model.num_prefix_tokens)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.model.cls_token.device

    def weights_id(self) -> str:
        """Which weights these are: the timm tag, ``sha256:<hex>`` of a local file, or ``random:<sha1>``."""
        if getattr(self, "_weights_id", None) is None:
            self._weights_id = weights_identity(self.pretrained, self.weights_sha256, self.model)
        return self._weights_id

    def preprocess_config(self) -> dict[str, Any]:
        """The one source of preprocessing: ``image_size`` (S), ``mean`` and ``std`` (ImageNet's) and the
        ``image_resize`` of these weights' image processor (see ``vlmad.data.Preprocess``)."""
        return {
            "image_size": self.image_size,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "image_resize": self.image_resize,
        }

    def signature(self) -> str:
        """Hash of every setting that changes the features (architecture, weights, size, table resize)."""
        if getattr(self, "_signature", None) is None:
            parts = [
                self.model_name,
                self.arch,
                sorted(self.arch_kwargs.items()),
                self.weights_id(),
                self.image_size,
                tuple(self.model.pos_embed.shape),
                self.pos_embed_interpolation,
            ]
            self._signature = hashlib.sha1(repr(parts).encode()).hexdigest()[:16]
        return self._signature

    # ---------------------------------------------------------------- image
    def resolve_layers(self, layers: tuple[int, ...] | list[int]) -> list[int]:
        """0-based block indices; negative ones count from the end (Hugging Face ``hidden_states[j]``, j < 0)."""
        bad = [i for i in layers if not -self.depth <= int(i) < self.depth]
        if bad:
            raise ValueError(
                f"layer indices {bad} out of range for {self.model_name} with {self.depth} blocks "
                f"(0-based 0..{self.depth - 1}, or negative from the end: -1..-{self.depth})"
            )
        return [int(i) % self.depth for i in layers]

    def check_layers(self, layers: tuple[int, ...] | list[int]) -> None:
        """Raise if a layer index is outside the backbone."""
        self.resolve_layers(layers)

    def encode_image(
        self, images: Tensor, layers: tuple[int, ...] | list[int] = (), final: bool = True
    ) -> DinoFeatures:
        """One pass: final normed patch tokens and/or raw tapped blocks, prefix tokens dropped.

        Args:
            images: (B, 3, S, S) ImageNet-normalised.
            layers: block indices to tap (0-based; negative from the end).
            final: also run the remaining blocks and the final LayerNorm; False stops after the deepest tap.

        Returns:
            DinoFeatures with ``tokens`` (B, P, C) (None if not ``final``) and ``intermediates`` {block: (B, P, C)}.
        """
        m = self.model
        taps = set(self.resolve_layers(layers))
        last = len(m.blocks) - 1 if final or not taps else max(taps)
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))  # (B, prefix + P, C)
        prefix = m.num_prefix_tokens
        out: dict[int, Tensor] = {}
        for i, block in enumerate(m.blocks[: last + 1]):
            x = block(x)
            if i in taps:
                out[i] = x[:, prefix:]
        tokens = m.norm(x)[:, prefix:] if final else None
        return DinoFeatures(tokens=tokens, intermediates=out)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a library's INFO lines (timm announces every position-table resample; vlmad logs its own choice)."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.WARNING)
    try:
        yield
    finally:
        target.setLevel(level)
