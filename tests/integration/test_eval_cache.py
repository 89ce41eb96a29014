"""Disk feature cache end to end: a k-shot sweep encodes each test image once; an unwritable cache runs uncached
with a warning; both report the same numbers as no cache."""

from __future__ import annotations

import logging

import pytest

from vlmad.engine.run import evaluate
from vlmad.methods.winclip import WinCLIP

JOBS = [(1, 0), (1, 1), (2, 0)]  # (k_shot, reference seed)


def _sweep(make_cfg, count_encodes, cache_dir=None):
    encoded = count_encodes(WinCLIP)
    results = []
    for k, seed in JOBS:
        # no OK/NG threshold calibration: count only the test images' and references' encodes
        extra = ["module.threshold.calibrate=false", *([f"module.feature_cache={cache_dir}"] if cache_dir else [])]
        overrides = ["method=winclip", f"method.k_shot={k}", "seed=0", f"module.reference_seed={seed}", *extra]
        res, objects = evaluate(make_cfg("evaluate", *overrides))
        results.append(res)
    n_test = sum(len(objects["datamodule"].test_dataset(c)) for c in objects["datamodule"].test_categories)
    return results, sum(encoded), n_test, objects


def test_disk_cache_encodes_test_images_once_with_identical_results(make_cfg, count_encodes, tmp_path):
    plain, plain_encoded, n_test, _ = _sweep(make_cfg, count_encodes)
    cached, cached_encoded, _, objects = _sweep(make_cfg, count_encodes, tmp_path / "cache")
    n_refs = sum(k for k, _ in JOBS) * len(objects["datamodule"].test_categories)
    assert plain_encoded == len(JOBS) * n_test + n_refs
    assert cached_encoded <= n_test + n_refs  # test images once; only references not seen before
    assert any((tmp_path / "cache" / "text").glob("*.pt"))  # prototypes shared through the cache too
    for a, b in zip(plain, cached, strict=True):
        for category, row in a.items():
            for name, value in row.items():
                assert b[category][name] == pytest.approx(value, abs=1e-6), (category, name)


def test_unwritable_cache_directory_warns_once_and_reports_the_same_numbers(make_cfg, tmp_path, caplog):
    (tmp_path / "a_file").write_text("x")
    unwritable = tmp_path / "a_file" / "cache"  # NotADirectoryError on every write (chmod cannot stop root)
    args = ["method=winclip", "method.k_shot=1", "seed=0"]
    plain, _ = evaluate(make_cfg("evaluate", *args))
    caplog.set_level(logging.WARNING)
    cached, objects = evaluate(make_cfg("evaluate", *args, f"module.feature_cache={unwritable}"))
    warnings = [r.getMessage() for r in caplog.records if "not writable" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one for the feature cache, one for the text prototypes under it
    assert objects["module"].feature_cache.misses > 0 and not (tmp_path / "a_file").is_dir()
    for category, row in plain.items():
        for name, value in row.items():
            assert cached[category][name] == pytest.approx(value, abs=1e-6), (category, name)


def test_cached_features_are_read_in_loader_workers(make_cfg, count_encodes, tmp_path):
    """A warm disk cache with 1 loader worker: every test image's features come from the worker, none is encoded."""
    args = ["method=winclip", "seed=0", "module.threshold.calibrate=false", f"module.feature_cache={tmp_path / 'c'}"]
    cold, _ = evaluate(make_cfg("evaluate", *args))
    encoded = count_encodes(WinCLIP)
    warm, objects = evaluate(make_cfg("evaluate", *args, "datamodule.num_workers=1"))
    cache, dm = objects["module"].feature_cache, objects["datamodule"]
    n_test = sum(len(dm.test_dataset(c)) for c in dm.test_categories)
    assert sum(encoded) == 0 and cache.hits == n_test
    assert cache.worker_reads == n_test  # read by the worker process, handed over with the batch
    for category, row in cold.items():
        for name, value in row.items():
            assert warm[category][name] == pytest.approx(value, abs=1e-6), (category, name)
