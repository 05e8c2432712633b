"""The embedded default: scikit-learn's bundled handwritten digits, written in the CUB-200-2011 layout.

Images are the 8×8 digits as PNGs; `segmentations/` holds the stroke pixels as 0/255 PNGs, standing in for
human annotations. Everything downstream reads the tree with the ordinary CUB loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from pipeline.data import DATASETS, DatasetSpec, ImageDataset
from pipeline.data.cub import CUBDataset

DEFAULT_ROOT = "data/prepared/digits_cub"
TEST_FRACTION = 0.2  # 1,797 images -> 1,438 train / 359 test
STROKE_LEVEL = 4  # of 16: pixels at or above it are "stroke" (the human-mask stand-in)


def write_digits_cub(out: str | Path, *, test_fraction: float = TEST_FRACTION, seed: int = 0) -> dict:
    """Write the digits as a CUB-200-2011 tree under `out`; returns a small summary."""
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    images = np.asarray(digits.images)  # N×8×8, values 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):  # stratified, fixed: the test split never depends on params
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        is_test[idx[: int(round(len(idx) * test_fraction))]] = True

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "segmentations").mkdir(parents=True, exist_ok=True)
    class_dirs = [f"{c + 1:03d}.digit_{c}" for c in range(10)]
    lines_img, lines_lab, lines_split = [], [], []
    for i, (img, lab) in enumerate(zip(images, labels), start=1):
        rel = f"{class_dirs[lab]}/digit_{lab}_{i:04d}.png"
        for sub in ("images", "segmentations"):
            (out / sub / class_dirs[lab]).mkdir(exist_ok=True)
        pix = np.round(img * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pix, mode="L").save(out / "images" / rel)
        seg = np.where(img >= STROKE_LEVEL, 255, 0).astype(np.uint8)
        Image.fromarray(seg, mode="L").save(out / "segmentations" / rel)
        lines_img.append(f"{i} {rel}")
        lines_lab.append(f"{i} {lab + 1}")
        lines_split.append(f"{i} {0 if is_test[i - 1] else 1}")
    (out / "images.txt").write_text("\n".join(lines_img) + "\n")
    (out / "image_class_labels.txt").write_text("\n".join(lines_lab) + "\n")
    (out / "train_test_split.txt").write_text("\n".join(lines_split) + "\n")
    (out / "classes.txt").write_text("\n".join(f"{c + 1} {d}" for c, d in enumerate(class_dirs)) + "\n")
    return {"images": int(len(labels)), "train": int((~is_test).sum()), "test": int(is_test.sum()),
            "classes": 10, "source": "sklearn.datasets.load_digits"}


class DigitsDataset(CUBDataset):
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)


def _digits(root: Optional[str], split: str, image_size: int) -> ImageDataset:
    root = root or DEFAULT_ROOT
    if not Path(root).is_dir():
        from pipeline.data import DatasetError
        raise DatasetError(f"digits: {root} does not exist; run the `prepare` stage first "
                           f"(`dvc repro prepare`, or `python -m stages.prepare`).")
    ds = DigitsDataset(root, split, image_size, name="digits")
    ds.preload()
    return ds


DATASETS.register("digits")(DatasetSpec(_digits, "embedded default: sklearn digits in the CUB layout",
                                        default_root=DEFAULT_ROOT))
