"""VisualAD vs the official implementation's reference fixtures (tests/fixtures/visualad/README.md).

Every fixture file is tested and every setting (size, taps, anchors, dropout, loss constants, optimiser groups,
batch order, dropout masks) is read from it; the method is built from the shipped conf/method/visualad.yaml with
only those settings replaced, plus the one reference switch ``output_scale: raw`` (the shipped ``unit`` map is an
affine image of it: test_shipped_defaults_affine). Each stage runs on the reference's own input when the fixture
holds it, else on vlmad's upstream output; comparisons of exactly the omitted keys are skipped.
Run with ``-s`` to see the max deviation of every key.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from reference import assert_close, fixture_backbone, fixture_files, load_fixture, meta, omitted, shipped_defaults
from torch import nn

from vlmad.methods.ops import gaussian_blur
from vlmad.methods.visualad import COS_EPS, PATCH_START, VisualAD

pytestmark = pytest.mark.parity

FILES = fixture_files("visualad")
FILE_CASES = [pytest.param(path, id=path.stem) for path in FILES]
METHOD_CONF = Path(__file__).resolve().parents[2] / "conf" / "method" / "visualad.yaml"
REFERENCE = {"output_scale": "raw"}  # the reference's layer sum (the shipped unit scale is affine to it)


@functools.cache
def _fixture(path) -> dict:
    return load_fixture(path)


_BACKBONES: dict = {}


def _backbone(path, ckpt_dir):
    if path not in _BACKBONES:
        fx = _fixture(path)
        size = meta(fx, "image_size")
        _BACKBONES[path] = fixture_backbone(fx, ckpt_dir, image_size=size, pos_embed_interpolation="bilinear")
    return _BACKBONES[path]


def _layers(fx: dict) -> list[int]:
    """1-based tapped layers of the fixture."""
    return [int(i) for i in meta(fx, "features_list_1based")]


def _token_group(fx: dict) -> dict:
    return next(g for g in meta(fx, "optimizer_groups") if "anomaly_token" in g["params"])


def _check_constants(fx: dict) -> None:
    """Settings the method does not expose must be the ones the fixture was made with."""
    assert meta(fx, "patch_start_idx") == PATCH_START
    assert list(meta(fx, "token_order")) == ["anomaly", "normal", "class", "patches"]
    assert meta(fx, "cos_eps") == COS_EPS
    assert meta(fx, "focal")["smooth"] == 1e-5 and meta(fx, "dice_smooth") == 1.0  # vlmad.methods.ops defaults


def _method(path, ckpt_dir, reference: bool = True) -> VisualAD:
    """The shipped defaults with the fixture's settings, its initial tensors loaded."""
    fx = _fixture(path)
    _check_constants(fx)
    settings = {
        **shipped_defaults("visualad"),
        "feature_layers": [i - 1 for i in _layers(fx)],
        "num_anchors": meta(fx, "num_anchors"),
        "sca_max_patches": meta(fx, "sca_max_patches"),
        "res_scale_init": meta(fx, "res_scale_init"),
        "dropout": meta(fx, "dropout"),
        "transform_hidden_dim": meta(fx, "transform_hidden_dim"),
        "smoothing_sigma": meta(fx, "sigma"),
        "smoothing_reference_size": meta(fx, "image_size"),  # the reference's sigma, at the fixture size
        "topk_ratio": meta(fx, "topk_ratio"),
        "contrastive_margin": meta(fx, "contrastive")["margin"],
        "focal_gamma": meta(fx, "focal")["gamma"],
        "token_lr": _token_group(fx)["lr"],
        "token_grad_clip": meta(fx, "clip_grad_max_norm_per_token"),
        **(REFERENCE if reference else {}),
    }
    method = VisualAD(_backbone(path, ckpt_dir), **settings)
    assert method.topk(meta(fx, "image_size")) == meta(fx, "topk_k")
    state = method.state_dict()
    with torch.no_grad():
        for key in [k for k in fx if k.startswith("init/")]:
            name, value = key[len("init/") :], fx[key]
            target = state[name]
            if name.endswith("pos_encoding"):  # only the rows the grid reads are stored
                target[:, : value.shape[1]].copy_(value)
            else:
                target.copy_(value)
    return method.eval()


