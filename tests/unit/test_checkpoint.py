"""Checkpoints record the backbone weights they were fitted on; official reference files load converted."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from vlmad.backbones import ClipBackbone
from vlmad.engine.checkpoint import CheckpointMismatchError, load_method_weights
from vlmad.engine.module import AnomalyModule
from vlmad.methods.anomalyclip import AnomalyCLIP
from vlmad.methods.aprilgan import AprilGAN

ANOMALYCLIP = {"feature_layers": [3], "dpam_start": 1, "deep_prompt_depth": 3}


def _backbone(seed: int) -> ClipBackbone:
    return ClipBackbone("vlmad-tiny", None, 64, random_seed=seed)  # the random weights come from backbone.random_seed


def _save(module: AnomalyModule, path) -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


def test_other_backbone_weights_are_refused_naming_both(tmp_path):
    trained = AnomalyCLIP(_backbone(111), **ANOMALYCLIP)
    ckpt = tmp_path / "prompts.ckpt"
    _save(AnomalyModule(trained), ckpt)
    assert torch.load(ckpt, weights_only=False)["vlmad"]["backbone_weights"] == trained.backbone.weights_id()

    other = AnomalyCLIP(_backbone(0), **ANOMALYCLIP)
    with pytest.raises(CheckpointMismatchError, match="backbone weights") as err:
        load_method_weights(other, ckpt)
    message = str(err.value)
    assert str(ckpt) in message and trained.backbone.weights_id() in message and other.backbone.weights_id() in message
    assert "set backbone.model_name=vlmad-tiny backbone.pretrained=null backbone.random_seed=111" in message  # the fix

    same = AnomalyCLIP(_backbone(111), **ANOMALYCLIP)  # same seed: the same weights, loads
    load_method_weights(same, ckpt)
    for key, value in trained.learned_state().items():
        torch.testing.assert_close(same.learned_state()[key], value)


def test_settings_only_checkpoint_of_a_training_free_method_ignores_weights(tmp_path):
    from vlmad.methods.winclip import WinCLIP

    ckpt = tmp_path / "winclip.ckpt"
    _save(AnomalyModule(WinCLIP(_backbone(1))), ckpt)
    load_method_weights(WinCLIP(_backbone(2)), ckpt)  # nothing was fitted to the weights: no refusal


def test_official_anomalyclip_file_is_converted(tmp_path, caplog):
    source = AnomalyCLIP(_backbone(0), **ANOMALYCLIP)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.normal_()
    state = source.learned_state()
    n_ctx, dim = state["ctx_pos"].shape
    official = {
        "ctx_pos": state["ctx_pos"].view(1, 1, n_ctx, dim),
        "ctx_neg": state["ctx_neg"].view(1, 1, n_ctx, dim),
        "token_prefix_pos": torch.zeros(1, 1, dim),
    }
    official |= {f"compound_prompts_text.{i}": d for i, d in enumerate(state["deep_prompts"])}
    path = tmp_path / "9_12_4_multiscale_visa" / "epoch_15.pth"
    path.parent.mkdir()
    torch.save({"prompt_learner": official}, path)

    target = AnomalyCLIP(_backbone(0), **ANOMALYCLIP)
    with caplog.at_level(logging.INFO, logger="vlmad.engine.checkpoint"):
        load_method_weights(target, path)
    assert f"converted official AnomalyCLIP checkpoint {path}" in caplog.text
    for key, value in state.items():
        torch.testing.assert_close(target.learned_state()[key], value)


def test_official_aprilgan_file_is_converted_and_shapes_checked(tmp_path, caplog):
    source = AprilGAN(_backbone(0), feature_layers=[1, 3])
    state = {k: torch.randn_like(v) for k, v in source.learned_state().items()}
    official = {"trainable_linearlayer": {k.replace("projections.", "fc."): v for k, v in state.items()}}
    path = tmp_path / "visa_pretrained.pth"
    torch.save(official, path)
    target = AprilGAN(_backbone(0), feature_layers=[1, 3])
    with caplog.at_level(logging.INFO, logger="vlmad.engine.checkpoint"):
        load_method_weights(target, path)
    assert f"converted official AprilGAN checkpoint {path}" in caplog.text
    for key, value in state.items():
        torch.testing.assert_close(target.learned_state()[key], value)

    with pytest.raises(CheckpointMismatchError, match=r"visa_pretrained.pth: .*lacks learned tensors"):
        load_method_weights(AprilGAN(_backbone(0), feature_layers=[0, 1, 3]), path)  # three taps, two in the file
    torch.save({"trainable_linearlayer": {"fc.0.weight": torch.zeros(5, 5), "fc.0.bias": torch.zeros(5)}}, path)
    with pytest.raises(CheckpointMismatchError, match=r"method.projections.0.weight has shape \(5, 5\)"):
        load_method_weights(AprilGAN(_backbone(0), feature_layers=[1]), path)


def test_unknown_file_is_neither_vlmad_nor_official(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointMismatchError, match=r"other.pth: not a vlmad checkpoint"):
        load_method_weights(AprilGAN(_backbone(0), feature_layers=[3]), path)


def test_random_weights_follow_the_backbone_seed_not_the_global_rng():
    torch.manual_seed(111)  # a train run's seed ...
    first = ClipBackbone("vlmad-tiny", None, 64)
    after_build = torch.rand(1)
    torch.manual_seed(0)  # ... and an evaluate run's: the same default random_seed, the same weights
    assert ClipBackbone("vlmad-tiny", None, 64).weights_id() == first.weights_id()
    torch.manual_seed(111)
    assert torch.equal(torch.rand(1), after_build)  # the build leaves the run's random stream untouched
    assert _backbone(1).weights_id() != first.weights_id()  # another backbone.random_seed: other weights
