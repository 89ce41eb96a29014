"""ClipBackbone: frozen, 0-based layer taps equal open_clip's, weights from tags/files/random, clear errors."""

from __future__ import annotations

import hashlib
import logging
import warnings

import open_clip
import pytest
import torch

from vlmad.backbones import ClipBackbone
from vlmad.errors import ConfigError


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):  # random init is loud
        return ClipBackbone("vlmad-tiny", pretrained=None)


def test_frozen_and_always_eval(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not backbone.model.training


def test_layer_taps_are_0_based_block_outputs_as_in_open_clip(backbone):
    images = torch.randn(2, 3, 64, 64)
    layers = [0, 5, backbone.depth - 1]
    feats = backbone.encode_image(images, layers)
    ref = backbone.model.visual.forward_intermediates(
        images, indices=layers, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
    )
    for i, (patch, cls) in zip(
        layers, zip(ref["image_intermediates"], ref["image_intermediates_prefix"], strict=True), strict=True
    ):
        torch.testing.assert_close(feats.intermediates[i], torch.cat([cls, patch], dim=1))
    # layer depth-1 (the last block) is the stream ln_post/proj are applied to
    torch.testing.assert_close(backbone.visual.ln_post(feats.intermediates[backbone.depth - 1]), feats.tokens)
    torch.testing.assert_close(feats.embedding, backbone.model.encode_image(images))
    assert feats.tokens.shape == (2, 1 + backbone.grid_size**2, backbone.width)


def test_layer_index_out_of_range_names_the_convention(backbone):
    with pytest.raises(ValueError, match="0-based"):
        backbone.encode_image(torch.randn(1, 3, 64, 64), [backbone.depth])


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_position_table_resized_once_at_construction(mode):
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        small = ClipBackbone("vlmad-tiny", None)
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        big = ClipBackbone("vlmad-tiny", None, image_size=128, pos_embed_interpolation=mode)
    assert big.grid_size == 8 and big.visual.positional_embedding.shape == (65, big.width)
    torch.testing.assert_close(big.visual.positional_embedding[0], small.visual.positional_embedding[0])  # CLS kept
    before = big.visual.positional_embedding.clone()
    big.encode_image(torch.randn(1, 3, 128, 128))
    assert torch.equal(before, big.visual.positional_embedding)  # never rewritten in forward


def test_local_checkpoint_file_loads_strictly(tmp_path, backbone):
    path = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), path)
    loaded = ClipBackbone("vlmad-tiny", pretrained=str(path))
    for (name, a), b in zip(backbone.model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.signature() != ClipBackbone("vlmad-tiny", pretrained=str(path), image_size=128).signature()


def test_unreachable_weights_say_how_to_use_a_local_file(monkeypatch):
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: ["a_hub_tag"])

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")  # what a download without network raises

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"network.*backbone\.pretrained=/path/to/"):
        ClipBackbone("vlmad-tiny", pretrained="a_hub_tag")  # create_model is patched: nothing downloads
    with pytest.raises(ValueError, match="neither an existing checkpoint file nor an open_clip tag"):
        ClipBackbone("vlmad-tiny", pretrained="no_such_tag")


def _torchscript_archive(state: dict[str, torch.Tensor], path) -> None:
    """Save ``state`` as a TorchScript archive laid out like OpenAI's ``*.pt`` files (fp16 weights, int metadata)."""

    class Node(torch.nn.Module):
        pass

    root = Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, Node())
            node = getattr(node, name)
        node.register_parameter(leaf, torch.nn.Parameter(value.half(), requires_grad=False))
    for key, value in {"input_resolution": 64, "context_length": 77, "vocab_size": 49408}.items():
        root.register_buffer(key, torch.tensor(value))  # OpenAI's archives carry these next to the weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch >= 2.9
        torch.jit.script(root).save(str(path))


def test_openai_torchscript_archive_loads_every_weight(tmp_path, backbone, caplog):
    path = tmp_path / "ViT-tiny-openai.pt"
    _torchscript_archive(backbone.model.state_dict(), path)
    caplog.set_level(logging.INFO)
    loaded = ClipBackbone("vlmad-tiny", pretrained=str(path))
    expected = backbone.model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():  # the archive holds fp16 values, loaded into the fp32 model
        assert torch.equal(got[name], value.half().float()), name
    assert loaded.signature() != backbone.signature()


def test_local_file_logs_what_was_loaded_not_random_init(tmp_path, backbone, caplog):
    path = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), path)
    caplog.set_level(logging.INFO)
    loaded = ClipBackbone("vlmad-tiny", pretrained=str(path))
    messages = [r.getMessage() for r in caplog.records]
    assert not any("initialized randomly" in m for m in messages), messages
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    n = len(backbone.model.state_dict())
    assert f"loaded weights from {path} (sha256 {sha[:12]}, {n} tensors)" in messages
    assert loaded.weights_sha256 == sha


def test_unreadable_weights_file_names_the_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=rf"{path} is not a weights file") as err:
        ClipBackbone("vlmad-tiny", pretrained=str(path))
    assert "weights_only" not in str(err.value)  # no torch advice to unpickle an untrusted file


def _seeded(**kwargs) -> ClipBackbone:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights
        return ClipBackbone("vlmad-tiny", None, **kwargs)


@pytest.mark.parametrize(
    "changed",
    [{"force_quick_gelu": True}, {"image_size": 128, "pos_embed_interpolation": "bilinear"}],
    ids=["force_quick_gelu", "pos_embed_interpolation"],
)
def test_signature_changes_with_every_setting_that_changes_features(changed, tmp_path, backbone):
    path = str(tmp_path / "tiny.pt")  # file weights: the signature cannot lean on a fingerprint of the values
    torch.save(backbone.model.state_dict(), path)
    base = {"image_size": 128} if "image_size" in changed else {}
    a, b = ClipBackbone("vlmad-tiny", path, **base), ClipBackbone("vlmad-tiny", path, **changed)
    images = torch.randn(1, 3, a.image_size, a.image_size)
    assert not torch.allclose(a.encode_image(images).tokens, b.encode_image(images).tokens)  # features differ ...
    assert a.signature() != b.signature()  # ... so a feature cache must not mix them
    assert ClipBackbone("vlmad-tiny", path, **base).signature() == a.signature()  # and an identical build hits


def test_signature_follows_file_content_not_location(tmp_path, backbone):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(backbone.model.state_dict(), first)
    second.write_bytes(first.read_bytes())
    assert ClipBackbone("vlmad-tiny", str(first)).signature() == ClipBackbone("vlmad-tiny", str(second)).signature()
    other = {k: v + 1 if k == "visual.proj" else v for k, v in backbone.model.state_dict().items()}
    torch.save(other, second)
    assert ClipBackbone("vlmad-tiny", str(first)).signature() != ClipBackbone("vlmad-tiny", str(second)).signature()
    # where a tag's download is cached changes nothing
    assert _seeded(cache_dir=str(tmp_path)).signature() == _seeded().signature()
