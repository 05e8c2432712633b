"""SIP-H masks: CUB segmentations resized like their images and binarised, written to a mask store."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from pipeline.data import DatasetError, ImageDataset
from pipeline.data.cub import resize_uint8
from pipeline.maskstore import dataset_attrs
from pipeline.maskstore.writer import write_mask_store, write_unavailable_store

log = logging.getLogger(__name__)

Missing = Literal["error", "empty"]

HUMAN_RULE = ("segmentation PNG resized like its image (bilinear, to image_size²), salient where value / 255 >= "
              "threshold (absolute, as the authors' code); one channel broadcast over C")
FOLDER_RULE = ("mask PNG of its image's size resized nearest-neighbour to image_size², salient where value / 255 >= "
               "threshold; one channel broadcast over C")


# ----------------------------------------------------------------------------------------------- human

def binarise(segmentations: torch.Tensor, threshold: float) -> torch.Tensor:
    """uint8 [B, 1, H, W] -> bool: value / 255 >= threshold.

    Absolute, as the authors' code (Temp_CVPR `train_model.py` keeps the perturbation where 1 − map >= 0.5 for
    the map in [0, 1]; on uint8 values, salient at 0.5 means value >= 128 either way). A faint segmentation
    whose peak stays below the level gives an empty mask rather than a rescaled one.
    """
    return segmentations.float() >= threshold * 255.0


class FileMasks:
    """Masks in files, one per image by its index (CUB's segmentations/, the folder dataset's masks/)."""

    def __init__(self, dataset: ImageDataset):
        if not dataset.has_segmentations:
            raise DatasetError(f"dataset {dataset.name!r} ({dataset.split}) has no human segmentations")
        self.dataset = dataset
        self.where = str(getattr(dataset, "seg_root", None) or getattr(dataset, "mask_root", None))
        self.rule = FOLDER_RULE if hasattr(dataset, "read_segmentation") else HUMAN_RULE

    def provenance(self) -> str:
        return self.where

    def problems(self) -> list[str]:
        """Mask files no image has (the folder dataset checks; CUB's tree has none to check)."""
        return getattr(self.dataset, "annotation_problems", list)()

    def absent(self) -> list[str]:
        # every file stat'ed up front, so that a missing one fails before any decoding, naming all of them
        return [str(p) for p in map(self.dataset.segmentation_path, range(len(self.dataset))) if not p.is_file()]

    def name(self, i: int) -> str:
        return str(self.dataset.segmentation_path(i))

    def read(self, i: int) -> torch.Tensor:
        reader = getattr(self.dataset, "read_segmentation", None)
        if reader is not None:  # its own rule (the folder dataset: nearest-neighbour, size checked)
            return reader(i)
        with Image.open(self.dataset.segmentation_path(i)) as img:
            return resize_uint8(img, self.dataset.image_size, "L")


def mask_source(dataset: ImageDataset, *, root: Optional[str | Path] = None,
                coco: Optional[Any] = None) -> Optional[Any]:
    """Where `dataset`'s human masks come from: a COCO file (`coco`: file relative to `root`, categories), the
    dataset's own mask files, or None when it has neither."""
    if coco is not None:
        from pipeline.data import inside
        from pipeline.coco_masks import CocoMasks

        base = root if root is not None else getattr(dataset, "root", ".")
        return CocoMasks(dataset, inside(base, coco.file, "human_masks.coco.file"), coco.categories)
    return FileMasks(dataset) if dataset.has_segmentations else None


class HumanMasks:
    """Iterable of `(start, masks)` from a mask source; `masks` bool [B, C, H, W] on the CPU.

    `stats` counts masks that were missing or unreadable (only non-zero with missing="empty"). A mask that does
    not fit its image, and a mask for an image that does not exist, are errors whatever `missing` says.
    """

    def __init__(self, dataset: ImageDataset, *, threshold: float, missing: Missing, batch_size: int,
                 workers: int, progress: bool, source: Optional[Any] = None):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if missing not in ("error", "empty"):
            raise ValueError(f"missing must be 'error' or 'empty', got {missing!r}")
        self.source = source if source is not None else FileMasks(dataset)
        self.dataset, self.threshold, self.missing = dataset, threshold, missing
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.stats: dict[str, int] = {"missing_segmentations": 0, "unreadable_segmentations": 0}

    def _check_present(self) -> None:
        problems = self.source.problems()
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DatasetError(f"{len(problems)} mask problem(s):\n  " + "\n  ".join(problems[:10]) + more)
        absent = self.source.absent()
        self.stats["missing_segmentations"] = len(absent)
        if absent and self.missing == "error":
            shown = "\n  ".join(str(p) for p in absent[:10])
            more = f"\n  ... and {len(absent) - 10} more" if len(absent) > 10 else ""
            raise DatasetError(f"{len(absent)} of {len(self.dataset)} image(s) of {self.dataset.name}/"
                               f"{self.dataset.split} have no mask:\n  {shown}{more}\n(set human_masks.missing: "
                               f"empty to leave their masks empty instead)")
        if absent:
            log.warning("%d image(s) have no mask; their masks are left empty (first: %s)", len(absent), absent[0])

    def _read(self, i: int) -> tuple[Optional[torch.Tensor], Optional[str]]:
        try:
            return self.source.read(i), None
        except FileNotFoundError:
            return None, None  # already counted as missing
        except DatasetError:
            raise  # a mask that does not fit its image: never left empty
        except (UnidentifiedImageError, OSError, ValueError) as err:
            return None, f"{self.source.name(i)}: {err}"

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        self._check_present()
        ds = self.dataset
        n = len(ds)
        c, h, w = ds.image_shape
        unreadable: list[str] = []
        bar = tqdm(total=n, desc="human masks", unit="img", disable=not self.progress, leave=False)
        # PNG decoding releases the GIL, so threads overlap the per-file work.
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            try:
                for start in range(0, n, self.batch_size):
                    stop = min(n, start + self.batch_size)
                    seg = torch.zeros((stop - start, 1, h, w), dtype=torch.uint8)
                    for j, (img, err) in enumerate(pool.map(self._read, range(start, stop))):
                        if img is not None:
                            seg[j] = img
                        elif err is not None:
                            unreadable.append(err)
                    bar.update(stop - start)
                    yield start, binarise(seg, self.threshold).expand(-1, c, -1, -1)
            finally:
                bar.close()
        self.stats["unreadable_segmentations"] = len(unreadable)
        if unreadable and self.missing == "error":
            shown = "\n  ".join(unreadable[:10])
            more = f"\n  ... and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
            raise DatasetError(f"{len(unreadable)} mask(s) unreadable:\n  {shown}{more}")
        if unreadable:
            log.warning("%d mask(s) unreadable; their masks are left empty (first: %s)",
                        len(unreadable), unreadable[0])


def human_masks(dataset: ImageDataset, *, threshold: float = 0.5, missing: Missing = "error",
                batch_size: int = 256, workers: Optional[int] = None, progress: bool = True,
                source: Optional[Any] = None) -> HumanMasks:
    """Masks of every item of `dataset` from `source` (default: its segmentation files; see `HUMAN_RULE`)."""
    return HumanMasks(dataset, threshold=threshold, missing=missing, batch_size=batch_size, source=source,
                      workers=workers if workers is not None else min(8, os.cpu_count() or 1), progress=progress)


def extract_human(dataset: ImageDataset, out: str | Path, *, root: Optional[str | Path] = None,
                  threshold: float = 0.5, missing: Missing = "error", chunk_size: int = 256,
                  batch_size: int = 256, progress: bool = True, coco: Optional[Any] = None) -> dict[str, Any]:
    """Human masks of `dataset` (from its mask files, or from the COCO file `coco` names), written to a new
    store at `out`; the store records where they came from."""
    source = mask_source(dataset, root=root, coco=coco)
    if source is None:
        raise DatasetError(f"dataset {dataset.name!r} ({dataset.split}) has no human segmentations")
    attrs = {"kind": "human", **dataset_attrs(dataset, root), "rule": source.rule,
             "params": {"threshold": threshold, "missing": missing}, "segmentations": source.provenance()}
    masks = human_masks(dataset, threshold=threshold, missing=missing, batch_size=batch_size, progress=progress,
                        source=source)
    return write_mask_store(out, masks, n=len(dataset), shape=dataset.image_shape, attrs=attrs,
                            chunk_size=chunk_size)


def write_no_human_masks(dataset: ImageDataset, out: str | Path, *, root: Optional[str | Path] = None,
                         reason: Optional[str] = None) -> dict[str, Any]:
    """An empty human store for a dataset without segmentations, so that `sip_h` can refuse it by reason."""
    reason = reason or (f"dataset {dataset.name!r} has no human segmentations (only CUB-200-2011-style trees "
                        f"with a segmentations/ folder do), so sip_h cannot be trained on it; use sip_s")
    attrs = {"kind": "human", **dataset_attrs(dataset, root), "n": 0, "rule": HUMAN_RULE}
    return write_unavailable_store(out, shape=dataset.image_shape, reason=reason, attrs=attrs)
