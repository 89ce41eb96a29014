"""Deterministic synthetic datasets written in the real MVTec-AD and raw VisA layouts.

The trees are read back by the real readers, so tests and demos exercise the same code paths as the
official data: PNGs with ``_mask.png`` 0/255 masks and a grayscale category (MVTec), non-square JPEGs
with class-id masks and ``split_csv/1cls.csv`` (VisA).
"""

from __future__ import annotations

import csv
import json
import shutil
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vlmad.data.mvtec import MVTec
from vlmad.data.records import Reader, Record
from vlmad.data.visa import VisA
from vlmad.io import atomic_write

MVTEC_CATEGORIES = ["carpet_syn", "grid_syn", "bottle_syn", "nut_syn"]
# Different products from the MVTec-format ones, so fitting on one and testing on the other is a transfer.
VISA_CATEGORIES = ["candle_syn", "pcb_syn", "capsules_syn"]
MARKER = ".vlmad_synthetic.json"
# Saved single-channel, like MVTec's grid, screw and zipper.
GRAYSCALE = {"grid", "screw", "zipper"}
RECIPES = {
    "carpet": "noise",
    "grid": "grid",
    "bottle": "ring",
    "nut": "disc",
    "candle": "discs",
    "pcb": "stripes",
    "capsules": "ellipses",
}
DEFECT_KINDS = ("scratch", "blob", "missing", "crack")
Point = Sequence[float]  # (y, x)
PALETTE = np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.95], [0.95, 0.85, 0.1], [0.05] * 3, [0.97] * 3])


def _base_name(category: str) -> str:
    return category.removesuffix("_syn")


def _recipe(category: str) -> str:
    recipes = sorted(set(RECIPES.values()))
    return RECIPES.get(_base_name(category), recipes[zlib.crc32(category.encode()) % len(recipes)])


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0
) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    return ((dx * c + dy * s) / rx) ** 2 + ((dy * c - dx * s) / ry) ** 2 <= 1.0


def _segment_mask(yy: np.ndarray, xx: np.ndarray, p0: Point, p1: Point, width: float) -> np.ndarray:
    """Pixels within ``width`` of the segment p0-p1 (points as (y, x))."""
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0.0, 1.0)
    return (yy - (y0 + t * dy)) ** 2 + (xx - (x0 + t * dx)) ** 2 <= width**2


