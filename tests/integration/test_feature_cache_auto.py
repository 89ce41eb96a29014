"""``module.feature_cache: auto`` (the default): where the fit set's frozen features go, exactness with and without
the cache, per-epoch mosaics left out; the OK/NG calibration stays <= 5 % of an evaluation's forward passes."""

from __future__ import annotations

import logging

import torch

from vlmad.backbones import cache as cache_mod
from vlmad.engine.run import evaluate, train
from vlmad.methods.anomalyclip import AnomalyCLIP
from vlmad.methods.aprilgan import AprilGAN
from vlmad.methods.winclip import WinCLIP

GIB = 2**30


def _probes(monkeypatch, memory: int, disk: int) -> None:
    monkeypatch.setattr(cache_mod, "available_memory", lambda: memory)
    monkeypatch.setattr(cache_mod, "free_disk", lambda directory: disk)


def test_choice_memory_then_disk_then_none(monkeypatch, tmp_path):
    _probes(monkeypatch, memory=10 * GIB, disk=100 * GIB)
    assert cache_mod.choose_storage(4 * GIB, tmp_path)[0] == "memory"  # 4 <= 0.5 x 10
    storage, reason = cache_mod.choose_storage(6 * GIB, tmp_path)  # 6 > 0.5 x 10, <= 0.5 x 100
    assert storage == "disk" and str(tmp_path) in reason and "6.00 GiB" in reason
    storage, reason = cache_mod.choose_storage(60 * GIB, tmp_path)  # > 0.5 x 100: no room anywhere
    assert storage is None and "free disk" in reason
    assert cache_mod.choose_storage(6 * GIB, None)[0] is None  # no run folder for a disk cache


def _fit(make_cfg, method: str, *extra: str):
    cfg = make_cfg("train", f"method={method}", "trainer.max_epochs=2", "test_after_fit=false", *extra)
    _, objects = train(cfg)
    learned = {k: v.detach().clone() for k, v in objects["method"].learned_state().items()}
    return learned, objects


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6)


def test_auto_memory_disk_none_are_exact_and_logged(make_cfg, count_encodes, monkeypatch, caplog):
    calls = count_encodes(AnomalyCLIP)
    plain, objects = _fit(make_cfg, "anomalyclip", "module.feature_cache=null")
    n_fit = len(objects["datamodule"].fit_dataset())
    assert sum(calls) == 2 * n_fit and objects["module"].fit_cache_stats is None
    stats = {}
    for memory, disk, storage in [(100 * GIB, 100 * GIB, "memory"), (0, 100 * GIB, "disk"), (0, 0, None)]:
        _probes(monkeypatch, memory, disk)
        calls.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vlmad.engine.module"):
            learned, objects = _fit(make_cfg, "anomalyclip", "module.feature_cache_dtype=fp32")  # auto: the default
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("feature cache: ")]
        assert len(lines) == 1 and f"{n_fit} fit images x" in lines[0], lines  # one line: choice and size
        stats[storage], run_dir = objects["module"].fit_cache_stats, objects["module"].output_dir
        if storage is None:
            assert lines[0].startswith("feature cache: off") and stats[storage] is None
            assert sum(calls) == 1 + 2 * n_fit  # the size probe, then every epoch encodes
        else:
            assert lines[0].startswith(f"feature cache: {storage}") and stats[storage]["storage"] == storage
            assert sum(calls) == n_fit  # the probe's image is the first entry: every image encoded once
            assert stats[storage]["misses"] == n_fit and stats[storage]["hits"] == n_fit + 1  # + the probe's image
        assert not (run_dir / "feature_cache").exists()  # an auto disk cache is deleted after fitting
        assert objects["module"].feature_cache is None  # released for the test phase
        _assert_equal(plain, learned)
    # the default storage, bf16: half the bytes, learned prompts within bf16's ~3 significant digits of fp32
    _probes(monkeypatch, 100 * GIB, 100 * GIB)
    compact, objects = _fit(make_cfg, "anomalyclip")
    bf16 = objects["module"].fit_cache_stats
    assert bf16["dtype"] == "bf16" and bf16["bytes"] * 2 == stats["memory"]["bytes"]
    for key, value in plain.items():
        torch.testing.assert_close(compact[key], value, rtol=0, atol=2e-3)


def test_mosaics_bypass_the_cache_and_learn_the_same(make_cfg):
    mosaic = ["datamodule.mosaic_prob=0.5", "module.feature_cache_dtype=fp32"]
    plain, _ = _fit(make_cfg, "aprilgan", *mosaic, "module.feature_cache=null")
    learned, objects = _fit(make_cfg, "aprilgan", *mosaic)
    stats, n_fit = objects["module"].fit_cache_stats, len(objects["datamodule"].fit_dataset())
    # every sample is a mosaic (bypassed) or an original image (a stored entry, a hit when seen again)
    assert stats["bypassed"] > 0 and stats["hits"] + stats["misses"] + stats["bypassed"] == 2 * n_fit + 1
    assert stats["misses"] <= n_fit  # no mosaic was ever stored
    _assert_equal(plain, learned)


def test_auto_is_off_for_methods_that_do_not_declare_frozen_features():
    from vlmad.methods.base import AnomalyMethod

    assert AnomalyMethod.cacheable is False  # opt-in: a new method is never served stale features by default
    assert AnomalyCLIP.cacheable and AprilGAN.cacheable


def test_default_calibration_costs_at_most_5_percent_of_the_test_encodes(make_cfg, count_encodes, tmp_path):
    """20 test images and 8 normal training images per category: the old default (32 images) scored all 8."""
    root = tmp_path / "cal"
    data = [f"data.root={root}", "data.categories=[bottle_syn]", "data.n_train=8"]
    data += ["data.n_test_good=10", "data.n_test_defect=10", "data.image_size=64"]
    calls = count_encodes(WinCLIP)
    _, objects = evaluate(make_cfg("evaluate", "method=winclip", *data))
    n_test = len(objects["datamodule"].test_dataset("bottle_syn"))
    threshold = objects["module"].thresholds["bottle_syn"]
    assert n_test == 20 and threshold["n_normal_images"] == 1 and "max_share 0.04 of 20" in threshold["source"]
    assert sum(calls) - n_test <= 0.05 * n_test  # calibration encodes against the evaluation's
