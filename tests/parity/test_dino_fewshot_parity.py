"""AnomalyDINO and SubspaceAD against the official implementations' fixtures (tiny DINOv2s, CPU float32).

dammsi/AnomalyDINO @ b3435f0 and CLendering/SubspaceAD @ 2ca687e, run by the fixture harness (README in the fixture
folder). Every setting (sizes, k, taps, rotations, masking, class name) is read from each fixture; the method is built
from its shipped config (conf/method/*.yaml) and its default backbone config (position-table resize, image resize)
with only the fixture's settings replaced. Each stage is fed the reference's own input (or vlmad's own upstream output
where the fixture omits that input), so a failure points at one stage; the end-to-end paths (datamodule reference
draw with views, prepare, forward) are checked on the final keys. Max deviations per key are printed with ``-s``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from reference import HERE, assert_close, fixture_files, fixture_root, load_fixture, meta, omitted, shipped_defaults

from vlmad.backbones import DinoBackbone
from vlmad.data import MVTec, Preprocess
from vlmad.data.datamodule import AnomalyDataModule
from vlmad.data.references import rotate_nearest
from vlmad.methods.anomalydino import AnomalyDINO, first_component, foreground_mask, top_mean
from vlmad.methods.subspacead import SubspaceAD, fit_pca, gaussian_blur_cv2, reconstruction_residual
from vlmad.methods.subspacead import top_mean as top_mean_pixels

pytestmark = pytest.mark.parity

FIXTURES = fixture_files("dino_fewshot")
LOADED = {path: load_fixture(path) for path in FIXTURES}  # read once: the method of each picks its tests
METHODS = {"AnomalyDINO": "anomalydino", "SubspaceAD": "subspacead"}
BY_METHOD = {m: [p for p in FIXTURES if METHODS[meta(LOADED[p], "method")] == m] for m in METHODS.values()}
DEVIATIONS: dict[str, float] = {}
PC1_RTOL = 1e-3  # sklearn's randomized float32 PCA (fixture README)


def method_of(fx: dict) -> str:
    return METHODS[meta(fx, "method")]


def _ids(paths: list[Path]) -> list[str]:
    return [p.name.split(".")[0] for p in paths]


@pytest.fixture(scope="module", params=BY_METHOD["anomalydino"], ids=_ids(BY_METHOD["anomalydino"]))
def adino(request):
    """(fixture, its backbone, vlmad-preprocessed test images) of each AnomalyDINO fixture."""
    fx = LOADED[request.param]
    bb = make_backbone(fx)
    return fx, bb, preprocess(fx, bb, fx["inputs/test_uint8"])


@pytest.fixture(scope="module", params=BY_METHOD["subspacead"], ids=_ids(BY_METHOD["subspacead"]))
def ssad(request):
    """(fixture, its backbone, vlmad-preprocessed test images) of each SubspaceAD fixture."""
    fx = LOADED[request.param]
    bb = make_backbone(fx)
    return fx, bb, preprocess(fx, bb, fx["inputs/test_uint8"])


def test_every_fixture_has_tests():
    assert all(BY_METHOD.values()), f"a method without fixtures: { {m: len(p) for m, p in BY_METHOD.items()} }"
    assert sum(map(len, BY_METHOD.values())) == len(FIXTURES)


def check(fx: dict, key: str, ours, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Compare with ``fx[key]``; skip exactly the omitted keys."""
    if key in omitted(fx):
        return
    DEVIATIONS[key] = max(DEVIATIONS.get(key, 0.0), assert_close(key, ours, fx[key], rtol, atol))


def check_exact(fx: dict, key: str, ours) -> None:
    if key in omitted(fx):
        return
    assert torch.equal(torch.as_tensor(ours).cpu(), fx[key]), f"{key}: not identical to the reference"
    DEVIATIONS[key] = 0.0


def fed(fx: dict, key: str, ours):
    """The reference's value of ``key`` as the next stage's input, or ours where the fixture omits it."""
    return ours if key in omitted(fx) else fx[key]


def shipped_backbone(method: str) -> dict:
    """The method's default backbone config (``override /backbone`` in conf/method/<method>.yaml)."""
    conf = HERE.parents[1] / "conf"
    defaults = OmegaConf.load(conf / "method" / f"{method}.yaml")["defaults"]
    name = next(d["override /backbone"] for d in defaults if "override /backbone" in d)
    return OmegaConf.to_container(OmegaConf.load(conf / "backbone" / f"{name}.yaml"))


