"""CUB-200-2011 in its released layout (`images/`, the index files, and the separate `segmentations/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data import DATASETS, DatasetError, DatasetSpec, ImageDataset, inside

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

HOW_TO_GET = (
    "CUB-200-2011 is not downloaded automatically. Get CUB_200_2011.tgz and segmentations.tgz from "
    "https://www.vision.caltech.edu/datasets/cub_200_2011/ , extract both (segmentations/ may sit inside "
    "CUB_200_2011/ or beside it) and set `data.root` in params.yaml to the CUB_200_2011 folder."
)

INDEX_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def _read_table(path: Path, what: str, parse=lambda v: v) -> dict[int, Any]:
    """`id value` lines as {id: parse(value)}; a non-integer id, a value `parse` rejects (ValueError) or an id
    given twice is refused with the file and line."""
    out: dict[int, Any] = {}
    where: dict[int, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{path}:{lineno}: expected an id and {what}, got {line!r}")
        key, raw = parts
        try:
            k = int(key)
        except ValueError:
            raise DatasetError(f"{path}:{lineno}: the id {key!r} is not a whole number") from None
        if k in out:
            raise DatasetError(f"{path}:{lineno}: id {k} given twice (first at line {where[k]})")
        try:
            out[k] = parse(raw.strip())
        except ValueError:
            raise DatasetError(f"{path}:{lineno}: {raw.strip()!r} is not {what}") from None
        where[k] = lineno
    return out


def _split_flag(v: str) -> bool:
    if v not in ("0", "1"):
        raise ValueError(v)
    return v == "1"


def find_segmentations(root: Path) -> Optional[Path]:
    for cand in (root / "segmentations", root.parent / "segmentations"):
        if cand.is_dir():
            return cand
    return None


_WIDE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def to_8bit(img: Image.Image, mode: str) -> Image.Image:
    """`img` as 8-bit `mode` ("RGB" or "L"), whatever it was stored as; the one place every loader converts.

    16-bit images (and 32-bit integer ones, which Pillow may open 16-bit PNGs as) are scaled to 0..255, not
    clipped; a palette image used as a segmentation ("L") is an index map: index 0 is the background and every
    other index the object (255); float images have no defined range and are refused, as are modes Pillow
    cannot convert."""
    m = img.mode
    if m in _WIDE or m == "I":
        arr = np.asarray(img, dtype=np.int64)
        top = _WIDE.get(m) or (65535 if arr.max(initial=0) > 255 else 255)
        out = Image.fromarray(np.clip(arr * 255 // top, 0, 255).astype(np.uint8), mode="L")
        return out.convert(mode)
    if m == "P" and mode == "L":
        idx = np.asarray(img, dtype=np.uint8)
        return Image.fromarray(np.where(idx != 0, 255, 0).astype(np.uint8), mode="L")
    if m == "F":
        raise ValueError("a 32-bit float image has no defined value range; store it as 8- or 16-bit")
    return img.convert(mode)


def resize_uint8(img: Image.Image, size: int, mode: str) -> torch.Tensor:
    """Resize a PIL image to size×size (bilinear) and return uint8 C×H×W."""
    img = to_8bit(img, mode).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class CUBDataset(ImageDataset):
    name = "cub"
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, root: str | Path, split: str, image_size: int, *, name: str = "cub"):
        self.name = name
        self.split = split
        self.image_size = image_size
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.name}: dataset root {self.root} does not exist. {HOW_TO_GET}")
        missing = [f for f in INDEX_FILES if not (self.root / f).is_file()]
        if missing:
            raise DatasetError(f"{self.name}: {self.root} lacks {', '.join(missing)}. {HOW_TO_GET}")
        if not (self.root / "images").is_dir():
            raise DatasetError(f"{self.name}: {self.root / 'images'} does not exist. {HOW_TO_GET}")

        images = _read_table(self.root / "images.txt", "an image path")
        labels = _read_table(self.root / "image_class_labels.txt", "a class id (a whole number)", int)
        is_train = _read_table(self.root / "train_test_split.txt", "1 (train) or 0 (test)", _split_flag)
        classes = sorted(_read_table(self.root / "classes.txt", "a class name").items())
        for fname, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
            lost = sorted(set(images) - set(table))
            if lost:
                raise DatasetError(f"{self.root / fname}: no entry for image id(s) {lost[:5]}")
        want_train = split == "train"
        keep = sorted(k for k in images if is_train[k] == want_train)
        self.image_ids = keep
        self.relpaths = [images[k] for k in keep]
        index = self.root / "images.txt"
        self.image_paths = [inside(self.root / "images", images[k], f"{index}: image {k}") for k in keep]
        self.ids = [f"{k}:{images[k]}" for k in keep]
        class_ids = [c for c, _ in classes]
        if class_ids != list(range(1, len(classes) + 1)):
            raise DatasetError(f"{self.root / 'classes.txt'}: class ids must be 1..K without gaps")
        self.class_names = [n for _, n in classes]
        lab = np.array([labels[k] - 1 for k in keep], dtype=np.int64)
        bad = np.flatnonzero((lab < 0) | (lab >= len(classes)))
        if len(bad):
            raise DatasetError(f"{self.root / 'image_class_labels.txt'}: label out of range for image id "
                               f"{keep[bad[0]]}")
        self.labels = lab
        self.seg_root = find_segmentations(self.root)
        self.has_segmentations = self.seg_root is not None

    def _load(self, i: int) -> torch.Tensor:
        path = self.image_paths[i]
        try:
            with Image.open(path) as img:
                return resize_uint8(img, self.image_size, "RGB")  # a few CUB images are grayscale
        except FileNotFoundError:
            raise DatasetError(f"{self.name}/{self.split}[{i}]: image file missing: {path}") from None
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DatasetError(f"{self.name}/{self.split}[{i}]: cannot read image {path}: {err}") from None

    def segmentation_path(self, i: int) -> Path:
        if self.seg_root is None:
            raise DatasetError(
                f"{self.name}: no segmentations/ folder in {self.root} or {self.root.parent}. {HOW_TO_GET}")
        rel = Path(self.relpaths[i]).with_suffix(".png")
        return inside(self.seg_root, rel, f"{self.name}/{self.split}[{i}] segmentation")

    def source_files(self) -> dict[str, Path]:
        files = {name: self.root / name for name in INDEX_FILES}
        files.update((f"images/{rel}", path) for rel, path in zip(self.relpaths, self.image_paths))
        if self.seg_root is not None:
            files.update(self._segmentation_files("segmentations"))
        return files


def _cub(root: Optional[str], split: str, image_size: int) -> ImageDataset:
    if root is None:
        raise DatasetError(f"cub: `data.root` is not set. {HOW_TO_GET}")
    return CUBDataset(root, split, image_size)


DATASETS.register("cub")(DatasetSpec(_cub, "CUB-200-2011 (200 bird species) with human segmentations"))
