"""APRIL-GAN on the random-weights tiny CLIP (4 blocks, 64 px, 4x4 grid): contract, options, invariances."""

from __future__ import annotations

import pytest
import torch

from vlmad.backbones import ClipBackbone
from vlmad.methods.aprilgan import AprilGAN
from vlmad.methods.prompts import TextFeatureCache

LAYERS = [1, 3]


def tiny_clip() -> ClipBackbone:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return ClipBackbone("vlmad-tiny", None)


@pytest.fixture(scope="module")
def backbone():
    # Module scope: the text features of a class are cached per backbone, so they are encoded once here.
    return tiny_clip()


TEXT = TextFeatureCache()  # one prompt-ensemble encoding per class for the whole file (420 sentences each)


def make(backbone, **kwargs) -> AprilGAN:
    torch.manual_seed(0)
    model = AprilGAN(backbone, **{"feature_layers": LAYERS, **kwargs})
    model.text_cache = TEXT  # keyed by the backbone's signature, so sharing it is exact
    return model


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def prepared(backbone, k_shot: int = 0, classes=("bottle", "cable"), **kwargs) -> AprilGAN:
    model = make(backbone, k_shot=k_shot, **kwargs)
    for i, name in enumerate(classes):
        model.prepare(name, images(2, seed=10 + i) if k_shot else None)
    return model


@pytest.mark.parametrize("k_shot", [0, 2])
@pytest.mark.parametrize("image_score", ["text", "map_max", "fusion"])
def test_prediction_shapes_and_range(backbone, k_shot, image_score):
    model = prepared(backbone, k_shot, image_score=image_score)
    pred = model(images(), ["bottle", "cable", "bottle", "cable"])
    assert pred.pred_score.shape == (4,) and pred.anomaly_map.shape == (4, 64, 64)
    for t in (pred.pred_score, pred.anomaly_map):
        assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1


@pytest.mark.parametrize("k_shot", [0, 2])
def test_batch_of_four_equals_four_batches_of_one(backbone, k_shot):
    # The reference scores a batch with its first image's class; here every image keeps its own class.
    model = prepared(backbone, k_shot, smoothing_sigma=1.0, few_shot_layers=[0, 2])
    x, names = images(), ["bottle", "cable", "cable", "bottle"]
    batch = model(x, names)
    singles = [model(x[i : i + 1], names[i : i + 1]) for i in range(4)]
    torch.testing.assert_close(batch.pred_score, torch.cat([p.pred_score for p in singles]))
    torch.testing.assert_close(batch.anomaly_map, torch.cat([p.anomaly_map for p in singles]))
    assert not torch.allclose(model.text_features("bottle"), model.text_features("cable"))


def batch_dict() -> dict:
    mask = torch.zeros(4, 64, 64)
    mask[1:3, 20:40, 10:30] = 1.0
    return {"image": images(), "mask": mask[:, None], "category": ["bottle", "cable", "bottle", "cable"]}


def test_loss_gradients_only_on_projections(backbone):
    model = make(backbone)
    model.train()
    losses = model.loss(batch_dict())
    assert set(losses) == {"loss", "focal", "dice"}
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    torch.testing.assert_close(losses["loss"], losses["focal"] + losses["dice"])
    losses["loss"].backward()
    with_grad = {k for k, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"projections.{i}.{w}" for i in range(len(LAYERS)) for w in ("weight", "bias")}
    assert with_grad == set(model.learned_state())
    assert not model.backbone.training


@pytest.mark.parametrize("k_shot", [0, 1])
def test_precomputed_features_give_identical_results(backbone, k_shot):
    model = prepared(backbone, k_shot, image_score="fusion", few_shot_layers=[0, 3])
    batch = batch_dict()
    feats = model.encode_images(batch["image"])
    assert feats["stages"].shape == (4, len(LAYERS), 16, 64) and feats["global"].shape == (4, 32)
    assert ("few_shot_stages" in feats) == bool(k_shot)
    direct, cached = model(batch["image"], batch["category"]), model(batch["image"], batch["category"], feats)
    assert torch.equal(direct.pred_score, cached.pred_score) and torch.equal(direct.anomaly_map, cached.anomaly_map)
    assert torch.equal(model.loss(batch)["loss"], model.loss(batch, features=feats)["loss"])


