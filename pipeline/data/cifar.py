"""CIFAR-10/100 read from torchvision's on-disk pickle format (never downloaded here)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data import DATASETS, DatasetError, DatasetSpec, ImageDataset

CIFAR_LAYOUT = {
    # name: (folder, train files, test files, meta file, label key, class-name key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


# The only callables a CIFAR pickle needs: numpy's array reconstruction (under numpy 1 and numpy 2 names) and,
# for bytes pickled by Python 3 at protocol 2, `_codecs.encode`. Dicts, lists, str, bytes and int need none.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global outside `_ALLOWED`: a crafted file cannot run code when it is loaded."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR file holds only arrays, lists, "
                                         f"dicts, strings and numbers")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DatasetError(f"missing CIFAR file {path}") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged or crafted file
        raise DatasetError(f"cannot read CIFAR file {path}: {err}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


class CIFARDataset(ImageDataset):
    def __init__(self, name: str, root: str | Path, split: str, image_size: int):
        folder, train_files, test_files, meta_file, label_key, names_key = CIFAR_LAYOUT[name]
        self.name, self.split, self.image_size = name, split, image_size
        self.mean, self.std = CIFAR_MEAN[name], CIFAR_STD[name]
        root = Path(root)
        base = root if root.name == folder else root / folder
        how = (f"{name} is not downloaded automatically: get the Python version from "
               f"https://www.cs.toronto.edu/~kriz/cifar.html , extract it so that {base} exists, and set "
               f"`data.root` to {root}.")
        if not base.is_dir():
            raise DatasetError(f"{name}: {base} does not exist. {how}")
        files = train_files if split == "train" else test_files
        missing = [f for f in files + [meta_file] if not (base / f).is_file()]
        if missing:
            raise DatasetError(f"{name}: {base} lacks {', '.join(missing)}. {how}")
        self._files = {f"{folder}/{f}": base / f for f in files + [meta_file]}
        data, labels, ids = [], [], []
        for fname in files:
            entry = _unpickle(base / fname)
            if "data" not in entry or label_key not in entry:
                keys = list(entry)
                found = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "") or "none"
                hint = (" (bytes keys: pickled as Python 2 bytes; the Python version of the download has str "
                        "keys)" if any(isinstance(k, bytes) for k in keys) else "")
                raise DatasetError(f"{base / fname}: expected keys 'data' and {label_key!r}, found {found}{hint}")
            arr = np.asarray(entry["data"], dtype=np.uint8)
            if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
                raise DatasetError(f"{base / fname}: 'data' must be N×3072 uint8, got {arr.shape}")
            data.append(arr.reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in entry[label_key])
            ids.extend(f"{fname}:{r}" for r in range(arr.shape[0]))
        meta = _unpickle(base / meta_file)
        if names_key not in meta:
            raise DatasetError(f"{base / meta_file}: expected key {names_key!r}")
        self.class_names = [str(c) for c in meta[names_key]]
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DatasetError(f"{base}: labels outside 0..{len(self.class_names) - 1}")
        self.ids = ids
        images = torch.from_numpy(np.concatenate(data))
        if image_size != 32:
            images = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear",
                                   align_corners=False, antialias=True).round().clamp(0, 255).to(torch.uint8)
        self._cache = images  # CIFAR is small: always in memory

    def _load(self, i: int) -> torch.Tensor:
        return self._cache[i]

    def source_files(self) -> dict[str, Path]:
        return dict(self._files)


def _factory(name: str):
    def make(root: Optional[str], split: str, image_size: int) -> ImageDataset:
        if root is None:
            raise DatasetError(f"{name}: `data.root` is not set; point it at the folder that holds "
                               f"{CIFAR_LAYOUT[name][0]}/")
        return CIFARDataset(name, root, split, image_size)
    return make


DATASETS.register("cifar10")(DatasetSpec(_factory("cifar10"), "CIFAR-10 (torchvision pickle layout)"))
DATASETS.register("cifar100")(DatasetSpec(_factory("cifar100"), "CIFAR-100 (torchvision pickle layout)"))