def size(fx: dict) -> int:
    if method_of(fx) == "subspacead":
        return meta(fx, "image_res")
    h, w = meta(fx, "prepared_hw")
    assert h == w and meta(fx, "smaller_edge_size") == h, "vlmad runs square inputs: smaller edge = prepared side"
    return h


def make_backbone(fx: dict) -> DinoBackbone:
    """The fixture's tiny DINOv2 (paths relative to the fixture folder), sized and resized as the shipped config."""
    folder = fixture_root() / "dino_fewshot"
    shipped = shipped_backbone(method_of(fx))
    return DinoBackbone(
        Path(meta(fx, "timm_config")).stem,
        pretrained=str(folder / meta(fx, "timm_weights")),
        model_config=str(folder / meta(fx, "timm_config")),
        image_size=size(fx),
        pos_embed_interpolation=shipped["pos_embed_interpolation"],
        image_resize=shipped["image_resize"],
    )


def build(fx: dict, backbone: DinoBackbone):
    """The shipped defaults with the fixture's own settings."""
    name = method_of(fx)
    settings = shipped_defaults(name)
    if name == "anomalydino":
        assert meta(fx, "knn_metric") == "L2_normalized"
        assert meta(fx, "gaussian_truncate") == 4.0  # vlmad's blur truncates at 4 sigma, as scipy's default
        settings.update(
            rotation="all" if meta(fx, "rotation") else "none",
            masking="all" if meta(fx, "masking") else "none",
            dataset=None,  # the fixture's switches above replace the per-dataset tables
            mask_references=bool(meta(fx, "mask_ref_images")),
            mask_threshold=meta(fx, "mask_threshold"),
            mask_border=meta(fx, "mask_border"),
            mask_keep_fraction=meta(fx, "mask_center_keep_fraction"),
            mask_kernel=meta(fx, "mask_kernel"),
            knn=meta(fx, "knn_neighbors"),
            top_fraction=meta(fx, "top_fraction"),
            smoothing_sigma=meta(fx, "gaussian_sigma"),
        )
        if meta(fx, "rotation"):
            settings["rotation_angles"] = meta(fx, "rotation_angles")
        return AnomalyDINO(backbone, k_shot=meta(fx, "k_shot"), **settings)
    assert (meta(fx, "score_method"), meta(fx, "drop_k"), meta(fx, "img_score_agg")) == ("reconstruction", 0, "mtop1p")
    settings.update(
        feature_layers=meta(fx, "layers_hf"),
        aggregation=meta(fx, "agg_method"),
        aug_count=meta(fx, "aug_count"),
        no_aug_classes=[],  # the fixture's class is augmented
        pca_ev=meta(fx, "pca_ev"),
        top_fraction=meta(fx, "top_fraction"),
        blur_kernel=meta(fx, "blur_ksize"),
        blur_sigma=meta(fx, "blur_sigma"),
    )
    return SubspaceAD(backbone, k_shot=meta(fx, "k_shot"), **settings)


def preprocess(fx: dict, backbone: DinoBackbone, images_u8: torch.Tensor) -> torch.Tensor:
    """vlmad's preprocessing (the datamodule's Preprocess from the backbone's preprocess_config) of (N, H, W, 3)."""
    transform = Preprocess(**backbone.preprocess_config())
    assert tuple(transform.mean.flatten().tolist()) == pytest.approx(meta(fx, "image_mean"))
    assert tuple(transform.std.flatten().tolist()) == pytest.approx(meta(fx, "image_std"))
    return torch.stack([transform(Image.fromarray(img.numpy()), None)[0] for img in images_u8])


def check_backbone_and_inputs(fx: dict, backbone: DinoBackbone, test_images: torch.Tensor) -> None:
    check(fx, "backbone/pos_embed_resized", backbone.model.pos_embed)
    assert backbone.grid_size**2 == math.prod(meta(fx, "grid_hw"))
    if method_of(fx) == "anomalydino":
        check(fx, "inputs/test_prepared_subset", test_images[meta(fx, "prepared_subset")])
    else:
        check(fx, "inputs/test_pixel_values", test_images)
    assert fx["inputs/labels"].tolist() == [0 if n.startswith("good/") else 1 for n in meta(fx, "test_names")]


