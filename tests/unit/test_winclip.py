"""WinCLIP / WinCLIP+ on the tiny random-weights CLIP (64 px, 4×4 grid)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmad.backbones import ClipBackbone
from vlmad.bench.winclip import format_rows, run
from vlmad.methods.prompts import TextFeatureCache
from vlmad.methods.winclip import WinCLIP, window_layout

TEXT = TextFeatureCache()  # shared across tests: text does not depend on the options under test


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model is overhead-bound; one thread avoids oversubscription on the shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(backbone, **kwargs) -> WinCLIP:
    method = WinCLIP(backbone, **kwargs)
    method.text_cache = TEXT
    return method


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        return ClipBackbone("vlmad-tiny", None)


@pytest.fixture(scope="module")
def images(backbone):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, backbone.image_size, backbone.image_size, generator=g)


@pytest.fixture(scope="module")
def refs(backbone):
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=g)


def _windows(method, images, scale):
    with torch.no_grad():
        return method.window_embeddings(method.backbone.embed(images), scale)


def test_window_layout_and_coverage():
    indices, coverage = window_layout(4, 2, 1)
    assert indices[:2].tolist() == [[0, 1, 4, 5], [1, 2, 5, 6]]
    assert coverage.sum(1).view(4, 4).tolist() == [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]]
    assert window_layout(15, 3, 1)[0].shape == (169, 9)


def test_window_embeddings_differ_and_match_per_window_loop(backbone, images):
    method = make(backbone)
    for k in method.scales:
        emb = _windows(method, images, k)  # (B, n_win, D)
        assert (emb - emb.mean(1, keepdim=True)).abs().amax() > 1e-3
        tokens = backbone.embed(images)
        seqs = getattr(method, f"window_sequence_{k}")
        with torch.no_grad():
            loop = torch.stack(
                [
                    torch.stack([backbone.project(backbone.blocks(tokens[b : b + 1, s])[0][0, 0]) for s in seqs])
                    for b in range(len(images))
                ]
            )
        torch.testing.assert_close(emb, loop, rtol=1e-5, atol=1e-5)
        # chunking the window batch must not change anything
        method.window_chunk = 3
        torch.testing.assert_close(_windows(method, images, k), emb, rtol=1e-5, atol=1e-5)
        method.window_chunk = 4096


def test_sequence_first_permute_would_collapse_windows(backbone, images, monkeypatch):
    # anomalib's NLD -> LND permute on open_clip 3.x: attention across windows, every window identical.
    def seq_first_blocks(tokens, layers=()):
        x = backbone.visual.ln_pre(tokens).transpose(0, 1)
        for block in backbone.visual.transformer.resblocks:
            x = block(x)
        return x.transpose(0, 1), {}

    method = make(backbone)
    monkeypatch.setattr(backbone, "blocks", seq_first_blocks)
    emb = _windows(method, images, 2)
    assert (emb - emb[:1, :1]).abs().amax() < 1e-5


def test_prediction_shapes_range_and_batch_invariance(backbone, images, refs):
    for k_shot in (0, 2):
        method = make(backbone, k_shot=k_shot)
        method.prepare("bottle", refs[:k_shot] if k_shot else None)
        out = method(images, ["bottle"] * 4)
        s = backbone.image_size
        assert out.pred_score.shape == (4,) and out.anomaly_map.shape == (4, s, s)
        for t in (out.pred_score, out.anomaly_map):
            assert t.min() >= 0 and t.max() <= 1
        singles = [method(images[i : i + 1], ["bottle"]) for i in range(4)]
        torch.testing.assert_close(torch.cat([o.pred_score for o in singles]), out.pred_score, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.cat([o.anomaly_map for o in singles]), out.anomaly_map, rtol=0, atol=1e-6)


def test_mixed_classes_and_memory(backbone, images, refs):
    method = make(backbone, k_shot=2)
    method.prepare("bottle", refs)
    method.prepare("screw", refs.flip(-1))
    mem = method.memory["bottle"]
    grid, width, dim = backbone.grid_size, backbone.width, backbone.embed_dim
    assert mem["patch"].shape == (2 * grid**2, width)
    assert mem[2].shape == (2 * (grid - 1) ** 2, dim) and mem[3].shape == (2 * (grid - 2) ** 2, dim)
    mixed = method(images, ["bottle", "screw", "screw", "bottle"])
    screw = method(images, ["screw"] * 4)
    bottle = method(images, ["bottle"] * 4)
    torch.testing.assert_close(mixed.anomaly_map[1:3], screw.anomaly_map[1:3])
    torch.testing.assert_close(mixed.pred_score[[0, 3]], bottle.pred_score[[0, 3]])
    assert not torch.allclose(screw.anomaly_map, bottle.anomaly_map)


def test_text_encoded_once_per_class_name(backbone, refs, monkeypatch):
    calls = []
    encode = backbone.encode_text
    monkeypatch.setattr(backbone, "encode_text", lambda tokens: calls.append(len(tokens)) or encode(tokens))
    method = WinCLIP(backbone, k_shot=1)
    method.prepare("cable", refs[:1])
    assert calls == [147, 84]  # one batch per class prompt list
    method.prepare("cable", refs[1:])
    method(refs, ["cable", "cable"])
    assert calls == [147, 84]
    method.prepare("zipper", refs[1:])
    assert len(calls) == 4


def test_harmonic_aggregate_matches_loop_and_zero_scores(backbone):
    method = make(backbone)
    scores = torch.rand(2, 9, generator=torch.Generator().manual_seed(0)) + 0.01
    indices = method.window_indices_2
    loop = torch.stack(
        [
            torch.stack([(indices == p).any(1).sum() / (1 / scores[b, (indices == p).any(1)]).sum() for p in range(16)])
            for b in range(2)
        ]
    ).view(2, 4, 4)
    torch.testing.assert_close(method.harmonic_aggregate(scores, 2), loop)
    scores[0, 0] = 0.0  # top-left window covers patches 0, 1, 4, 5
    agg = method.harmonic_aggregate(scores, 2)
    assert torch.isfinite(agg).all()
    assert agg[0].flatten()[[0, 1, 4, 5]].eq(0).all() and agg[0].flatten()[[2, 3, 6]].gt(0).all()


@pytest.mark.parametrize(
    "option",
    [
        {"temperature": 0.01},
        {"harmonic_on": "normality"},
        {"image_score": "map_max"},
        {"smoothing_sigma": 2.0},
        {"prompts": "winclip_22"},
        {"normalize_prompts": True},
        {"fusion": "harmonic"},
        {"few_shot_levels": ["patch"]},
    ],
)
def test_options_change_outputs(backbone, images, refs, option):
    base = make(backbone, k_shot=1)
    other = make(backbone, k_shot=1, **option)
    outs = []
    for method in (base, other):
        method.prepare("pill", refs[:1])
        outs.append(method(images, ["pill"] * 4))
    assert outs[1].anomaly_map.min() >= 0 and outs[1].anomaly_map.max() <= 1
    changed = not torch.allclose(outs[0].anomaly_map, outs[1].anomaly_map, atol=1e-6)
    changed |= not torch.allclose(outs[0].pred_score, outs[1].pred_score, atol=1e-6)
    assert changed


def test_smoothing_matches_scipy(backbone, images):
    ndimage = pytest.importorskip("scipy.ndimage")
    raw, smooth = make(backbone), make(backbone, smoothing_sigma=3.0)
    a, b = raw(images[:1], ["x"]).anomaly_map, smooth(images[:1], ["x"]).anomaly_map
    ref = torch.from_numpy(ndimage.gaussian_filter(a[0].double().numpy(), 3.0, mode="reflect"))
    torch.testing.assert_close(b[0].double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_score": "max"},
        {"harmonic_on": "both"},
        {"fusion": "sum"},
        {"scales": (5,)},
        {"scales": (2, 2)},
        {"few_shot_levels": ("patch", 4)},
        {"temperature": 0.0},
        {"window_stride": 0},
        {"window_stride": 2},
        {"k_shot": -1},
    ],
)
def test_invalid_options_raise(backbone, kwargs):
    with pytest.raises(ValueError, match="WinCLIP"):
        WinCLIP(backbone, **kwargs)


def test_few_shot_without_references_raises(backbone, images, refs):
    method = make(backbone, k_shot=2)
    with pytest.raises(ValueError, match="reference"):
        method.prepare("bottle")
    with pytest.raises(ValueError, match="reference"):
        method.prepare("bottle", refs[:1])
    with pytest.raises(ValueError, match="prepare"):
        method(images, ["bottle"] * 4)


def test_bench_smoke():
    rows = run(batch_sizes=(2,), n_images=2, backbone_name="vlmad-tiny")
    assert {r["measure"] for r in rows} >= {"encode_image", "zero_shot", "one_shot", "prepare_text", "prepare_refs"}
    assert all(r["seconds"] > 0 for r in rows)
    assert next(r for r in rows if r["measure"] == "prepare_refs")["text_calls"] == 0
    assert "zero_shot" in format_rows(rows)


def test_cosine_helper_agrees(backbone):
    method = make(backbone)
    q, m = torch.randn(2, 3, 8), torch.randn(5, 8)
    ref = ((1 - F.normalize(q, dim=-1) @ F.normalize(m, dim=-1).T) / 2).amin(-1)
    torch.testing.assert_close(method.association_scores(q, m), ref)
