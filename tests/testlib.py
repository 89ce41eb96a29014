"""Constants and helpers the tests import (``from testlib import ...``); fixtures stay in conftest.py.

A module of its own because ``from testlib import ...`` resolves to whichever conftest.py pytest loaded last
(tests/parity/ has one too), which depends on how pytest was invoked.
"""

from __future__ import annotations

from pathlib import Path

from vlmad.config import compose

SYNTHETIC = {"image_size": 64, "n_train": 4, "n_test_good": 2, "n_test_defect": 2, "seed": 0}
SYNTHETIC_CATEGORIES = {"mvtec": ["carpet_syn", "bottle_syn"], "visa": ["candle_syn", "pcb_syn"]}


def synthetic_overrides(node: str, layout: str, root: Path) -> list[str]:
    # the same generator arguments as synthetic_roots, so the reader finds the trees instead of regenerating
    cats = ",".join(SYNTHETIC_CATEGORIES[layout])
    return [f"{node}.root={root}", f"{node}.categories=[{cats}]", *(f"{node}.{k}={v}" for k, v in SYNTHETIC.items())]


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
            base += synthetic_overrides("data", "visa", synthetic_roots["visa"])
            base += synthetic_overrides("test_data", "mvtec", synthetic_roots["mvtec"])
        else:
            base += ["data=synthetic", *synthetic_overrides("data", "mvtec", synthetic_roots["mvtec"])]
        return compose(config_name, [*base, *overrides], tmp_path / "run")

    return _make
