"""AnomalyCLIP vs the official implementation's reference fixtures (tests/fixtures/anomalyclip/README.md).

Every fixture file and every tapped-layer setting in its meta is tested; nothing about the fixture
(sizes, batch, layers, seeds) is hard-coded. Run with ``-s`` to see the max deviation of every key.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from reference import (
    assert_close,
    assert_rank_identical,
    fixture_backbone,
    fixture_files,
    load_fixture,
    meta,
    omitted,
    shipped_defaults,
)

from vlmad.backbones.dpam import dpam_forward
from vlmad.methods.anomalyclip import AnomalyCLIP

pytestmark = pytest.mark.parity

FILES = fixture_files("anomalyclip")
PROMPTS = ("ctx_pos", "ctx_neg", "deep")


@functools.cache
def _fixture(path) -> dict:
    return load_fixture(path)


def _settings(fx: dict) -> dict[str, list[int]]:
    """Tapped-layer settings as 0-based block indices."""
    try:
        return {k: list(v) for k, v in meta(fx, "feature_settings_0based_block").items()}
    except KeyError:
        return {k: [i - 1 for i in v] for k, v in meta(fx, "feature_settings_1based").items()}


CASES = [
    pytest.param(path, name, layers, id=f"{path.stem}-{name}")
    for path in FILES
    for name, layers in _settings(_fixture(path)).items()
]
FILE_CASES = [pytest.param(path, id=path.stem) for path in FILES]

_BACKBONES: dict = {}


def _backbone(path, ckpt_dir):
    if path not in _BACKBONES:
        fx = _fixture(path)
        size = meta(fx, "image_size")
        _BACKBONES[path] = fixture_backbone(fx, ckpt_dir, image_size=size, pos_embed_interpolation="bilinear")
    return _BACKBONES[path]


# The only switch away from the shipped defaults: the reference sums the tapped layers' maps
# (test_shipped_defaults_rank_identical proves the default mean rank-identical).
REFERENCE = {"layer_reduce": "sum"}


def _method(path, ckpt_dir, layers, reference: bool = True, **kwargs) -> AnomalyCLIP:
    """The shipped defaults with the fixture's own settings (and the reference switch unless ``reference``)."""
    fx = _fixture(path)
    size = meta(fx, "image_size")
    settings = {
        **shipped_defaults("anomalyclip"),
        "feature_layers": layers,
        "dpam_start": min(meta(fx, "dpam_blocks_0based")),
        "n_ctx": meta(fx, "n_ctx"),
        "deep_prompt_depth": meta(fx, "deep_prompt_depth"),
        "deep_prompt_len": meta(fx, "deep_prompt_length"),
        "temperature": meta(fx, "temperature"),
        "lam": meta(fx, "lam"),
        "smoothing_sigma": meta(fx, "sigma"),
        "smoothing_reference_size": size,  # sigma applies exactly at the fixture size
        **(REFERENCE if reference else {}),
        **kwargs,
    }
    method = AnomalyCLIP(_backbone(path, ckpt_dir), **settings)
    with torch.no_grad():
        for name, param in zip(PROMPTS, (method.ctx_pos, method.ctx_neg, method.deep_prompts), strict=True):
            param.copy_(fx[f"prompts/{name}"].reshape(param.shape))
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
        rel = dev / max(float(ref.abs().max()), 1e-30)
        print(f"[{self.label}] {key}: max|Δ| {dev:.3g} (rel. to max|ref| {rel:.2g})")


def _batch(fx: dict) -> dict:
    labels = fx["inputs/labels"]
    return {
        "image": fx["inputs/images"],
        "mask": fx["inputs/masks"],
        "label": labels,
        "has_mask": torch.ones_like(labels, dtype=torch.bool),
    }


@pytest.mark.parametrize("path", FILE_CASES)
def test_text_side_and_position_table(path, ckpt_dir):
    fx = _fixture(path)
    check = Checker(fx, path.stem)
    method = _method(path, ckpt_dir, next(iter(_settings(fx).values())))
    check("visual/positional_embedding_resized", method.backbone.visual.positional_embedding)
    if "text/tokenized_prompts" not in check.skip:
        assert torch.equal(method.tokens.cpu(), fx["text/tokenized_prompts"])
    with torch.no_grad():
        check("text/prompt_embeddings", method.prompt_embeddings())
        check("text/features_raw", method.text_features(normalize=False))
        check("text/features", method.text_features())


@pytest.mark.parametrize("path", FILE_CASES)
def test_debug_streams(path, ckpt_dir):
    fx = _fixture(path)
    check = Checker(fx, path.stem)
    backbone = _backbone(path, ckpt_dir)
    dpam_start = min(meta(fx, "dpam_blocks_0based"))
    image = fx["inputs/images"][:1]
    found = {(int(m[1]), m[2]) for k in fx if (m := re.fullmatch(r"debug/layer(\d+)/(\w+)", k))}
    original = sorted(n - 1 for n, kind in found if kind == "original_stream")  # 1-based layer -> block
    vv = sorted(n - 1 for n, kind in found if kind == "vv_stream")
    with torch.no_grad():
        # The original stream is the stock CLIP stream (no DPAM); the DPAM loop's own h is checked at the end.
        _, plain = dpam_forward(backbone, image, backbone.depth, original)
        final, taps = dpam_forward(backbone, image, dpam_start, vv)
    for i in original:
        check(f"debug/layer{i + 1}/original_stream", plain[i][0])
    check(f"debug/layer{backbone.depth}/original_stream", final[0])
    for i in vv:
        check(f"debug/layer{i + 1}/vv_stream", taps[i][0])


