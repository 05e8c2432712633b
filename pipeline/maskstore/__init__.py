"""Mask stores: the salience masks of a dataset split, bit-packed in one Zarr v3 array, read by sample index.

Layout: the store's root is a single uint8 array of shape (N, ceil(C·H·W / 8)). Row i is the C×H×W bool mask of
dataset item i, flattened in C, H, W order and packed like `np.packbits` (first element in the most significant
bit). It is chunked along N and zstd-compressed; provenance lives in the array's attributes. A store is written
under a temporary name and renamed when complete, so a half-written store never exists at its final path.
Several processes can write one store together, each a chunk-aligned range of rows
(`write_mask_store_distributed`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import zarr

from pipeline.core.errors import MaskStoreError  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

FORMAT = "sipat-masks-v1"
DEFAULT_MEMORY_LIMIT = 1 << 30  # packed bytes up to which a store is held in (device) memory
KINDS = ("synthetic", "human")
PERCENTILES = (5, 25, 50, 75, 95)




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


_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.int64)


def _chunk_key(arr, i: int) -> str:
    return arr.metadata.encode_chunk_key((i, 0))


def chunk_digest(rows: np.ndarray) -> str:
    """Digest of one chunk's decoded rows: recorded at write time, so that chunks swapped or replaced by
    another store's (valid, decodable) chunks are told apart from the ones written there."""
    return hashlib.blake2b(np.ascontiguousarray(rows).tobytes(), digest_size=8).hexdigest()


