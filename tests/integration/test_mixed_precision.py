"""Mixed precision: every method under bf16 (and fp16) autocast on CPU agrees with its fp32 run.

Each method is built twice from the same seeded config (tiny backbone, 64 px, generated data) and scored once in
fp32 and once inside ``torch.autocast`` (what Lightning's ``bf16-mixed`` / ``16-mixed`` wrap every step in). The
delicate parts (temperature logits, softmaxes, harmonic means, min-distances, blur) run in fp32 inside the methods
(``vlmad.methods.ops.fp32``), so outputs are float32 and rankings agree. Lightning turns ``16-mixed`` on CPU into
``bf16-mixed``; fp16 is checked with a plain ``torch.autocast`` here.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torchmetrics.functional.classification import binary_auroc

from vlmad.bench.gpu_check import rank_correlation
from vlmad.config import compose
from vlmad.engine.run import evaluate, train
from vlmad.methods.aprilgan import AprilGAN
from vlmad.methods.ops import autocast_active, fp32

CATEGORIES = ["carpet_syn", "bottle_syn"]
DATA = {"image_size": 64, "n_train": 4, "n_test_good": 10, "n_test_defect": 10, "seed": 0}  # 40 test images
DINO = ["backbone=tiny_dinov2", "backbone.image_size=56"]
# name -> (config overrides, extra overrides of the mixed run)
METHODS = {
    "winclip": (["method=winclip"], []),
    "winclip_k1": (["method=winclip", "method.k_shot=1"], []),
    "anomalyclip": (["method=anomalyclip"], []),
    "aprilgan": (["method=aprilgan"], []),
    "aprilgan_k1": (["method=aprilgan", "method.k_shot=1"], []),
    "musc": (["method=musc"], []),  # precision=fp32 keeps its encoder in fp32 even inside bf16-mixed (its spec)
    "musc_bf16": (["method=musc"], ["method.precision=bf16"]),  # MuSc's own bf16 encoder setting
    # the tower (with its tokens) in bf16, SCA/SAF/cosines in fp32. Untrained at the shipped init (0.1·W^-1/2) the two
    # tokens are nearly equal and the maps nearly flat: ranks then follow noise (score rank correlation 0.992, image
    # |d AUROC| 0.010, at the limits); tokens at 1·W^-1/2 give maps with contrast, as trained ones have (0.998, 0.003)
    "visualad": (["method=visualad", "method.token_init_scale=1.0"], []),
    # DINOv2 methods on the tiny DINOv2 (56 px: 4x4 patches of 14 px)
    "anomalydino": (["method=anomalydino", *DINO], []),
    "anomalydino_masked": (["method=anomalydino", "method.masking=all", "method.mask_threshold=0.5", *DINO], []),
    "subspacead": (["method=subspacead", "method.aug_count=3", *DINO], []),
}
# Measured on CPU in bf16 (this file's data): max |d AUROC| 0.0075 (image), 0.0004 (pixel); min map rank
# correlation 0.99997 (see the README's "Mixed precision").
AUROC_TOL, MIN_RANK_CORR = 0.01, 0.99


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from vlmad.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("amp") / "mvtec", categories=CATEGORIES, **DATA)


def _cfg(tmp_path, data_root, config_name: str, *overrides: str):
    nodes = ["data", "test_data"] if config_name == "train" else ["data"]  # train fits and tests on the same tree
    settings = {"root": data_root, "categories": f"[{','.join(CATEGORIES)}]", **DATA}
    tiny = [] if any(o.startswith("backbone=") for o in overrides) else ["backbone=tiny", "backbone.image_size=64"]
    base = [
        *tiny,
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "datamodule.batch_size=20",
        "datamodule.num_workers=0",
        "module.num_overlays=0",
        f"paths.data_dir={tmp_path / 'data'}",
        *(f"{node}=synthetic" for node in nodes),
        *(f"{node}.{k}={v}" for node in nodes for k, v in settings.items()),
    ]
    return compose(config_name, [*base, *overrides], tmp_path / "run")


def _score(cfg, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Score every test image with a freshly built (seeded) method, in fp32 or inside autocast(dtype)."""
    L.seed_everything(cfg.seed, verbose=False)
    backbone = instantiate(cfg.backbone)
    method = instantiate(cfg.method, backbone=backbone).eval()
    dm = instantiate(cfg.datamodule, test_set=instantiate(cfg.data), **backbone.preprocess_config())
    out: dict[str, list[torch.Tensor]] = {"score": [], "map": [], "label": [], "mask": []}
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None), torch.no_grad():
        for category in dm.test_categories:
            draw = method.reference_draw(dm.prompt_name(category))  # the method's rule and views (as the module)
            refs = dm.reference_images(category, method.k_shot, cfg.seed, draw)[0] if method.k_shot else None
            method.prepare(dm.prompt_name(category), refs)
            batches = list(dm.test_dataloader()[dm.test_categories.index(category)])
            if method.transductive:
                for batch in batches:
                    method.accumulate(batch["image"], list(batch["class_name"]))
                preds = [method.score_accumulated()]
            else:
                preds = [method(b["image"], list(b["class_name"])) for b in batches]
            for pred in preds:
                out["score"].append(pred.pred_score)
                out["map"].append(pred.anomaly_map)
            out["label"] += [b["label"] for b in batches]
            out["mask"] += [b["mask"] for b in batches]
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, data_root):
    """fp32_run(name): the method's fp32 outputs, computed once per module (shared by the bf16 and fp16 tests)."""
    runs: dict[str, dict[str, torch.Tensor]] = {}

    def _run(name: str) -> dict[str, torch.Tensor]:
        if name not in runs:
            runs[name] = _score(_cfg(tmp_path_factory.mktemp(name), data_root, "evaluate", *METHODS[name][0]), None)
        return runs[name]

    return _run


