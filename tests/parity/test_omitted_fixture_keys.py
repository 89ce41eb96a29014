"""A fixture set that omits per-token tensors (as the full-size MuSc set does) still runs every parity test.

The shipped MuSc fixture is copied into a temporary set folder without ``features/block*/tokens`` and ``lnamd/*``
(listed in ``omitted_keys``); the MuSc parity tests then run on it in a subprocess: the stages whose reference
input is gone run from vlmad's own upstream output, nothing fails or skips. (A set folder without ``metrics/``:
tests/unit/test_metrics.py.)
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys

import pytest
import torch
from reference import HERE, fixture_files, load_fixture

pytestmark = pytest.mark.parity

OMITTED = ["features/block*/tokens", "lnamd/*"]


@pytest.fixture(scope="module")
def omitting_set(tmp_path_factory):
    """A set folder holding only musc/ (one fixture with OMITTED left out and listed)."""
    root = tmp_path_factory.mktemp("omitting_fixtures")
    (root / "musc").mkdir()
    source = fixture_files("musc")[0]
    fx = load_fixture(source)
    dropped = [k for k in fx if any(fnmatch.fnmatchcase(k, p) for p in OMITTED)]
    assert any(k.startswith("features/") for k in dropped) and any(k.startswith("lnamd/") for k in dropped)
    fx = {k: v for k, v in fx.items() if k not in dropped}
    fx["meta"] = {**fx["meta"], "omitted_keys": OMITTED}
    torch.save(fx, root / "musc" / source.name.removesuffix(".xz"))
    return root


def _pytest(root, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLMAD_REFERENCE_FIXTURES": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *args]
    return subprocess.run(cmd, cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=600)


def test_musc_parity_runs_end_to_end_on_a_set_that_omits_stage_inputs(omitting_set):
    proc = _pytest(omitting_set, "tests/parity/test_musc_parity.py")
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "7 passed" in summary and "skipped" not in summary and "failed" not in summary, summary
