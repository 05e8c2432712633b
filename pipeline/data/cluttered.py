"""Cluttered digits: a CUB stand-in in the spirit of cluttered MNIST (Jaderberg et al. 2015).

Each 8×8 digit is placed at a random position on a larger dark canvas strewn with fragments of other digits
(from the same split, so no test stroke reaches training). The segmentation marks the digit's own strokes
only, as a CUB segmentation marks the bird and not the background: an object on a cluttered background, so
SIP-H (human masks) and SIP-S (synthetic masks) can be compared as on CUB. Written as a CUB-200-2011 tree by
the one tree writer, with the same train/test split as the embedded digits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data import DATASETS, DatasetSpec
from pipeline.data.digits import (DIGIT_CLASSES, STROKE_LEVEL, TEST_FRACTION, embedded_loader, load_sklearn_digits,
                                  write_cub_tree)

DEFAULT_ROOT = "data/prepared/cluttered_digits_cub"
CANVAS = 16  # pixels per side; the digit keeps its 8×8 size (a quarter of the canvas)
FRAGMENTS = 4  # clutter pieces per image
# pixels per side of each piece: cluttered MNIST's 8×8 pieces of 28×28 digits, 8/28 of a side, rounded up
FRAGMENT_SIZE = 3


def clutter_digits(images: np.ndarray, groups: np.ndarray, *, canvas: int = CANVAS, fragments: int = FRAGMENTS,
                   fragment_size: int = FRAGMENT_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Canvases (N×canvas×canvas uint8) and segmentations (0/255, the digit's strokes only).

    images: N×8×8 in 0..16. Fragments of image i come from other images of the same group (split).
    Pieces and digit are combined by maximum, so clutter never erases a stroke.
    """
    n, h, w = images.shape
    if canvas < max(h, w) or fragment_size > min(h, w):
        raise ValueError("the canvas must hold a digit and a fragment must fit in a digit")
    rng = np.random.default_rng(seed)
    pix = np.round(images * (255.0 / 16.0)).astype(np.uint8)
    out = np.zeros((n, canvas, canvas), dtype=np.uint8)
    seg = np.zeros((n, canvas, canvas), dtype=np.uint8)
    members = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    for i in range(n):
        pool = members[groups[i]]
        for _ in range(fragments):
            j = i
            while j == i:
                j = int(pool[rng.integers(len(pool))])
            sy, sx = rng.integers(0, h - fragment_size + 1), rng.integers(0, w - fragment_size + 1)
            ty, tx = rng.integers(0, canvas - fragment_size + 1, size=2)
            piece = pix[j, sy:sy + fragment_size, sx:sx + fragment_size]
            region = out[i, ty:ty + fragment_size, tx:tx + fragment_size]
            np.maximum(region, piece, out=region)
        ty, tx = rng.integers(0, canvas - h + 1), rng.integers(0, canvas - w + 1)
        region = out[i, ty:ty + h, tx:tx + w]
        np.maximum(region, pix[i], out=region)
        seg[i, ty:ty + h, tx:tx + w] = np.where(images[i] >= STROKE_LEVEL, 255, 0)
    return out, seg


def write_cluttered_digits_cub(out: str | Path, *, test_fraction: float = TEST_FRACTION, seed: int = 0) -> dict:
    """Write the cluttered digits as a CUB-200-2011 tree under `out`; returns a small summary."""
    images, labels, is_test = load_sklearn_digits(test_fraction, seed)
    canvases, seg = clutter_digits(images, is_test.astype(np.int64), seed=seed)
    names = [f"cluttered_{lab}_{i + 1:04d}" for i, lab in enumerate(labels)]
    write_cub_tree(out, canvases, labels, ~is_test, DIGIT_CLASSES, segmentations=seg, names=names)
    return {"images": int(len(labels)), "train": int((~is_test).sum()), "test": int(is_test.sum()),
            "classes": 10, "canvas": CANVAS, "fragments": FRAGMENTS, "fragment_size": FRAGMENT_SIZE,
            "salient_fraction": round(float((seg > 0).mean()), 4),
            "source": "sklearn.datasets.load_digits, cluttered"}


DATASETS.register("cluttered_digits")(DatasetSpec(
    embedded_loader("cluttered_digits", DEFAULT_ROOT),
    "embedded CUB stand-in: digits on a canvas cluttered with fragments of other digits",
    default_root=DEFAULT_ROOT, embedded_writer=write_cluttered_digits_cub))
