"""Writing mask stores: one process, or several processes each writing a chunk-aligned range of rows into one
store (`write_mask_store_distributed`). The format and the reader are in `pipeline.maskstore`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from pipeline.core.errors import MaskStoreError
from pipeline.core.utils import atomic_path
from pipeline.maskstore import FORMAT, coverage_stats, integrity_problems, packed_to_host, packed_width, scan_chunks

log = logging.getLogger(__name__)


def _codec() -> BloscCodec:
    # Packed bytes are already dense bits: byte shuffling has nothing to regroup, so plain zstd.
    return BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle", typesize=1)


# Every chunk is written, all-zero ones too, so that a chunk file missing later is damage, never "empty masks".
_ARRAY_CONFIG = {"write_empty_chunks": True}


def _create(tmp: Path, n: int, shape: Sequence[int], chunk_size: int):
    width = packed_width(shape)
    return zarr.create_array(store=str(tmp), shape=(n, width), chunks=(max(1, min(chunk_size, n)), width),
                             dtype="uint8", compressors=[_codec()], fill_value=0, zarr_format=3,
                             overwrite=True, dimension_names=("sample", "packed_bits"), config=_ARRAY_CONFIG)


def _base_attrs(n: int, shape: Sequence[int], chunk_size: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "n": int(n),
        "image_shape": [int(s) for s in shape],
        "packing": {"layout": "row i = np.packbits(mask_i.reshape(-1)), C,H,W order", "bit_order": "big",
                    "width_bytes": packed_width(shape), "chunk_size": int(max(1, min(chunk_size, n))),
                    "codec": "blosc-zstd-5"},
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


def _final_attrs(tmp: Path, n: int, shape: tuple[int, ...], chunk: int, attrs: dict[str, Any], cover: np.ndarray,
                 stats: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The attributes of a finished store, after reading it back: its totals are what `MaskStore.open` checks."""
    final = {**_base_attrs(n, shape, chunk), "available": True, **attrs, "coverage": coverage_stats(cover)}
    if stats:
        final["counts"] = {**final.get("counts", {}), **dict(stats)}
    report, _ = scan_chunks(tmp, zarr.open_array(str(tmp), mode="r"))
    final["totals"] = {"empty_masks": report["empty_masks"], "salient_elements": report["salient_elements"],
                       "chunk_digests": report["chunk_digests"]}
    problems = integrity_problems(report, final)
    if problems:
        raise MaskStoreError(f"{tmp}: the store read back differs from what was written: {'; '.join(problems)}")
    return final


def _log_written(path, n: int, shape: Sequence[int], final: dict[str, Any]) -> None:
    log.info("wrote %s: %d masks of %s, mean salient fraction %.3f", path, n, "×".join(map(str, shape)),
             final["coverage"].get("mean", float("nan")))


def write_mask_store(path: str | Path, batches: Iterable[tuple[int, torch.Tensor]], *, n: int,
                     shape: Sequence[int], attrs: dict[str, Any], chunk_size: int = 256) -> dict[str, Any]:
    """Write masks for items 0..n-1 to a new store at `path`; returns the attributes written.

    `batches` yields `(start, masks)` in order, `masks` a bool tensor [B, *shape] on any device; it is packed
    there, so only the packed bits cross to the host. If `batches` has a `stats` mapping (as the extractors in
    `pipeline.synthetic_masks` and `pipeline.human_masks` do), it is read after the last batch and stored as attrs["counts"]. Nothing exists at
    `path` unless every item was written.
    """
    shape = tuple(int(s) for s in shape)
    chunk = max(1, min(chunk_size, n))
    with atomic_path(path, is_dir=True) as tmp:
        arr = _create(tmp, n, shape, chunk)
        cover = _write_rows(arr, batches, rows=(0, n), chunk=chunk, shape=shape, where=str(path))
        final = _final_attrs(tmp, n, shape, chunk, attrs, cover, getattr(batches, "stats", None))
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
    result is the store `write_mask_store` writes, byte for byte. On a failure anywhere every rank raises (the failing rank its own error) and nothing exists at `path`. Returns the
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
            final = _final_attrs(tmp, n, shape, chunk, attrs, cover, stats)
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
        arr = zarr.open_array(where, mode="r+").with_config(_ARRAY_CONFIG)
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
        final = {**_base_attrs(0, shape, 1), **attrs, "available": False, "reason": reason,
                 "totals": {"empty_masks": 0, "salient_elements": 0}}
        arr.attrs.update(final)
    log.warning("wrote %s without masks: %s", path, reason)
    return final