class Checker:
    """assert_close on fixture keys, skipping omitted ones and recording max deviations."""

    def __init__(self, fx: dict, label: str) -> None:
        self.fx, self.label, self.skip = fx, label, omitted(fx)

    def __call__(self, key: str, ours: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5, mask=None) -> None:
        if key in self.skip:
            return
        ref = self.fx[key]
        ours = ours.detach().reshape(ref.shape)
        if mask is not None:
            ours, ref = ours[mask], ref[mask]
        dev = assert_close(key, ours, ref, rtol=rtol, atol=atol)
        ours64, ref64 = ours.double(), ref.double()
        budget = float(((ours64 - ref64).abs() / (atol + rtol * ref64.abs())).max())
        print(f"[{self.label}] {key}: max|Δ| {dev:.3g} ({budget:.0%} of the tolerance)")

    def grad(self, key: str, ours: torch.Tensor) -> None:
        """The README's gradient tolerance: 1e-4·|ref| + 1e-4·max|ref| + 1e-10."""
        if key in self.skip:
            return
        ref = self.fx[key]
        self(key, ours[tuple(slice(0, n) for n in ref.shape)], rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-10)

    def given(self, key: str, ours: torch.Tensor) -> torch.Tensor:
        """The reference's value as the next stage's input when the fixture holds it, else ours."""
        return ours if key in self.skip or key not in self.fx else self.fx[key].to(ours.dtype).reshape(ours.shape)


