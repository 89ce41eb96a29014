"""MuSc against the official implementation's fixtures (xrli-U/MuSc @ b76b93d, tiny CLIP, CPU float32).

Every setting (image size, taps, r values, MSM interval, RsCIN windows) is read from each fixture. Each stage is
fed the reference's own input, so a failure points at one stage; the end-to-end and accumulate paths are checked
on the final keys. A fixture that omits a stage's input (the full-size set leaves out ``features/block*/tokens``
and ``lnamd/*``) feeds that stage vlmad's own upstream output instead; only the omitted comparisons are skipped.
Max deviations are collected in ``DEVIATIONS`` and printed with ``-s``.
"""

from __future__ import annotations

import pytest
import torch
from reference import (
    assert_close,
    fixture_backbone,
    fixture_files,
    load_fixture,
    meta,
    omitted,
    reference_or_ours,
    shipped_defaults,
)

from vlmad.methods.musc import MuSc, interval, lnamd

pytestmark = pytest.mark.parity

FIXTURES = fixture_files("musc")
DEVIATIONS: dict[str, float] = {}
_UPSTREAM: dict[int, tuple[dict, dict]] = {}  # id(fixture) -> (fixture, vlmad's own upstream outputs)


@pytest.fixture(scope="module", params=FIXTURES, ids=[p.stem for p in FIXTURES])
def fx(request):
    return load_fixture(request.param)


@pytest.fixture(scope="module")
def backbone(fx, ckpt_dir):
    # The reference resizes the position table bicubic WITHOUT antialias (open_clip 3.x antialiases).
    return fixture_backbone(
        fx, ckpt_dir, image_size=meta(fx, "image_size"), pos_embed_interpolation="bicubic_no_antialias"
    )


def build(fx: dict, backbone, windows=None) -> MuSc:
    """The shipped defaults (conf/method/musc.yaml) with the fixture's own settings."""
    settings = {
        **shipped_defaults("musc"),
        "feature_layers": meta(fx, "feature_layers_0based"),
        "r_list": meta(fx, "r_list"),
        "msm_interval": (meta(fx, "topmin_min"), meta(fx, "topmin_max")),
        "rscin_windows": meta(fx, "rscin_windows_run") if windows is None else windows,
        "dataset": None,  # the windows above are the fixture's (the shipped value follows data._target_)
        "distance_chunk": 3,  # several blocks per side, so the chunked path (both directions) is exercised
    }
    return MuSc(backbone, **settings)


def check(fx: dict, key: str, ours) -> None:
    """Compare with ``fx[key]`` at rtol 1e-4 / atol 1e-5; skip exactly the omitted keys."""
    if key in omitted(fx):
        return
    DEVIATIONS[key] = max(DEVIATIONS.get(key, 0.0), assert_close(key, ours, fx[key]))


def upstream(fx: dict, backbone) -> dict:
    """vlmad's own tower outputs on the fixture's images (once per fixture): block tokens and class tokens."""
    if id(fx) not in _UPSTREAM:
        with torch.no_grad():
            out = backbone.encode_image(fx["inputs/images"], meta(fx, "feature_layers_0based"))
        feats = build(fx, backbone).encode_images(fx["inputs/images"])
        _UPSTREAM[id(fx)] = (fx, {"tokens": out.intermediates, "global": feats["global"]})
    return _UPSTREAM[id(fx)][1]


def tokens(fx: dict, block: int, backbone) -> torch.Tensor:
    """(N, L, C) block tokens without CLS: the reference's, or ours where the fixture omits them."""
    key = f"features/block{block}/tokens"
    return reference_or_ours(fx, key, lambda: upstream(fx, backbone)["tokens"][block])[:, 1:]


def raw_scores(fx: dict, backbone) -> torch.Tensor:
    """(N,) raw image scores (max of the pixel map) from the upstream stages, where ``scores/raw`` is omitted."""
    model = build(fx, backbone)
    taps = torch.stack([tokens(fx, b, backbone) for b in meta(fx, "feature_layers_0based")], 1)
    return model.pixel_maps(model.patch_scores(taps)).amax(dim=(1, 2))


def test_inputs_and_settings(fx):
    n = fx["inputs/images"].shape[0]
    assert fx["inputs/labels"].tolist() == list(meta(fx, "labels"))
    mean = torch.tensor(meta(fx, "image_mean")).view(1, 3, 1, 1)
    std = torch.tensor(meta(fx, "image_std")).view(1, 3, 1, 1)
    check(fx, "inputs/images", (fx["inputs/images_uint8"].float() / 255 - mean) / std)
    lo, hi = interval(n - 1, meta(fx, "topmin_min"), meta(fx, "topmin_max"))
    assert hi - lo == meta(fx, "msm_k")


