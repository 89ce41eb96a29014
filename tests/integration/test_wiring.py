"""Wiring: preprocessing from the backbone only, names from the batch, data.class_names, the comparison entry point."""

from __future__ import annotations

import pytest
import torch

from vlmad.config import compose
from vlmad.engine import compare
from vlmad.engine.run import build, evaluate, train
from vlmad.errors import ConfigError

TINY = [
    "backbone=tiny",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "datamodule.num_workers=0",
    "module.num_overlays=0",
    "module.threshold.calibrate=false",
]


def test_datamodule_and_predict_take_preprocessing_from_the_backbone(make_cfg, tmp_path):
    from vlmad.deploy.predict import build_method

    cfg = make_cfg("evaluate", "backbone.image_size=96")
    assert "image_size" not in cfg.datamodule and "mean" not in cfg.datamodule  # no parallel config values
    objects = build(cfg, fit=False)
    source = objects["backbone"].preprocess_config()
    transform = objects["datamodule"].transform
    assert source["image_size"] == transform.image_size == 96
    assert transform.mean.flatten().tolist() == pytest.approx(source["mean"])
    assert transform.std.flatten().tolist() == pytest.approx(source["std"])
    batch = next(iter(objects["datamodule"].test_dataloader()[0]))
    assert batch["image"].shape[-2:] == (96, 96)

    _, preprocess = build_method(
        compose("predict", ["backbone=tiny", "backbone.image_size=96", "input=x", "device=cpu"], tmp_path / "predict")
    )
    assert preprocess.image_size == 96
    torch.testing.assert_close(preprocess.mean, transform.mean)
    torch.testing.assert_close(preprocess.std, transform.std)


def test_class_names_map_folders_to_object_names(synthetic_roots, tmp_path, monkeypatch):
    from vlmad.methods.winclip import WinCLIP

    prepared: list[str] = []
    original = WinCLIP.prepare
    monkeypatch.setattr(
        WinCLIP, "prepare", lambda self, name, refs=None: prepared.append(name) or original(self, name, refs)
    )

    def run(data: str, *extra: str) -> dict[str, float]:
        out = tmp_path / f"run{len(prepared)}"
        overrides = [
            *TINY,
            "backbone.image_size=64",
            "method=winclip",
            f"data={data}",
            f"data.root={synthetic_roots['mvtec']}",
            "data.categories=[bottle_syn]",
            *extra,
        ]
        return evaluate(compose("evaluate", overrides, out))[0]["bottle_syn"]

    folder_name = run("mvtec")
    mapped = run("mvtec", "data.class_names={bottle_syn: bottle}")
    assert prepared == ["bottle_syn", "bottle"]  # the prompts say "bottle", not the folder name
    # the same images and prompt name as the synthetic reader (which names bottle_syn "bottle"): the same numbers
    reference = run(
        "synthetic",
        *(f"data.{k}={v}" for k, v in {"image_size": 64, "n_train": 4, "n_test_good": 2, "n_test_defect": 2}.items()),
    )
    assert prepared[-1] == "bottle"
    assert mapped == pytest.approx(reference)
    assert set(folder_name) == set(mapped)


def test_test_step_refuses_a_batch_of_several_categories(tiny_backbone):
    from vlmad.engine.module import AnomalyModule
    from vlmad.methods.winclip import WinCLIP

    module = AnomalyModule(WinCLIP(tiny_backbone))
    batch = {"category": ["a", "b"], "class_name": ["a", "b"], "image": torch.zeros(2, 3, 64, 64)}
    with pytest.raises(ValueError, match=r"one category, got \['a', 'b'\]"):
        module.test_step(batch, 0)


def test_own_data_needs_a_named_test_set(make_cfg, tmp_path):
    cfg = compose("train", ["data=folder", f"data.root={tmp_path / 'mine'}"], tmp_path / "run")
    assert cfg.get("test_data") is None  # no fitting and testing on the same split
    with pytest.raises(ConfigError, match=r"mine: fitting on your own data has no default test set"):
        train(cfg)


def test_comparisons_run_from_their_own_entry_point(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"vlmad compare"):
        train(make_cfg("train", "experiment=comparison"))
    cfg = compare.compose_comparison(["backbone=tiny", f"paths.output_dir={tmp_path / 'cmp'}"])
    members = {"winclip", "anomalyclip", "aprilgan", "musc", "visualad", "anomalydino", "subspacead"}
    assert set(cfg.comparison.members) == members  # every method of the README's table
    assert cfg.paths.output_dir == str(tmp_path / "cmp")
    with pytest.raises(ConfigError, match="no `comparison` node"):
        compare.compose_comparison(["experiment=smoke"])


def test_comparison_run_folder_follows_the_train_and_evaluate_rules(tmp_path, monkeypatch):
    cfg = compare.compose_comparison(["backbone=tiny", f"hydra.run.dir={tmp_path / 'moved'}"])
    assert cfg.paths.output_dir == str(tmp_path / "moved")  # hydra.run.dir moves it, as for train.py
    monkeypatch.chdir(tmp_path)
    import vlmad.config

    asked = []
    monkeypatch.setattr(vlmad.config, "fresh_dir", lambda path: asked.append(path) or f"{path}-1")
    out = compare.compose_comparison(["backbone=tiny"]).paths.output_dir
    assert asked == [out[:-2]] and asked[0].startswith("outputs/comparison/")  # the collision guard names it
