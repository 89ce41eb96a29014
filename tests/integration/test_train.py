"""Training end to end: fit on the synthetic auxiliary set, checkpoints, resume, evaluation from a checkpoint."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from testlib import cfg_maker

from vlmad.engine.checkpoint import CheckpointMismatchError
from vlmad.engine.run import evaluate, train


def _learned(objects) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in objects["method"].learned_state().items()}


@pytest.fixture(scope="module")
def anomalyclip_one_epoch(synthetic_roots, tmp_path_factory) -> tuple:
    """One 1-epoch AnomalyCLIP fit and its test, shared by the reload, refusal and resume tests (cfg, results, objects).

    Its checkpoint is what a 1-epoch fit with ``test_after_fit=false`` writes too (testing changes no learned tensor).
    """
    make = cfg_maker(tmp_path_factory.mktemp("anomalyclip_one_epoch"), synthetic_roots)
    cfg = make("train", "method=anomalyclip", "trainer.max_epochs=1")
    return (cfg, *train(cfg))


@pytest.mark.parametrize("method", ["anomalyclip", "aprilgan"])
def test_train_then_evaluate_from_checkpoint(make_cfg, method, caplog, request):
    if method == "anomalyclip":
        cfg, results, objects = request.getfixturevalue("anomalyclip_one_epoch")
    else:
        cfg = make_cfg("train", f"method={method}", "trainer.max_epochs=1")
        with caplog.at_level(logging.INFO, logger="vlmad.engine.module"):
            results, objects = train(cfg)
        # a run is not silent: one line per epoch (losses) and per tested category (images, seconds)
        assert re.search(r"epoch 1/1: loss \d+\.\d{4}.*\(\d+ images, \d+\.\d s\)", caplog.text), caplog.text
        for category in objects["datamodule"].test_categories:
            assert re.search(rf"{category}: 4 images in \d+\.\d s", caplog.text)
        assert caplog.text.count("feature cache (memory") == 1  # the epoch's report, not repeated at the fit's end
    assert set(results) == {*objects["datamodule"].test_categories, "mean"}
    ckpt = objects["module"].output_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["state_dict"] and not any(".backbone." in k for k in state["state_dict"])
    assert ckpt.stat().st_size < 2_000_000  # learned tensors only, never the frozen CLIP
    assert not list(ckpt.parent.glob("*.tmp"))  # written atomically
    # evaluate.py's own seed (0, train's is 111): the random tiny weights come from backbone.random_seed, not the run's
    eval_cfg = make_cfg("evaluate", f"method={method}", f"ckpt_path={ckpt}")
    assert eval_cfg.seed != cfg.seed
    eval_results, eval_objects = evaluate(eval_cfg)
    for key, value in _learned(objects).items():
        torch.testing.assert_close(eval_objects["method"].learned_state()[key], value)
    # same trained method on the same target: the same numbers as the test run after fitting
    assert eval_results["mean"]["pixel_auroc"] == pytest.approx(results["mean"]["pixel_auroc"], abs=1e-6)


def test_resume_reaches_the_uninterrupted_result(make_cfg, anomalyclip_one_epoch):
    full = make_cfg("train", "method=anomalyclip", "trainer.max_epochs=2", "test_after_fit=false")
    _, full_objects = train(full)
    _, _, first_objects = anomalyclip_one_epoch  # the same fit's first epoch, stopped there
    last = first_objects["module"].output_dir / "checkpoints" / "last.ckpt"
    resumed = make_cfg(
        "train", "method=anomalyclip", "trainer.max_epochs=2", "test_after_fit=false", f"ckpt_path={last}"
    )
    _, resumed_objects = train(resumed)
    one_epoch = _learned(first_objects)
    for key, value in _learned(full_objects).items():
        assert not torch.allclose(one_epoch[key], value)  # the second epoch did change the prompts
        torch.testing.assert_close(_learned(resumed_objects)[key], value, rtol=1e-5, atol=1e-6)


def test_checkpoint_for_another_prompt_shape_is_refused(make_cfg, anomalyclip_one_epoch):
    _, _, objects = anomalyclip_one_epoch
    ckpt = objects["module"].output_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointMismatchError, match="n_ctx"):
        evaluate(make_cfg("evaluate", "method=anomalyclip", "method.n_ctx=8", f"ckpt_path={ckpt}"))
    with pytest.raises(CheckpointMismatchError, match="checkpoint"):
        evaluate(make_cfg("evaluate", "method=aprilgan", f"ckpt_path={ckpt}"))
    # another backbone.random_seed: other random tiny weights, refused with the override that fixes it
    with pytest.raises(CheckpointMismatchError, match=r"backbone weights: checkpoint 'vlmad-tiny random:\w+' vs ") as e:
        evaluate(make_cfg("evaluate", "method=anomalyclip", "backbone.random_seed=5", f"ckpt_path={ckpt}"))
    assert str(e.value).endswith(
        "set backbone.model_name=vlmad-tiny backbone.pretrained=null backbone.random_seed=0 to evaluate it"
    )


def test_feature_cache_skips_the_encoder_after_the_first_epoch(make_cfg, count_encodes):
    losses = {}
    for cached in (False, True):
        # uncached = null: the default (auto) would cache the fit set too
        extra = ["module.feature_cache=memory"] if cached else ["module.feature_cache=null"]
        cfg = make_cfg("train", "method=anomalyclip", "trainer.max_epochs=3", "test_after_fit=false", *extra)
        from vlmad.methods.anomalyclip import AnomalyCLIP

        calls = count_encodes(AnomalyCLIP)
        _, objects = train(cfg)
        n_fit = len(objects["datamodule"].fit_dataset())
        assert sum(calls) == (n_fit if cached else 3 * n_fit)  # cached: every image encoded exactly once
        losses[cached] = _learned(objects)
        if cached:
            cache = objects["module"].feature_cache
            assert cache.misses == n_fit and cache.hits == 2 * n_fit and cache.bytes > 0
    for key, value in losses[False].items():
        torch.testing.assert_close(losses[True][key], value, rtol=1e-5, atol=1e-6)
