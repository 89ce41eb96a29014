"""``make gpu-check``: its CPU smoke mode runs here (so the script cannot rot); the real mode needs CUDA."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlmad.bench import gpu_check
from vlmad.bench.gpu_check import rank_correlation


def test_rank_correlation_by_hand():
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])  # average ranks 1, 2.5, 2.5, 4
    b = torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert rank_correlation(a, b) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    x = torch.randn(50)
    assert rank_correlation(x, x.exp()) == pytest.approx(1.0)  # any increasing map keeps the ranks
    assert rank_correlation(x, -x) == pytest.approx(-1.0)


def _check_report(report: dict, out) -> None:
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # the printed table's data, as JSON
    assert [r["method"] for r in report["rows"]] == list(gpu_check.METHODS)
    for row in report["rows"]:
        assert row["fp32_images_per_s"] > 0 and row["bf16_images_per_s"] > 0
        assert row["bf16_map_dtype"] == "float32"  # maps handed to the metrics stay fp32 under bf16
        assert row["map_rank_corr"] >= 0.99
        assert row["devices_ok"]  # every parameter and buffer on the check's device
    assert report["musc_category"]["images_per_s"] > 0
    dino = report["dino_fewshot"]  # AnomalyDINO and SubspaceAD: per-image times and set-up per k
    assert {(d["method"], d["k"]) for d in dino} >= {("anomalydino", 1), ("subspacead", 2)}
    assert all(d["bare_s"] > 0 and d["forward_s"] > 0 and d["setup_s"] > 0 and d["views"] > d["k"] for d in dino)
    assert all(r["setup_s"] > 0 for r in report["rows"] if r["method"] in ("anomalydino", "subspacead"))
    e2e = report["end_to_end"]
    assert e2e["steps"] > 0 and e2e["learned_fp32"]
    assert 0 <= e2e["image_auroc"] <= 1 and 0 <= e2e["pixel_auroc"] <= 1


def test_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--cpu-smoke", "--out", str(out)])
    assert report["mode"] == "cpu-smoke" and report["end_to_end"]["device"] == "cpu"
    _check_report(report, out)
    assert "bf16 img/s" in capsys.readouterr().out


def test_real_mode_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA"):
        gpu_check.run(smoke=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_on_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--out", str(out)])
    assert report["mode"] == "cuda" and report["end_to_end"]["device"].startswith("cuda")
    _check_report(report, out)
    assert all(r["batch"] == 32 and r["fp32_peak_gb"] > 0 for r in report["rows"])
    assert report["seconds"] < 300
