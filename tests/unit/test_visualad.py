"""VisualAD on the shipped tiny random CLIP (24 vision blocks, width 64, 64 px, grid 4)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from vlmad.backbones import ClipBackbone
from vlmad.backbones.cache import FeatureCache
from vlmad.config import compose
from vlmad.errors import ConfigError
from vlmad.methods.visualad import VisualAD

SIZE = 64
LAYERS = [5, 11, 17, 23]  # the shipped defaults: ViT-L's depth


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return ClipBackbone("vlmad-tiny", None, image_size=SIZE, pos_embed_interpolation="bilinear")


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def make(backbone, **kwargs) -> VisualAD:
    torch.manual_seed(0)
    return VisualAD(backbone, **kwargs)


def batch_of(images) -> dict:
    mask = torch.zeros(len(images), SIZE, SIZE)
    mask[1, 10:30, 20:40] = 1.0
    mask[2, 40:60, 5:25] = 1.0
    return {"image": images, "mask": mask, "label": torch.tensor([0, 1, 1, 0]), "has_mask": torch.ones(4).bool()}


def learned(method: VisualAD) -> dict[str, nn.Parameter]:
    return {n: p for n, p in method.named_parameters() if not n.startswith("backbone.")}


def test_shapes_range_and_unit_scale_is_affine_to_the_reference_sum(backbone, images):
    method, raw = make(backbone).eval(), make(backbone, output_scale="raw").eval()
    with torch.no_grad():
        pred, ref = method(images, ["object"] * 4), raw(images, ["object"] * 4)
    assert pred.pred_score.shape == (4,) and pred.anomaly_map.shape == (4, SIZE, SIZE)
    assert float(pred.anomaly_map.min()) >= 0 and float(pred.anomaly_map.max()) <= 1
    assert float(pred.pred_score.min()) >= 0 and float(pred.pred_score.max()) <= 1
    assert float(ref.anomaly_map.abs().max()) <= 2 * len(LAYERS)
    torch.testing.assert_close(pred.anomaly_map, (ref.anomaly_map / len(LAYERS) + 2) / 4)
    torch.testing.assert_close(pred.pred_score, (ref.pred_score / len(LAYERS) + 2) / 4)
    assert float(pred.anomaly_map.std()) > 0  # the maps carry structure


def test_batch_of_4_equals_4_batches_of_1(backbone, images):
    method = make(backbone).eval()
    with torch.no_grad():
        whole = method(images, ["a", "b", "a", "b"])
        single = [method(image[None], ["a"]) for image in images]
    torch.testing.assert_close(whole.pred_score, torch.cat([p.pred_score for p in single]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.anomaly_map, torch.cat([p.anomaly_map for p in single]), rtol=1e-5, atol=1e-6)


def test_the_tokens_take_part_in_attention(backbone, images):
    """Every patch token of a tapped layer differs from the plain CLIP stream, and moves with the tokens."""
    method = make(backbone).eval()
    with torch.no_grad():
        ours = method.encode_images(images)["tokens"][:, 0, 3:]  # (B, N, W) first tapped layer, patches
        _, plain = backbone.blocks(backbone.embed(images), [LAYERS[0]])
        plain = backbone.visual.ln_post(plain[LAYERS[0]][:, 1:])
        assert ((ours - plain).abs().amax(dim=-1) > 1e-6).all()
        method.anomaly_token.mul_(3)
        moved = method.encode_images(images)["tokens"][:, 0, 3:]
    assert ((moved - ours).abs().amax(dim=-1) > 1e-6).all()


def test_gradients_reach_every_learned_tensor_and_no_frozen_one(backbone, images):
    method = make(backbone).train()
    losses = method.loss(batch_of(images))
    assert set(losses) == {"loss", "image_loss", "contrastive_loss", "seg_loss", "focal", "dice"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["image_loss"] + losses["contrastive_loss"] + losses["seg_loss"])
    losses["loss"].backward()
    assert all(p.grad is None for p in backbone.parameters())  # frozen, yet the tokens' gradients cross it
    for name, param in learned(method).items():
        assert param.requires_grad and param.grad is not None, name
    for name in ("anomaly_token", "normal_token", "ln_post.weight"):
        assert float(learned(method)[name].grad.norm()) > 0, name
    grid = backbone.grid_size**2  # only the grid's rows of the SCA position tables are read
    pos = method.cross_attn.layer_attentions["layer_6"].pos_encoding.grad
    assert pos[:, :grid].abs().sum() > 0 and not pos[:, grid:].any()


def test_images_without_masks_enter_the_image_and_token_terms_only(backbone, images):
    method = make(backbone, dropout=0.0).train()
    batch = batch_of(images)
    full = method.loss(batch)
    batch["has_mask"] = torch.tensor([True, False, True, True])
    batch["mask"][1] = 7.0  # would change the segmentation loss if it were read
    partial = method.loss(batch)
    torch.testing.assert_close(partial["image_loss"], full["image_loss"])
    torch.testing.assert_close(partial["contrastive_loss"], full["contrastive_loss"])
    assert not torch.isclose(partial["seg_loss"], full["seg_loss"])
    batch["has_mask"] = torch.zeros(4).bool()
    assert float(method.loss(batch)["seg_loss"]) == 0


def test_ln_post_trained_in_training_clip_at_test_by_default(backbone, images):
    method = make(backbone)
    with torch.no_grad():
        method.ln_post.weight.mul_(1.5)  # the trained copy now differs from CLIP's
    method.eval()
    assert method.active_ln_post() is backbone.visual.ln_post  # the reference's test script
    with torch.no_grad():
        clip_path = method(images).anomaly_map
        method.test_ln_post = "trained"
        assert method.active_ln_post() is method.ln_post
        trained_path = method(images).anomaly_map
    assert not torch.allclose(clip_path, trained_path)
    method.test_ln_post = "clip"
    assert method.train().active_ln_post() is method.ln_post


def test_dropout_in_training_only(backbone, images):
    method = make(backbone)
    with torch.no_grad():
        method.train()
        first, second = method.loss(batch_of(images))["loss"], method.loss(batch_of(images))["loss"]
        assert not torch.isclose(first, second)  # SCA / SAF dropout draws differ
        method.eval()
        torch.testing.assert_close(method(images).anomaly_map, method(images).anomaly_map, rtol=0, atol=0)


def test_token_gradients_are_clipped_and_a_non_finite_step_is_skipped(backbone, images):
    method = make(backbone).train()
    params = learned(method)
    for param in params.values():
        param.grad = torch.full_like(param, 3.0)
    method.before_optimizer_step()
    for name in ("anomaly_token", "normal_token"):  # each token to norm 1, separately
        assert float(params[name].grad.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(params["ln_post.weight"].grad, torch.full_like(params["ln_post.weight"], 3.0))  # not clipped
    optimizer = torch.optim.AdamW(method.param_groups(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in params.items()}
    for param in params.values():
        param.grad = torch.ones_like(param)
    params["ln_post.bias"].grad[0] = float("nan")
    method.before_optimizer_step()
    optimizer.step()
    assert all(torch.equal(before[n], p) for n, p in params.items())  # no step, no weight decay


def test_param_groups_are_the_references(backbone):
    method = make(backbone, token_lr=5e-3)
    groups = method.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in learned(method).values())  # every learned tensor exactly once
    names = [g["name"] for g in groups]
    transforms = [f"layer_transforms.layer_{i + 1}" for i in LAYERS]
    assert names == ["anomaly_token", "normal_token", "ln_post", *transforms, "cross_attn"]
    assert [g.get("lr") for g in groups] == [5e-3, 5e-3, None, None, None, None, None, None]


def test_refuses_a_non_clip_backbone_k_shot_and_too_many_patches(backbone):
    from vlmad.backbones.dino import DinoBackbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dino = DinoBackbone("vlmad-tiny-dinov2", None, image_size=56)
    with pytest.raises(ConfigError, match="not a ClipBackbone") as err:
        VisualAD(dino)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not a ClipBackbone"):
        VisualAD(nn.Linear(2, 2))  # any other object
    with pytest.raises(ValueError, match="zero-shot only"):
        VisualAD(backbone, k_shot=1)
    with pytest.raises(ValueError, match="exceed sca_max_patches=8"):
        VisualAD(backbone, sca_max_patches=8)


def test_no_feature_cache(backbone, images):
    method = make(backbone)
    assert not method.cacheable
    with pytest.raises(ValueError, match="cacheable"):
        method.attach_cache(FeatureCache("memory"))
    from vlmad.engine.module import AnomalyModule

    module = AnomalyModule(method, feature_cache="memory")  # a sweep-wide setting: skipped with a log line
    assert module.feature_cache is None and method.feature_cache is None


def test_learned_state_reloads_without_the_backbone(backbone, images):
    method = make(backbone).eval()
    with torch.no_grad():
        for param in learned(method).values():
            param.add_(0.01 * torch.randn_like(param))
        expected = method(images)
    state = method.learned_state()
    assert state and not any(k.startswith("backbone.") for k in state)
    assert {"anomaly_token", "normal_token", "ln_post.weight", "ln_post.bias"} <= set(state)
    fresh = make(backbone).eval()
    fresh.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images).anomaly_map, expected.anomaly_map, rtol=0, atol=0)
    hparams = method.hparams_for_checkpoint()
    assert hparams["grid_size"] == SIZE // backbone.patch_size and hparams["feature_layers"] == LAYERS


@pytest.mark.parametrize(("data", "epochs"), [("visa", 1), ("mvtec", 2), ("synthetic_visa", 1)])
def test_config_epochs_and_optimizer_follow_the_official_scripts(tmp_path, data, epochs):
    cfg = compose("train", ["method=visualad", f"data={data}"], tmp_path)
    assert cfg.trainer.max_epochs == epochs and cfg.module.scheduler.T_max == epochs
    assert cfg.module.optimizer._target_ == "torch.optim.AdamW" and cfg.module.optimizer.weight_decay == 0.01
    assert cfg.backbone.pos_embed_interpolation == "bilinear"  # the reference's in-forward resize


def test_bench_inference_smoke():
    from vlmad.bench.visualad import default_layers, format_rows, inference

    assert default_layers(24) == LAYERS  # the reference's taps on ViT-L
    row = {"section": "inference", **inference(image_size=32, n_images=1, backbone_name="vlmad-tiny")}
    assert row["clip_s"] > 0 and row["visualad_s"] > 0 and row["ratio"] == row["visualad_s"] / row["clip_s"]
    assert "RANDOM weights" in format_rows([row])
