"""Frozen backbones: CLIP (open_clip, unforked) and DINOv2 (timm)."""

from vlmad.backbones.clip import ClipBackbone, ImageFeatures, register_model_config
from vlmad.backbones.dino import DinoBackbone, DinoFeatures

__all__ = ["ClipBackbone", "DinoBackbone", "DinoFeatures", "ImageFeatures", "register_model_config"]
