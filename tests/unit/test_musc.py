"""MuSc: chunked distances, small-set refusal, set semantics, the module's category path and the protocol label."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmad.config import compose
from vlmad.engine.run import evaluate
from vlmad.methods.musc import PROTOCOL, MuSc, interval, lnamd, min_set_size, nearest_patch_distances
from vlmad.metrics import AnomalyMetrics
from vlmad.metrics.published import lookup

SMALL = {"feature_layers": [1, 3], "r_list": [1, 3]}  # a fast subset of the paper's taps / degrees


@pytest.fixture
def images():
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_chunked_distances_equal_a_direct_computation():
    feats = F.normalize(torch.randn(5, 9, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    pairs = torch.cdist(feats.double().flatten(0, 1), feats.double().flatten(0, 1))  # (N*L, N*L)
    direct = pairs.view(5, 9, 5, 9).amin(-1)  # (N, L, N)
    for chunk in (1, 2, 3, 5, 8):
        ours = nearest_patch_distances(feats, chunk)
        assert torch.isinf(ours.diagonal(dim1=0, dim2=2)).all()  # an image never scores itself
        off = ~torch.eye(5, dtype=torch.bool)[:, None, :].expand(5, 9, 5)
        torch.testing.assert_close(ours[off].double(), direct[off], rtol=0, atol=2e-6)


def test_interval_and_minimum_set_size():
    assert [interval(n - 1, 0, 0.3)[1] for n in (4, 5, 42, 83, 200)] == [0, 1, 12, 24, 59]  # spec examples
    assert min_set_size(0, 0.3) == 5 and min_set_size(0, 2) == 2  # a count >= 1 is taken as a count


def test_lnamd_counts_the_zero_padding_and_normalises():
    tokens = torch.randn(2, 16, 8)
    out = lnamd(tokens, 3)
    assert out.shape == (2, 16, 8) and torch.allclose(out.norm(dim=-1), torch.ones(2, 16))
    normed = F.layer_norm(tokens.transpose(1, 2).reshape(2, 8, 4, 4), (8, 4, 4))
    corner = normed[:, :, :2, :2].sum((2, 3)) / 9  # 4 real neighbours, 5 padded zeros, divided by 9
    torch.testing.assert_close(out[:, 0], F.normalize(corner, dim=-1))


def test_fewer_than_five_images_are_refused_with_category_and_count(tiny_backbone, images):
    model = MuSc(tiny_backbone, **SMALL)
    model.prepare("screw")
    model.accumulate(images[:3])
    model.accumulate(images[3:4])
    with pytest.raises(ValueError, match=r"'screw' has 4 test images.*at least 5 images"):
        model.score_accumulated()
    pred = model(images[:5])  # five is enough (k = 1: the nearest other image)
    assert torch.isfinite(pred.anomaly_map).all() and torch.isfinite(pred.pred_score).all()


def test_accumulated_batches_equal_one_set_and_are_permutation_equivariant(tiny_backbone, images):
    model = MuSc(tiny_backbone, **SMALL, distance_chunk=2)
    whole = model(images)
    assert whole.pred_score.shape == (6,) and whole.anomaly_map.shape == (6, 64, 64)
    assert float(whole.anomaly_map.min()) >= 0 and float(whole.anomaly_map.max()) <= 1
    assert float(whole.pred_score.min()) >= 0 and float(whole.pred_score.max()) <= 1
    model.prepare("bottle")
    for batch in images.split(4):
        model.accumulate(batch)
    acc = model.score_accumulated()
    torch.testing.assert_close(acc.anomaly_map, whole.anomaly_map)
    torch.testing.assert_close(acc.pred_score, whole.pred_score)
    with pytest.raises(RuntimeError, match="nothing accumulated"):  # cleared after scoring
        model.score_accumulated()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = model(images[perm])
    torch.testing.assert_close(permuted.anomaly_map, whole.anomaly_map[perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted.pred_score, whole.pred_score[perm], rtol=1e-5, atol=1e-6)


def test_scores_depend_on_the_other_images(tiny_backbone, images):
    model = MuSc(tiny_backbone, **SMALL, rscin_windows=[0])  # raw maxima: no min-max over the set
    in_first, in_second = model(images[:5]).anomaly_map[1], model(images[1:6]).anomaly_map[0]  # both image 1
    assert (in_first - in_second).abs().max() > 1e-3  # transductive: the set changes every image's map


def test_rscin_windows_follow_the_dataset(tiny_backbone):
    table = {"mvtec": [1, 2, 3], "visa": [1, 8, 9], "default": [1, 2, 3]}
    assert MuSc(tiny_backbone, **SMALL, rscin_windows=table, dataset="vlmad.data.VisA").rscin_windows == [1, 8, 9]
    assert MuSc(tiny_backbone, **SMALL, rscin_windows=table, dataset="vlmad.data.MVTec").rscin_windows == [1, 2, 3]
    assert MuSc(tiny_backbone, **SMALL, rscin_windows=table, dataset="vlmad.data.Synthetic").rscin_windows == [1, 2, 3]
    with pytest.raises(ValueError, match="RsCIN window 8 > 5 test images"):
        MuSc(tiny_backbone, **SMALL, rscin_windows=[1, 8]).rscin(torch.rand(5), F.normalize(torch.randn(5, 4), dim=-1))
    with pytest.raises(ValueError, match="k_shot must be 0"):
        MuSc(tiny_backbone, k_shot=1)
    with pytest.raises(ValueError, match="odd r_list"):
        MuSc(tiny_backbone, r_list=[2])


def test_published_per_category_tables_reproduce_the_means():
    for pid, n in [("musc_mvtec", 15), ("musc_visa", 12)]:
        rows = lookup(pid)
        categories = [c for c in rows if c != "mean"]
        assert len(categories) == n
        for metric in ("image_auroc", "pixel_auroc", "pixel_aupro_legacy"):
            if (pid, metric) == ("musc_visa", "pixel_auroc"):
                continue  # the reference README's own table: categories average 98.84, its mean row says 98.71
            mean = np.mean([rows[c][metric] for c in categories])
            assert mean == pytest.approx(rows["mean"][metric], abs=6e-4), (pid, metric)
    assert lookup("musc_mvtec")["mean"]["image_auroc"] == pytest.approx(0.9777)
    assert lookup("musc_visa")["mean"]["pixel_aupro_legacy"] == pytest.approx(0.9243)


@pytest.fixture(scope="module")
def six_image_root(tmp_path_factory):
    from vlmad.data.synthetic import generate

    args = {"image_size": 64, "n_train": 1, "n_test_good": 4, "n_test_defect": 2, "seed": 0}
    root = generate(tmp_path_factory.mktemp("musc_data"), layout="mvtec", categories=["bottle_syn"], **args)
    return [f"data.root={root}", "data.categories=[bottle_syn]", *(f"data.{k}={v}" for k, v in args.items())]


def test_module_scores_each_category_once_with_the_protocol_label(six_image_root, tmp_path, capsys):
    overrides = [
        "method=musc",
        "backbone=tiny",
        "backbone.image_size=64",
        "data=synthetic",
        *six_image_root,
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "datamodule.batch_size=4",
        "method.feature_layers=[1,3]",
        "method.r_list=[1,3]",
        "module.num_overlays=2",
    ]
    results, objects = evaluate(compose("evaluate", overrides, tmp_path / "run"))
    out = tmp_path / "run"
    assert (out / "metrics.csv").read_text().splitlines()[1].startswith("bottle_syn,")
    assert json.loads((out / "run.json").read_text())["protocol"] == PROTOCOL
    assert PROTOCOL in capsys.readouterr().out  # the printed results table's title
    assert len(list((out / "heatmaps" / "bottle_syn").glob("*.png"))) == 2
    # the category path (batches of 4 + 2, scored at the flush) equals scoring the whole category at once
    batches = list(objects["datamodule"].test_dataloader()[0])
    method = objects["method"]
    with torch.no_grad():
        pred = method(torch.cat([b["image"] for b in batches]))
    metrics = AnomalyMetrics(legacy_aupro=True)
    metrics.update(
        pred.pred_score,
        torch.cat([b["label"] for b in batches]),
        pred.anomaly_map,
        torch.cat([b["mask"] for b in batches]),
        torch.cat([b["has_mask"] for b in batches]),
    )
    direct = metrics.compute()
    for name, value in results["bottle_syn"].items():
        assert value == pytest.approx(direct[name], nan_ok=True), name
    assert not math.isnan(results["bottle_syn"]["image_auroc"])


def test_data_check_refuses_a_category_of_four(make_cfg):
    cfg = make_cfg("evaluate", "method=musc", "method.feature_layers=[1]", "method.r_list=[1]")
    with pytest.raises(ValueError, match=r"carpet_syn/test: 4 test images of 'carpet_syn'.*needs at least 5"):
        evaluate(cfg)


def test_wandb_run_carries_the_protocol(tmp_path, monkeypatch):
    from vlmad.outputs import loggers

    class FakeRun:
        def __init__(self):
            self.summary = {}

        tags = ("musc",)

        def log(self, payload):
            self.logged = payload

    run = FakeRun()
    monkeypatch.setattr(loggers, "active_run", lambda: run)
    results = {"a": {"image_auroc": 0.5}, "mean": {"image_auroc": 0.5}}
    loggers.log_test_report(results, f"MuSc | {PROTOCOL}", tmp_path / "heatmaps", protocol=PROTOCOL)
    assert run.summary["test/protocol"] == PROTOCOL and PROTOCOL in run.summary["test/title"]
    assert "transductive-zero-shot" in run.tags


def test_aprilgan_transductive_minmax_on_the_category_path(tiny_backbone, make_cfg, images):
    from vlmad.methods.aprilgan import AprilGAN

    def build(**kw):
        torch.manual_seed(0)  # the same projections in every instance
        model = AprilGAN(tiny_backbone, k_shot=1, feature_layers=[1, 3], **kw)
        model.prepare("bottle", images[:1])
        return model

    model = build(image_fusion="transductive_minmax")
    assert model.transductive and not build().transductive
    with pytest.raises(RuntimeError, match="score_accumulated"):
        model(images[1:], ["bottle"] * 5)
    for batch in images[1:].split(3):
        model.accumulate(batch, ["bottle"] * len(batch))
    pred = model.score_accumulated()
    map_max = build(image_score="map_max")(images[1:], ["bottle"] * 5).pred_score
    text = 2 * build()(images[1:], ["bottle"] * 5).pred_score - map_max  # fixed fusion = ½(text + map max)
    expected = 0.5 * (text + (map_max - map_max.min()) / (map_max.max() - map_max.min()))
    torch.testing.assert_close(pred.pred_score, expected.to(pred.pred_score.dtype), rtol=1e-5, atol=1e-6)
    cfg = make_cfg(
        "evaluate",
        "method=aprilgan",
        "method.k_shot=1",
        "method.image_fusion=transductive_minmax",
        "method.feature_layers=[1,3]",
    )
    results, _ = evaluate(cfg)
    assert set(results) == {"carpet_syn", "bottle_syn", "mean"}
    assert not math.isnan(results["mean"]["image_auroc"])
    protocol = json.loads((Path(cfg.paths.output_dir) / "run.json").read_text())["protocol"]
    assert protocol.startswith("transductive k-shot")