# ---------------------------------------------------------------------------------------------------- AnomalyDINO
def write_tree(fx: dict, root: Path) -> Path:
    """The fixture's references (at their sorted positions for its seed) and test images as an MVTec-layout class."""
    folder = root / meta(fx, "class_name")
    good = folder / "train" / "good"
    good.mkdir(parents=True)
    k, seed = meta(fx, "k_shot"), meta(fx, "seed")
    for i in range(seed * k):  # the sorted slice seed*k:(seed+1)*k: fillers sort before the references
        Image.fromarray(fx["refs/uint8"][0].numpy()).save(good / f"-pad{i:03d}.png")
    for name, img in zip(meta(fx, "ref_files"), fx["refs/uint8"], strict=True):
        Image.fromarray(img.numpy()).save(folder / name)
    for name, img, mask in zip(meta(fx, "test_names"), fx["inputs/test_uint8"], fx["inputs/test_masks"], strict=True):
        defect, stem = name.split("/")
        (folder / "test" / defect).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.numpy()).save(folder / "test" / defect / f"{stem}.png")
        if defect != "good":
            (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            Image.fromarray((mask.numpy() > 0).astype(np.uint8) * 255).save(
                folder / "ground_truth" / defect / f"{stem}_mask.png"
            )
    return root


def test_anomalydino_backbone_and_inputs(adino):
    check_backbone_and_inputs(*adino)


def test_anomalydino_references_and_bank(adino, tmp_path):
    fx, backbone, _ = adino
    model = build(fx, backbone)
    name = meta(fx, "class_name")
    draw = model.reference_draw(name)
    if meta(fx, "rotation"):
        views = draw.views(list(fx["refs/uint8"].numpy()), torch.Generator())
        check_exact(fx, "refs/augmented_uint8", torch.from_numpy(np.stack(views)))
    dm = AnomalyDataModule(MVTec(write_tree(fx, tmp_path)), num_workers=0, **backbone.preprocess_config())
    refs, paths = dm.reference_images(name, meta(fx, "k_shot"), meta(fx, "seed"), draw)
    assert [str(Path(p).relative_to(tmp_path / name)) for p in paths] == list(meta(fx, "ref_files"))
    feats = model.encode_images(refs)["patches"]
    check(fx, "refs/features", feats)
    model.prepare(name, refs)
    check(fx, "memory_bank", model.memory[name])
    bank_in = fed(fx, "refs/features", feats)
    check(fx, "memory_bank", F.normalize(bank_in.flatten(0, 1), dim=-1))


def test_anomalydino_mask_distances_maps(adino):
    fx, backbone, test_images = adino
    model = build(fx, backbone)
    gh, gw = meta(fx, "grid_hw")
    feats = model.encode_images(test_images)["patches"]
    check(fx, "test/features", feats)
    feats = fed(fx, "test/features", feats)
    constants = {"bank": fed(fx, "memory_bank", None)}
    if meta(fx, "masking"):
        constants["masking"] = torch.ones((), dtype=torch.bool)
        scores, direction = first_component(feats)
        check(fx, "test/pc1_scores", scores, rtol=PC1_RTOL)
        check(fx, "test/pc1_component", direction, rtol=PC1_RTOL)
        check(fx, "test/pc1_mean", feats.mean(1), rtol=PC1_RTOL)
        settings = model.mask_settings
        mask = foreground_mask(fed(fx, "test/pc1_scores", scores), (gh, gw), **settings)
        check_exact(fx, "test/foreground_mask", mask)
    assert constants["bank"] is not None, "memory_bank omitted: run test_anomalydino_references_and_bank's path"
    dist, index, fg = model.patch_distances(feats, constants)
    check_exact(fx, "test/foreground_mask", fg)
    check_exact(fx, "test/nn_index", torch.where(fg, index, -1))
    ref_sq = fx["test/nn_sqdist_faiss"]
    if "test/nn_sqdist_faiss" not in omitted(fx):
        assert torch.equal(ref_sq.isnan(), ~fg), "test/nn_sqdist_faiss: background positions differ"
        DEVIATIONS["test/nn_sqdist_faiss"] = assert_close("test/nn_sqdist_faiss", 2 * dist[fg], ref_sq[fg])
    check(fx, "test/patch_dist", dist.view(-1, gh, gw))
    patch = fed(fx, "test/patch_dist", dist.view(-1, gh, gw).double())
    hw = tuple(meta(fx, "image_hw"))
    check(fx, "maps/upsampled", F.interpolate(patch[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0])
    check(fx, "maps/pixel", model.pixel_maps(patch, hw))
    assert top_mean(patch.flatten(1), meta(fx, "top_fraction")).shape == (patch.shape[0],)
    assert int(gh * gw * meta(fx, "top_fraction")) == meta(fx, "n_top")
    check(fx, "scores/image", top_mean(patch.flatten(1), meta(fx, "top_fraction")))


def test_anomalydino_end_to_end(adino, tmp_path):
    """Datamodule draw (rule + views) -> prepare -> forward; batch of all = one image at a time (the reference's)."""
    fx, backbone, test_images = adino
    model = build(fx, backbone)
    name = meta(fx, "class_name")
    dm = AnomalyDataModule(MVTec(write_tree(fx, tmp_path)), num_workers=0, **backbone.preprocess_config())
    model.prepare(name, dm.reference_images(name, meta(fx, "k_shot"), meta(fx, "seed"), model.reference_draw(name))[0])
    whole = model(test_images, [name] * len(test_images))
    check(fx, "scores/image", whole.pred_score.double() * 2)  # vlmad emits distance / 2
    ones = [model(img[None], [name]) for img in test_images]
    torch.testing.assert_close(torch.cat([p.pred_score for p in ones]), whole.pred_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([p.anomaly_map for p in ones]), whole.anomaly_map, rtol=1e-5, atol=1e-6)
    view = model.for_class(name)  # the exported graph's module: the same numbers
    torch.testing.assert_close(view(test_images)[0], whole.pred_score)
    assert whole.anomaly_map.shape == test_images.shape[:1] + test_images.shape[2:]
    assert whole.anomaly_map.min() >= 0 and whole.anomaly_map.max() <= 1
    # the forward's map is the reference's dists2map at the input size (parity maps above: at the original size)
    gh, gw = meta(fx, "grid_hw")
    dist = model.patch_distances(model.encode_images(test_images)["patches"], model.class_constants(name))[0]
    expected = model.pixel_maps(dist.view(-1, gh, gw), tuple(test_images.shape[-2:])) / 2
    torch.testing.assert_close(whole.anomaly_map, expected.clamp(0, 1))


# ---------------------------------------------------------------------------------------------------- SubspaceAD
def reference_views(fx: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Both PCA passes' images, remade from the references with the recorded angles (uint8, pass-major)."""
    passes = []
    for key in ("mean", "cov"):
        angles = iter(meta(fx, f"angles_{key}_pass"))
        out = []
        for img in fx["refs/uint8"].numpy():
            out.append(img)
            out += [rotate_nearest(img, next(angles)) for _ in range(meta(fx, "aug_count"))]
        passes.append(torch.from_numpy(np.stack(out)))
    return passes[0], passes[1]


def test_subspacead_backbone_and_inputs(ssad):
    check_backbone_and_inputs(*ssad)


def test_subspacead_taps_and_fused(ssad):
    fx, backbone, test_images = ssad
    model = build(fx, backbone)
    assert model.blocks == list(meta(fx, "feature_blocks_0based"))
    pixels = fed(fx, "inputs/test_pixel_values", test_images)
    full: dict[int, torch.Tensor] = {}  # the whole residual stream (CLS, registers, patches) of the tapped blocks
    hooks = [
        backbone.model.blocks[b].register_forward_hook(lambda _m, _i, out, b=b: full.__setitem__(b, out))
        for b in model.blocks
    ]
    try:
        out = backbone.encode_image(pixels, model.blocks, final=False)
    finally:
        for hook in hooks:
            hook.remove()
    prefix = backbone.num_prefix_tokens
    assert prefix == 1 + 4  # CLS + 4 registers, dropped from vlmad's taps
    for block in model.blocks:
        assert torch.equal(full[block][:, prefix:], out.intermediates[block])
        check(fx, f"test/taps/block{block}", full[block])
    check(fx, "test/fused", model.encode_images(pixels)["fused"])


def test_subspacead_reference_passes_and_pca(ssad):
    fx, backbone, _ = ssad
    model = build(fx, backbone)
    mean_u8, cov_u8 = reference_views(fx)
    check_exact(fx, "refs/mean_pass/images_uint8", mean_u8)
    check_exact(fx, "refs/cov_pass/images_uint8", cov_u8)
    fused = {}
    for key, images in (("mean", mean_u8), ("cov", cov_u8)):
        fused[key] = model.encode_images(preprocess(fx, backbone, images))["fused"]
        check(fx, f"refs/{key}_pass/fused", fused[key])
    pca = fit_pca(
        fed(fx, "refs/mean_pass/fused", fused["mean"]).flatten(0, 1),
        fed(fx, "refs/cov_pass/fused", fused["cov"]).flatten(0, 1),
        meta(fx, "pca_ev"),
    )
    check(fx, "pca/mean", pca["mean"])
    check(fx, "pca/cov", pca["cov"])
    check(fx, "pca/eigvals_all", pca["eigvals_all"])
    check(fx, "pca/eigvals", pca["eigvals"])
    assert pca["components"].shape[1] == meta(fx, "pca_k")
    basis = pca["components"]
    if "pca/components" not in omitted(fx):  # eigenvector signs are arbitrary: compare the projectors
        ref = fx["pca/components"]
        DEVIATIONS["pca/components (projector)"] = assert_close("pca/components", basis @ basis.T, ref @ ref.T)


def test_subspacead_residual_maps_scores(ssad):
    fx, backbone, _ = ssad
    model = build(fx, backbone)
    g = meta(fx, "grid_hw")
    residual = reconstruction_residual(fx["test/fused"], fx["pca/mean"], fx["pca/components"]).view(-1, *g)
    check(fx, "test/residual", residual)
    check(fx, "maps/grid", residual)
    grid = fed(fx, "maps/grid", residual)
    s = meta(fx, "image_res")
    check(fx, "maps/upsampled", F.interpolate(grid[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0])
    upsampled = fed(fx, "maps/upsampled", model.raw_maps(grid, (s, s)))
    check(fx, "maps/pixel", gaussian_blur_cv2(upsampled, meta(fx, "blur_ksize"), meta(fx, "blur_sigma")))
    check(fx, "maps/pixel", model.raw_maps(grid, (s, s)))
    pixel = fed(fx, "maps/pixel", model.raw_maps(grid, (s, s)))
    assert max(1, int(s * s * meta(fx, "top_fraction"))) == meta(fx, "n_top")
    check(fx, "scores/image", top_mean_pixels(pixel.flatten(1).double(), meta(fx, "top_fraction")))


def test_subspacead_end_to_end(ssad):
    """prepare on the recorded reference views -> forward; s / (s + c) of the reference; batch of all = one by one."""
    fx, backbone, test_images = ssad
    model = build(fx, backbone)
    name = meta(fx, "class_name")
    mean_u8, cov_u8 = reference_views(fx)
    model.prepare(name, preprocess(fx, backbone, torch.cat([mean_u8, cov_u8])))
    constants = model.class_constants(name)
    score, maps = model.raw_score(test_images, constants)
    check(fx, "maps/pixel", maps)
    check(fx, "scores/image", score)
    whole = model(test_images, [name] * len(test_images))
    c = constants["scale"]
    torch.testing.assert_close(whole.pred_score, score / (score + c))
    torch.testing.assert_close(whole.anomaly_map, maps / (maps + c))
    check(fx, "scores/image", (c * whole.pred_score.double() / (1 - whole.pred_score.double())))
    assert whole.anomaly_map.min() >= 0 and whole.anomaly_map.max() < 1
    ones = [model(img[None], [name]) for img in test_images]
    torch.testing.assert_close(torch.cat([p.pred_score for p in ones]), whole.pred_score, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat([p.anomaly_map for p in ones]), whole.anomaly_map, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.for_class(name)(test_images)[1], whole.anomaly_map)
    ref = fx["pca/components"]  # the stored float32 basis spans the reference's subspace
    torch.testing.assert_close(
        constants["basis"].double() @ constants["basis"].double().T, ref @ ref.T, atol=1e-5, rtol=0
    )


def test_print_deviations():
    assert DEVIATIONS, "no comparison ran"
    for key, dev in sorted(DEVIATIONS.items()):
        print(f"{key:<40} max |Δ| {dev:.3g}")