def test_text_features_encoded_once_per_class(monkeypatch):
    backbone = tiny_clip()
    calls = []
    encode = backbone.encode_text
    monkeypatch.setattr(backbone, "encode_text", lambda tokens: calls.append(len(tokens)) or encode(tokens))
    model = make(backbone, class_names={"cat_a": "widget"})
    model.text_cache = TextFeatureCache()  # a fresh one: count every encoding
    for _ in range(2):
        model.prepare("bottle")
        model(images(2), ["bottle", "bottle"])
        model.loss({**batch_dict(), "category": ["bottle", "cat_a", "bottle", "cat_a"]})
    assert calls == [245, 175, 245, 175]  # normal + anomalous sentences of "bottle", then of "widget"
    second = make(backbone)
    second.text_cache = model.text_cache  # e.g. a disk text cache shared by the jobs of a sweep
    second.prepare("bottle")
    assert len(calls) == 4
    named = model.loss({**batch_dict(), "category": ["x"] * 4, "class_name": ["bottle", "widget"] * 2})
    assert len(calls) == 4  # batch["class_name"] takes precedence over the category map
    torch.testing.assert_close(named["loss"], model.loss({**batch_dict(), "category": ["bottle", "cat_a"] * 2})["loss"])


def test_stage_reduce_sum_is_n_times_mean(backbone):
    x, names = images(), ["bottle"] * 4
    mean, total = (prepared(backbone, stage_reduce=r)(x, names).anomaly_map for r in ("mean", "sum"))
    torch.testing.assert_close(total, len(LAYERS) * mean)
    assert total.max() > 1  # the reference's range [0, n_stages]
    fs_mean, fs_sum = (prepared(backbone, 2, stage_reduce=r)(x, names).anomaly_map for r in ("mean", "sum"))
    # k-shot: the reference sum Σ P_s + Σ d_s over its range n + 2 n_fs (a positive multiple: same ranking)
    torch.testing.assert_close(fs_sum, 3 * len(LAYERS) * fs_mean)
    assert (fs_sum - total).min() >= 0 and fs_mean.max() <= 1


def test_invalid_options_raise(backbone):
    for kwargs in [
        {"stage_reduce": "max"},
        {"image_score": "clip"},
        {"image_fusion": "minmax"},
        {"feature_layers": [1, backbone.depth]},
        {"few_shot_layers": [-1]},
        {"feature_layers": []},
        {"temperature": 0.0},
        {"k_shot": -1},
        {"prompts": "nope"},
    ]:
        with pytest.raises(ValueError):
            make(backbone, **kwargs)
    model = make(backbone, k_shot=2)
    with pytest.raises(ValueError, match="reference images"):
        model.prepare("bottle")
    with pytest.raises(RuntimeError, match="no few-shot memory"):
        model(images(1), ["bottle"])
    with pytest.raises(RuntimeError, match="fuse_scores_minmax"):
        prepared(backbone, 1, image_fusion="transductive_minmax")(images(1), ["bottle"])


def test_fuse_scores_minmax():
    fused = AprilGAN.fuse_scores_minmax(torch.tensor([0.2, 0.4, 0.6]), torch.tensor([3.0, 5.0, 4.0]))
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, torch.tensor([0.1, 0.7, 0.55], dtype=torch.float64))


def test_convert_official_checkpoint_round_trip(backbone):
    model = make(backbone)
    official = {
        "trainable_linearlayer": {
            k.replace("projections.", "fc."): v.clone() + 1 for k, v in model.learned_state().items()
        }
    }
    converted = AprilGAN.convert_official_checkpoint(official)
    assert set(converted) == set(model.learned_state())
    other = make(backbone)
    other.load_state_dict(converted, strict=False)
    for key, value in other.learned_state().items():
        assert torch.equal(value, model.learned_state()[key] + 1)
    assert AprilGAN.convert_official_checkpoint(official["trainable_linearlayer"]).keys() == converted.keys()
    with pytest.raises(ValueError, match="unexpected key"):
        AprilGAN.convert_official_checkpoint({"trainable_linearlayer": {"proj.0.weight": torch.zeros(1)}})
    hparams = model.hparams_for_checkpoint()
    assert hparams["feature_layers"] == LAYERS and hparams["width"] == 64 and hparams["embed_dim"] == 32
