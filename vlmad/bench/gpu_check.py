"""``make gpu-check``: every method at its paper backbone and size on one CUDA device, fp32 vs bf16, in minutes.

Per method (random weights, ``pretrained=None``; random weights cost what trained ones cost): images/s at batch 32
in fp32 and under bf16 autocast (warm-up, then timed between ``torch.cuda.synchronize`` calls), peak GPU memory,
bf16-vs-fp32 agreement of the maps and scores (max |diff|, Spearman rank correlation); MuSc also as a 200-image
category in bf16 (``vlmad.bench.musc``); AnomalyDINO and SubspaceAD also as s/image against the bare DINOv2 pass
with their reference set-up for k = 1, 2, 4 (``vlmad.bench.dino_fewshot``); then a tiny-backbone train + evaluate
through ``vlmad.engine.run`` on the device in ``bf16-mixed``. Prints one table and writes it as JSON.
``--cpu-smoke`` runs the same code with the tiny backbones (CLIP at 64 px, DINOv2 at 56 px) on the CPU in seconds
(the test suite runs it, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("winclip", "anomalyclip", "aprilgan", "musc", "visualad", "anomalydino", "subspacead")
TINY = {"clip": ("tiny", 64), "dinov2": ("tiny_dinov2", 56)}  # smoke backbone per family (patch 16 / 14)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMOKE = {"batch": 6, "image_size": 64, "warmup": 0, "repeats": 1}  # MuSc scores a set: >= 5 images
GPU = {"batch": 32, "warmup": 1, "repeats": 3}


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share the mean of their positions) of a flattened tensor, float64."""
    _, inverse, counts = torch.unique(x.flatten().double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return ((ends - counts.double() + ends - 1) / 2)[inverse]


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two same-shape tensors (Pearson correlation of their average ranks).

    Returns 1.0 when both are constant (identical orderings), NaN when only one is.
    """
    ra, rb = _ranks(a), _ranks(b.to(a.device))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    if denom == 0:
        return 1.0 if ra.abs().sum() == rb.abs().sum() == 0 else math.nan
    return float((ra * rb).sum() / denom)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_method(name: str, device: torch.device, smoke: bool, workdir: Path) -> Any:
    """The method with its conf/method default backbone (random weights), or the tiny one at 64 px, on ``device``."""
    from hydra.utils import get_class, instantiate
    from lightning import seed_everything
    from omegaconf import OmegaConf

    from vlmad.config import CONF_DIR, compose

    overrides = [f"method={name}", "backbone.pretrained=null"]
    if smoke:
        target = OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml").method._target_
        tiny, size = TINY[get_class(target).backbone_families[0]]
        overrides += [f"backbone={tiny}", f"backbone.image_size={size}"]
    cfg = compose("evaluate", overrides, workdir / name)
    seed_everything(0, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning: speed and agreement only
        backbone = instantiate(cfg.backbone)
        method = instantiate(cfg.method, backbone=backbone)
    return method.eval().to(device)


def images_for(method: Any, batch: int, device: torch.device) -> Tensor:
    """(B, 3, S, S) smooth random images (low-res noise upsampled, plus fine noise), seeded."""
    size = method.backbone.image_size
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(batch, 3, max(2, size // 16), max(2, size // 16), generator=gen)
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (images + 0.3 * torch.randn(batch, 3, size, size, generator=gen)).to(device)


def _predict(method: Any, images: Tensor, precision: str) -> Any:
    """One prediction of the batch; MuSc scores it as one set, its encoder precision set by ``precision``."""
    dtype = DTYPES[precision]
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32), torch.inference_mode():
        if method.transductive:
            method.precision = precision  # MuSc's own encoder setting (it leaves the outer autocast otherwise)
            return method(images)
        if method.reference_draw("object") is None:  # few-shot methods with their own draw: prepared once
            method.prepare("object", images[: method.k_shot] if method.k_shot else None)
        return method(images, ["object"] * len(images))


def prepare_views(method: Any, images: Tensor) -> float:
    """Prepare a method that draws reference views (AnomalyDINO, SubspaceAD) from the first k images; seconds.

    The views (rotations) are made from the images turned back into 8-bit pictures, as the datamodule makes them
    from the original files, then preprocessed and encoded by ``prepare`` (not part of the images/s).
    """
    from PIL import Image

    from vlmad.data.transforms import Preprocess

    mean = torch.tensor(method.backbone.mean, device=images.device).view(3, 1, 1)
    std = torch.tensor(method.backbone.std, device=images.device).view(3, 1, 1)
    pictures = [
        ((img * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        for img in images[: method.k_shot]
    ]
    start = time.perf_counter()
    draw = method.reference_draw("object")
    views = draw.views(pictures, torch.Generator().manual_seed(0)) if draw.views is not None else pictures
    transform = Preprocess(**method.backbone.preprocess_config())
    refs = torch.stack([transform(Image.fromarray(v), None)[0] for v in views]).to(images.device)
    with torch.inference_mode():
        method.prepare("object", refs)
    _sync(images.device)
    return time.perf_counter() - start


def measure(method: Any, images: Tensor, precision: str, warmup: int, repeats: int) -> tuple[dict, Any]:
    """Images/s and peak memory of ``repeats`` timed batches after ``warmup`` untimed ones.

    Returns:
        ``{"images_per_s", "peak_gb"}`` (peak None on CPU) and the last prediction.
    """
    device = images.device
    for _ in range(warmup):
        _predict(method, images, precision)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(repeats):
        pred = _predict(method, images, precision)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": repeats * len(images) / seconds, "peak_gb": peak}, pred


def agreement(full: Any, mixed: Any) -> dict[str, float]:
    """bf16-vs-fp32: max |diff| of maps and scores, rank correlation of maps and scores, output dtypes."""
    return {
        "map_max_abs": float((full.anomaly_map - mixed.anomaly_map).abs().max()),
        "score_max_abs": float((full.pred_score - mixed.pred_score).abs().max()),
        "map_rank_corr": rank_correlation(full.anomaly_map, mixed.anomaly_map),
        "score_rank_corr": rank_correlation(full.pred_score, mixed.pred_score),
        "bf16_map_dtype": str(mixed.anomaly_map.dtype).removeprefix("torch."),
    }


def method_row(name: str, device: torch.device, smoke: bool, workdir: Path) -> dict:
    """Speed, memory and agreement of one method at batch 32 (smoke: 6) in fp32 and bf16."""
    start = time.perf_counter()
    method = build_method(name, device, smoke, workdir)
    plan = SMOKE if smoke else GPU
    images = images_for(method, plan["batch"], device)
    setup_s = prepare_views(method, images) if method.reference_draw("object") is not None else None
    speed, preds = {}, {}
    for precision in DTYPES:
        speed[precision], preds[precision] = measure(method, images, precision, plan["warmup"], plan["repeats"])
    backbone = method.backbone
    row = {"method": name, "backbone": backbone.model_name, "size": backbone.image_size, "batch": len(images)}
    for precision, values in speed.items():
        row.update({f"{precision}_{k}": v for k, v in values.items()})
    row.update(agreement(preds["fp32"], preds["bf16"]))
    row["setup_s"] = setup_s  # reference views + prepare (fp32), k = the method's default
    row["devices_ok"] = all(t.device.type == device.type for t in [*method.parameters(), *method.buffers()])
    row["seconds"] = time.perf_counter() - start
    del method
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def musc_category(device: torch.device, smoke: bool) -> dict:
    """MuSc's 200-image category in bf16 at 518 px on the GPU (smoke: 6 tiny images), via ``vlmad.bench.musc``."""
    from vlmad.bench import musc

    if smoke:
        row = musc.run(n_images=6, image_size=SMOKE["image_size"], backbone_name="vlmad-tiny")[0]
    else:
        row = musc.run(n_images=200, device="cuda", precision="bf16", batch_size=16)[0]
    return {**row, "images_per_s": row["n"] / row["total_s"]}


def dino_fewshot(device: torch.device, smoke: bool, methods: tuple[str, ...]) -> list[dict]:
    """AnomalyDINO / SubspaceAD s/image vs the bare DINOv2 pass, set-up for k = 1, 2, 4 (vlmad.bench.dino_fewshot)."""
    from vlmad.bench import dino_fewshot as bench

    chosen = tuple(m for m in ("anomalydino", "subspacead") if m in methods)
    if not chosen:
        return []
    if smoke:
        tiny = {"image_size": 56, "backbone_name": "vlmad-tiny-dinov2", "aug_count": 3, "source_size": 96}
        return bench.run(chosen, ks=(1, 2), warmup=0, **tiny)
    return bench.run(chosen, device="cuda", n_images=4)


def end_to_end(device: torch.device, workdir: Path) -> dict:
    """Tiny-backbone AnomalyCLIP train (1 epoch) + evaluate through ``vlmad.engine.run`` in bf16-mixed on ``device``."""
    from vlmad.config import compose
    from vlmad.data.synthetic import generate
    from vlmad.engine.run import train

    data = {"image_size": 64, "n_train": 2, "n_test_good": 4, "n_test_defect": 4, "seed": 0}
    root = generate(workdir / "data", categories=["carpet_syn", "bottle_syn"], **data)
    sets = [f"{node}.{k}={v}" for node in ("data", "test_data") for k, v in {"root": root, **data}.items()]
    overrides = [
        "method=anomalyclip",
        "backbone=tiny",
        "backbone.image_size=64",
        "data=synthetic",
        "test_data=synthetic",
        *sets,
        "data.categories=[carpet_syn,bottle_syn]",
        "test_data.categories=[carpet_syn,bottle_syn]",
        f"trainer.accelerator={device.type}",
        "trainer.precision=bf16-mixed",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "datamodule.batch_size=4",
        "datamodule.num_workers=0",
        "module.num_overlays=0",
    ]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results, objects = train(compose("train", overrides, workdir / "e2e"))
    method = objects["method"]
    return {
        "device": str(objects["module"].device),
        "steps": objects["trainer"].global_step,
        "image_auroc": results["mean"]["image_auroc"],
        "pixel_auroc": results["mean"]["pixel_auroc"],
        "learned_fp32": all(v.dtype == torch.float32 for v in method.learned_state().values()),
        "seconds": time.perf_counter() - start,
    }


def run(smoke: bool = False, methods: tuple[str, ...] = METHODS, workdir: Path | None = None) -> dict:
    """The whole check; ``smoke`` = tiny backbone on the CPU. Returns the JSON-ready report."""
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device; use --cpu-smoke to check the script on the CPU")
    device = torch.device("cpu" if smoke else "cuda")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        rows = [method_row(name, device, smoke, work) for name in methods]
        musc = musc_category(device, smoke) if "musc" in methods else None
        dino = dino_fewshot(device, smoke, methods)
        e2e = end_to_end(device, work)
    return {
        "mode": "cpu-smoke" if smoke else "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "rows": rows,
        "musc_category": musc,
        "dino_fewshot": dino,
        "end_to_end": e2e,
        "seconds": time.perf_counter() - start,
    }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(report: dict) -> str:
    """One plain-text table (methods), plus the MuSc category and end-to-end lines."""
    head = (
        f"{'method':<12}{'backbone':<24}{'size':>5}{'batch':>6}{'fp32 img/s':>11}{'bf16 img/s':>11}"
        f"{'fp32 GB':>8}{'bf16 GB':>8}{'max|dmap|':>10}{'max|dscore|':>12}{'map rho':>8}{'score rho':>10}"
    )
    lines = [f"gpu_check ({report['mode']}) on {report['device']}, torch {report['torch']}", head]
    for r in report["rows"]:
        lines.append(
            f"{r['method']:<12}{r['backbone']:<24}{r['size']:>5}{r['batch']:>6}{r['fp32_images_per_s']:>11.1f}"
            f"{r['bf16_images_per_s']:>11.1f}{_num(r['fp32_peak_gb'], '.2f'):>8}{_num(r['bf16_peak_gb'], '.2f'):>8}"
            f"{r['map_max_abs']:>10.2e}{r['score_max_abs']:>12.2e}{r['map_rank_corr']:>8.4f}"
            f"{r['score_rank_corr']:>10.4f}"
        )
    m = report["musc_category"]
    if m:
        lines.append(
            f"musc category: {m['n']} images at {m['size']} px, {m['precision']}: {m['images_per_s']:.1f} img/s "
            f"(encode {m['encode_s']:.1f} s, score {m['score_s']:.1f} s, peak {m['peak_mb']:.0f} MB)"
        )
    for d in report.get("dino_fewshot") or []:
        lines.append(
            f"{d['method']} {d['backbone']} {d['size']} px, k={d['k']} ({d['views']} views): "
            f"set-up {d['setup_s']:.2f} s; "
            f"s/img bare {d['bare_s']:.4f}, encode {d['encode_s']:.4f}, forward {d['forward_s']:.4f} "
            f"(scoring alone {d['score_s']:.4f}: {100 * d['overhead']:.1f} % of the bare pass)"
        )
    e = report["end_to_end"]
    lines.append(
        f"tiny train+evaluate (bf16-mixed) on {e['device']}: {e['steps']} steps, image AUROC "
        f"{e['image_auroc']:.3f}, pixel AUROC {e['pixel_auroc']:.3f}, {e['seconds']:.1f} s"
    )
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """``python -m vlmad.bench gpu_check [--cpu-smoke] [--out gpu_check.json]``."""
    parser = argparse.ArgumentParser(prog="python -m vlmad.bench gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny backbone on the CPU, seconds")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON report is written")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args(argv)
    report = run(smoke=args.cpu_smoke, methods=tuple(args.methods))
    print(format_report(report), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    main()
