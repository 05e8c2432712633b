"""The embedded default: scikit-learn's bundled handwritten digits, written in the CUB-200-2011 layout.

Images are the 8×8 digits as PNGs; `segmentations/` holds the stroke pixels as 0/255 PNGs, standing in for
human annotations. Everything downstream reads the tree with the ordinary CUB loader. `write_cub_tree` is the
one writer of that layout (the cluttered digits and the test fixtures use it too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from pipeline.data import DATASETS, DatasetSpec, ImageDataset
from pipeline.data.cub import CUBDataset

DEFAULT_ROOT = "data/prepared/digits_cub"
TEST_FRACTION = 0.2  # 1,797 images -> 1,438 train / 359 test
STROKE_LEVEL = 4  # of 16: pixels at or above it are "stroke" (the human-mask stand-in)


def write_cub_tree(out: str | Path, images: Sequence[np.ndarray], labels: Sequence[int], is_train: Sequence[bool],
                   class_dirs: Sequence[str], *, segmentations: Optional[Sequence[np.ndarray]] = None,
                   names: Optional[Sequence[str]] = None, image_ext: str = ".png", jpeg_quality: int = 95) -> Path:
    """Write a CUB-200-2011 tree: `images/<class>/<name><ext>`, the four index files and, when given,
    `segmentations/<class>/<name>.png`.

    images: uint8 arrays, H×W (written as grayscale) or H×W×3 (RGB). labels: 0-based class of each image.
    names: file stems (default `img_<id>`). Image ids are 1-based in the order given, as in the release.
    """
    out = Path(out)
    n = len(images)
    if not (len(labels) == len(is_train) == n) or (segmentations is not None and len(segmentations) != n):
        raise ValueError("images, labels, is_train and segmentations must have the same length")
    lines_img, lines_lab, lines_split = [], [], []
    for i in range(n):
        lab = int(labels[i])
        stem = names[i] if names is not None else f"img_{i + 1:05d}"
        rel = f"{class_dirs[lab]}/{stem}{image_ext}"
        (out / "images" / class_dirs[lab]).mkdir(parents=True, exist_ok=True)
        img = np.asarray(images[i], dtype=np.uint8)
        pil = Image.fromarray(img, mode="L" if img.ndim == 2 else "RGB")
        if image_ext.lower() in (".jpg", ".jpeg"):
            pil.save(out / "images" / rel, quality=jpeg_quality)
        else:
            pil.save(out / "images" / rel)
        if segmentations is not None:
            (out / "segmentations" / class_dirs[lab]).mkdir(parents=True, exist_ok=True)
            seg = np.asarray(segmentations[i], dtype=np.uint8)
            Image.fromarray(seg, mode="L").save(out / "segmentations" / Path(rel).with_suffix(".png"))
        lines_img.append(f"{i + 1} {rel}")
        lines_lab.append(f"{i + 1} {lab + 1}")
        lines_split.append(f"{i + 1} {1 if is_train[i] else 0}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "images.txt").write_text("\n".join(lines_img) + "\n")
    (out / "image_class_labels.txt").write_text("\n".join(lines_lab) + "\n")
    (out / "train_test_split.txt").write_text("\n".join(lines_split) + "\n")
    (out / "classes.txt").write_text("\n".join(f"{c + 1} {d}" for c, d in enumerate(class_dirs)) + "\n")
    return out


def load_sklearn_digits(test_fraction: float = TEST_FRACTION,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 1,797 digits (N×8×8, values 0..16), their labels and a fixed, class-stratified test flag."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images)
    labels = np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):  # stratified, fixed: the test split never depends on params
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        is_test[idx[: int(round(len(idx) * test_fraction))]] = True
    return images, labels, is_test


DIGIT_CLASSES = [f"{c + 1:03d}.digit_{c}" for c in range(10)]


def write_digits_cub(out: str | Path, *, test_fraction: float = TEST_FRACTION, seed: int = 0) -> dict:
    """Write the digits as a CUB-200-2011 tree under `out`; returns a small summary."""
    images, labels, is_test = load_sklearn_digits(test_fraction, seed)
    pix = np.round(images * (255.0 / 16.0)).astype(np.uint8)
    seg = np.where(images >= STROKE_LEVEL, 255, 0).astype(np.uint8)
    names = [f"digit_{lab}_{i + 1:04d}" for i, lab in enumerate(labels)]
    write_cub_tree(out, pix, labels, ~is_test, DIGIT_CLASSES, segmentations=seg, names=names)
    return {"images": int(len(labels)), "train": int((~is_test).sum()), "test": int(is_test.sum()),
            "classes": 10, "source": "sklearn.datasets.load_digits"}


class DigitsDataset(CUBDataset):
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)


def embedded_loader(name: str, default_root: str):
    """A loader for an embedded CUB tree that the `prepare` stage writes under `default_root`."""

    def load(root: Optional[str], split: str, image_size: int) -> ImageDataset:
        root = root or default_root
        if not Path(root).is_dir():
            from pipeline.data import DatasetError
            raise DatasetError(f"{name}: {root} does not exist; run the `prepare` stage first "
                               f"(`dvc repro prepare`, or `python -m stages.prepare`).")
        ds = DigitsDataset(root, split, image_size, name=name)
        ds.preload()
        return ds

    return load


DATASETS.register("digits")(DatasetSpec(embedded_loader("digits", DEFAULT_ROOT),
                                        "embedded default: sklearn digits in the CUB layout",
                                        default_root=DEFAULT_ROOT, embedded_writer=write_digits_cub))
