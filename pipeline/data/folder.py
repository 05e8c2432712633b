"""Your own images: a folder tree or a CSV manifest, with human masks in a mask folder (or a COCO file, see
`pipeline.human_masks`).

Layouts, under the data root:

- ``train/<class>/...`` and ``test/<class>/...``: any file Pillow opens (by extension), at any depth below the
  class folder; classes are the folder names, sorted (as torchvision's ImageFolder), train's and test's together.
- ``manifest.csv`` with a header and the columns ``path,label,split`` (split ``train`` or ``test``, path relative
  to the root): used instead of the folders when present. Classes are the labels, sorted.

Human masks (optional): ``masks/`` mirrors the image paths with a ``.png`` suffix (``masks/train/cat/a.png`` for
``train/cat/a.jpg``), binary or grey (salient where value / 255 >= ``human_masks.threshold``), the image's own
size, resized nearest-neighbour.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data import DATASETS, DatasetError, DatasetSpec, ImageDataset, inside
from pipeline.data.cub import resize_uint8, to_8bit

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MANIFEST = "manifest.csv"
MASKS = "masks"
SPLITS = ("train", "test")

LAYOUT = ("expected train/<class>/<image> and test/<class>/<image> folders, or a manifest.csv with the columns "
          "path,label,split")


def _scan_folders(root: Path) -> list[tuple[str, str, str]]:
    """(relative path, class, split) of every image under root/train and root/test, sorted by path."""
    rows = []
    for split in SPLITS:
        base = root / split
        if not base.is_dir():
            raise DatasetError(f"folder: {base} does not exist; {LAYOUT}")
        loose = sorted(p.name for p in base.iterdir() if p.is_file() and not p.name.startswith("."))
        if loose:
            raise DatasetError(f"folder: {base} holds files outside a class folder ({', '.join(loose[:3])}); "
                               f"put each image in {split}/<class>/")
        for cls in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(cls.rglob("*")):
                if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                    rel = path.relative_to(root).as_posix()
                    inside(root, rel, f"folder: {split}/{cls.name}")  # a symlink out of the tree
                    rows.append((rel, cls.name, split))
    return rows


def _read_manifest(path: Path) -> list[tuple[str, str, str]]:
    """(relative path, label, split) of every row of a manifest.csv; bad rows named by line."""
    rows, seen = [], {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            lacking = [c for c in ("path", "label", "split") if c not in columns]
            if lacking:
                raise DatasetError(f"{path}: header lacks the column(s) {', '.join(lacking)} (has: "
                                   f"{', '.join(columns) or 'none'}); expected path,label,split")
            for lineno, raw in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
                rel, label, split = row["path"], row["label"], row["split"]
                if not rel and not label and not split:
                    continue
                if not rel or not label:
                    raise DatasetError(f"{path}:{lineno}: empty path or label")
                if split not in SPLITS:
                    raise DatasetError(f"{path}:{lineno}: split {split!r} is neither 'train' nor 'test'")
                if PurePosixPath(rel).suffix.lower() not in IMAGE_EXTENSIONS:
                    raise DatasetError(f"{path}:{lineno}: {rel!r} is not an image file name "
                                       f"({', '.join(IMAGE_EXTENSIONS)})")
                if rel in seen:
                    raise DatasetError(f"{path}:{lineno}: {rel!r} listed twice (first at line {seen[rel]})")
                seen[rel] = lineno
                rows.append((rel, label, split))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read {path}: {err}") from None
    return rows


class FolderDataset(ImageDataset):
    """One split of an image folder tree or manifest (module docstring); items by sorted path."""

    name = "folder"

    def __init__(self, root: str | Path, split: str, image_size: int, *, name: str = "folder"):
        self.name, self.split, self.image_size = name, split, image_size
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{name}: dataset root {self.root} does not exist; {LAYOUT}")
        manifest = self.root / MANIFEST
        rows = _read_manifest(manifest) if manifest.is_file() else _scan_folders(self.root)
        self.layout = "manifest" if manifest.is_file() else "folders"
        where = manifest if manifest.is_file() else self.root
        self.class_names = sorted({label for _, label, _ in rows})
        if not self.class_names:
            raise DatasetError(f"{name}: no images found in {where}; {LAYOUT} "
                               f"(image files: {', '.join(IMAGE_EXTENSIONS)})")
        for s in SPLITS:
            if not any(r[2] == s for r in rows):
                raise DatasetError(f"{name}: {where} has no {s} images")
        index = {c: k for k, c in enumerate(self.class_names)}
        self.all_relpaths = [rel for rel, _, _ in rows]  # both splits: what a mask may be for
        mine = sorted((r for r in rows if r[2] == split), key=lambda r: r[0])
        self.relpaths = [rel for rel, _, _ in mine]
        self.image_paths = [inside(self.root, rel, f"{where}: {rel}") for rel in self.relpaths]
        self.ids = list(self.relpaths)
        self.labels = np.array([index[label] for _, label, _ in mine], dtype=np.int64)
        self.mask_root = self.root / MASKS
        self.has_segmentations = self.mask_root.is_dir()

    def _load(self, i: int) -> torch.Tensor:
        path = self.image_paths[i]
        try:
            with Image.open(path) as img:
                return resize_uint8(img, self.image_size, "RGB")
        except FileNotFoundError:
            raise DatasetError(f"{self.name}/{self.split}[{i}]: image file missing: {path}") from None
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DatasetError(f"{self.name}/{self.split}[{i}]: cannot read image {path}: {err}") from None

    def original_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image `i` as stored (read from its header only)."""
        try:
            with Image.open(self.image_paths[i]) as img:
                return img.size
        except (OSError, ValueError) as err:
            raise DatasetError(f"{self.name}/{self.split}[{i}]: cannot read image {self.image_paths[i]}: "
                               f"{err}") from None

    # ------------------------------------------------------------------ masks from the mask folder

    def segmentation_path(self, i: int) -> Path:
        rel = PurePosixPath(self.relpaths[i]).with_suffix(".png")
        return inside(self.mask_root, str(rel), f"{self.name}/{self.split}[{i}] mask")

    def read_segmentation(self, i: int) -> torch.Tensor:
        """Mask `i` as uint8 1×S×S (nearest-neighbour); it must have its image's size."""
        path = self.segmentation_path(i)
        with Image.open(path) as img:
            want = self.original_size(i)
            if img.size != want:
                raise DatasetError(f"{path} is {img.size[0]}×{img.size[1]} but its image {self.image_paths[i]} "
                                   f"is {want[0]}×{want[1]}: a mask must have its image's size")
            arr = np.asarray(to_8bit(img, "L").resize((self.image_size,) * 2, Image.NEAREST), dtype=np.uint8)
        return torch.from_numpy(arr.copy())[None]

    def annotation_problems(self) -> list[str]:
        """Mask files for images that do not exist (a renamed or deleted image, a typo in a folder name)."""
        if not self.mask_root.is_dir():
            return []
        expected = {PurePosixPath(rel).with_suffix(".png").as_posix() for rel in self.all_relpaths}
        return [f"{p}: a mask for an image that does not exist (no {MASKS}/<image path>.png matches it)"
                for p in sorted(self.mask_root.rglob("*"))
                if p.is_file() and not p.name.startswith(".")
                and p.relative_to(self.mask_root).as_posix() not in expected]

    def source_files(self) -> dict[str, Path]:
        files = {rel: path for rel, path in zip(self.relpaths, self.image_paths)}
        if self.layout == "manifest":
            files[MANIFEST] = self.root / MANIFEST
        if self.has_segmentations:
            files.update(self._segmentation_files(MASKS))
        return files


def _folder(root: Optional[str], split: str, image_size: int) -> ImageDataset:
    if root is None:
        raise DatasetError(f"folder: `data.root` is not set; point it at your image folder ({LAYOUT})")
    return FolderDataset(root, split, image_size)


DATASETS.register("folder")(DatasetSpec(_folder, "your own images: train/<class>/, test/<class>/ folders or a "
                                                  "manifest.csv, with optional masks/ or a COCO file"))
