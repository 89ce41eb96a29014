"""Shared fixtures: composed-then-shrunk configs, generated datasets, a seeded tiny CLIP. Nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from testlib import SYNTHETIC, SYNTHETIC_CATEGORIES, cfg_maker

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs tiny models: with several intra-op threads on a small (and possibly loaded) machine the
# threads spin against each other and tiny ops get ~100x slower. Benchmarks (make bench) use all cores.
torch.set_num_threads(1)


# The longest files first (measured, ``make test`` on 2 cores): with whole files per xdist worker, a long file
# started last would leave one core idle while it runs alone. Longest-first is the classic fix for that tail.
LONGEST_FIRST = (
    "integration/test_ddp_faults.py",
    "integration/test_ddp.py",
    "integration/test_sweep.py",
    "integration/test_export.py",
    "integration/test_mixed_precision.py",
    "integration/test_experiments.py",
    "integration/test_learning.py",
    "integration/test_eval_cache.py",
    "integration/test_configs.py",
    "integration/test_hardening.py",
    "integration/test_serve.py",
    "integration/test_run_states.py",
    "integration/test_predict.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of :data:`LONGEST_FIRST` first, in that order; the rest keep their collection order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next((i for name, i in rank.items() if path.endswith(name)), len(rank))

    items.sort(key=key)  # stable: tests within a file, and the other files, keep their order


@pytest.fixture(scope="session")
def synthetic_roots(tmp_path_factory) -> dict[str, Path]:
    """Small generated MVTec-format and VisA-format trees (generated once per session)."""
    from vlmad.data.synthetic import generate

    base = tmp_path_factory.mktemp("synthetic")
    return {
        layout: generate(base / f"{layout}_format", layout=layout, categories=SYNTHETIC_CATEGORIES[layout], **SYNTHETIC)
        for layout in ("mvtec", "visa")
    }


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
