"""ClipBackbone: frozen, 0-based layer taps equal open_clip's, weights from tags/files/random, clear errors."""

from __future__ import annotations

import open_clip
import pytest
import torch

from vlmad.backbones import ClipBackbone


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
    for i, (patch, cls) in zip(layers, zip(ref["image_intermediates"], ref["image_intermediates_prefix"], strict=True),
                               strict=True):  # fmt: skip
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
