"""WinCLIP / WinCLIP+ against anomalib 2.7.0's WinClipModel, stage by stage (fixture: ../fixtures/winclip).

Everything (sizes, class name, k values, reference indices) is read from each fixture file.
"""

from __future__ import annotations

import pytest
import torch
from reference import assert_close, fixture_backbone, fixture_files, load_fixture, meta, omitted, shipped_defaults

from vlmad.methods.winclip import WinCLIP

pytestmark = pytest.mark.parity
FILES = fixture_files("winclip")


@pytest.fixture(scope="module", params=FILES, ids=[p.stem for p in FILES])
def case(request, ckpt_dir):
    fx = load_fixture(request.param)
    backbone = fixture_backbone(fx, ckpt_dir)
    mean = fx["settings.clip_mean"].float().view(1, 3, 1, 1)
    std = fx["settings.clip_std"].float().view(1, 3, 1, 1)

    def to_input(u8: torch.Tensor) -> torch.Tensor:
        return (u8.float() / 255 - mean) / std

    assert backbone.grid_size == int(fx["settings.grid_size"][0])
    assert backbone.image_size == int(fx["settings.image_size"][0])
    method = WinCLIP(backbone, **settings(fx))
    return fx, method, to_input(fx["inputs.images_u8"]), to_input, meta(fx, "class_name")


def settings(fx: dict) -> dict:
    """The shipped defaults (conf/method/winclip.yaml) with only the fixture's own settings replaced."""
    return {
        **shipped_defaults("winclip"),
        "scales": tuple(fx["settings.scales"].tolist()),
        "window_stride": int(fx["settings.window_stride"]),
        "temperature": float(fx["settings.temperature"]),
    }


class Checker:
    """assert_close for every key the fixture holds; records the max deviation per key."""

    def __init__(self, fx: dict) -> None:
        self.fx, self.skip, self.devs = fx, omitted(fx), {}

    def __call__(self, key: str, ours: torch.Tensor) -> None:
        if key in self.skip:
            return
        self.devs[key] = assert_close(key, ours, self.fx[key])

    def report(self, title: str) -> None:
        print(f"\n{title}: " + ", ".join(f"{k}={v:.2g}" for k, v in self.devs.items()))


def test_prompts_and_text_prototypes(case):
    fx, method, _, _, name = case
    normal, anomalous = method.prompt_set.sentences(name)
    assert normal == list(fx["prompts.normal"])
    assert anomalous == list(fx["prompts.anomalous"])
    check = Checker(fx)
    for kind, sentences in [("normal", normal), ("anomalous", anomalous)]:
        tokens = method.backbone.tokenize(sentences)
        if f"prompts.{kind}_tokens" not in check.skip:
            assert torch.equal(tokens, fx[f"prompts.{kind}_tokens"])
        with torch.no_grad():
            check(f"prompts.{kind}_embeddings", method.backbone.encode_text(tokens))
    check("text_prototypes", method.text_prototypes(name))
    check.report("text")


def test_zero_shot_stages(case):
    fx, method, images, _, name = case
    check = Checker(fx)
    for k in method.scales:
        assert torch.equal(getattr(method, f"window_indices_{k}"), fx[f"windows.indices_scale{k}"])
    with torch.no_grad():
        check("image.tokens_before_ln_pre", method.backbone.embed(images))
        embedding, patch_tokens, window_emb = method.encode(images)
        protos = method.text_prototypes(name)
        image_scores = method.class_scores(embedding[:, None], protos)[:, 0]
        window_scores = {k: method.class_scores(e, protos) for k, e in window_emb.items()}
        grid_map = method.zero_shot_grid(image_scores, window_scores)
    check("image.image_embeddings", embedding)
    check("image.patch_embeddings", patch_tokens)
    check("zero_shot.image_scores", image_scores)
    grid = method.backbone.grid_size
    check("zero_shot.grid_map_image", image_scores.view(-1, 1, 1).expand(-1, grid, grid))
    for k in method.scales:
        check(f"image.window_embeddings_scale{k}", window_emb[k])
        check(f"zero_shot.window_scores_scale{k}", window_scores[k])
        check(f"zero_shot.grid_map_scale{k}", method.harmonic_aggregate(window_scores[k], k))
    check("zero_shot.grid_map", grid_map)
    out = method(images, [name] * images.shape[0])
    check("zero_shot.pixel_map", out.anomaly_map)
    check("zero_shot.pred_score", out.pred_score)
    check.report("zero-shot")


def test_few_shot_stages(case):
    fx, method0, images, to_input, name = case
    for k_shot in fx["settings.few_shot_ks"].tolist():
        pre = f"few_shot.k{k_shot}."
        method = WinCLIP(method0.backbone, k_shot=k_shot, **settings(fx))
        method.text_cache = method0.text_cache  # text is per class name, not per reference draw
        method.prepare(name, to_input(fx["inputs.ref_images_u8"][fx[pre + "ref_indices"]]))
        memory = method.memory[name]
        check = Checker(fx)
        check(pre + "memory.patch_embeddings", memory["patch"].view(k_shot, -1, memory["patch"].shape[-1]))
        with torch.no_grad():
            _, patch_tokens, window_emb = method.encode(images)
            check(pre + "assoc_patch", method.association_scores(patch_tokens, memory["patch"]))
            for k in method.scales:
                check(pre + f"memory.window_embeddings_scale{k}", memory[k].view(k_shot, -1, memory[k].shape[-1]))
                check(pre + f"assoc_window_scale{k}", method.association_scores(window_emb[k], memory[k]))
            maps = method.few_shot_level_maps(patch_tokens, window_emb, memory)
            few = method.few_shot_grid(patch_tokens, window_emb, [name] * images.shape[0])
            _, fused = method.predict_grid(images, [name] * images.shape[0])
        for level, grid_map in maps.items():
            check(pre + (f"grid_map_{level}" if level == "patch" else f"grid_map_scale{level}"), grid_map)
        check(pre + "grid_map", few)
        check(pre + "few_shot_max", few.flatten(1).amax(1))
        check(pre + "fused_grid_map", fused)
        out = method(images, [name] * images.shape[0])
        check(pre + "pixel_map", out.anomaly_map)
        check(pre + "image_scores", out.pred_score)
        check.report(f"{k_shot}-shot")
