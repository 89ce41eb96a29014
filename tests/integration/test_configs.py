"""Every config file is composed (and instantiated where cheap) by a test, so none can rot."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from vlmad.config import CONF_DIR as CONF
from vlmad.config import compose

GROUP_ALLOWED_KEYS = {"method", "module", "trainer", "defaults"}
TINY_SIZE = {"tiny": 64, "tiny_dinov2": 56}  # input sides of the random-weights test backbones (patch 16 / 14)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("method", _options("method"))
@pytest.mark.parametrize("config_name", ["train", "evaluate"])
def test_every_method_composes_and_instantiates(make_cfg, config_name, method):
    family = get_class(OmegaConf.load(CONF / "method" / f"{method}.yaml").method._target_).backbone_families[0]
    tiny = {"clip": "tiny", "dinov2": "tiny_dinov2"}[family]  # each method on a tiny backbone of its family
    cfg = make_cfg(config_name, f"method={method}", f"backbone={tiny}", f"backbone.image_size={TINY_SIZE[tiny]}")
    assert cfg.method._target_.startswith("vlmad.methods.")
    assert cfg.backbone.model_name == f"vlmad-{tiny.replace('_', '-')}"  # command line wins over the method default
    backbone = instantiate(cfg.backbone)
    assert instantiate(cfg.method, backbone=backbone).backbone is backbone


def test_method_files_only_touch_their_keys():
    for path in (CONF / "method").glob("*.yaml"):
        text = path.read_text()
        assert text.startswith("# @package _global_"), path
        keys = set(OmegaConf.load(path).keys())
        own = {k for k in keys if k.startswith(f"{path.stem}_")}  # its own helpers, e.g. visualad_fit_epochs
        assert keys - own <= GROUP_ALLOWED_KEYS, f"{path.name} sets {keys - own - GROUP_ALLOWED_KEYS}"


@pytest.mark.parametrize("backbone", _options("backbone"))
def test_every_backbone_composes(make_cfg, backbone):
    cfg = make_cfg("evaluate", f"backbone={backbone}")
    family = "DinoBackbone" if backbone.startswith(("dinov2", "tiny_dinov2")) else "ClipBackbone"
    assert cfg.backbone._target_ == f"vlmad.backbones.{family}"
    assert "image_size" not in cfg.datamodule  # run.build takes size, mean and std from the backbone


@pytest.mark.parametrize("data", _options("data"))
def test_every_data_composes_and_instantiates(tmp_path, data):
    cfg = compose("evaluate", [f"data={data}", f"data.root={tmp_path / 'missing'}"], tmp_path)
    assert cfg.data._target_.startswith("vlmad.data.")
    if data.startswith("synthetic"):
        reader = instantiate(cfg.data)  # generates into the (missing) root
        assert reader.categories and Path(cfg.data.root).is_dir()
    else:
        from hydra.errors import InstantiationException

        with pytest.raises(InstantiationException, match=r"root not found: .*missing"):  # names the path
            instantiate(cfg.data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("visa", "vlmad.data.MVTec"),
        ("mvtec", "vlmad.data.VisA"),
        ("synthetic_visa", "vlmad.data.Synthetic"),
        ("folder", None),
    ],
)
def test_train_tests_on_the_other_dataset_by_default(tmp_path, data, expected):
    cfg = compose("train", [f"data={data}"], tmp_path)
    if expected is None:  # own data: no default (never the split it was fitted on)
        assert cfg.get("test_data") is None
    else:
        assert cfg.test_data._target_ == expected
        assert cfg.test_data._target_ != cfg.data._target_ or cfg.test_data.layout != cfg.data.layout
    cfg = compose("train", [f"data={data}", "test_data=visa", "test_data.root=/x"], tmp_path)
    assert cfg.test_data._target_ == "vlmad.data.VisA" and cfg.test_data.root == "/x"


@pytest.mark.parametrize(
    "group", ["trainer", "callbacks", "logger", "paths", "hydra", "experiment", "test_data", "datamodule", "module"]
)
def test_every_group_file_composes(tmp_path, group):
    for option in _options(group):
        name = "train" if group in {"callbacks", "test_data"} else "evaluate"
        cfg = compose(name, [f"{group}={option}"], tmp_path)
        OmegaConf.to_container(cfg, resolve=False)
        assert cfg.method is not None


def test_datamodule_and_module_nodes_come_from_their_groups(tmp_path):
    for name, optimizer in (("train", "torch.optim.Adam"), ("evaluate", None)):
        text = (CONF / f"{name}.yaml").read_text()
        assert "\ndatamodule:" not in text and "\nmodule:" not in text  # not repeated in the primary configs
        cfg = compose(name, [], tmp_path)
        assert cfg.datamodule._target_ == "vlmad.data.AnomalyDataModule"
        assert cfg.module._target_ == "vlmad.engine.module.AnomalyModule"
        assert (cfg.module.optimizer or {}).get("_target_") == optimizer