def test_position_table_and_features(fx, backbone):
    check(fx, "visual/positional_embedding", backbone.visual.positional_embedding)
    feats = build(fx, backbone).encode_images(fx["inputs/images"])
    with torch.no_grad():
        out = backbone.encode_image(fx["inputs/images"], meta(fx, "feature_layers_0based"))
    for t, block in enumerate(meta(fx, "feature_layers_0based")):
        check(fx, f"features/block{block}/tokens", out.intermediates[block])
        check(fx, f"features/block{block}/tokens", torch.cat([out.intermediates[block][:, :1], feats["taps"][:, t]], 1))
    check(fx, "global/image_features_raw", out.embedding)
    check(fx, "global/class_tokens", feats["global"])


def test_lnamd_and_mutual_scores(fx, backbone):
    model = build(fx, backbone)
    for r in meta(fx, "r_list"):
        per_block = []
        for block in meta(fx, "feature_layers_0based"):
            ours = lnamd(tokens(fx, block, backbone), r)
            check(fx, f"lnamd/r{r}/block{block}", ours)
            feats = reference_or_ours(fx, f"lnamd/r{r}/block{block}", ours)  # omitted: our LNAMD feeds MSM
            per_block.append(model.mutual_scores(feats))
            check(fx, f"msm/r{r}/block{block}", per_block[-1])
        check(fx, f"msm/r{r}/mean_over_layers", torch.stack(per_block).mean(0))


def test_maps_and_raw_scores(fx, backbone):
    model = build(fx, backbone)
    taps = torch.stack([tokens(fx, b, backbone) for b in meta(fx, "feature_layers_0based")], 1)  # (N, T, L, C)
    grid = model.patch_scores(taps)  # (N, L)
    g = meta(fx, "grid_side")
    check(fx, "maps/grid", grid.view(-1, g, g))
    ref_grid = reference_or_ours(fx, "maps/grid", grid.view(-1, g, g)).flatten(1)
    pixel = model.pixel_maps(ref_grid)
    check(fx, "maps/pixel", pixel)
    raw = reference_or_ours(fx, "maps/pixel", pixel).amax(dim=(1, 2))
    check(fx, "scores/raw", raw)
    check(fx, "scores/raw_minmax", (raw - raw.min()) / (raw.max() - raw.min()))


def test_rscin(fx, backbone):
    model = build(fx, backbone)
    emb = reference_or_ours(fx, "global/class_tokens", lambda: upstream(fx, backbone)["global"])
    raw = reference_or_ours(fx, "scores/raw", lambda: raw_scores(fx, backbone))
    check(fx, "rscin/similarity", emb @ emb.T)
    for k in meta(fx, "rscin_single_ks"):
        check(fx, f"rscin/single_k/k{k}", model.rscin(raw, emb, [k]))
    for name, windows in meta(fx, "rscin_windows").items():
        check(fx, f"rscin/{name}/scores", model.rscin(raw, emb, windows))
        check(fx, f"rscin/{name}/scores", build(fx, backbone, windows).rscin(raw, emb))
    assert torch.equal(model.rscin(raw, emb, [0]), raw)  # a window list with 0 turns RsCIN off


def test_end_to_end_and_accumulated(fx, backbone):
    images = fx["inputs/images"]
    model = build(fx, backbone)
    whole = model(images)  # the batch is the whole set
    check(fx, "maps/pixel", whole.anomaly_map.double() * 2)  # vlmad emits distances / 2 (in [0, 1])
    check(fx, "scores/final", whole.pred_score)
    model.prepare(meta(fx, "class_name"))
    for batch in images.split(meta(fx, "batch_size")):
        model.accumulate(batch)
    acc = model.score_accumulated()
    check(fx, "maps/pixel", acc.anomaly_map.double() * 2)
    check(fx, "scores/final", acc.pred_score)
    assert (acc.anomaly_map.min() >= 0) and (acc.anomaly_map.max() <= 1) and (acc.pred_score.max() <= 1)
    for name, windows in meta(fx, "rscin_windows").items():
        check(fx, f"rscin/{name}/scores", build(fx, backbone, windows)(images).pred_score)


def test_print_deviations():
    assert DEVIATIONS, "no comparison ran"
    for key, dev in sorted(DEVIATIONS.items()):
        print(f"{key:<36} max |Δ| {dev:.3g}")