def _aurocs(run: dict[str, torch.Tensor]) -> tuple[float, float]:
    image = binary_auroc(run["score"].double(), run["label"].long()).item()
    pixel = binary_auroc(run["map"].flatten().double(), run["mask"].flatten().long()).item()
    return image, pixel


@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_autocast_agrees_with_fp32(tmp_path, data_root, fp32_run, name):
    overrides, mixed_overrides = METHODS[name]
    full = fp32_run(name)
    mixed = _score(_cfg(tmp_path, data_root, "evaluate", *overrides, *mixed_overrides), torch.bfloat16)
    # the maps and scores handed to the metrics are float32 whatever the autocast dtype
    assert mixed["map"].dtype == mixed["score"].dtype == torch.float32
    assert torch.isfinite(mixed["map"]).all() and torch.isfinite(mixed["score"]).all()
    for fp32_auroc, bf16_auroc in zip(_aurocs(full), _aurocs(mixed), strict=True):
        assert abs(fp32_auroc - bf16_auroc) <= AUROC_TOL
    assert rank_correlation(full["map"], mixed["map"]) >= MIN_RANK_CORR
    assert rank_correlation(full["score"], mixed["score"]) >= MIN_RANK_CORR


def test_fp16_autocast_agrees_with_fp32(tmp_path, data_root, fp32_run):
    """16-mixed (CUDA only in Lightning: on CPU it falls back to bf16) as a plain fp16 autocast: k-shot APRIL-GAN."""
    name = "aprilgan_k1"
    full, mixed = fp32_run(name), _score(_cfg(tmp_path, data_root, "evaluate", *METHODS[name][0]), torch.float16)
    assert mixed["map"].dtype == torch.float32
    assert rank_correlation(full["map"], mixed["map"]) >= MIN_RANK_CORR


def test_guard_keeps_the_logits_fp32(tiny_backbone):
    """Without ``fp32`` APRIL-GAN's cos / 0.01 logits come out in bf16 under autocast; with it they are float32."""
    method = AprilGAN(tiny_backbone, feature_layers=[1, 3]).eval()
    text = method._batch_text_features(["object"])  # (1, 2, D)
    tokens = torch.randn(1, 2, tiny_backbone.grid_size**2, tiny_backbone.width)
    unguarded = AprilGAN.stage_logits.__wrapped__  # the undecorated function
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert autocast_active()
        assert unguarded(method, tokens, text).dtype == torch.bfloat16
        assert method.stage_logits(tokens, text).dtype == torch.float32
    reference = method.stage_logits(tokens, text)
    torch.testing.assert_close(method.stage_logits(tokens.bfloat16(), text), reference, rtol=0, atol=0.5)


def test_fp32_decorator_casts_and_leaves_fp32_untouched():
    @fp32
    def matmul(a: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return a @ b["x"]

    a = torch.randn(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        assert matmul(a.bfloat16(), {"x": a}).dtype == torch.float32
    assert matmul(a, {"x": a}).dtype == torch.float32
    assert matmul(a.double(), {"x": a.double()}).dtype == torch.float64  # outside autocast: unchanged


def test_lightning_bf16_mixed_evaluate_matches_32(tmp_path, data_root):
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        cfg = _cfg(
            tmp_path / precision,
            data_root,
            "evaluate",
            "method=aprilgan",
            "method.k_shot=1",
            f"trainer.precision={precision}",
        )
        results[precision], objects = evaluate(cfg)
        assert str(objects["trainer"].precision) == precision
    for metric in ("image_auroc", "pixel_auroc"):
        assert results["bf16-mixed"]["mean"][metric] == pytest.approx(results["32-true"]["mean"][metric], abs=0.01)


@pytest.mark.parametrize("method", ["anomalyclip", "aprilgan", "visualad"])
def test_bf16_mixed_training_step(tmp_path, data_root, method):
    cfg = _cfg(
        tmp_path,
        data_root,
        "train",
        f"method={method}",
        "trainer.precision=bf16-mixed",
        "+trainer.max_steps=1",
        "test_after_fit=false",
    )
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    learned = objects["method"].learned_state()
    assert learned and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in learned.values())


def test_method_state_follows_to(tmp_path, data_root):
    """Few-shot memories and window buffers follow ``.to()`` (float64 stands in for a device move)."""
    cfg = _cfg(tmp_path, data_root, "evaluate", "method=winclip", "method.k_shot=1")
    L.seed_everything(0, verbose=False)
    backbone = instantiate(cfg.backbone)
    winclip = instantiate(cfg.method, backbone=backbone).eval()
    aprilgan = AprilGAN(backbone, k_shot=1, feature_layers=[1, 3]).eval()
    refs = torch.randn(1, 3, 64, 64)
    for method in (winclip, aprilgan):  # both prepared before the (shared) backbone is converted
        method.prepare("object", refs)
    winclip.to(torch.float64), aprilgan.to(torch.float64)
    assert all(t.dtype == torch.float64 for level in winclip.memory.values() for t in level.values())
    assert winclip.coverage_2.dtype == torch.float64 and winclip.window_sequence_2.dtype == torch.long
    assert all(t.dtype == torch.float64 for t in aprilgan._memory.values())


def test_trainer_accelerator_defaults_to_auto(tmp_path, data_root):
    cfg = compose("evaluate", [], tmp_path / "run")
    assert cfg.trainer.accelerator == "auto"  # picks the GPU when there is one
