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
    """A miniature CUB-200-2011 tree: JPEG images (one grayscale), index files and soft PNG segmentations,
    written by the library's one CUB-tree writer."""
    from pipeline.data.digits import write_cub_tree

    rng = np.random.default_rng(seed)
    images, segs, labels, names, is_train = [], [], [], [], []
    k = 0
    for c in range(n_classes):
        for j in range(per_class):
            k += 1
            pix = rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)
            if k in grayscale_ids:
                pix = np.asarray(Image.fromarray(pix, "RGB").convert("L"))
            images.append(pix)
            if with_segmentations:
                seg = np.zeros((size, size + 4), dtype=np.float64)
                seg[size // 4: 3 * size // 4, size // 4: 3 * size // 4 + 2] = 1.0
                if soft_segmentations:  # the real files are soft-valued (0..255 with a blurred rim)
                    seg = seg * rng.uniform(0.7, 1.0) * 255
                    seg[size // 4 - 1, :] = 60
                else:
                    seg *= 255
                segs.append(seg.astype(np.uint8))
            labels.append(c)
            names.append(f"Bird_{c}_{j:04d}_{k}")
            is_train.append(j < per_class - 1)
    return write_cub_tree(root, images, labels, is_train, [f"{c + 1:03d}.Bird_{c}" for c in range(n_classes)],
                          segmentations=segs if with_segmentations else None, names=names, image_ext=".jpg")


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


# The longest files first: under `pytest -n auto --dist loadfile --no-loadscope-reorder` (make test) each file runs
# whole on one worker, handed out in collection order, so the end-to-end DVC runs and the SLURM grids start at once
# instead of last (xdist's default order, by number of tests per file, put the one-test files last).
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_grid_slurm.py", "test_own_data_e2e.py", "test_survey_app.py",
                 "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays
