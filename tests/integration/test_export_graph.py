"""Export traces each method's own eval path: ``export_graph(m, c)`` is ``m.for_class(c)``, no per-method copy.

A 2-block random-weights tiny CLIP keeps tracing and ONNX export to about a second per method.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import vlmad.deploy.export as export_module
from vlmad.backbones import ClipBackbone, DinoBackbone
from vlmad.deploy.export import ExportError, export_graph, export_onnx
from vlmad.methods.anomalyclip import AnomalyCLIP
from vlmad.methods.anomalydino import AnomalyDINO
from vlmad.methods.aprilgan import AprilGAN
from vlmad.methods.base import AnomalyMethod, ClassView, Prediction
from vlmad.methods.ops import min_cosine_distance
from vlmad.methods.subspacead import SubspaceAD
from vlmad.methods.visualad import VisualAD
from vlmad.methods.winclip import WinCLIP

TINY2 = "vlmad-tiny-d2"
# two sentences per class instead of the shipped ensembles (hundreds): the text encoder is not what is tested
PROMPTS = {"normal_states": ["flawless {}"], "anomalous_states": ["damaged {}"], "templates": ["a photo of a {}."]}
METHODS = {
    "winclip": lambda bb: WinCLIP(bb, prompts=PROMPTS),
    # 4 windows per transformer call: several chunks per scale, still one graph for every batch size
    "winclip_k1": lambda bb: WinCLIP(bb, k_shot=1, prompts=PROMPTS, window_chunk=4, smoothing_sigma=1.5),
    "anomalyclip": lambda bb: AnomalyCLIP(bb, feature_layers=[0, 1], dpam_start=1, deep_prompt_depth=2),
    "aprilgan": lambda bb: AprilGAN(bb, feature_layers=[0, 1], prompts=PROMPTS),
    "aprilgan_k2": lambda bb: AprilGAN(bb, k_shot=2, feature_layers=[0, 1], prompts=PROMPTS, image_fusion="fixed"),
    "visualad": lambda bb: VisualAD(bb, feature_layers=[0, 1]),  # class-agnostic: no constants, tokens are weights
}
# on a 2-block tiny DINOv2 at 56 px (4x4 patches); banks chunked (several chunks, one graph for every batch size)
DINO_METHODS = {
    "anomalydino": lambda bb: AnomalyDINO(bb, distance_chunk=50),
    "anomalydino_masked": lambda bb: AnomalyDINO(bb, k_shot=2, masking="all", mask_threshold=0.5, distance_chunk=50),
    "subspacead": lambda bb: SubspaceAD(bb, aug_count=2, feature_layers=[-1, -2]),
}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> ClipBackbone:
    """The shipped tiny CLIP cut to 2 vision blocks, random weights (seeded)."""
    shipped = Path(__file__).parents[2] / "vlmad" / "backbones" / "model_configs" / "vlmad-tiny.json"
    config = json.loads(shipped.read_text())
    config["vision_cfg"]["layers"] = 2
    path = tmp_path_factory.mktemp("tiny2") / f"{TINY2}.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    return ClipBackbone(TINY2, pretrained=None, image_size=64, model_config=str(path))


@pytest.fixture(scope="module")
def dino_backbone(tmp_path_factory) -> DinoBackbone:
    """The shipped tiny DINOv2 cut to 2 blocks, random weights (seeded), 56 px."""
    shipped = Path(__file__).parents[2] / "vlmad" / "backbones" / "dino_configs" / "vlmad-tiny-dinov2.json"
    config = json.loads(shipped.read_text())
    config["kwargs"]["depth"] = 2
    path = tmp_path_factory.mktemp("tiny_dino2") / "vlmad-tiny-dinov2-d2.json"
    path.write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return DinoBackbone(path.stem, model_config=str(path), image_size=56)


def _images(n: int, seed: int, size: int = 64) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_export_module_holds_no_graph_of_its_own():
    own = [v for v in vars(export_module).values() if isinstance(v, type) and v.__module__ == export_module.__name__]
    assert not [c.__name__ for c in own if issubclass(c, nn.Module)]  # no WinCLIPGraph & co.


def _prepared(name: str, backbone: ClipBackbone | DinoBackbone) -> AnomalyMethod:
    torch.manual_seed(1)
    method = {**METHODS, **DINO_METHODS}[name](backbone)
    n = method.k_shot
    draw = method.reference_draw("bottle")
    if draw is not None and draw.views is not None:  # as many images as the method's views of k references
        n = len(draw.views([np.zeros((8, 8, 3), np.uint8)] * method.k_shot, torch.Generator()))
    method.prepare("bottle", _images(n, 2, backbone.image_size) if method.k_shot else None)
    return method


@pytest.mark.parametrize("name", [*METHODS, *DINO_METHODS])
def test_export_graph_is_the_methods_own_class_view(request, name):
    backbone = request.getfixturevalue("dino_backbone" if name in DINO_METHODS else "backbone")
    method = _prepared(name, backbone)
    graph = export_graph(method, "bottle")
    assert type(graph) is ClassView and graph.method is method and not graph.training
    assert set(dict(graph.named_buffers(recurse=False))) == set(method.class_constants("bottle"))
    images = _images(3, 3, backbone.image_size)
    with torch.no_grad():
        ref = method(images, ["bottle"] * 3)
        scores, maps = graph(images)
    torch.testing.assert_close(scores, ref.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(maps, ref.anomaly_map, rtol=0, atol=0)
    assert float(maps.std()) > 1e-4


def test_chunked_windows_trace_with_a_dynamic_batch(backbone):
    """WinCLIP's window chunks (3 per scale here) are counted over windows: a trace at batch 2 serves 1 and 3."""
    graph = export_graph(_prepared("winclip_k1", backbone), "bottle")
    images = _images(3, 3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on constants (buffer sizes, the image size)
        traced = torch.jit.trace(graph, images[:2], check_trace=False)  # what the ONNX exporter runs
        for b in (1, 3):
            for got, want in zip(traced(images[:b]), graph(images[:b]), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


class PatchPrototype(AnomalyMethod):
    """A toy method written only against the contract: ``class_constants`` and ``score``, no export code."""

    def __init__(self, backbone: ClipBackbone, k_shot: int = 1) -> None:
        super().__init__(backbone, k_shot)
        self.memory: dict[str, Tensor] = {}

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """``patches``: (B, P, W) final ``ln_post`` tokens."""
        return {"patches": self.backbone.encode_image(images).tokens[:, 1:]}

    def prepare(self, class_name: str, reference_images: Tensor | None = None) -> None:
        self.memory[class_name] = self.encode_images(reference_images)["patches"].flatten(0, 1)  # (K·P, W)

    def class_constants(self, class_name: str) -> dict[str, Tensor]:
        return {"memory": self.memory[class_name]}

    def score(self, images: Tensor, constants: dict[str, Tensor]) -> Prediction:
        patches = self.encode_images(images)["patches"]  # (B, P, W)
        g = self.backbone.grid_size
        # chunk=5 memory rows: the chunk loop runs over the memory, never over the batch
        dist = min_cosine_distance(patches.flatten(0, 1), constants["memory"], chunk=5).view(-1, 1, g, g)
        maps = torch.nn.functional.interpolate(dist, size=images.shape[-2:], mode="bilinear")[:, 0] / 2
        return Prediction(pred_score=maps.flatten(1).amax(1), anomaly_map=maps)


class ForwardOnly(AnomalyMethod):
    """A per-image method without ``score``: nothing to export."""

    def forward(self, images: Tensor, class_names: list[str]) -> Prediction:
        return Prediction(images.mean((1, 2, 3)), images.mean(1))


def test_a_new_method_exports_through_onnxruntime_without_export_code(backbone, tmp_path):
    import onnxruntime as ort

    method = PatchPrototype(backbone)
    method.prepare("widget", _images(1, 4))
    path = tmp_path / "model.onnx"
    export_onnx(export_graph(method, "widget"), path, 64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = _images(3, 5)
    with torch.no_grad():
        ref = method(images, ["widget"] * 3)
    for b in (1, 3):
        scores, maps = session.run(None, {"images": images[:b].numpy()})
        assert scores.shape == (b,) and maps.shape == (b, 64, 64)
        np.testing.assert_allclose(scores, ref.pred_score[:b].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(maps, ref.anomaly_map[:b].numpy(), rtol=0, atol=1e-5)
    assert float(ref.anomaly_map.std()) > 1e-4
    with pytest.raises(ExportError, match="ForwardOnly has no per-class score"):
        export_graph(ForwardOnly(backbone), "widget")


@pytest.mark.parametrize("name", ["anomalydino_masked", "subspacead"])
def test_dinov2_methods_export_through_onnxruntime(dino_backbone, tmp_path, name):
    """The kNN over a chunked bank with the PCA foreground mask, and the PCA residual, trace with a dynamic batch."""
    import onnxruntime as ort

    method = _prepared(name, dino_backbone)
    path = tmp_path / "model.onnx"
    export_onnx(export_graph(method, "bottle"), path, 56)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = _images(3, 5, 56)
    with torch.no_grad():
        ref = method(images, ["bottle"] * 3)
    for b in (1, 3):
        scores, maps = session.run(None, {"images": images[:b].numpy()})
        np.testing.assert_allclose(scores, ref.pred_score[:b].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(maps, ref.anomaly_map[:b].numpy(), rtol=0, atol=1e-5)
    assert float(ref.anomaly_map.std()) > 1e-4


def test_min_cosine_distance_chunks_over_memory_without_changing_values():
    gen = torch.Generator().manual_seed(0)
    queries, memory = torch.randn(37, 8, generator=gen), torch.randn(23, 8, generator=gen)
    full = 1 - (torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(memory, dim=-1).T)
    for chunk in (1, 5, 23, 8192):
        torch.testing.assert_close(min_cosine_distance(queries, memory, chunk=chunk), full.amin(1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="empty memory"):
        min_cosine_distance(queries, memory[:0])
