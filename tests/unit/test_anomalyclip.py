"""AnomalyCLIP and DPAM on the tiny random CLIP (4 vision blocks, 2 text blocks, 64 px, grid 4)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmad.backbones import ClipBackbone
from vlmad.backbones.dpam import check_dpam_block, dpam_forward
from vlmad.bench.anomalyclip import format_rows, run
from vlmad.methods.anomalyclip import AnomalyCLIP

SIZE = 64

# The shipped tiny CLIP has ViT-L's depth (24 vision / 12 text blocks) so paper layer indices are valid.
LAST = 23
TEXT_DEPTH = 12


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ClipBackbone("vlmad-tiny", None)


@pytest.fixture
def images():
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def make(backbone, **kwargs) -> AnomalyCLIP:
    torch.manual_seed(0)
    kwargs = {"feature_layers": [LAST], "dpam_start": 1, "deep_prompt_depth": 2, **kwargs}
    return AnomalyCLIP(backbone, **kwargs)


def batch_of(images) -> dict:
    mask = torch.zeros(len(images), SIZE, SIZE)
    mask[1, 10:30, 20:40] = 1.0
    mask[2, 40:60, 5:25] = 1.0
    return {
        "image": images,
        "mask": mask,
        "label": torch.tensor([0, 1, 1, 0]),
        "has_mask": torch.ones(len(images), dtype=torch.bool),
    }


def vv_by_hand(block, x):
    """V-V attention written out per head with explicit softmax (independent of dpam.dual_attention)."""
    attn = block.attn
    width = x.shape[-1]
    v = F.linear(x, attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])  # (B, N, W)
    heads = v.split(width // attn.num_heads, dim=-1)
    outs = [((h @ h.transpose(1, 2)) / math.sqrt(h.shape[-1])).softmax(-1) @ h for h in heads]
    return attn.out_proj(torch.cat(outs, dim=-1))


def stock_stream(backbone, images):
    """ln_pre output and the output of every block of the unmodified CLIP."""
    h = backbone.visual.ln_pre(backbone.embed(images))
    outs = []
    for block in backbone.visual.transformer.resblocks:
        h = block(h)
        outs.append(h)
    return outs


# ---------------------------------------------------------------- DPAM
def test_dpam_leaves_backbone_untouched(backbone, images):
    state = copy.deepcopy(backbone.state_dict())
    with torch.no_grad():
        before = backbone.encode_image(images).embedding
    method = make(backbone)
    method.eval()(images, None)
    method.train().loss(batch_of(images))["loss"].backward()
    with torch.no_grad():
        after = backbone.encode_image(images).embedding
    assert torch.equal(before, after)
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.modules())


def test_dual_path_differs_from_in_place_swap(backbone, images):
    with torch.no_grad():
        final, taps = dpam_forward(backbone, images, 1, [LAST])
        stock = stock_stream(backbone, images)
        # Single-stream swap (not the method): V-V attention replaces attention inside the blocks.
        h = stock[0]
        for block in list(backbone.visual.transformer.resblocks)[1:]:
            h = h + vv_by_hand(block, block.ln_1(h))
            h = h + block.mlp(block.ln_2(h))
    torch.testing.assert_close(final, stock[-1], rtol=1e-5, atol=1e-5)  # original stream = stock CLIP
    assert (taps[LAST] - h).abs().max() > 1e-2


def test_tap_below_dpam_start_is_ordinary_block_output(backbone, images):
    with torch.no_grad():
        final, taps = dpam_forward(backbone, images, backbone.depth, [LAST])
        _, stock = backbone.blocks(backbone.embed(images), [LAST])
    assert torch.equal(taps[LAST], stock[LAST]) and torch.equal(final, stock[LAST])


def test_vv_stream_seeded_from_previous_block(backbone, images):
    with torch.no_grad():
        _, taps = dpam_forward(backbone, images, LAST, [LAST])  # only the last block is dual-path
        h_prev = stock_stream(backbone, images)[LAST - 1]
        block = backbone.visual.transformer.resblocks[LAST]
        expected = h_prev + vv_by_hand(block, block.ln_1(h_prev))  # no MLP on the V-V stream
    torch.testing.assert_close(taps[LAST], expected, rtol=1e-5, atol=1e-5)


def test_dpam_reads_open_clip_internals_or_fails_loudly(backbone):
    for i, real in enumerate(backbone.visual.transformer.resblocks):  # the pinned open_clip layout
        check_dpam_block(real, i)
    block = nn.Module()
    for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"):
        setattr(block, name, nn.Identity())
    block.attn = nn.Linear(4, 4)  # e.g. open_clip >= 3.4's own attention class
    with pytest.raises(RuntimeError, match=r"open_clip_torch<3\.4"):
        check_dpam_block(block, 0)


# ---------------------------------------------------------------- method
def test_prediction_shapes_and_batch_independence(backbone, images):
    method = make(backbone, feature_layers=[LAST - 1, LAST]).eval()
    method.prepare("object")
    with torch.no_grad():
        whole = method(images, ["a"] * 4)
        singles = [method(images[i : i + 1], ["a"]) for i in range(4)]
    assert whole.pred_score.shape == (4,) and whole.anomaly_map.shape == (4, SIZE, SIZE)
    assert whole.anomaly_map.min() >= 0 and whole.anomaly_map.max() <= 1
    torch.testing.assert_close(whole.pred_score, torch.cat([s.pred_score for s in singles]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.anomaly_map, torch.cat([s.anomaly_map for s in singles]), rtol=1e-5, atol=1e-6)


def test_only_prompts_train_and_cached_features_are_identical(backbone, images):
    method = make(backbone).train()
    batch = batch_of(images)
    out = method.loss(batch)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    with_grad = {n for n, p in method.named_parameters() if p.grad is not None}
    assert with_grad == {"ctx_pos", "ctx_neg", "deep_prompts"}
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    features = method.encode_images(images)
    assert not features["patch"].requires_grad and features["patch"].shape == (4, 1, 17, 32)
    cached = method.loss(batch, features=features)
    assert all(torch.equal(out[k], cached[k]) for k in out)
    method.eval()
    with torch.no_grad():
        direct, from_cache = method(images, None), method(images, None, features=features)
    assert torch.equal(direct.pred_score, from_cache.pred_score)
    assert torch.equal(direct.anomaly_map, from_cache.anomaly_map)


def test_images_without_mask_only_enter_the_ce_term(backbone, images):
    method = make(backbone).train()
    batch = batch_of(images)
    none = method.loss({**batch, "has_mask": torch.zeros(4, dtype=torch.bool)})
    assert none["local_loss"] == 0 and torch.equal(none["loss"], none["image_loss"])
    mixed = method.loss({**batch, "has_mask": torch.tensor([True, True, False, False])})
    subset = method.loss({k: v[:2] for k, v in batch.items()})
    torch.testing.assert_close(mixed["local_loss"], subset["local_loss"])
    torch.testing.assert_close(mixed["image_loss"], method.loss(batch)["image_loss"])


def test_deep_prompts_overwrite_and_matter(backbone):
    method = make(backbone, deep_prompt_depth=2, deep_prompt_len=4)
    seen = []
    handles = [
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        for block in backbone.model.transformer.resblocks
    ]
    try:
        with torch.no_grad():
            before = method.text_features()
    finally:
        for handle in handles:
            handle.remove()
    assert [x.shape[1] for x in seen] == [77] * TEXT_DEPTH  # overwritten, not inserted
    torch.testing.assert_close(seen[1][:, 1:5], method.deep_prompts[0].detach().expand(2, -1, -1))
    with torch.no_grad():
        method.deep_prompts[0, 1] += torch.randn(32)  # not a constant shift: ln_1 would remove that
        assert not torch.allclose(method.text_features(), before)
    shallow = make(backbone, deep_prompt_depth=1)
    assert shallow.deep_prompts is None and set(shallow.learned_state()) == {"ctx_pos", "ctx_neg"}


def test_text_path_matches_stock_encoder_without_prompts(backbone):
    method = make(backbone, deep_prompt_depth=1)
    with torch.no_grad():
        method.ctx_pos.copy_(method.token_embeddings[0, 1 : 1 + method.n_ctx])
        method.ctx_neg.copy_(method.token_embeddings[1, 1 : 1 + method.n_ctx])
        stock = F.normalize(backbone.encode_text(method.tokens), dim=-1)
        torch.testing.assert_close(method.text_features(), stock, rtol=1e-5, atol=1e-6)


def test_text_cache_follows_parameter_changes(backbone, images):
    method = make(backbone).eval()
    method.prepare("anything")
    first = method._eval_text_features()
    assert method._eval_text_features() is first
    with torch.no_grad():
        method.ctx_neg.add_(torch.randn_like(method.ctx_neg))
    assert not torch.equal(method._eval_text_features(), first)
    method.train()
    assert method._text_cache is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k_shot": 1}, "zero-shot only"),
        ({"feature_layers": [LAST + 1]}, "0-based"),
        ({"feature_layers": [-1]}, "0-based"),
        ({"dpam_start": LAST + 2}, "0-based"),
        ({"deep_prompt_depth": TEXT_DEPTH + 1}, "text encoder blocks"),
        ({"deep_prompt_len": 13}, "deep_prompt_len"),
        ({"layer_reduce": "max"}, "layer_reduce"),
        ({"n_ctx": 80}, "does not fit"),
    ],
)
def test_invalid_config(backbone, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(backbone, **kwargs)


def test_convert_official_checkpoint_round_trip(backbone):
    method = make(backbone)
    learned = method.learned_state()
    official = {
        "ctx_pos": learned["ctx_pos"][None, None],
        "ctx_neg": learned["ctx_neg"][None, None],
        "token_prefix_pos": torch.zeros(1, 1, 1, 32),
        "compound_prompt_projections.0.weight": torch.zeros(48, 32),
        **{f"compound_prompts_text.{i}": p for i, p in enumerate(learned["deep_prompts"])},
    }
    converted = AnomalyCLIP.convert_official_checkpoint({"prompt_learner": official})
    assert set(converted) == set(learned)
    assert all(torch.equal(converted[k], learned[k]) for k in learned)
    make(backbone).load_state_dict(converted, strict=False)
    many = {"ctx_pos": torch.zeros(1, 1, 2, 3), "ctx_neg": torch.zeros(1, 1, 2, 3)}
    many |= {f"compound_prompts_text.{i}": torch.full((1, 3), float(i)) for i in range(11)}
    deep = AnomalyCLIP.convert_official_checkpoint(many)["deep_prompts"]
    assert deep[:, 0, 0].tolist() == list(range(11))  # numeric, not lexicographic, order


def test_hparams_for_checkpoint(backbone):
    hp = make(backbone).hparams_for_checkpoint()
    assert hp["backbone"] == "vlmad-tiny" and hp["text_width"] == 32 and hp["feature_layers"] == [LAST]


def test_bench_smoke():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = run(image_sizes=(32,), n_images=1, backbone_name="vlmad-tiny")
    assert len(rows) == 1 and rows[0]["image_size"] == 32 and rows[0]["ratio"] > 0
    assert "ratio" in format_rows(rows)
