"""Shared fixtures: tiny datasets written in the real on-disk formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def make_cub_tree(root: Path, *, n_classes: int = 3, per_class: int = 4, size: int = 20, seed: int = 0,
                  grayscale_ids: tuple[int, ...] = (2,), with_segmentations: bool = True,
                  soft_segmentations: bool = True) -> Path:
    """A miniature CUB-200-2011 tree: JPEG images (one grayscale), index files and soft PNG segmentations."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines_img, lines_lab, lines_split, classes = [], [], [], []
    k = 0
    for c in range(n_classes):
        cdir = f"{c + 1:03d}.Bird_{c}"
        classes.append(f"{c + 1} {cdir}")
        (root / "images" / cdir).mkdir(parents=True, exist_ok=True)
        if with_segmentations:
            (root / "segmentations" / cdir).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            k += 1
            rel = f"{cdir}/Bird_{c}_{j:04d}_{k}.jpg"
            pix = rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)
            img = Image.fromarray(pix, "RGB")
            if k in grayscale_ids:
                img = img.convert("L")
            img.save(root / "images" / rel, quality=95)
            if with_segmentations:
                seg = np.zeros((size, size + 4), dtype=np.float64)
                seg[size // 4: 3 * size // 4, size // 4: 3 * size // 4 + 2] = 1.0
                if soft_segmentations:  # the real files are soft-valued (0..255 with a blurred rim)
                    seg = seg * rng.uniform(0.7, 1.0) * 255
                    seg[size // 4 - 1, :] = 60
                else:
                    seg *= 255
                Image.fromarray(seg.astype(np.uint8), "L").save(root / "segmentations" / Path(rel).with_suffix(".png"))
            lines_img.append(f"{k} {rel}")
            lines_lab.append(f"{k} {c + 1}")
            lines_split.append(f"{k} {1 if j < per_class - 1 else 0}")
    (root / "images.txt").write_text("\n".join(lines_img) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines_lab) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(lines_split) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def make_cifar_tree(root: Path, name: str = "cifar10", per_file: int = 6, seed: int = 0) -> Path:
    """torchvision's pickle layout with a handful of rows per batch file."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        files, label_key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
        meta_file, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
        n_cls = 10
    else:
        base = root / "cifar-100-python"
        files, label_key = ["train", "test"], "fine_labels"
        meta_file, meta = "meta", {"fine_label_names": [f"f{i}" for i in range(100)]}
        n_cls = 100
    base.mkdir(parents=True, exist_ok=True)
    for f in files:
        entry = {"data": rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, n_cls, size=per_file).tolist(), "batch_label": f}
        with open(base / f, "wb") as fh:
            pickle.dump(entry, fh)
    with open(base / meta_file, "wb") as fh:
        pickle.dump(meta, fh)
    return root


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    return make_cub_tree(tmp_path / "CUB_200_2011")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from pipeline.data.digits import write_digits_cub

    root = tmp_path_factory.mktemp("digits") / "digits_cub"
    write_digits_cub(root)
    return root
