"""AnomalyCLIP's DPAM: dual-path V-V attention as its own loop over the frozen ViT's blocks.

The open_clip model is never modified (no hooks, no patched modules): the loop reads each block's
``ln_1``, ``attn`` (``in_proj_weight/bias``, ``out_proj``, ``num_heads``), ``ls_1``, ``ln_2``, ``mlp`` and
``ls_2``. Reference: zqhang/AnomalyCLIP ``AnomalyCLIP_lib/AnomalyCLIP.py`` (docs spec §2). Layer indices
are 0-based block indices: layer ``i`` is the stream after block ``i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmad.backbones.clip import ClipBackbone

_BLOCK_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")


def check_dpam_block(block: nn.Module, index: int) -> None:
    """Raise if a residual block lacks the open_clip internals the DPAM loop reads."""
    missing = [name for name in _BLOCK_PARTS if not hasattr(block, name)]
    attn = getattr(block, "attn", None)
    if missing or not isinstance(attn, nn.MultiheadAttention):
        raise RuntimeError(
            f"DPAM cannot read visual block {index} ({type(block).__name__}): missing {missing}, attn is "
            f"{type(attn).__name__}. It needs open_clip's ResidualAttentionBlock with nn.MultiheadAttention, "
            "as in open_clip_torch<3.4 (later versions replace nn.MultiheadAttention); keep the pin."
        )
    if not attn.batch_first or not attn._qkv_same_embed_dim:
        raise RuntimeError(
            f"DPAM: visual block {index} needs a batch-first nn.MultiheadAttention with a packed "
            "in_proj_weight (open_clip_torch>=3.0,<3.4)."
        )


def dual_attention(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Original and V-V attention of one block on the same normalised input, with the block's weights.

    Args:
        block: open_clip ``ResidualAttentionBlock``.
        x: (B, N, W) ``ln_1`` of the original stream.

    Returns:
        (B, N, W) ``out_proj(softmax(q kᵀ/√d) v)`` (the stock attention) and
        (B, N, W) ``out_proj(softmax(v vᵀ/√d) v)`` (V-V, same per-head scale).
    """
    attn: nn.MultiheadAttention = block.attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3W)
    qkv = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
    q, k, v = qkv.unbind(0)  # (B, h, N, d) each
    # One fused call for both paths: the V-V half of the batch uses v as query and key.
    out = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))  # (2B, h, N, d)
    out = attn.out_proj(out.transpose(1, 2).reshape(2 * batch, tokens, width))  # (2B, N, W)
    return out[:batch], out[batch:]


def dpam_forward(
    backbone: ClipBackbone, images: Tensor, dpam_start: int, feature_layers: list[int] | tuple[int, ...]
) -> tuple[Tensor, dict[int, Tensor]]:
    """Vision pass with AnomalyCLIP's dual path in blocks ``dpam_start .. depth-1``.

    Both attentions of a DPAM block read ``ln_1`` of the original stream h; the V-V stream z is seeded
    with the input of block ``dpam_start`` (the output of block ``dpam_start - 1``), accumulates only the
    V-V attention outputs (no MLP) and never feeds an attention. h is the unchanged CLIP stream.

    Args:
        backbone: frozen ClipBackbone (not modified).
        images: (B, 3, S, S) CLIP-normalised, S = ``backbone.image_size``.
        dpam_start: first 0-based DPAM block, 0..depth (depth = no DPAM).
        feature_layers: 0-based blocks to tap.

    Returns:
        (B, 1+P, W) original stream after the last block (before ``ln_post``); dict layer -> (B, 1+P, W):
        z after that block, or h if the layer is below ``dpam_start``.
    """
    backbone.check_layers(feature_layers)
    if not 0 <= dpam_start <= backbone.depth:
        raise ValueError(f"dpam_start {dpam_start} must be a 0-based block index in 0..{backbone.depth}")
    blocks = backbone.visual.transformer.resblocks
    last_vv = max((i for i in feature_layers if i >= dpam_start), default=-1)  # no V-V work past the last tap
    h = backbone.visual.ln_pre(backbone.embed(images))  # (B, 1+P, W)
    z: Tensor | None = None
    taps: dict[int, Tensor] = {}
    for i, block in enumerate(blocks):
        if i < dpam_start or i > last_vv:
            h = block(h)  # (B, 1+P, W), the stock block
        else:
            check_dpam_block(block, i)
            a_ori, a_vv = dual_attention(block, block.ln_1(h))  # both (B, 1+P, W)
            z = (h if z is None else z) + block.ls_1(a_vv)  # seeded with block i-1's output
            h = h + block.ls_1(a_ori)
            h = h + block.ls_2(block.mlp(block.ln_2(h)))
        if i in feature_layers:
            taps[i] = h if i < dpam_start else z
    return h, taps
