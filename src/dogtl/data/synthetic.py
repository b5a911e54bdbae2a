"""Procedurally drawn, clearly synthetic image sets in the Kaggle layout.

Used by `dogtl demo`, the tests and the benchmarks, so nothing needs a download.
Each class has its own colour scheme and shape, drawn with random position, size and
noise, so a classifier has something real (if easy) to learn.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dogtl.core.files import atomic_path

SHAPES = ("ellipse", "rectangle", "triangle", "stripes", "cross", "ring")


def class_names(num_classes: int) -> list[str]:
    return [f"synthetic_{SHAPES[k % len(SHAPES)]}_{k:02d}" for k in range(num_classes)]


def draw_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    hue = (label * 0.37) % 1.0
    base = np.array([hue, 1 - hue, (hue * 3) % 1.0]) * 200 + 30
    pixels = rng.normal(base, 25, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    fg = tuple(int(255 - c) for c in base)
    r = int(size * rng.uniform(0.2, 0.35))
    cx, cy = (int(size * rng.uniform(0.35, 0.65)) for _ in range(2))
    box = [cx - r, cy - r, cx + r, cy + r]
    shape = SHAPES[label % len(SHAPES)]
    if shape == "ellipse":
        draw.ellipse(box, fill=fg)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "stripes":
        for x in range(0, size, max(4, size // 8)):
            draw.line([(x, 0), (x, size)], fill=fg, width=max(2, size // 24))
    elif shape == "cross":
        draw.line([(cx - r, cy), (cx + r, cy)], fill=fg, width=max(3, r // 3))
        draw.line([(cx, cy - r), (cx, cy + r)], fill=fg, width=max(3, r // 3))
    else:
        draw.ellipse(box, outline=fg, width=max(3, r // 4))
    return image


def make_kaggle_dataset(root: str | Path, num_classes: int = 3, per_class: int = 8, test_images: int = 4,
                        size: int = 96, seed: int = 0, sample_submission: bool = True) -> Path:
    """Write labels.csv, train/<id>.jpg, test/<id>.jpg and sample_submission.csv under root."""
    root = Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = class_names(num_classes)
    rows = []
    for k, name in enumerate(names):
        for j in range(per_class):
            image_id = f"{k:02d}{j:04d}{rng.integers(1 << 30):08x}"
            draw_image(k, size, rng).save(root / "train" / f"{image_id}.jpg", quality=90)
            rows.append((image_id, name))
    _write_csv(root / "labels.csv", [("id", "breed"), *rows])
    if test_images:
        (root / "test").mkdir(exist_ok=True)
        test_ids = []
        for j in range(test_images):
            test_id = f"test{j:05d}"
            draw_image(int(rng.integers(num_classes)), size, rng).save(root / "test" / f"{test_id}.jpg", quality=90)
            test_ids.append(test_id)
        if sample_submission:
            _write_csv(root / "sample_submission.csv",
                       [["id", *names], *([t, *([f"{1 / num_classes:.6f}"] * num_classes)] for t in test_ids)])
    return root


def _write_csv(path: Path, rows) -> None:
    """Atomically, so a killed run never leaves a labels file that looks whole."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(rows)