@pytest.mark.parametrize(("path", "setting", "layers"), CASES)
def test_inference(path, setting, layers, ckpt_dir):
    fx = _fixture(path)
    check = Checker(fx, f"{path.stem}/{setting}")
    method = _method(path, ckpt_dir, layers)
    images = fx["inputs/images"]
    with torch.no_grad():
        method.prepare("object")
        features = method.encode_images(images)
        text = method.text_features()
        check("global/image_features_raw", features["global"])
        check("global/image_features", torch.nn.functional.normalize(features["global"], dim=-1))
        check("global/text_probs", method.image_logits(features, text).softmax(-1))
        similarity = method.similarity(features, text)  # (B, L, 1+P, 2)
        probs = method.upsampled_probabilities(similarity)  # (B, L, 2, S, S)
        side = round((similarity.shape[2] - 1) ** 0.5)
        for j, i in enumerate(layers):
            check(f"layer{i + 1}/patch_features", features["patch"][:, j])
            check(f"layer{i + 1}/similarity", similarity[:, j])
            check(f"layer{i + 1}/grid_map", similarity[:, j, 1:, 1].reshape(-1, side, side))
            check(f"layer{i + 1}/anomaly_map", probs[:, j, 1])
        check(f"{setting}/anomaly_map", probs[:, :, 1].sum(dim=1))
        prediction = method(images, ["object"] * len(images))
    check("global/image_score", prediction.pred_score)
    check(f"{setting}/anomaly_map_smoothed", prediction.anomaly_map)


@pytest.mark.parametrize(("path", "setting", "layers"), CASES)
def test_shipped_defaults_rank_identical(path, setting, layers, ckpt_dir):
    """The shipped default map is a positive multiple (1/n layers) of the reference's: same AUROC/AP/AUPRO."""
    fx = _fixture(path)
    method = _method(path, ckpt_dir, layers, reference=False)
    with torch.no_grad():
        method.prepare("object")
        prediction = method(fx["inputs/images"], ["object"] * len(fx["inputs/images"]))
    key = f"{setting}/anomaly_map_smoothed"
    if key not in omitted(fx):
        scale = assert_rank_identical(f"{key} (defaults)", prediction.anomaly_map, fx[key])
        assert scale == pytest.approx(len(layers), rel=1e-5)
    if "global/image_score" not in omitted(fx):
        assert_close("global/image_score (defaults)", prediction.pred_score, fx["global/image_score"])


def _train_step(fx: dict, method: AnomalyCLIP, check: Checker, prefix: str, grad_tol: tuple[float, float]) -> None:
    """One loss/backward/Adam step compared with ``{prefix}/grads`` and ``{prefix}/params_after_adam``."""
    params = [method.ctx_pos, method.ctx_neg, method.deep_prompts]
    adam = meta(fx, "adam")
    optimizer = torch.optim.Adam(params, lr=adam["lr"], betas=tuple(adam["betas"]), eps=adam["eps"])
    optimizer.zero_grad()
    method.loss(_batch(fx))["loss"].backward()
    optimizer.step()
    for name, param in zip(PROMPTS, params, strict=True):
        grad_key = f"{prefix}/grads/{name}"
        if grad_key in check.skip:
            continue
        ref_grad = fx[grad_key]
        scale = float(ref_grad.abs().max())
        check(grad_key, param.grad, rtol=grad_tol[0], atol=grad_tol[1] * scale)
        # Adam's first step moves every entry by ~lr*sign(grad): only entries with a clear gradient are defined.
        check(f"{prefix}/params_after_adam/{name}", param, mask=ref_grad.abs() > 1e-4 * scale)


@pytest.mark.parametrize(("path", "setting", "layers"), CASES)
def test_training_step(path, setting, layers, ckpt_dir):
    fx = _fixture(path)
    check = Checker(fx, f"{path.stem}/{setting}")
    method = _method(path, ckpt_dir, layers).train()
    batch = _batch(fx)
    features = method.encode_images(batch["image"])
    text = method.text_features()
    probs = method.upsampled_probabilities(method.similarity(features, text))
    with torch.no_grad():
        check(f"{setting}/train/text_logits", method.image_logits(features, text))
        check(f"{setting}/train/local_parts", method.local_loss_parts(probs, (batch["mask"] > 0.5).float()))
        out = method.loss(batch, features=features)
    check(f"{setting}/train/image_loss", out["image_loss"])
    check(f"{setting}/train/local_loss", out["local_loss"])
    check(f"{setting}/train/total_loss", out["loss"])
    _train_step(fx, method, check, f"{setting}/train", grad_tol=(1e-4, 1e-5))


@pytest.mark.parametrize(("path", "setting", "layers"), CASES)
def test_training_step_official_fp16_cast(path, setting, layers, ckpt_dir):
    fx = _fixture(path)
    check = Checker(fx, f"{path.stem}/{setting}/fp16")
    method = _method(path, ckpt_dir, layers, round_deep_prompts_fp16=True).train()
    _train_step(fx, method, check, f"{setting}/train_official_fp16cast", grad_tol=(1e-3, 1e-3))
