"""Datasets: a registry of loaders whose items carry their sample index.

Every item is `(image, label, index)`: `image` is float32 C×H×W in [0, 1] (normalisation, if any, lives
inside the model so that attacks see [0, 1] inputs), and `index` is the item's position in its split. Masks
are stored and read by that index, so it never depends on shuffling, batching or the validation split.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.core.errors import ConfigError, DatasetError  # noqa: F401  (DatasetError re-exported)
from pipeline.core.registry import Registry
from pipeline.core.utils import inside  # noqa: F401  (re-exported: the loaders' path check)

log = logging.getLogger(__name__)




class ImageDataset(torch.utils.data.Dataset):
    """Base class: subclasses set the attributes below and implement `_load(i) -> uint8 C×H×W tensor`."""

    name: str = "dataset"
    split: str = "train"
    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    image_size: int
    channels: int = 3
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    _cache: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _load(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_uint8(self, i: int) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[i]
        return self._load(i)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}/{self.split}: index {i} out of range [0, {len(self)})")
        return self.image_uint8(i).float().div_(255.0), int(self.labels[i]), i

    def preload(self, limit_bytes: int = 2 << 30) -> bool:
        """Decode every image once into one uint8 tensor (returns False when it would exceed `limit_bytes`)."""
        if self._cache is not None:
            return True
        need = len(self) * int(np.prod(self.image_shape))
        if need > limit_bytes:
            return False
        cache = torch.empty((len(self), *self.image_shape), dtype=torch.uint8)
        for i in tqdm(range(len(self)), desc=f"decode {self.name}/{self.split}", unit="img", leave=False,
                      disable=len(self) < 2000):
            cache[i] = self._load(i)
        self._cache = cache
        return True

    def fingerprint(self) -> str:
        """Hash of the sample order (ids and labels) and geometry: what a mask store must match."""
        h = hashlib.sha256()
        h.update(f"{self.name}|{self.split}|{self.image_shape}|".encode())
        for sid in self.ids:
            h.update(sid.encode())
            h.update(b"\0")
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    # Human salience: datasets with annotations override these two.
    has_segmentations: bool = False

    def segmentation_path(self, i: int) -> Path:
        raise DatasetError(f"dataset {self.name!r} has no human segmentations")

    def source_files(self) -> dict[str, Path]:
        """Every file this split reads, by a name relative to the dataset root (for `content_fingerprint`)."""
        return {}

    def _segmentation_files(self, folder: str) -> dict[str, Path]:
        """For `source_files` of datasets read from image files (`relpaths`): the segmentation files present, named
        `folder/<image path>.png` (an absent one is `human_masks.missing`'s business)."""
        files = {}
        for i, rel in enumerate(self.relpaths):
            seg = self.segmentation_path(i)
            if seg.is_file():
                files[f"{folder}/{PurePosixPath(rel).with_suffix('.png')}"] = seg
        return files

    def unreadable_images(self, workers: Optional[int] = None, progress: bool = True) -> list[str]:
        """Decode every image once; the messages of those that fail (an empty list when all decode)."""
        if self._cache is not None:
            return []  # already decoded into memory

        def one(i: int) -> Optional[str]:
            try:
                self._load(i)
            except DatasetError as err:
                return str(err)
            return None

        # Image decoding releases the GIL, so threads overlap the per-file work.
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            results = list(tqdm(pool.map(one, range(len(self))), total=len(self), unit="img", leave=False,
                                desc=f"decode {self.name}/{self.split}", disable=not progress))
        return [r for r in results if r is not None]


def content_fingerprint(datasets: Sequence[ImageDataset], progress: bool = True) -> dict:
    """Names, sizes and SHA-256 of every file the datasets read, and one digest over them all.

    This is what changes when a file under the dataset root is replaced, unlike `ImageDataset.fingerprint`
    (sample order only).
    """
    files: dict[str, Path] = {}
    for ds in datasets:
        files.update(ds.source_files())
    h = hashlib.sha256()
    total = 0
    for name in tqdm(sorted(files), desc="hash dataset files", unit="file", leave=False, disable=not progress):
        path = files[name]
        fh = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    fh.update(block)
                    total += len(block)
        except OSError as err:
            raise DatasetError(f"cannot read {path}: {err.strerror or err}") from None
        h.update(f"{name}\0{fh.hexdigest()}\n".encode())
    return {"files": len(files), "bytes": total, "sha256": h.hexdigest()}


@dataclass(frozen=True)
class DatasetSpec:
    factory: Callable[[Optional[str], str, int], ImageDataset]
    description: str
    default_root: Optional[str] = None
    # Embedded data sets: writes the tree at `default_root` (the `prepare` stage calls it); returns a summary.
    embedded_writer: Optional[Callable[..., dict]] = None


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def load_dataset(name: str, root: Optional[str], split: str, image_size: int) -> ImageDataset:
    """Instantiate a registered dataset (`split` is "train" or "test")."""
    spec = DATASETS.get(name, "dataset")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return spec.factory(root or spec.default_root, split, image_size)


def split_fingerprints(dataset: ImageDataset, root: Optional[str]) -> dict[str, str]:
    """Sample-order fingerprints of both splits of `dataset`'s data (the other split is loaded to get it)."""
    other = "test" if dataset.split == "train" else "train"
    return {dataset.split: dataset.fingerprint(),
            other: load_dataset(dataset.name, root, other, dataset.image_size).fingerprint()}


def train_val_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified split of training indices into (train, val), each sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * val_fraction))
        val.append(idx[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx.astype(np.int64), val_idx.astype(np.int64)


class BatchIterator:
    """Yields `(x, y, index)` batches of a subset of a dataset.

    With the images preloaded it slices one uint8 tensor (no per-sample Python work); otherwise it uses a
    DataLoader with workers and pinned memory. Either way `index` is the dataset index of each row.
    """

    def __init__(self, dataset: ImageDataset, indices: Sequence[int] | np.ndarray, batch_size: int, *,
                 shuffle: bool, seed: int = 0, num_workers: int = 0, pin_memory: bool = False,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        if world_size > 1 and batch_size % world_size:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
        self.epoch = 0
        self.labels = torch.as_tensor(np.asarray(dataset.labels, dtype=np.int64))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = order[torch.randperm(len(order), generator=g)]
        if self.world_size > 1:
            # Every process draws the same permutation; process r takes every world_size-th sample, so a
            # global batch of `batch_size` is split evenly. Short tails are padded by wrapping around.
            pad = (-len(order)) % self.world_size
            order = torch.cat([order, order[:pad]])[self.rank::self.world_size]
        return order

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def _batches(self) -> list[torch.Tensor]:
        batches = list(torch.split(self._order(), self.local_batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.local_batch_size:
            batches.pop()
        elif self.shuffle and len(batches) > 1 and len(batches[-1]) == 1:
            # a training batch of one sample breaks batch norm ("Expected more than 1 value per channel"):
            # it joins the batch before it, so every sample is still seen once per epoch
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def __len__(self) -> int:
        n = -(-len(self.indices) // self.world_size)
        b = self.local_batch_size
        if self.drop_last:
            return n // b
        full = -(-n // b)
        return full - 1 if self.shuffle and full > 1 and n % b == 1 else full

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        cache = self.dataset._cache
        if cache is not None:
            for idx in batches:
                x = cache[idx]
                if self.pin_memory:
                    x = x.pin_memory()
                yield x.float().div_(255.0), self.labels[idx], idx
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=[b.tolist() for b in batches], num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=False)
        for x, y, idx in loader:
            yield x, y, idx


def _register_builtin() -> None:
    from pipeline.data import cifar, cluttered, cub, digits, folder  # noqa: F401  (registration side effects)


_register_builtin()