def _features(check: Checker, method: VisualAD, images: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """Tower outputs compared with ``{prefix}/…``, then replaced by the reference's where it has them."""
    features = method.encode_images(images)
    for name in ("anomaly", "normal", "class"):
        key = f"{prefix}/{name}_features"
        if key in check.fx:
            check(key, features[name])
            features[name] = check.given(key, features[name])
    for j, layer in enumerate(_layers(check.fx)):
        key = f"{prefix}/layer{layer}/tokens"
        if key in check.fx:
            check(key, features["tokens"][:, j])
            features["tokens"][:, j] = check.given(key, features["tokens"][:, j])
    return features


def _heads(check: Checker, method: VisualAD, features: dict, prefix: str) -> dict[str, torch.Tensor]:
    out = method.layer_outputs(features)
    for j, layer in enumerate(_layers(check.fx)):
        for name in ("sca_anomaly", "sca_normal", "grid_map"):
            key = f"{prefix}/layer{layer}/{name}"
            if key in check.fx or key in check.skip:
                check(key, out[name][:, j])
    return out


@pytest.mark.parametrize("path", FILE_CASES)
def test_inference(path, ckpt_dir):
    fx = _fixture(path)
    check = Checker(fx, path.stem)
    method = _method(path, ckpt_dir)
    images = fx["inputs/images"]
    with torch.no_grad():
        check("debug/ln_pre_input", method.token_sequence(images[:1])[0])
        features = _features(check, method, images, "forward")
        grids = _heads(check, method, features, "forward")["grid_map"]
        for j, layer in enumerate(_layers(fx)):
            grids[:, j] = check.given(f"forward/layer{layer}/grid_map", grids[:, j])
        summed = method.upsample(grids).sum(dim=1)
        check("forward/anomaly_map", summed)
        smoothed = gaussian_blur(check.given("forward/anomaly_map", summed), method.smoothing_sigma)
        check("forward/anomaly_map_smoothed", smoothed)
        check("forward/image_score", method.topk_mean(check.given("forward/anomaly_map_smoothed", smoothed)))
        one_by_one = [method(image[None], [name]) for image, name in zip(images, meta(fx, "class_names"), strict=True)]
    # end to end through the eval forward, one image at a time as the reference
    check("forward/anomaly_map_smoothed", torch.cat([p.anomaly_map for p in one_by_one]))
    check("forward/image_score", torch.cat([p.pred_score for p in one_by_one]))


@pytest.mark.parametrize("path", FILE_CASES)
def test_shipped_defaults_affine(path, ckpt_dir):
    """The shipped ``unit`` outputs are (raw / L + 2) / 4 of the reference's: in [0, 1], same AUROC/AP/AUPRO."""
    fx = _fixture(path)
    method = _method(path, ckpt_dir, reference=False)
    with torch.no_grad():
        pred = method(fx["inputs/images"], list(meta(fx, "class_names")))
    n_layers = len(_layers(fx))
    for key, ours in (("forward/anomaly_map_smoothed", pred.anomaly_map), ("forward/image_score", pred.pred_score)):
        if key not in omitted(fx):
            assert_close(f"{key} (defaults)", ours, (fx[key] / n_layers + 2) / 4)
    assert float(pred.anomaly_map.min()) >= 0 and float(pred.anomaly_map.max()) <= 1


def _train_batch(fx: dict) -> dict:
    order = fx["train/batch_index"]
    labels = fx["inputs/labels"][order]
    return {
        "image": fx["inputs/images"][order],
        "mask": fx["inputs/masks"][order],
        "label": labels,
        "has_mask": torch.ones_like(labels, dtype=torch.bool),
    }


def _check_losses(check: Checker, method: VisualAD, batch: dict, prefix: str) -> dict:
    features = _features(check, method, batch["image"], prefix)
    out = _heads(check, method, features, prefix)
    up = method.upsample(out["grid_map"])
    check(f"{prefix}/seg_scores", method.topk_mean(up.sum(dim=1)))
    check(f"{prefix}/seg_parts", method.seg_loss_parts(up, batch["mask"]))
    losses = method.loss(batch)  # the method's own path, end to end
    for name in ("image_loss", "contrastive_loss", "seg_loss"):
        check(f"{prefix}/{name}", losses[name])
    check(f"{prefix}/total_loss", losses["loss"])
    return losses


def _optimizer(fx: dict, method: VisualAD) -> torch.optim.Optimizer:
    """The shipped optimizer (conf/method/visualad.yaml) over method.param_groups(), checked against the reference's."""
    factory = instantiate(OmegaConf.load(METHOD_CONF).module.optimizer)
    optimizer = factory(params=method.param_groups())
    names = {id(p): n for n, p in method.named_parameters()}
    ours = {frozenset(names[id(p)] for p in g["params"]): g for g in optimizer.param_groups}
    for ref in meta(fx, "optimizer_groups"):
        group = ours.pop(frozenset(ref["params"]))  # KeyError: not the reference's grouping
        for setting in ("lr", "weight_decay", "eps"):
            assert group[setting] == pytest.approx(ref[setting]), (ref["params"][0], setting)
        assert list(group["betas"]) == pytest.approx(list(ref["betas"]))
    assert not ours, f"groups the reference does not have: {list(ours)}"
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {n for ref in meta(fx, "optimizer_groups") for n in ref["params"]}
    return optimizer


def _set_dropout(method: VisualAD, p: float) -> None:
    for module in method.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


@pytest.mark.parametrize("path", FILE_CASES)
def test_training_step_and_after_step(path, ckpt_dir):
    fx = _fixture(path)
    check = Checker(fx, path.stem)
    method = _method(path, ckpt_dir).train()
    _set_dropout(method, 0.0)  # the fixture's train/ step has its dropouts replaced by identities
    batch = _train_batch(fx)
    optimizer = _optimizer(fx, method)
    optimizer.zero_grad()
    _check_losses(check, method, batch, "train")["loss"].backward()
    named = dict(method.named_parameters())
    for key in [k for k in fx if k.startswith("train/grads/")]:
        name = key[len("train/grads/") :]
        check.grad(key, named[name].grad)
        if name.endswith("pos_encoding"):  # rows past the grid are never read
            assert not named[name].grad[:, fx[key].shape[1] :].any()
    method.before_optimizer_step()  # per-token norm clipping
    for token in ("anomaly_token", "normal_token"):
        check.grad(f"train/grads_clipped/{token}", named[token].grad)
    optimizer.step()
    for key in [k for k in fx if k.startswith("train/params_after/")]:
        name = key[len("train/params_after/") :]
        ref_grad = fx[f"train/grads/{name}"]
        # AdamW's first step moves an entry by ~lr·sign(grad): defined where the gradient is clearly non-zero
        # (the floor excludes k_norm.bias, whose true gradient is exactly zero and whose reference holds noise)
        defined = ref_grad.abs() > 1e-4 * ref_grad.abs().max() + 1e-10
        ours = named[name][tuple(slice(0, n) for n in ref_grad.shape)]
        if defined.any():
            check(key, ours, mask=defined)
        # everywhere: within two first-step moves (each ≤ lr·(1 + wd·|p|)) of the reference
        group = next(g for g in meta(fx, "optimizer_groups") if name in g["params"])
        bound = 2 * group["lr"] * (1 + group["weight_decay"] * fx[f"init/{name}"].abs()) + 1e-5
        assert ((ours.detach() - fx[key]).abs() <= bound).all(), key
    # the official test path on the stepped model: CLIP's ln_post, not the trained one (test_ln_post: clip)
    method.eval()
    with torch.no_grad():
        features = _features(check, method, fx["inputs/images"], "after_step")
        _heads(check, method, features, "after_step")
        check("after_step/image_score", method(fx["inputs/images"]).pred_score)


class MaskedDropout(nn.Module):
    """Applies the reference's recorded keep-masks in call order (cyclically, once per forward): x · mask / (1 - p)."""

    def __init__(self, masks: list[torch.Tensor], p: float) -> None:
        super().__init__()
        self.masks, self.p, self.calls = list(masks), p, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.masks[self.calls % len(self.masks)]
        self.calls += 1
        return x * mask.reshape(x.shape).to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("path", FILE_CASES)
def test_training_step_with_dropout(path, ckpt_dir):
    fx = _fixture(path)
    prefix = "train_dropout"
    if not any(k.startswith(f"{prefix}/") for k in fx):
        pytest.skip(f"{path.name} has no {prefix}/ keys")
    check = Checker(fx, f"{path.stem}/dropout")
    method = _method(path, ckpt_dir).train()
    p = meta(fx, "dropout")
    probes = []
    for layer in _layers(fx):
        key = VisualAD.layer_key(layer - 1)
        calls = ("attn_anomaly", "out_anomaly", "attn_normal", "out_normal")  # the reference's call order
        masks = [fx[f"{prefix}/masks/cross_attn.{key}/{c}"] for c in calls]
        method.cross_attn.layer_attentions[key].dropout = MaskedDropout(masks, p)
        mlp = method.layer_transforms[key].mlp
        for index in (2, 4):
            assert isinstance(mlp[index], nn.Dropout)
            mlp[index] = MaskedDropout([fx[f"{prefix}/masks/layer_transforms.{key}.mlp.{index}"]], p)
        probes += [method.cross_attn.layer_attentions[key].dropout, mlp[2], mlp[4]]
    losses = _check_losses(check, method, _train_batch(fx), prefix)  # two forwards: the stages, then loss()
    assert all(probe.calls == 2 * len(probe.masks) for probe in probes)  # every mask once per forward, in order
    losses["loss"].backward()
    named = dict(method.named_parameters())
    for key in [k for k in fx if re.match(rf"{prefix}/grads/", k)]:
        check.grad(key, named[key[len(f"{prefix}/grads/") :]].grad)
