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


# ----------------------------------------------------------------------------------------------- human

def binarise(segmentations: torch.Tensor, threshold: float) -> torch.Tensor:
    """uint8 [B, 1, H, W] -> bool: value / 255 >= threshold.

    Absolute, as the authors' code (Temp_CVPR `train_model.py` keeps the perturbation where 1 − map >= 0.5 for
    the map in [0, 1]; on uint8 values, salient at 0.5 means value >= 128 either way). A faint segmentation
    whose peak stays below the level gives an empty mask rather than a rescaled one.
    """
    return segmentations.float() >= threshold * 255.0


class HumanMasks:
    """Iterable of `(start, masks)` from a dataset's segmentations; `masks` bool [B, C, H, W] on the CPU.

    `stats` counts segmentations that were missing or unreadable (only non-zero with missing="empty").
    """

    def __init__(self, dataset: ImageDataset, *, threshold: float, missing: Missing, batch_size: int,
                 workers: int, progress: bool):
        if not dataset.has_segmentations:
            raise DatasetError(f"dataset {dataset.name!r} ({dataset.split}) has no human segmentations")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if missing not in ("error", "empty"):
            raise ValueError(f"missing must be 'error' or 'empty', got {missing!r}")
        self.dataset, self.threshold, self.missing = dataset, threshold, missing
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.stats: dict[str, int] = {"missing_segmentations": 0, "unreadable_segmentations": 0}

    def _check_present(self) -> None:
        # Stat every file up front so that a missing one fails before any decoding, naming all of them.
        absent = [p for p in (self.dataset.segmentation_path(i) for i in range(len(self.dataset)))
                  if not p.is_file()]
        self.stats["missing_segmentations"] = len(absent)
        if absent and self.missing == "error":
            shown = "\n  ".join(str(p) for p in absent[:10])
            more = f"\n  ... and {len(absent) - 10} more" if len(absent) > 10 else ""
            raise DatasetError(f"{len(absent)} of {len(self.dataset)} segmentation file(s) missing for "
                               f"{self.dataset.name}/{self.dataset.split}:\n  {shown}{more}\n(set "
                               f"human_masks.missing: empty to leave their masks empty instead)")
        if absent:
            log.warning("%d segmentation file(s) missing; their masks are left empty (first: %s)",
                        len(absent), absent[0])

    def _read(self, i: int) -> tuple[Optional[torch.Tensor], Optional[str]]:
        path = self.dataset.segmentation_path(i)
        try:
            with Image.open(path) as img:
                return resize_uint8(img, self.dataset.image_size, "L"), None
        except FileNotFoundError:
            return None, None  # already counted as missing
        except (UnidentifiedImageError, OSError, ValueError) as err:
            return None, f"{path}: {err}"

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
            raise DatasetError(f"{len(unreadable)} segmentation file(s) unreadable:\n  {shown}{more}")
        if unreadable:
            log.warning("%d segmentation file(s) unreadable; their masks are left empty (first: %s)",
                        len(unreadable), unreadable[0])


def human_masks(dataset: ImageDataset, *, threshold: float = 0.5, missing: Missing = "error",
                batch_size: int = 256, workers: Optional[int] = None, progress: bool = True) -> HumanMasks:
    """Masks of every item of `dataset` from its segmentation PNGs (see `HUMAN_RULE`)."""
    return HumanMasks(dataset, threshold=threshold, missing=missing, batch_size=batch_size,
                      workers=workers if workers is not None else min(8, os.cpu_count() or 1), progress=progress)


def extract_human(dataset: ImageDataset, out: str | Path, *, root: Optional[str | Path] = None,
                  threshold: float = 0.5, missing: Missing = "error", chunk_size: int = 256,
                  batch_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """Human masks of `dataset` from its segmentations, written to a new store at `out`."""
    attrs = {"kind": "human", **dataset_attrs(dataset, root), "rule": HUMAN_RULE,
             "params": {"threshold": threshold, "missing": missing},
             "segmentations": str(getattr(dataset, "seg_root", None))}
    masks = human_masks(dataset, threshold=threshold, missing=missing, batch_size=batch_size, progress=progress)
    return write_mask_store(out, masks, n=len(dataset), shape=dataset.image_shape, attrs=attrs,
                            chunk_size=chunk_size)


def write_no_human_masks(dataset: ImageDataset, out: str | Path, *, root: Optional[str | Path] = None,
                         reason: Optional[str] = None) -> dict[str, Any]:
    """An empty human store for a dataset without segmentations, so that `sip_h` can refuse it by reason."""
    reason = reason or (f"dataset {dataset.name!r} has no human segmentations (only CUB-200-2011-style trees "
                        f"with a segmentations/ folder do), so sip_h cannot be trained on it; use sip_s")
    attrs = {"kind": "human", **dataset_attrs(dataset, root), "n": 0, "rule": HUMAN_RULE}
    return write_unavailable_store(out, shape=dataset.image_shape, reason=reason, attrs=attrs)
