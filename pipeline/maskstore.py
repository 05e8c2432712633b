"""Mask stores: the salience masks of a dataset split, bit-packed in one Zarr v3 array, read by sample index.

Layout: the store's root is a single uint8 array of shape (N, ceil(C·H·W / 8)). Row i is the C×H×W bool mask of
dataset item i, flattened in C, H, W order and packed like `np.packbits` (first element in the most significant
bit). It is chunked along N and zstd-compressed; provenance lives in the array's attributes. A store is written
under a temporary name and renamed when complete, so a half-written store never exists at its final path.
Several processes can write one store together, each a chunk-aligned range of rows
(`write_mask_store_distributed`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from pipeline.utils import atomic_path

log = logging.getLogger(__name__)

FORMAT = "sipat-masks-v1"
DEFAULT_MEMORY_LIMIT = 1 << 30  # packed bytes up to which a store is held in (device) memory
KINDS = ("synthetic", "human")
PERCENTILES = (5, 25, 50, 75, 95)


from pipeline.errors import MaskStoreError  # noqa: E402,F401  (re-exported)


# --------------------------------------------------------------------------------------------------- packing

def packed_width(shape: Sequence[int]) -> int:
    """Bytes per packed mask of an image of shape C×H×W."""
    return -(-int(np.prod(shape)) // 8)


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Bool [B, ...] -> uint8 [B, ceil(D/8)] on the same device, bit for bit what `np.packbits(axis=1)` gives."""
    b = masks.shape[0]
    flat = masks.reshape(b, int(np.prod(masks.shape[1:]))).contiguous().view(torch.uint8)  # no copy: bool is 0/1
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return (flat.view(b, flat.shape[1] // 8, 8) << _shifts(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_masks(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """uint8 [B, W] -> bool [B, *shape] on the same device (inverse of `pack_masks`)."""
    b = packed.shape[0]
    d = int(np.prod(shape))
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    return bits.view(b, packed.shape[1] * 8)[:, :d].reshape(b, *shape).bool()


def _recorded_event(device: torch.device):
    ev = torch.cuda.Event() if device.type == "cuda" else torch.Event(device=device)
    ev.record()
    return ev


def packed_to_host(batches: Iterable[tuple[int, torch.Tensor]], shape: Sequence[int], *, where: str = "masks"
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """`(start, bool masks)` on any device -> `(start, packed uint8 rows, salient fraction per row)` on the host.

    Masks are packed where they are, so only the bits cross to the host. On an accelerator the copy is
    asynchronous and results come one batch late: the device computes batch t while the host stores t-1.
    """
    shape = tuple(int(s) for s in shape)
    d = int(np.prod(shape))
    pending = None
    for start, masks in batches:
        if masks.dtype != torch.bool or tuple(masks.shape[1:]) != shape:
            raise MaskStoreError(f"{where}: expected bool masks [B, {', '.join(map(str, shape))}], got "
                                 f"{masks.dtype} {list(masks.shape)}")
        b = masks.shape[0]
        if b == 0:
            continue
        packed = pack_masks(masks)
        frac = masks.reshape(b, d).mean(1, dtype=torch.float32)
        if masks.device.type == "cpu":
            yield start, packed.numpy(), frac.numpy()
            continue
        # One transfer per batch: the fractions' bytes ride behind the packed bits.
        both = torch.cat([packed, frac.view(torch.uint8).view(b, 4)], 1).to("cpu", non_blocking=True)
        current = (start, both, _recorded_event(masks.device))
        if pending is not None:
            yield _split_host(*pending)
        pending = current
    if pending is not None:
        yield _split_host(*pending)


def _split_host(start: int, both: torch.Tensor, event) -> tuple[int, np.ndarray, np.ndarray]:
    event.synchronize()
    arr = both.numpy()
    return start, arr[:, :-4], np.ascontiguousarray(arr[:, -4:]).view(np.float32).reshape(-1)


def coverage_stats(fractions: np.ndarray) -> dict[str, Any]:
    """Mean, extremes and percentiles of the per-image salient fraction, plus the number of empty masks."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.size == 0:
        return {"n": 0}
    out: dict[str, Any] = {"n": int(f.size), "mean": float(f.mean()), "min": float(f.min()), "max": float(f.max())}
    for p, v in zip(PERCENTILES, np.percentile(f, PERCENTILES)):
        out[f"p{p}"] = float(v)
    out["empty"] = int((f == 0).sum())
    return out


# --------------------------------------------------------------------------------------------------- writing

def _codec() -> BloscCodec:
    # Packed bytes are already dense bits: byte shuffling has nothing to regroup, so plain zstd.
    return BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle", typesize=1)


def _create(tmp: Path, n: int, shape: Sequence[int], chunk_size: int):
    width = packed_width(shape)
    return zarr.create_array(store=str(tmp), shape=(n, width), chunks=(max(1, min(chunk_size, n)), width),
                             dtype="uint8", compressors=[_codec()], fill_value=0, zarr_format=3,
                             overwrite=True, dimension_names=("sample", "packed_bits"))


def _base_attrs(n: int, shape: Sequence[int], chunk_size: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "n": int(n),
        "image_shape": [int(s) for s in shape],
        "packing": {"layout": "row i = np.packbits(mask_i.reshape(-1)), C,H,W order", "bit_order": "big",
                    "width_bytes": packed_width(shape), "chunk_size": int(max(1, min(chunk_size, n))),
                    "codec": "blosc-zstd-5"},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def chunk_ranges(n: int, chunk_size: int, world_size: int) -> list[tuple[int, int]]:
    """Rows `[start, stop)` of each of `world_size` writers: consecutive, disjoint, covering 0..n, and cut only
    at chunk boundaries of a store with this `chunk_size`, so that no two writers touch the same Zarr chunk.

    Chunks are dealt out as evenly as possible (earlier ranks take the spare ones); a rank left without a chunk
    gets an empty range at n.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    chunk = max(1, min(chunk_size, n))
    n_chunks = -(-n // chunk)
    per, spare = divmod(n_chunks, world_size)
    bounds = [min(n, chunk * (r * per + min(r, spare))) for r in range(world_size + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _write_rows(arr, batches: Iterable[tuple[int, torch.Tensor]], *, rows: tuple[int, int], chunk: int,
                shape: tuple[int, ...], where: str) -> np.ndarray:
    """Write items rows[0]..rows[1]-1 (rows[0] on a chunk boundary) to `arr`; returns their salient fractions."""
    lo, hi = rows
    n = arr.shape[0]
    buf = np.zeros((chunk, packed_width(shape)), dtype=np.uint8)
    filled, written, expect = 0, lo, lo
    cover = np.zeros(hi - lo, dtype=np.float32)
    for start, packed, frac in packed_to_host(batches, shape, where=where):
        b = packed.shape[0]
        if start != expect:
            raise MaskStoreError(f"{where}: batch starts at item {start}, expected {expect} (batches must be "
                                 f"in index order)")
        if start + b > hi:
            limit = f"n={n}" if hi == n else f"item {hi - 1} (this writer's rows are {lo}..{hi - 1})"
            raise MaskStoreError(f"{where}: got masks for items beyond {limit}")
        cover[start - lo:start - lo + b] = frac
        pos = 0
        while pos < b:  # whole chunks only: zarr then never re-reads and re-encodes a chunk
            take = min(chunk - filled, b - pos)
            buf[filled:filled + take] = packed[pos:pos + take]
            filled += take
            pos += take
            if filled == chunk:
                arr[written:written + chunk] = buf
                written += chunk
                filled = 0
        expect += b
    if expect != hi:
        raise MaskStoreError(f"{where}: got masks for {expect - lo} items, expected {hi - lo}")
    if filled:
        arr[written:written + filled] = buf[:filled]
    return cover


def _final_attrs(n: int, shape: tuple[int, ...], chunk: int, attrs: dict[str, Any], cover: np.ndarray,
                 stats: Optional[dict[str, Any]]) -> dict[str, Any]:
    final = {**_base_attrs(n, shape, chunk), "available": True, **attrs, "coverage": coverage_stats(cover)}
    if stats:
        final["counts"] = {**final.get("counts", {}), **dict(stats)}
    return final


def _log_written(path, n: int, shape: Sequence[int], final: dict[str, Any]) -> None:
    log.info("wrote %s: %d masks of %s, mean salient fraction %.3f", path, n, "×".join(map(str, shape)),
             final["coverage"].get("mean", float("nan")))


def write_mask_store(path: str | Path, batches: Iterable[tuple[int, torch.Tensor]], *, n: int,
                     shape: Sequence[int], attrs: dict[str, Any], chunk_size: int = 256) -> dict[str, Any]:
    """Write masks for items 0..n-1 to a new store at `path`; returns the attributes written.

    `batches` yields `(start, masks)` in order, `masks` a bool tensor [B, *shape] on any device; it is packed
    there, so only the packed bits cross to the host. If `batches` has a `stats` mapping (as the extractors in
    `pipeline.salience` do), it is read after the last batch and stored as attrs["counts"]. Nothing exists at
    `path` unless every item was written.
    """
    shape = tuple(int(s) for s in shape)
    chunk = max(1, min(chunk_size, n))
    with atomic_path(path, is_dir=True) as tmp:
        arr = _create(tmp, n, shape, chunk)
        cover = _write_rows(arr, batches, rows=(0, n), chunk=chunk, shape=shape, where=str(path))
        final = _final_attrs(n, shape, chunk, attrs, cover, getattr(batches, "stats", None))
        arr.attrs.update(final)
    _log_written(path, n, shape, final)
    return final


def write_mask_store_distributed(path: str | Path, batches: Iterable[tuple[int, torch.Tensor]], *, n: int,
                                 shape: Sequence[int], attrs: dict[str, Any], chunk_size: int = 256
                                 ) -> dict[str, Any]:
    """`write_mask_store` split over the processes of the initialised default process group (a collective).

    Rank r passes the masks of its rows `chunk_ranges(n, chunk_size, world_size)[r]` only. Rank 0 creates the
    array under a temporary name next to `path` (all ranks must see the same file system); every rank writes
    its whole chunks into it; rank 0 then gathers the salient fractions and `stats` counts (summed over ranks),
    writes the attributes and renames the store onto `path`, but only once every rank reported success. The
    result is the store `write_mask_store` writes, byte for byte, except the `created` time. On a failure
    anywhere every rank raises (the failing rank its own error) and nothing exists at `path`. Returns the
    attributes written, on every rank. Without a group of several processes this is `write_mask_store`.
    """
    from pipeline import distributed as D

    if not D.active():
        return write_mask_store(path, batches, n=n, shape=shape, attrs=attrs, chunk_size=chunk_size)
    shape = tuple(int(s) for s in shape)
    chunk = max(1, min(chunk_size, n))
    rank, world = D.rank(), D.world_size()
    rows = chunk_ranges(n, chunk, world)[rank]
    if rank != 0:
        _write_part(None, batches, n=n, shape=shape, chunk=chunk, rows=rows, path=path)
        outcome = D.broadcast_object(None)  # rank 0's rename (or its failure) decides for everyone
        if isinstance(outcome, str):
            raise MaskStoreError(outcome)
        return outcome
    done = False
    try:
        with atomic_path(path, is_dir=True) as tmp:
            stats, cover = _write_part(tmp, batches, n=n, shape=shape, chunk=chunk, rows=rows, path=path)
            done = True  # every collective up to the last one is behind us
            final = _final_attrs(n, shape, chunk, attrs, cover, stats)
            zarr.open_array(str(tmp), mode="r+").attrs.update(final)
    except Exception as err:
        if done:  # a rank-0 failure after the gather (attributes, rename): the others wait to hear of it
            D.broadcast_object(f"{path}: rank 0 failed to finish the store: {type(err).__name__}: {err}")
        raise
    D.broadcast_object(final)
    _log_written(path, n, shape, final)
    return final


def _write_part(tmp: Optional[Path], batches, *, n: int, shape: tuple[int, ...], chunk: int,
                rows: tuple[int, int], path) -> tuple[Optional[dict[str, Any]], Optional[np.ndarray]]:
    """The collective steps of `write_mask_store_distributed` up to the gather; (stats, cover) on rank 0.

    Every rank runs the same collectives in the same order whatever fails, so that none is left waiting.
    """
    from pipeline import distributed as D

    rank = D.rank()
    # 1. Rank 0 creates the array; the others learn where it is, or that there is none.
    created: tuple[bool, str] = (False, "")
    if rank == 0:
        try:
            _create(tmp, n, shape, chunk)
            created = (True, str(tmp))
        except Exception as err:
            D.broadcast_object((False, f"{path}: rank 0 could not create the store: {err}"))
            raise
    ok, where = D.broadcast_object(created)
    if not ok:
        raise MaskStoreError(where)
    # 2. Every rank writes its rows; a failure is held back until all ranks have said how they did.
    error: Optional[Exception] = None
    cover = np.zeros(0, dtype=np.float32)
    try:
        if not Path(where).is_dir():
            raise MaskStoreError(f"{where} (created by rank 0) is not visible here: all processes must share "
                                 f"the file system of {path}")
        arr = zarr.open_array(where, mode="r+")
        cover = _write_rows(arr, batches, rows=rows, chunk=chunk, shape=shape, where=f"{path} (rank {rank})")
    except Exception as err:  # noqa: BLE001 - re-raised after the vote
        error = err
    if not D.all_ok(error is None):
        msg = None if error is None else f"rank {rank}: {type(error).__name__}: {error}"
        failed = [m for m in D.all_gather_objects(msg) if m]
        if error is not None:
            raise error
        raise MaskStoreError(f"{path}: not written, extraction failed on " + "; ".join(failed))
    # 3. Rank 0 gathers fractions and counts in rank order, which is item order.
    stats = getattr(batches, "stats", None)
    parts = D.gather_objects((cover, None if stats is None else dict(stats)))
    if parts is None:
        return None, None
    total: dict[str, Any] = {}
    for _, s in parts:
        for key, value in (s or {}).items():
            total[key] = total.get(key, 0) + value
    return total, np.concatenate([c for c, _ in parts])


def write_unavailable_store(path: str | Path, *, shape: Sequence[int], reason: str,
                            attrs: dict[str, Any]) -> dict[str, Any]:
    """Write a store that holds no masks and says why (e.g. human masks for a dataset without annotations)."""
    shape = tuple(int(s) for s in shape)
    with atomic_path(path, is_dir=True) as tmp:
        arr = _create(tmp, 0, shape, 1)
        final = {**_base_attrs(0, shape, 1), **attrs, "available": False, "reason": reason}
        arr.attrs.update(final)
    log.warning("wrote %s without masks: %s", path, reason)
    return final


# --------------------------------------------------------------------------------------------------- reading

def _open_array(path: Path):
    if not path.exists():
        raise MaskStoreError(f"mask store {path} does not exist (create it with `dvc repro` or `sipat masks ...`)")
    try:
        arr = zarr.open_array(str(path), mode="r")
    except Exception as err:  # noqa: BLE001 - zarr raises several types for a non-store
        raise MaskStoreError(f"{path} is not a readable Zarr mask store: {err}") from None
    attrs = dict(arr.attrs)
    if attrs.get("format") != FORMAT:
        raise MaskStoreError(f"{path}: not a mask store of this project (format {attrs.get('format')!r}, "
                             f"expected {FORMAT!r})")
    return arr, attrs


def read_store_attrs(path: str | Path) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Attributes and packed shape of a store, without any checks against a dataset."""
    arr, attrs = _open_array(Path(path))
    return attrs, tuple(arr.shape)


def store_disk_bytes(path: str | Path) -> int:
    """Total size of the files of a store on disk."""
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def _dataset_differences(attrs: dict[str, Any], dataset) -> list[str]:
    diffs = []
    for key, have, want in (
        ("dataset", attrs.get("dataset"), dataset.name),
        ("split", attrs.get("split"), dataset.split),
        ("image shape", attrs.get("image_shape"), list(dataset.image_shape)),
        ("number of items", attrs.get("n"), len(dataset)),
    ):
        if have != want:
            diffs.append(f"{key}: store has {have}, dataset has {want}")
    if attrs.get("fingerprint") != dataset.fingerprint():
        diffs.append(f"fingerprint of sample order (ids + labels): store has {attrs.get('fingerprint')}, dataset "
                     f"has {dataset.fingerprint()}")
    return diffs


class MaskStore:
    """Read-only access to a mask store by dataset index; open once with `MaskStore.open`."""

    def __init__(self, path: Path, array, attrs: dict[str, Any], device: torch.device, memory_limit: int):
        self.path = path
        self.attrs = attrs
        self.device = device
        self.image_shape = tuple(int(s) for s in attrs["image_shape"])
        self._array = array
        self._packed: Optional[torch.Tensor] = None
        if array.nbytes <= memory_limit:
            self._packed = torch.from_numpy(np.ascontiguousarray(array[:])).to(device)

    @classmethod
    def open(cls, path: str | Path, dataset=None, device: torch.device | str = "cpu", kind: Optional[str] = None,
             memory_limit: int = DEFAULT_MEMORY_LIMIT) -> "MaskStore":
        """Open a store, refusing one that holds no masks, is of another `kind`, or does not match `dataset`.

        When the packed array is at most `memory_limit` bytes it is loaded onto `device` at once; otherwise
        chunks are read as batches ask for them.
        """
        path = Path(path)
        arr, attrs = _open_array(path)
        if attrs.get("available") is False:
            raise MaskStoreError(f"mask store {path} holds no {attrs.get('kind', '')} masks: "
                                 f"{attrs.get('reason', 'no reason recorded')}")
        if kind is not None and attrs.get("kind") != kind:
            raise MaskStoreError(f"mask store {path} holds {attrs.get('kind')!r} masks, but {kind!r} masks are "
                                 f"needed")
        try:
            shape = tuple(int(s) for s in attrs["image_shape"])
            n = int(attrs["n"])
        except (KeyError, TypeError, ValueError):
            raise MaskStoreError(f"mask store {path}: attributes lack a valid n / image_shape") from None
        if tuple(arr.shape) != (n, packed_width(shape)):
            raise MaskStoreError(f"mask store {path}: array shape {tuple(arr.shape)} does not match n={n} and "
                                 f"image shape {shape} (expected {(n, packed_width(shape))})")
        if dataset is not None:
            diffs = _dataset_differences(attrs, dataset)
            if diffs:
                raise MaskStoreError(
                    f"mask store {path} was made for another dataset, split, image size or sample order than "
                    f"{dataset.name}/{dataset.split} at {dataset.image_size}px; regenerate it. Differences: "
                    + "; ".join(diffs))
        return cls(path, arr, attrs, torch.device(device), memory_limit)

    def __len__(self) -> int:
        return int(self.attrs["n"])

    @property
    def kind(self) -> str:
        return str(self.attrs.get("kind"))

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.image_shape)

    @property
    def in_memory(self) -> bool:
        return self._packed is not None

    def masks(self, index: torch.Tensor | Sequence[int] | np.ndarray) -> torch.Tensor:
        """Masks of dataset items `index` (1-D, CPU): bool [B, C, H, W] on the store's device."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"mask store {self.path}: index out of range [0, {len(self)}) "
                             f"(min {int(idx.min())}, max {int(idx.max())})")
        if self._packed is not None:
            packed = self._packed[idx.to(self.device, non_blocking=True)]
        else:
            # Orthogonal selection of sorted unique rows reads each needed chunk once.
            uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
            rows = np.asarray(self._array.oindex[uniq.numpy(), :])
            packed = torch.from_numpy(rows).to(self.device)[inverse.to(self.device)]
        return unpack_masks(packed, self.image_shape)

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        return self.masks(torch.tensor([i + len(self) if i < 0 else i]))[0]
