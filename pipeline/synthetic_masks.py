"""SIP-S masks (the paper's eq. 7–8): per image, the smallest set of elements carrying half of a robust teacher's
|∇ₓ loss|, extracted batch by batch and written to a mask store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.core.errors import CheckpointError
from pipeline.core.utils import resolve_device, sha256_file
from pipeline.data import BatchIterator, DatasetError, ImageDataset
from pipeline.maskstore import MaskStoreError, dataset_attrs
from pipeline.maskstore.writer import chunk_ranges, write_mask_store, write_mask_store_distributed

log = logging.getLogger(__name__)

Target = Literal["label", "predicted"]

SYNTHETIC_RULE = ("eq. 7-8: per image, the smallest set of C×H×W elements whose |d CE(teacher(x), target) / dx| "
                  "sums to at least `fraction` of the image's total; ties to the earlier flat index")


# ----------------------------------------------------------------------------------------------- synthetic

def salient_set(scores: torch.Tensor, fraction: float) -> tuple[torch.Tensor, int]:
    """Eq. 7–8 per sample: bool mask of the smallest set of elements whose |score| sum reaches `fraction` of the
    sample's total |score|.

    `scores` is [B, ...]; the mask has the same shape. Ties are broken by a stable sort, so among equal
    magnitudes the earlier flat index is taken first. A sample whose scores are all zero gets an empty mask and
    is counted in the returned `n_zero`. Non-finite scores raise ValueError.
    """
    mask, zero, bad = salient_set_async(scores, fraction)
    n_zero, n_bad = torch.stack([zero.sum(), bad.sum()]).tolist()
    if n_bad:
        raise ValueError(f"{n_bad} of {scores.shape[0]} samples have non-finite scores (NaN or inf gradients)")
    return mask, int(n_zero)


def salient_set_async(scores: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`salient_set` without a host synchronisation: returns (mask, all-zero rows, non-finite rows), the last two
    as bool [B] tensors on the scores' device, for the caller to check when it next synchronises anyway."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    b = scores.shape[0]
    flat = scores.detach().reshape(b, -1).abs()
    vals, order = torch.sort(flat, dim=1, descending=True, stable=True)
    # float64 prefix sums: the cut must not move with the rounding of long float32 sums.
    cum = vals.cumsum(1, dtype=torch.float64)
    total = cum[:, -1:]
    # An element (in sorted order) is salient iff the mass before it still falls short of the goal: exactly the
    # shortest prefix that reaches fraction·total, and nothing for an all-zero row (0 < 0 is false).
    before = F.pad(cum[:, :-1], (1, 0))
    keep = before < fraction * total
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, keep)
    total = total.squeeze(1)
    return mask.view(scores.shape), total <= 0, ~torch.isfinite(total)


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Target = "label") -> torch.Tensor:
    """∂ CE(model(x), t) / ∂x per sample, t the true label or the predicted class; model weights get no grads."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        t = y if target == "label" else logits.argmax(1)
        # Summed, not averaged: each sample's gradient is then independent of the batch size.
        loss = F.cross_entropy(logits.float(), t, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


class SyntheticMasks:
    """Iterable of `(start, masks)` over a dataset in index order; `masks` bool [B, C, H, W] on the device.

    `rows=(start, stop)` limits it to those items. Batches still follow the whole dataset's grid (multiples of
    `batch_size`), cut to the rows afterwards: an image is always computed in the same batch, so its mask does
    not depend on `rows` even where kernels round differently for other batch shapes.
    `stats["zero_gradient"]` counts images (of `rows`) whose gradient was all zero (they get empty masks).
    """

    def __init__(self, model: nn.Module, dataset: ImageDataset, *, fraction: float, target: Target,
                 batch_size: int, device: torch.device, num_workers: int = 0, progress: bool = True,
                 rows: Optional[tuple[int, int]] = None):
        n = len(dataset)
        lo, hi = rows if rows is not None else (0, n)
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"rows must satisfy 0 <= start <= stop <= {n}, got {rows}")
        self.rows = (int(lo), int(hi))
        if target not in ("label", "predicted"):
            raise ValueError(f"target must be 'label' or 'predicted', got {target!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.model, self.dataset = model, dataset
        self.fraction, self.target, self.batch_size = fraction, target, batch_size
        self.device, self.num_workers, self.progress = device, num_workers, progress
        self.stats: dict[str, int] = {"zero_gradient": 0}

    def _to_device(self, batch):
        if batch is None:
            return None
        x, y, idx = batch
        if self.device.type == "cuda":  # a pageable copy would block the host until the device caught up
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        lo, hi = self.rows
        n = hi - lo
        bs = self.batch_size
        # The global batches that overlap the rows (see the class docstring); none at all for empty rows.
        first, last = lo - lo % bs, min(len(self.dataset), -(-hi // bs) * bs)
        # BatchIterator would pin its uint8 batch and then convert it; `_to_device` pins the float batch instead.
        batches = BatchIterator(self.dataset, np.arange(first, last), bs, shuffle=False,
                                num_workers=self.num_workers) if n else ()
        was_training = self.model.training
        self.model.eval()
        # Counted on the device (all-zero, non-finite): a per-batch host sync would stall it between batches.
        flags = torch.zeros(2, dtype=torch.long, device=self.device)
        bar = tqdm(total=n, desc="synthetic masks", unit="img", disable=not self.progress, leave=False)
        it = iter(batches)
        try:
            current = self._to_device(next(it, None))
            while current is not None:
                x, y, idx = current
                grad = input_gradients(self.model, x, y, self.target)
                mask, zero, nonfinite = salient_set_async(grad, self.fraction)
                start = int(idx[0])
                a, b = max(0, lo - start), min(len(idx), hi - start)  # the part of this batch within the rows
                if (a, b) != (0, len(idx)):
                    mask, zero, nonfinite = mask[a:b], zero[a:b], nonfinite[a:b]
                flags += torch.stack([zero, nonfinite]).sum(1)
                # Fetch the next batch while the device works on this one.
                current = self._to_device(next(it, None))
                bar.update(b - a)
                yield start + a, mask
        finally:
            bar.close()
            self.model.train(was_training)
        n_zero, n_bad = flags.tolist()
        self.stats["zero_gradient"] = n_zero
        if n_bad:
            raise CheckpointError(f"{n_bad} of {n} images have a non-finite input gradient (NaN or inf): is the "
                             f"teacher checkpoint broken?")
        if self.stats["zero_gradient"]:
            log.warning("%d of %d images had an all-zero input gradient (a saturated teacher?); their masks are "
                        "empty", self.stats["zero_gradient"], n)


def synthetic_masks(model: nn.Module, dataset: ImageDataset, *, fraction: float = 0.5, target: Target = "label",
                    batch_size: int = 256, device: torch.device | str = "cpu", num_workers: int = 0,
                    progress: bool = True, rows: Optional[tuple[int, int]] = None) -> SyntheticMasks:
    """Eq. 7–8 masks of every item of `dataset` (or of items `rows`) from `model` (in eval mode), in batches on
    `device`."""
    return SyntheticMasks(model, dataset, fraction=fraction, target=target, batch_size=batch_size,
                          device=torch.device(device), num_workers=num_workers, progress=progress, rows=rows)


def _load_teacher(checkpoint: Path, dataset: ImageDataset, device: torch.device, *, root, fraction: float,
                  target: Target, warn: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher on `device`, checked against `dataset`, and the attributes of a store made from it."""
    from pipeline.models import check_checkpoint_matches, load_checkpoint

    model, meta = load_checkpoint(checkpoint, device)
    if meta.get("role", "teacher") != "teacher":
        # SIP-S masks are the robust teacher's gradients (paper eq. 7); a student's would silently be others
        raise DatasetError(f"{checkpoint} is a {meta.get('role')} checkpoint (strategy {meta.get('strategy')}), not "
                           f"a teacher: synthetic masks come from the robust teacher (the teacher stage's "
                           f"data/teacher/model.pt)")
    check_checkpoint_matches(meta, dataset, checkpoint)
    if meta.get("num_classes") not in (None, dataset.num_classes):
        raise DatasetError(f"teacher {checkpoint} has {meta['num_classes']} classes but dataset {dataset.name!r} "
                           f"has {dataset.num_classes}: was it trained on another dataset?")
    if meta.get("image_shape") not in (None, list(dataset.image_shape)):
        raise DatasetError(f"teacher {checkpoint} was trained on {meta['image_shape']} images but the dataset "
                           f"gives {list(dataset.image_shape)}: check data.image_size")
    if warn and meta.get("dataset_fingerprint") not in (None, dataset.fingerprint()):
        log.warning("teacher %s was trained on %s (fingerprint %s), not on this %s/%s (%s)", checkpoint,
                    meta.get("dataset"), meta["dataset_fingerprint"], dataset.name, dataset.split,
                    dataset.fingerprint())
    attrs = {
        "kind": "synthetic",
        **dataset_attrs(dataset, root),
        "rule": SYNTHETIC_RULE,
        "params": {"fraction": fraction, "target": target, "loss": "cross_entropy"},
        "teacher": {"checkpoint": str(checkpoint), "sha256": sha256_file(checkpoint),
                    "arch": meta.get("arch"), "role": meta.get("role", "teacher"),
                    "strategy": meta.get("strategy"), "dataset": meta.get("dataset"),
                    "dataset_fingerprint": meta.get("dataset_fingerprint"),
                    # teacher.checkpoint: the file it was imported from (path, SHA-256, format), else None
                    "imported_from": meta.get("imported_from")},
    }
    return model, attrs


def extract_synthetic(checkpoint: str | Path, dataset: ImageDataset, out: str | Path, *,
                      root: Optional[str | Path] = None, fraction: float = 0.5, target: Target = "label",
                      batch_size: int = 256, chunk_size: int = 256, device: str | torch.device = "auto",
                      num_workers: int = 0, progress: bool = True,
                      distributed: Optional[bool] = None) -> dict[str, Any]:
    """Synthetic masks of `dataset` from the teacher at `checkpoint`, written to a new store at `out`.

    Under torchrun with WORLD_SIZE > 1, or inside an initialised process group of several processes, every
    process must call this: each extracts the items `chunk_ranges(n, chunk_size, world_size)[rank]` on its
    device (cuda:LOCAL_RANK on CUDA) and writes them into the one store, which comes out byte for byte as a
    single process writes it (`write_mask_store_distributed`). A group this call initialised is destroyed
    before it returns. `distributed=False` forces one process even then; every process gets the attributes.
    """
    from pipeline import distributed as D

    checkpoint = Path(checkpoint)
    if distributed is False:
        info = D.DistInfo(0, 1, 0, resolve_device(device) if isinstance(device, str) else device, False)
    else:
        info = D.init_from_env(device)  # WORLD_SIZE unset or 1: no group, the device resolved as always
    try:
        if not info.distributed:
            model, attrs = _load_teacher(checkpoint, dataset, info.device, root=root, fraction=fraction,
                                         target=target, warn=True)
            masks = synthetic_masks(model, dataset, fraction=fraction, target=target, batch_size=batch_size,
                                    device=info.device, num_workers=num_workers, progress=progress)
            return write_mask_store(out, masks, n=len(dataset), shape=dataset.image_shape, attrs=attrs,
                                    chunk_size=chunk_size)
        # A rank that cannot load the teacher must not leave the others waiting in a collective.
        error: Optional[Exception] = None
        try:
            model, attrs = _load_teacher(checkpoint, dataset, info.device, root=root, fraction=fraction,
                                         target=target, warn=info.is_main)
        except Exception as err:  # noqa: BLE001 - re-raised after the vote
            error = err
        if not D.all_ok(error is None):
            if error is not None:
                raise error
            raise MaskStoreError(f"{out}: not written: another process failed to load the teacher {checkpoint}")
        rows = chunk_ranges(len(dataset), chunk_size, info.world_size)[info.rank]
        masks = synthetic_masks(model, dataset, fraction=fraction, target=target, batch_size=batch_size,
                                device=info.device, num_workers=num_workers, progress=progress and info.is_main,
                                rows=rows)
        return write_mask_store_distributed(out, masks, n=len(dataset), shape=dataset.image_shape, attrs=attrs,
                                            chunk_size=chunk_size)
    finally:
        D.shutdown(info)