def _normal_image(
    recipe: str, style: np.ndarray, h: int, w: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One defect-free image.

    Returns:
        image (H, W, 3) float in [0, 1]; foreground (H, W) bool where defects may be placed.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    m = min(h, w)
    c0, c1, c2 = style[:, None, None, :]  # (1, 1, 3) each
    fg = np.ones((h, w), bool)
    if recipe == "noise":
        low = rng.random((max(h // 6, 2), max(w // 6, 2))).astype(np.float32)
        t = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR))[..., None]
        img = c0 + (c1 - c0) * t
    elif recipe == "grid":
        period, oy, ox = m / 8, *rng.uniform(0, m / 8, 2)
        lines = ((xx + ox) % period < 2) | ((yy + oy) % period < 2)
        img = np.repeat(np.where(lines, 0.25, 0.65)[..., None], 3, axis=2)
    elif recipe == "stripes":
        theta, phase = rng.normal(0.0, 0.05), rng.uniform(0, 2 * np.pi)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / (m / 6) + phase)
        img = c0 + (c1 - c0) * (t > 0.6)[..., None]
    else:
        img = np.broadcast_to(c0, (h, w, 3)).copy()
        cy, cx = h / 2 + rng.normal(0, m * 0.02), w / 2 + rng.normal(0, m * 0.02)
        if recipe in ("disc", "ring"):
            fg = _ellipse(yy, xx, cy, cx, 0.36 * m, 0.36 * m)
            hole = _ellipse(yy, xx, cy, cx, 0.12 * m if recipe == "disc" else 0.22 * m, 0.12 * m)
            img = np.where(fg[..., None], c1, img)
            img = np.where(hole[..., None], c2, img)
        elif recipe == "discs":
            fg = np.zeros((h, w), bool)
            for sy in (-1, 1):
                for sx in (-1, 1):
                    fg |= _ellipse(yy, xx, cy + sy * 0.22 * m, cx + sx * 0.22 * w, 0.17 * m, 0.17 * m)
            img = np.where(fg[..., None], c1, img)
        else:  # "ellipses": a row of capsules
            fg = np.zeros((h, w), bool)
            for i in range(4):
                px = cx + (i - 1.5) * w / 4.6
                fg |= _ellipse(yy, xx, cy, px, 0.3 * m, 0.09 * m, rng.normal(0, 0.08))
            img = np.where(fg[..., None], c1, img)
    return np.asarray(img, np.float32), fg


def _add_defect(img: np.ndarray, fg: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Paint one defect in place; returns the exact set of painted pixels, (H, W) bool."""
    h, w = fg.shape
    m = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inner = fg & (np.abs(yy - h / 2) < 0.4 * h) & (np.abs(xx - w / 2) < 0.4 * w)
    candidates = np.flatnonzero(inner if inner.any() else fg)
    cy, cx = np.unravel_index(candidates[rng.integers(len(candidates))], (h, w))
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.2, 0.3) * m
        dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
        mask = _segment_mask(yy, xx, (cy - dy, cx - dx), (cy + dy, cx + dx), max(1.0, m / 64))
    elif kind == "blob":
        r = rng.uniform(0.05, 0.08, 2) * m
        mask = _ellipse(yy, xx, cy, cx, r[0], r[1], rng.uniform(0, np.pi))
    elif kind == "missing":
        r = rng.uniform(0.08, 0.11) * m
        mask = _ellipse(yy, xx, cy, cx, r, r * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)) & fg
    else:  # crack: a short random walk
        mask = np.zeros((h, w), bool)
        point, heading = np.array([cy, cx], np.float32), rng.uniform(0, 2 * np.pi)
        for _ in range(6):
            heading += rng.normal(0, 0.6)
            nxt = point + 0.05 * m * np.array([np.sin(heading), np.cos(heading)], np.float32)
            mask |= _segment_mask(yy, xx, point, nxt, max(0.8, m / 100))
            point = nxt
    mask[cy, cx] = True
    # The paint colour is one of the 3 palette entries farthest from the local colour: salient but varied.
    distance = np.abs(PALETTE - img[mask].mean(0)).sum(1)
    colour = PALETTE[np.argsort(distance)[-3:][rng.integers(3)]]
    img[mask] = colour
    return mask


def _to_pil(img: np.ndarray, gray: bool) -> Image.Image:
    arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr.mean(2).round().astype(np.uint8)) if gray else Image.fromarray(arr)


def _category_samples(
    category: str, size: int, counts: tuple[int, int, int], seed: int, layout: str
) -> Iterator[tuple[str, str, int, int, Image.Image, np.ndarray | None]]:
    """Yield (split, kind, index, image, mask) for one category; kind "good" for normal images."""
    rng = np.random.default_rng(zlib.crc32(f"{seed}/{category}".encode()))
    h, w = (size, round(1.25 * size)) if layout == "visa" else (size, size)
    style = rng.uniform(0.15, 0.85, (3, 3)).astype(np.float32)
    style[1] = 1.0 - style[0]  # the object / second texture colour contrasts with the background
    recipe, gray = _recipe(category), _base_name(category) in GRAYSCALE
    first = zlib.crc32(category.encode()) % len(DEFECT_KINDS)
    kinds = [DEFECT_KINDS[first], DEFECT_KINDS[(first + 2) % len(DEFECT_KINDS)]]
    n_train, n_good, n_defect = counts
    jobs = [("train", "good")] * n_train + [("test", "good")] * n_good
    jobs += [("test", kinds[i % 2]) for i in range(n_defect)]
    seen: dict[tuple[str, str], int] = {}
    for split, kind in jobs:
        index = seen[split, kind] = seen.get((split, kind), -1) + 1
        img, fg = _normal_image(recipe, style, h, w, rng)
        mask = None if kind == "good" else _add_defect(img, fg, kind, rng)
        img = img + rng.normal(0, 0.015, img.shape).astype(np.float32)
        yield split, kind, kinds.index(kind) + 1 if mask is not None else 0, index, _to_pil(img, gray), mask


def _write_mvtec(root: Path, category: str, size: int, counts: tuple[int, int, int], seed: int) -> None:
    for split, kind, _, i, image, mask in _category_samples(category, size, counts, seed, "mvtec"):
        folder = root / category / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.png")
        if mask is not None:
            gt = root / category / "ground_truth" / kind
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(gt / f"{i:03d}_mask.png")


def _write_visa(root: Path, category: str, size: int, counts: tuple[int, int, int], seed: int) -> list[list[str]]:
    rows, n_normal, n_anomaly = [], 0, 0
    data = root / category / "Data"
    for d in ("Images/Normal", "Images/Anomaly", "Masks/Anomaly"):
        (data / d).mkdir(parents=True, exist_ok=True)
    for split, _, class_id, _, image, mask in _category_samples(category, size, counts, seed, "visa"):
        if mask is None:
            name = f"Images/Normal/{n_normal:04d}.JPG"
            rows.append([category, split, "normal", f"{category}/Data/{name}", ""])
            n_normal += 1
        else:
            name, mask_name = f"Images/Anomaly/{n_anomaly:03d}.JPG", f"Masks/Anomaly/{n_anomaly:03d}.png"
            # VisA masks hold small class ids (1, 2, ...), not 0/255.
            Image.fromarray(mask.astype(np.uint8) * class_id).save(data / mask_name)
            rows.append([category, split, "anomaly", f"{category}/Data/{name}", f"{category}/Data/{mask_name}"])
            n_anomaly += 1
        image.save(data / name, quality=95, subsampling=0)
    with (root / category / "image_anno.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image", "label", "mask"], *[[r[3], r[2], r[4]] for r in rows]])
    return rows


def generate(
    root: str | Path,
    layout: str = "mvtec",
    categories: list[str] | None = None,
    image_size: int = 128,
    n_train: int = 8,
    n_test_good: int = 6,
    n_test_defect: int = 6,
    seed: int = 0,
) -> Path:
    """Write a small synthetic dataset into ``root`` (skipped if the same one is already there).

    Same arguments give byte-identical files. Regenerating with different arguments first deletes the
    category folders listed in the previous marker and those about to be written.

    Args:
        root: output folder.
        layout: "mvtec" (MVTec-AD tree) or "visa" (raw VisA tree + ``split_csv/1cls.csv``).
        categories: category names; default ``MVTEC_CATEGORIES`` / ``VISA_CATEGORIES``.
        image_size: image height (MVTec: square; VisA: width = 1.25 * height).
        n_train: normal training images per category.
        n_test_good: normal test images per category.
        n_test_defect: anomalous test images per category (two defect kinds, alternating).
        seed: generation seed (combined with the category name).

    Returns:
        ``root`` as a Path.
    """
    if layout not in ("mvtec", "visa"):
        raise ValueError(f"unknown synthetic layout {layout!r} (expected 'mvtec' or 'visa')")
    categories = list(categories or (MVTEC_CATEGORIES if layout == "mvtec" else VISA_CATEGORIES))
    args = dict(
        layout=layout,
        categories=categories,
        image_size=image_size,
        n_train=n_train,
        n_test_good=n_test_good,
        n_test_defect=n_test_defect,
        seed=seed,
        version=1,
    )
    root = Path(root)
    marker = root / MARKER
    old = json.loads(marker.read_text()) if marker.is_file() else None
    if old == args:
        return root
    same_settings = old is not None and {**old, "categories": categories} == args
    if same_settings and set(categories) <= set(old["categories"]):
        return root  # a subset of a tree already generated with the same settings (categories are independent)
    marker.unlink(missing_ok=True)
    for category in {*categories, *(old or {}).get("categories", [])}:
        shutil.rmtree(root / category, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    counts = (n_train, n_test_good, n_test_defect)
    if layout == "mvtec":
        for category in categories:
            _write_mvtec(root, category, image_size, counts, seed)
    else:
        rows = [row for c in categories for row in _write_visa(root, c, image_size, counts, seed)]
        (root / "split_csv").mkdir(exist_ok=True)
        with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *rows])
    # The marker goes last and atomically: an interrupted run leaves no marker and is redone.
    atomic_write(marker, json.dumps(args, sort_keys=True))
    return root


class Synthetic(Reader):
    """Generate a synthetic dataset (if not already there), then read it with the MVTec or VisA reader.

    Prompt names default to the category without its ``_syn`` suffix (``carpet_syn`` -> ``carpet``).
    Arguments as in :func:`generate`, plus ``class_names`` (prompt names per category).
    """

    def __init__(
        self,
        root: str | Path,
        layout: str = "mvtec",
        categories: list[str] | None = None,
        class_names: dict[str, str] | None = None,
        image_size: int = 128,
        n_train: int = 8,
        n_test_good: int = 6,
        n_test_defect: int = 6,
        seed: int = 0,
    ) -> None:
        categories = list(categories or (MVTEC_CATEGORIES if layout == "mvtec" else VISA_CATEGORIES))
        generate(root, layout, categories, image_size, n_train, n_test_good, n_test_defect, seed)
        reader_cls = MVTec if layout == "mvtec" else VisA
        self._reader = reader_cls(root, categories)
        self.name = f"synthetic_{layout}"
        self.root = self._reader.root
        self.categories = self._reader.categories
        self.class_names = {c: _base_name(c).replace("_", " ") for c in categories} | dict(class_names or {})
        self.mask_class_ids = self._reader.mask_class_ids

    def records(self, category: str, split: str) -> list[Record]:
        """Index one category's split (delegates to the underlying reader)."""
        return self._reader.records(category, split)
