"""Frozen CLIP backbones (open_clip, unforked)."""

from vlmad.backbones.clip import ClipBackbone, ImageFeatures, register_model_config

__all__ = ["ClipBackbone", "ImageFeatures", "register_model_config"]
