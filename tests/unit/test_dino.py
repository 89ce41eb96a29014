"""The DINOv2 family: DinoBackbone (timm), the backbone-family refusal, AnomalyDINO, SubspaceAD, reference draws."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from vlmad.backbones import ClipBackbone, DinoBackbone
from vlmad.backbones.dino import convert_hf_state_dict, hub_resize_pos_embed
from vlmad.data import MVTec, Preprocess
from vlmad.data.datamodule import AnomalyDataModule
from vlmad.data.references import ReferenceDraw, fixed_rotations, random_rotation_passes, shuffle_pick, sorted_slice
from vlmad.errors import ConfigError
from vlmad.methods.anomalyclip import AnomalyCLIP
from vlmad.methods.anomalydino import AnomalyDINO, class_set, first_component, foreground_mask
from vlmad.methods.aprilgan import AprilGAN
from vlmad.methods.musc import MuSc
from vlmad.methods.subspacead import SubspaceAD, fit_pca
from vlmad.methods.winclip import WinCLIP

SIZE = 56  # 4x4 patches of 14 px


def tiny(**kwargs) -> DinoBackbone:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the RANDOM-weights warning (asserted separately)
        return DinoBackbone("vlmad-tiny-dinov2", image_size=kwargs.pop("image_size", SIZE), **kwargs)


@pytest.fixture(scope="module")
def dino() -> DinoBackbone:
    return tiny()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- backbone
def test_backbone_is_frozen_and_drops_cls_and_registers(dino):
    assert dino.family == "dinov2" and dino.num_prefix_tokens == 5 and dino.grid_size == 4 and dino.depth == 18
    assert not any(p.requires_grad for p in dino.parameters())
    assert not dino.train().training and not dino.model.training
    full: dict[int, torch.Tensor] = {}
    hooks = [dino.model.blocks[i].register_forward_hook(lambda _m, _i, o, i=i: full.__setitem__(i, o)) for i in (3, 17)]
    x = images(2)
    with torch.no_grad():
        out = dino.encode_image(x, [3, -1])
    for h in hooks:
        h.remove()
    assert out.tokens.shape == (2, 16, 48) and set(out.intermediates) == {3, 17}
    assert full[3].shape == (2, 5 + 16, 48)  # CLS + 4 registers + patches inside the model
    assert torch.equal(out.intermediates[3], full[3][:, 5:])
    assert torch.equal(out.tokens, dino.model.forward_features(x)[:, 5:])  # after the final LayerNorm
    assert dino.preprocess_config() == {
        "image_size": SIZE,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "image_resize": "pil",
    }


def test_backbone_stops_after_the_deepest_tap(dino):
    calls = []
    hook = dino.model.blocks[5].register_forward_hook(lambda *_: calls.append(5))
    with torch.no_grad():
        out = dino.encode_image(images(1), [2, 4], final=False)
    hook.remove()
    assert out.tokens is None and set(out.intermediates) == {2, 4} and not calls
    assert dino.resolve_layers([-1, -18, 0]) == [17, 0, 0]
    with pytest.raises(ValueError, match="out of range"):
        dino.resolve_layers([18])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny(image_size=60)


def test_random_weights_warn_and_come_from_their_own_seed():
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="RANDOM weights"):
        a = DinoBackbone("vlmad-tiny-dinov2", image_size=SIZE, random_seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's RNG is neither read nor moved
    b, c = tiny(random_seed=0), tiny(random_seed=1)
    assert a.weights_id() == b.weights_id() != c.weights_id()
    assert a.signature() == b.signature() != tiny(random_seed=0, pos_embed_interpolation="dinov2_hub").signature()


def test_position_table_resizes(dino):
    native = tiny(image_size=224)  # the tiny config's native 16x16 table
    table = native.model.pos_embed.detach()  # (1, 256, C): no CLS row (registers model, no_embed_class)
    hub = tiny(pos_embed_interpolation="dinov2_hub").model.pos_embed.detach()
    assert torch.equal(hub, hub_resize_pos_embed(table, (4, 4)))
    timm_table = dino.model.pos_embed.detach()
    expected = torch.nn.functional.interpolate(
        table.reshape(1, 16, 16, -1).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", antialias=True
    )
    torch.testing.assert_close(timm_table, expected.permute(0, 2, 3, 1).reshape(1, 16, -1))
    assert (hub - timm_table).abs().max() > 1e-3  # the two references' resizes differ


def test_weight_files_timm_hub_and_hugging_face_layouts(tmp_path):
    ref = tiny(image_size=224)
    state = {k: v.clone() for k, v in ref.model.state_dict().items()}
    safetensors.torch.save_file(state, tmp_path / "timm.safetensors")
    # dinov2 hub layout (registers): CLS carries position row 0, registers apart, a mask token
    row0 = torch.randn(1, 1, 48)
    hub = {k: v for k, v in state.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    hub |= {"cls_token": state["cls_token"] - row0, "register_tokens": state["reg_token"]}
    hub |= {"pos_embed": torch.cat([row0, state["pos_embed"]], 1), "mask_token": torch.zeros(1, 48)}
    torch.save(hub, tmp_path / "hub.pth")
    for name in ("timm.safetensors", "hub.pth"):
        loaded = DinoBackbone("vlmad-tiny-dinov2", pretrained=str(tmp_path / name), image_size=224)
        for key, value in state.items():
            torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
        assert loaded.weights_id().startswith("sha256:")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"junk\.pth"):
        DinoBackbone("vlmad-tiny-dinov2", pretrained=str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match="neither an existing weights file nor a timm tag"):
        DinoBackbone("vit_small_patch14_dinov2", pretrained="no-such-tag")
    # Hugging Face Dinov2WithRegisters (transformers 5 names) -> timm, round trip of the converter
    hf = {
        "embeddings.cls_token": state["cls_token"] - row0,
        "embeddings.register_tokens": state["reg_token"],
        "embeddings.position_embeddings": torch.cat([row0, state["pos_embed"]], 1),
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(ref.depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = state[src + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = state[src + "attn.qkv.bias"].chunk(3)
        hf |= {
            dst + "attention.q_proj.weight": q,
            dst + "attention.k_proj.weight": k,
            dst + "attention.v_proj.weight": v,
        }
        hf |= {dst + "attention.q_proj.bias": qb, dst + "attention.k_proj.bias": kb, dst + "attention.v_proj.bias": vb}
        hf |= {dst + "attention.o_proj." + s: state[src + "attn.proj." + s] for s in ("weight", "bias")}
        hf |= {dst + f"{n}.{s}": state[src + f"{n}.{s}"] for n in ("norm1", "norm2") for s in ("weight", "bias")}
        hf |= {dst + f"mlp.{n}.{s}": state[src + f"mlp.{n}.{s}"] for n in ("fc1", "fc2") for s in ("weight", "bias")}
        hf |= {
            dst + "layer_scale1.lambda1": state[src + "ls1.gamma"],
            dst + "layer_scale2.lambda1": state[src + "ls2.gamma"],
        }
    converted = convert_hf_state_dict({f"dinov2.{k}": v for k, v in hf.items()})
    assert converted.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------------- refusal
@pytest.mark.parametrize(
    "method",
    [
        lambda b: WinCLIP(b),
        lambda b: AnomalyCLIP(b),
        lambda b: AprilGAN(b, feature_layers=[1, 3]),
        lambda b: MuSc(b, feature_layers=[1, 3]),
    ],
    ids=["winclip", "anomalyclip", "aprilgan", "musc"],
)
def test_clip_methods_refuse_a_dinov2_backbone(dino, method):
    with pytest.raises(ConfigError) as err:
        method(dino)
    message = str(err.value)
    assert "\n" not in message and "needs a CLIP backbone" in message and "DINOv2" in message
    assert "vlmad-tiny-dinov2" in message


@pytest.mark.parametrize("cls", [AnomalyDINO, SubspaceAD])
def test_dinov2_methods_refuse_a_clip_backbone(tiny_backbone, cls):
    with pytest.raises(
        ConfigError, match=rf"^{cls.__name__} needs a DINOv2 backbone, got the CLIP backbone 'vlmad-tiny'"
    ):
        cls(tiny_backbone)


# ---------------------------------------------------------------------------------------------------- AnomalyDINO
def test_class_switches_resolve_per_dataset():
    table = {"mvtec": ["capsule", "screw"], "visa": "all", "default": "none"}
    assert class_set(table, "vlmad.data.MVTec", "masking") == frozenset({"capsule", "screw"})
    assert class_set(table, "vlmad.data.VisA", "masking") is True
    assert class_set(table, "vlmad.data.Synthetic", "masking") is False
    assert class_set("all", None, "x") is True and class_set(None, None, "x") is False
    with pytest.raises(ValueError, match="no entry"):
        class_set({"mvtec": "all"}, "vlmad.data.VisA", "masking")


def test_first_component_matches_an_eigendecomposition():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 64, 16, generator=gen) * torch.linspace(3, 0.5, 16)  # a clear leading direction
    scores, v = first_component(feats)
    centred = feats.double() - feats.double().mean(1, keepdim=True)
    top = torch.linalg.eigh(centred.transpose(1, 2) @ centred)[1][..., -1]
    top = top * torch.sign(torch.gather(top, 1, top.abs().argmax(1, keepdim=True)))  # largest loading positive
    torch.testing.assert_close(v.double(), top, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.double(), (centred @ top[..., None])[..., 0], atol=1e-4, rtol=1e-4)


def test_foreground_mask_is_cv2s_morphology_on_the_flat_column():
    import cv2

    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(8, 36, generator=gen) * 12
    mask = foreground_mask(scores, (6, 6))
    kernel = np.ones((3, 3), np.uint8)
    for s, m in zip(scores.numpy(), mask.numpy(), strict=True):
        fg = s[:, None] > 10
        if fg.reshape(6, 6)[1:4, 1:4].sum() <= 9 * 0.35:  # centre window int(0.2*6):int(0.8*6)
            fg = -s[:, None] > 10
        fg = cv2.dilate(fg.astype(np.uint8), kernel).astype(bool)
        fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
        assert np.array_equal(fg[:, 0], m)


def prepared_adino(dino, masking="none", k=1, rotation="all") -> AnomalyDINO:
    model = AnomalyDINO(dino, k_shot=k, rotation=rotation, masking=masking, mask_threshold=0.5).eval()
    views = len(model.rotation_angles) if model.rotates("a") else 1
    model.prepare("a", images(k * views, seed=1))
    model.prepare("b", images(k * views, seed=2))
    return model


@pytest.mark.parametrize("masking", ["none", "all"])
def test_anomalydino_scores_maps_and_batches(dino, masking):
    model = prepared_adino(dino, masking)
    assert model.memory["a"].shape == (8 * 16, 48) and ("masking" in model.class_constants("a")) == (masking == "all")
    x = images(4, seed=3)
    with torch.no_grad():
        whole = model(x, ["a"] * 4)
        ones = [model(img[None], ["a"]) for img in x]
        mixed = model(x, ["a", "b", "a", "b"])
        b = model(x, ["b"] * 4)
    assert whole.pred_score.shape == (4,) and whole.anomaly_map.shape == (4, SIZE, SIZE)
    for out in (whole, mixed):
        assert out.pred_score.dtype == out.anomaly_map.dtype == torch.float32
        assert out.anomaly_map.min() >= 0 and out.anomaly_map.max() <= 1 and 0 <= out.pred_score.min() <= 1
    torch.testing.assert_close(torch.cat([o.pred_score for o in ones]), whole.pred_score)
    torch.testing.assert_close(torch.cat([o.anomaly_map for o in ones]), whole.anomaly_map)
    torch.testing.assert_close(mixed.pred_score[1::2], b.pred_score[1::2])  # each image against its own class
    torch.testing.assert_close(mixed.pred_score[::2], whole.pred_score[::2])
    assert not torch.equal(whole.pred_score, b.pred_score)
    # an image from the bank is at distance 0 from it (no masking: every patch scored)
    if masking == "none":
        with torch.no_grad():
            assert model(images(1, seed=1), ["a"]).pred_score.item() == pytest.approx(0, abs=1e-5)


def test_anomalydino_needs_its_views(dino):
    model = AnomalyDINO(dino, k_shot=2, rotation=["a"])
    draw = model.reference_draw("a")
    assert draw.rule == "sorted_slice" and draw.views is not None and model.reference_draw("b").views is None
    with pytest.raises(ValueError, match=r"AnomalyDINO\(k_shot=2, 8 views\) needs 16 reference views for 'a', got 2"):
        model.prepare("a", images(2))
    model.prepare("b", images(2))  # not rotated: the two references themselves
    with pytest.raises(RuntimeError, match="no memory bank for 'c'"):
        model.class_constants("c")
    with pytest.raises(ValueError, match="k_shot must be >= 1"):
        AnomalyDINO(dino, k_shot=0)


# ---------------------------------------------------------------------------------------------------- SubspaceAD
def prepared_ssad(dino, aug_count=3, k=1, **kwargs) -> SubspaceAD:
    model = SubspaceAD(dino, k_shot=k, aug_count=aug_count, **kwargs).eval()
    n = 2 * k * (1 + aug_count) if aug_count else k
    model.prepare("a", images(n, seed=1))
    model.prepare("b", images(n, seed=2))
    return model


def test_subspacead_scores_maps_and_batches(dino):
    model = prepared_ssad(dino)
    assert model.blocks == [6, 5, 4, 3, 2, 1, 0]  # -12..-18 of 18 blocks
    constants = model.class_constants("a")
    r = constants["basis"].shape[1]
    assert constants["mean"].shape == (48,) and 0 < r <= 48 and constants["scale"] > 0
    x = images(4, seed=3)
    with torch.no_grad():
        whole = model(x, ["a"] * 4)
        ones = [model(img[None], ["a"]) for img in x]
        raw_score, raw_maps = model.raw_score(x, constants)
    assert whole.pred_score.shape == (4,) and whole.anomaly_map.shape == (4, SIZE, SIZE)
    assert whole.anomaly_map.min() >= 0 and whole.anomaly_map.max() < 1 and whole.pred_score.max() < 1
    torch.testing.assert_close(torch.cat([o.pred_score for o in ones]), whole.pred_score)
    torch.testing.assert_close(torch.cat([o.anomaly_map for o in ones]), whole.anomaly_map)
    c = constants["scale"]
    torch.testing.assert_close(whole.pred_score, raw_score / (raw_score + c))  # the reference's ranking
    assert torch.equal(raw_score.argsort(), whole.pred_score.argsort())
    n_top = int(0.01 * SIZE * SIZE)
    torch.testing.assert_close(raw_score, raw_maps.flatten(1).topk(n_top, 1).values.mean(1))


def test_subspacead_references_and_options(dino):
    model = SubspaceAD(dino, k_shot=2, aug_count=3)
    draw = model.reference_draw("a")
    assert draw.rule == "shuffle" and draw.views is not None and model.reference_draw("transistor").views is None
    with pytest.raises(ValueError, match=r"needs 16 reference views for 'a', got 8"):
        model.prepare("a", images(8))
    model.prepare("transistor", images(2))  # no augmentation: both passes see the two references
    concat = prepared_ssad(dino, aug_count=0, feature_layers=[-1, -2], aggregation="concat")
    assert concat.class_constants("a")["mean"].shape == (96,)
    with pytest.raises(ValueError, match="out of range"):
        SubspaceAD(dino, feature_layers=[-19])


def test_fit_pca_two_passes():
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(200, 6, generator=gen), torch.randn(200, 6, generator=gen) * torch.arange(1, 7)
    pca = fit_pca(first, second, explained=0.9)
    mean = first.double().mean(0)
    cov = (second.double() - mean).T @ (second.double() - mean) / 199  # centred with the FIRST pass's mean
    torch.testing.assert_close(pca["mean"], mean)
    torch.testing.assert_close(pca["cov"], cov)
    evals = torch.linalg.eigvalsh(cov).flip(0)
    r = int(np.searchsorted((evals.cumsum(0) / evals.sum()).numpy(), 0.9)) + 1
    assert pca["components"].shape == (6, r) and torch.allclose(pca["eigvals"], evals[:r])


# ---------------------------------------------------------------------------------------------------- references
def test_reference_rules():
    assert sorted_slice(10, 2, 0) == [0, 1] and sorted_slice(10, 2, 3) == [6, 7]
    # SubspaceAD: one random stream seeded once, a shuffle per category in sorted order (k <= n only)
    sizes = {"b": 5, "a": 7, "c": 0, "d": 1}
    rng = random.Random(42)
    expected = {}
    for name in sorted(sizes):
        order = list(range(sizes[name]))
        if sizes[name] and sizes[name] >= 2:
            rng.shuffle(order)
        expected[name] = order[:2]
    assert all(shuffle_pick(sizes, c, 2, 42) == expected[c] for c in ("a", "b", "d"))
    with pytest.raises(ValueError, match="unknown reference rule"):
        ReferenceDraw("nope")


def test_views_rotations():
    img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    views = fixed_rotations([0, 90, 180])([img, img[::-1]], torch.Generator())
    assert len(views) == 6 and np.array_equal(views[0], img) and views[1].shape == img.shape
    passes = random_rotation_passes(2, passes=2)([img, img[::-1]], torch.Generator().manual_seed(0))
    assert len(passes) == 2 * 2 * 3
    assert all(np.array_equal(passes[i], img) for i in (0, 6)) and np.array_equal(passes[3], img[::-1])
    assert not np.array_equal(passes[1], passes[7])  # the second pass draws new angles


def test_datamodule_draws_with_the_method_rule(tmp_path, dino):
    root = tmp_path / "mvtec"
    rng = np.random.default_rng(0)
    for split, names in (("train/good", [f"{i:03d}" for i in range(6)]), ("test/good", ["000"])):
        (root / "obj" / split).mkdir(parents=True)
        for name in names:
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                root / "obj" / split / f"{name}.png"
            )
    dm = AnomalyDataModule(MVTec(root), num_workers=0, **dino.preprocess_config())
    model = AnomalyDINO(dino, k_shot=2)
    refs, paths = dm.reference_images("obj", 2, 1, model.reference_draw("obj"))
    assert [p[-7:] for p in paths] == ["002.png", "003.png"] and refs.shape == (16, 3, SIZE, SIZE)
    plain, _ = dm.reference_images("obj", 2, 1, ReferenceDraw("sorted_slice"))
    torch.testing.assert_close(refs[0], plain[0])  # the 0 deg view is the reference itself
    with pytest.raises(ValueError, match="with seed 3"):
        dm.reference_images("obj", 2, 3, model.reference_draw("obj"))
    _, paths = dm.reference_images("obj", 2, 42, ReferenceDraw("shuffle"))
    order = list(range(6))
    random.Random(42).shuffle(order)
    assert [p[-7:] for p in paths] == [f"{i:03d}.png" for i in order[:2]]
    ssad, _ = dm.reference_images("obj", 1, 0, SubspaceAD(dino, k_shot=1, aug_count=2).reference_draw("obj"))
    assert ssad.shape == (2 * 3, 3, SIZE, SIZE)


def test_preprocess_torchvision_resize():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    tv = Preprocess(28, mean, std, image_resize="torchvision")(Image.fromarray(img), None)[0]
    u8 = resize(
        torch.from_numpy(img).permute(2, 0, 1), [28, 28], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    torch.testing.assert_close(tv, (u8.float() / 255 - 0.5) / 0.25)
    pil = Preprocess(28, mean, std)(Image.fromarray(img), None)[0]
    assert (pil - tv).abs().max() > 0  # the two processors differ
    with pytest.raises(ValueError, match="unknown image_resize"):
        Preprocess(28, mean, std, image_resize="cv2")


def test_clip_backbone_family(tiny_backbone):
    assert isinstance(tiny_backbone, ClipBackbone) and tiny_backbone.family == "clip"


def test_anomalydino_low_precision_distances(dino):
    model = prepared_adino(dino)
    x = images(2, seed=3)
    with torch.no_grad():
        full = model(x, ["a", "a"])
        model.distance_dtype = "bf16"
        half = model(x, ["a", "a"])
    assert half.anomaly_map.dtype == torch.float32 and not torch.equal(half.anomaly_map, full.anomaly_map)
    torch.testing.assert_close(half.anomaly_map, full.anomaly_map, atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="distance_dtype"):
        AnomalyDINO(dino, distance_dtype="int8")