def scan_chunks(path: Path, arr, *, keep: bool = False) -> tuple[dict[str, Any], Optional[np.ndarray]]:
    """Read every chunk of a store once.

    Returns a report (`missing` and `corrupt` chunk keys, and over the readable chunks the `empty_masks` and
    `salient_elements` totals) and, with `keep`, the packed array itself. A chunk file that is absent would
    read back as zeros (Zarr's fill value), so presence is checked on disk rather than through Zarr.
    """
    n, width = (int(s) for s in arr.shape)
    rows_per = int(arr.chunks[0])
    out = np.zeros((n, width), dtype=np.uint8) if keep else None
    missing: list[str] = []
    corrupt: list[str] = []
    digests: list[Optional[str]] = []
    empty = salient = 0
    for i in range(-(-n // rows_per) if n else 0):
        key = _chunk_key(arr, i)
        lo, hi = i * rows_per, min(n, (i + 1) * rows_per)
        if not (path / key).is_file():
            missing.append(key)
            digests.append(None)
            continue
        try:
            rows = np.asarray(arr[lo:hi])
        except Exception as err:  # noqa: BLE001 - codecs raise several types for damaged bytes
            corrupt.append(f"{key} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
            digests.append(None)
            continue
        digests.append(chunk_digest(rows))
        empty += int((rows == 0).all(axis=1).sum())  # padding bits are always zero
        salient += int(_POPCOUNT[rows].sum())
        if out is not None:
            out[lo:hi] = rows
    report = {"chunks": -(-n // rows_per) if n else 0, "missing": missing, "corrupt": corrupt,
              "empty_masks": empty, "salient_elements": salient, "chunk_digests": digests,
              "chunk_keys": [_chunk_key(arr, i) for i in range(len(digests))]}
    return report, out


def integrity_problems(report: dict[str, Any], attrs: dict[str, Any]) -> list[str]:
    """What is wrong with a store, from `scan_chunks`'s report and the totals the writer recorded."""
    problems = []

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    if report["missing"]:
        problems.append(f"{len(report['missing'])} of {report['chunks']} chunk(s) missing: {listed(report['missing'])}")
    if report["corrupt"]:
        problems.append(f"{len(report['corrupt'])} of {report['chunks']} chunk(s) cannot be decoded: "
                        f"{listed(report['corrupt'])}")
    if problems:
        return problems
    totals = attrs.get("totals")
    needed = ("chunk_digests", "salient_elements", "empty_masks")
    if attrs.get("available") is False:
        return problems  # a store that says it holds no masks is refused when opened, by its reason
    if not isinstance(totals, dict) or any(k not in totals for k in needed):
        # without its record nothing can tell a swapped or replaced chunk: the store is not to be trusted
        lost = needed if not isinstance(totals, dict) else [k for k in needed if k not in totals]
        return problems + [f"its integrity record is missing (attribute totals: {', '.join(lost)}), so swapped or "
                           f"replaced chunks cannot be detected; write the store again"]
    recorded_empty = totals.get("empty_masks")
    if recorded_empty is not None and int(recorded_empty) != report["empty_masks"]:
        problems.append(f"{report['empty_masks']} empty masks, but the store recorded {recorded_empty} when written")
    if "salient_elements" in totals and int(totals["salient_elements"]) != report["salient_elements"]:
        problems.append(f"{report['salient_elements']} salient elements, but the store recorded "
                        f"{totals['salient_elements']} when written")
    recorded = totals.get("chunk_digests")
    if recorded is not None:
        if len(recorded) != len(report["chunk_digests"]):
            problems.append(f"{len(report['chunk_digests'])} chunks, but the store recorded {len(recorded)}")
        else:
            arr_keys = report.get("chunk_keys") or [str(i) for i in range(len(recorded))]
            changed = [arr_keys[i] for i, (a, b) in enumerate(zip(recorded, report["chunk_digests"])) if a != b]
            if changed:
                problems.append(f"{len(changed)} of {report['chunks']} chunk(s) hold other masks than were written "
                                f"there (swapped, or copied from another store): {listed(changed)}")
    return problems


def store_digest(path: str | Path) -> str:
    """A digest of a store's content: its zarr.json, which records every chunk's digest and the totals."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        raise MaskStoreError(f"mask store {path} does not exist (create it with `dvc repro` or `sipat masks ...`)")
    return hashlib.sha256(meta.read_bytes()).hexdigest()


def verify_store(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Read a whole store and compare it with its own record: (scan report, problems; empty when sound)."""
    path = Path(path)
    arr, attrs = _open_array(path)
    report, _ = scan_chunks(path, arr)
    return report, integrity_problems(report, attrs)


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
        ("image size", attrs.get("image_size"), int(dataset.image_size)),
        ("image shape", attrs.get("image_shape"), list(dataset.image_shape)),
        ("number of items", attrs.get("n"), len(dataset)),
    ):
        if have != want:
            diffs.append(f"{key}: store has {have}, dataset has {want}")
    if attrs.get("fingerprint") != dataset.fingerprint():
        diffs.append(f"fingerprint of sample order (ids + labels): store has {attrs.get('fingerprint')}, dataset "
                     f"has {dataset.fingerprint()}")
    teacher = attrs.get("teacher")
    if isinstance(teacher, dict) and teacher.get("dataset_fingerprint") not in (None, dataset.fingerprint()):
        diffs.append(f"teacher trained on {teacher.get('dataset')} (fingerprint {teacher.get('dataset_fingerprint')}),"
                     f" not on {dataset.name}/{dataset.split} ({dataset.fingerprint()})")
    return diffs


class MaskStore:
    """Read-only access to a mask store by dataset index; open once with `MaskStore.open`."""

    def __init__(self, path: Path, array, attrs: dict[str, Any], device: torch.device, memory_limit: int,
                 verify: bool = True):
        self.path = path
        self.attrs = attrs
        self.device = device
        self.image_shape = tuple(int(s) for s in attrs["image_shape"])
        self._array = array
        self._packed: Optional[torch.Tensor] = None
        keep = array.nbytes <= memory_limit
        packed = None
        if verify:  # one pass over every chunk, which also loads a store that fits in memory
            report, packed = scan_chunks(path, array, keep=keep)
            problems = integrity_problems(report, attrs)
            if problems:
                raise MaskStoreError(f"mask store {path} is damaged ({'; '.join(problems)}); regenerate it "
                                     f"(dvc repro, or sipat masks ...)")
        elif keep:
            packed = np.asarray(array[:])
        if packed is not None:
            self._packed = torch.from_numpy(np.ascontiguousarray(packed)).to(device)

    @classmethod
    def open(cls, path: str | Path, dataset=None, device: torch.device | str = "cpu", kind: Optional[str] = None,
             memory_limit: int = DEFAULT_MEMORY_LIMIT, *, verify: bool = True,
             expect: Optional[dict[str, Any]] = None) -> "MaskStore":
        """Open a store, refusing one that holds no masks, is of another `kind`, does not match `dataset` (its
        sample order, image size, and for synthetic masks the teacher's training data), or differs from `expect`.

        `expect` may name `teacher_sha256` (the checkpoint the masks must come from). With `verify` every chunk
        is read once and must be present, decodable and agree with the totals recorded at write time. When the
        packed array is at most `memory_limit` bytes it is loaded onto `device` at once; otherwise chunks are
        read as batches ask for them.
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
        unknown = set(expect or {}) - {"teacher_sha256"}
        if unknown:
            raise ValueError(f"MaskStore.open: unknown expectation(s) {sorted(unknown)}")
        want_teacher = (expect or {}).get("teacher_sha256")
        have_teacher = (attrs.get("teacher") or {}).get("sha256")
        if want_teacher is not None and have_teacher != want_teacher:
            raise MaskStoreError(f"mask store {path} was made from teacher {have_teacher}, not from this run's teacher "
                                 f"{want_teacher}; regenerate it")
        return cls(path, arr, attrs, torch.device(device), memory_limit, verify=verify)

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


def dataset_attrs(dataset, root: Optional[str | Path] = None) -> dict[str, Any]:
    """What a store records about its dataset: enough to reload its images and to refuse another dataset."""
    root = root if root is not None else getattr(dataset, "root", None)
    return {"dataset": dataset.name, "split": dataset.split, "root": None if root is None else str(root),
            "image_size": int(dataset.image_size), "image_shape": list(dataset.image_shape), "n": len(dataset),
            "num_classes": int(dataset.num_classes), "fingerprint": dataset.fingerprint()}


def parse_store_args(items: Sequence[str]) -> dict[str, str]:
    """`--masks KIND=PATH` arguments as {kind: path}; a malformed one is a ConfigError naming it."""
    from pipeline.core.errors import ConfigError

    stores = {}
    for item in items:
        kind, sep, path = item.partition("=")
        if not sep or not kind or not path:
            raise ConfigError(f"--masks expects KIND=PATH (e.g. synthetic=data/masks/synthetic.zarr), got {item!r}")
        stores[kind] = path
    return stores
