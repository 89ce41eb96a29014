"""Image/mask preprocessing faithful to the reference implementations (PIL resizing, CLIP normalisation)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlmad.data.imageio import open_rgb, to_rgb

__all__ = ["MASK_RESIZE", "RESIZE_MODES", "Preprocess", "open_rgb", "to_rgb"]

MASK_RESIZE = {"bilinear_threshold": Image.BILINEAR, "nearest": Image.NEAREST}
RESIZE_MODES = ("squash", "shorter_side_crop")
IMAGE_RESIZE = ("pil", "torchvision")


class Preprocess:
    """Resize and normalise an image and its mask with the same geometry.

    ``squash`` resizes straight to S x S with PIL bicubic, which is what open_clip's eval transform (for
    a square crop), AnomalyCLIP and APRIL-GAN do; ``shorter_side_crop`` resizes the shorter side to S
    and centre-crops. Masks: ``bilinear_threshold`` resizes the 0/255 mask bilinearly and keeps > 0.5
    (AnomalyCLIP / APRIL-GAN); ``nearest`` uses PIL nearest (anomalib's torchvision-v2 mask transform).

    Args:
        image_size: output side S.
        mean: per-channel normalisation mean (RGB, in [0, 1] units).
        std: per-channel normalisation std.
        mask_resize: "bilinear_threshold" or "nearest".
        resize_mode: "squash" or "shorter_side_crop".
        augment: optional albumentations transform applied jointly to image and mask before resizing
            (off by default: the published protocols use no augmentation).
        image_resize: ``pil`` (PIL bicubic of the 8-bit image, rounded to 8 bits: open_clip, the CLIP methods'
            references, AnomalyDINO) or ``torchvision`` (torchvision bicubic with antialias on the uint8 tensor,
            rounded to 8 bits: transformers 5's DINOv2 image processor, i.e. SubspaceAD).
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        mask_resize: str = "bilinear_threshold",
        resize_mode: str = "squash",
        augment: Any = None,
        image_resize: str = "pil",
    ) -> None:
        if image_resize not in IMAGE_RESIZE:
            raise ValueError(f"unknown image_resize {image_resize!r} (expected one of {list(IMAGE_RESIZE)})")
        if mask_resize not in MASK_RESIZE:
            raise ValueError(f"unknown mask_resize {mask_resize!r} (expected one of {list(MASK_RESIZE)})")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {resize_mode!r} (expected one of {list(RESIZE_MODES)})")
        if image_size <= 0 or len(mean) != 3 or len(std) != 3:
            raise ValueError(f"bad Preprocess arguments: image_size={image_size}, mean={mean}, std={std}")
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.mask_resize = mask_resize
        self.resize_mode = resize_mode
        self.augment = augment
        self.image_resize = image_resize

    def __call__(self, image: Image.Image, mask: np.ndarray | None) -> tuple[Tensor, Tensor]:
        """Preprocess one sample.

        Args:
            image: PIL image, any size and mode (converted to 8-bit RGB by ``to_rgb``).
            mask: (H, W) bool or 0/1 uint8, or None for an all-zero mask.

        Returns:
            image (3, S, S) float32 normalised; mask (S, S) float32 in {0, 1}.
        """
        image = to_rgb(image)  # 16-bit, float, alpha, palette, CMYK: see vlmad.data.imageio
        mask_u8 = np.zeros((image.height, image.width), np.uint8) if mask is None else (mask != 0).astype(np.uint8)
        if mask_u8.shape != (image.height, image.width):
            raise ValueError(f"mask shape {mask_u8.shape} != image size {(image.height, image.width)}")
        if self.augment is not None:
            out = self.augment(image=np.asarray(image), mask=mask_u8)
            image, mask_u8 = Image.fromarray(out["image"]), (np.asarray(out["mask"]) != 0).astype(np.uint8)
        s = self.image_size
        if self.resize_mode == "squash":
            size, box = (s, s), None
        else:
            scale = s / min(image.width, image.height)
            size = (max(s, round(image.width * scale)), max(s, round(image.height * scale)))
            # Same rounding as torchvision's CenterCrop.
            left, top = round((size[0] - s) / 2.0), round((size[1] - s) / 2.0)
            box = (left, top, left + s, top + s)
        mask_img = Image.fromarray(mask_u8 * 255).resize(size, MASK_RESIZE[self.mask_resize])
        if self.image_resize == "pil":
            image = image.resize(size, Image.BICUBIC)
            if box is not None:
                image = image.crop(box)
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        else:
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms.v2.functional import resize

            u8 = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
            u8 = resize(u8, [size[1], size[0]], interpolation=InterpolationMode.BICUBIC, antialias=True)
            if box is not None:
                u8 = u8[:, box[1] : box[3], box[0] : box[2]]
            pixels = u8.float() / 255.0
        if box is not None:
            mask_img = mask_img.crop(box)
        mask_t = torch.from_numpy(np.asarray(mask_img, dtype=np.float32) / 255.0 > 0.5).float()  # (S, S)
        return (pixels - self.mean) / self.std, mask_t
