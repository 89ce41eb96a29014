"""Shared fixtures: composed-then-shrunk configs, generated datasets, a seeded tiny CLIP. Nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vlmad.config import compose

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs tiny models: with several intra-op threads on a small (and possibly loaded) machine the
# threads spin against each other and tiny ops get ~100x slower. Benchmarks (make bench) use all cores.
torch.set_num_threads(1)

SYNTHETIC = {"image_size": 64, "n_train": 4, "n_test_good": 2, "n_test_defect": 2, "seed": 0}
SYNTHETIC_CATEGORIES = {"mvtec": ["carpet_syn", "bottle_syn"], "visa": ["candle_syn", "pcb_syn"]}


@pytest.fixture(scope="session")
def synthetic_roots(tmp_path_factory) -> dict[str, Path]:
    """Small generated MVTec-format and VisA-format trees (generated once per session)."""
    from vlmad.data.synthetic import generate

    base = tmp_path_factory.mktemp("synthetic")
    return {
        layout: generate(base / f"{layout}_format", layout=layout, categories=SYNTHETIC_CATEGORIES[layout], **SYNTHETIC)
        for layout in ("mvtec", "visa")
    }


def _synthetic_overrides(node: str, layout: str, root: Path) -> list[str]:
    # the same generator arguments as synthetic_roots, so the reader finds the trees instead of regenerating
    cats = ",".join(SYNTHETIC_CATEGORIES[layout])
    return [f"{node}.root={root}", f"{node}.categories=[{cats}]", *(f"{node}.{k}={v}" for k, v in SYNTHETIC.items())]


@pytest.fixture
def tiny_backbone():
    """The shipped random-weights tiny CLIP, seeded."""
    from vlmad.backbones import ClipBackbone

    torch.manual_seed(0)
    return ClipBackbone("vlmad-tiny", pretrained=None, image_size=64)


@pytest.fixture
def make_cfg(tmp_path, synthetic_roots):
    """make_cfg(config_name, *overrides): the real config with the tiny backbone and the generated data."""
    return cfg_maker(tmp_path, synthetic_roots)


def cfg_maker(tmp_path: Path, synthetic_roots: dict[str, Path]):
    """``make_cfg`` writing under ``tmp_path``: module-scoped fixtures share one run across tests with it."""

    def _make(config_name: str, *overrides: str):
        base = [
            "backbone=tiny",
            "backbone.image_size=64",
            f"paths.data_dir={tmp_path / 'data'}",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "datamodule.batch_size=4",
            "datamodule.num_workers=0",  # tiny images: worker start-up would dominate
            "module.num_overlays=2",
        ]
        if config_name == "train":
            base += ["data=synthetic_visa", "test_data=synthetic"]
            base += _synthetic_overrides("data", "visa", synthetic_roots["visa"])
            base += _synthetic_overrides("test_data", "mvtec", synthetic_roots["mvtec"])
        else:
            base += ["data=synthetic", *_synthetic_overrides("data", "mvtec", synthetic_roots["mvtec"])]
        return compose(config_name, [*base, *overrides], tmp_path / "run")

    return _make


@pytest.fixture
def count_encodes(monkeypatch):
    """count_encodes(MethodClass) -> list that receives the batch size of every ``encode_images`` call."""

    def _count(cls) -> list[int]:
        calls: list[int] = []
        original = cls.encode_images

        def counting(self, images, calls=calls, original=original):
            calls.append(len(images))
            return original(self, images)

        monkeypatch.setattr(cls, "encode_images", counting)
        return calls

    return _count
