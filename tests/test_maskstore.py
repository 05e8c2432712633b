"""Mask store: bit packing, round trip by index, refusal of foreign stores, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.data import ImageDataset
from pipeline.maskstore import MaskStore, MaskStoreError, pack_masks, packed_width, read_store_attrs, unpack_masks
from pipeline.maskstore.writer import write_mask_store, write_unavailable_store


class FakeDataset(ImageDataset):
    """In-memory dataset: just what a store checks (name, split, ids, labels, geometry)."""

    def __init__(self, n: int = 10, size: int = 5, *, name: str = "fake", split: str = "train", order=None):
        self.name, self.split, self.image_size = name, split, size
        self.class_names = ["a", "b", "c"]
        order = list(range(n)) if order is None else list(order)
        self.ids = [f"img{i}" for i in order]
        self.labels = np.array([i % 3 for i in order], dtype=np.int64)
        self._cache = torch.zeros((n, 3, size, size), dtype=torch.uint8)

    def _load(self, i: int) -> torch.Tensor:
        return self._cache[i]


def random_masks(n: int, shape, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) < 0.3


def write(path, ds, masks, *, batch: int = 3, chunk: int = 4, kind: str = "synthetic", stats=None):
    class Batches:
        def __init__(self):
            self.stats = stats or {}

        def __iter__(self):
            for s in range(0, len(masks), batch):
                yield s, masks[s:s + batch]

    attrs = {"kind": kind, "dataset": ds.name, "split": ds.split, "image_size": ds.image_size,
             "fingerprint": ds.fingerprint(), "params": {"fraction": 0.5}}
    return write_mask_store(path, Batches(), n=len(ds), shape=ds.image_shape, attrs=attrs, chunk_size=chunk)


def test_pack_unpack_matches_numpy_packbits():
    shape = (3, 5, 5)  # 75 elements: not a multiple of 8
    m = random_masks(7, shape)
    packed = pack_masks(m)
    assert packed.dtype == torch.uint8 and packed.shape == (7, packed_width(shape)) == (7, 10)
    assert np.array_equal(packed.numpy(), np.packbits(m.reshape(7, -1).numpy(), axis=1))
    assert torch.equal(unpack_masks(packed, shape), m)


@pytest.mark.parametrize("memory_limit", [1 << 30, 0])  # in memory / lazy chunk reads
def test_round_trip_by_index(tmp_path, memory_limit):
    ds = FakeDataset(10)
    masks = random_masks(10, ds.image_shape)
    write(tmp_path / "m.zarr", ds, masks, stats={"zero_gradient": 2})
    store = MaskStore.open(tmp_path / "m.zarr", dataset=ds, kind="synthetic", memory_limit=memory_limit)
    assert store.in_memory == (memory_limit > 0)
    assert len(store) == 10 and store.shape == (10, 3, 5, 5)
    idx = torch.tensor([9, 0, 4, 4, 7, 3])  # unsorted, repeated, across chunks
    got = store.masks(idx)
    assert got.dtype == torch.bool and got.device.type == "cpu"
    assert torch.equal(got, masks[idx])
    assert torch.equal(store[5], masks[5]) and torch.equal(store[-1], masks[9])
    assert store.masks(torch.tensor([], dtype=torch.long)).shape == (0, 3, 5, 5)
    with pytest.raises(IndexError):
        store.masks(torch.tensor([10]))
    assert store.attrs["counts"] == {"zero_gradient": 2}


def test_attrs_record_coverage_and_layout(tmp_path):
    ds = FakeDataset(10)
    masks = random_masks(10, ds.image_shape, seed=3)
    write(tmp_path / "m.zarr", ds, masks)
    attrs, packed_shape = read_store_attrs(tmp_path / "m.zarr")
    assert packed_shape == (10, 10)
    frac = masks.reshape(10, -1).float().mean(1).numpy()
    cov = attrs["coverage"]
    assert cov["mean"] == pytest.approx(frac.mean(), abs=1e-6)
    assert cov["p50"] == pytest.approx(np.percentile(frac, 50), abs=1e-6)
    assert {"p5", "p25", "p75", "p95"} <= set(cov)
    assert attrs["kind"] == "synthetic" and attrs["available"] is True and attrs["n"] == 10
    assert attrs["image_shape"] == [3, 5, 5] and attrs["params"] == {"fraction": 0.5}
    meta = json.loads((tmp_path / "m.zarr" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["data_type"] == "uint8"
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 10]
    assert "zstd" in json.dumps(meta["codecs"])


@pytest.mark.parametrize("other,what", [
    (FakeDataset(10, order=[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]), "fingerprint of sample order"),  # another order
    (FakeDataset(10, size=6), r"image shape: store has \[3, 5, 5\], dataset has \[3, 6, 6\]"),
    (FakeDataset(9), "number of items: store has 10, dataset has 9"),
    (FakeDataset(10, split="test"), "split: store has train, dataset has test"),
    (FakeDataset(10, name="other"), "dataset: store has fake, dataset has other"),
])
def test_refuses_a_store_made_for_another_dataset(tmp_path, other, what):
    ds = FakeDataset(10)
    write(tmp_path / "m.zarr", ds, random_masks(10, ds.image_shape))
    with pytest.raises(MaskStoreError, match=what) as err:
        MaskStore.open(tmp_path / "m.zarr", dataset=other)
    assert str(tmp_path / "m.zarr") in str(err.value)


def test_refuses_wrong_kind_unavailable_and_non_stores(tmp_path):
    ds = FakeDataset(10)
    write(tmp_path / "h.zarr", ds, random_masks(10, ds.image_shape), kind="human")
    with pytest.raises(MaskStoreError, match="'human' masks, but 'synthetic'"):
        MaskStore.open(tmp_path / "h.zarr", dataset=ds, kind="synthetic")
    write_unavailable_store(tmp_path / "none.zarr", shape=ds.image_shape, reason="CIFAR has no segmentations",
                            attrs={"kind": "human", "dataset": ds.name})
    attrs, shape = read_store_attrs(tmp_path / "none.zarr")
    assert attrs["available"] is False and shape == (0, 10)
    with pytest.raises(MaskStoreError, match="holds no human masks: CIFAR has no segmentations"):
        MaskStore.open(tmp_path / "none.zarr", dataset=ds, kind="human")
    with pytest.raises(MaskStoreError, match="does not exist"):
        MaskStore.open(tmp_path / "absent.zarr")
    (tmp_path / "junk").mkdir()
    with pytest.raises(MaskStoreError, match="junk"):
        MaskStore.open(tmp_path / "junk")


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if name in p.name)


def test_interrupted_write_leaves_nothing(tmp_path):
    ds = FakeDataset(10)
    masks = random_masks(10, ds.image_shape)

    def crashing():
        yield 0, masks[:4]
        yield 4, masks[4:8]  # a whole chunk is on disk by now
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_mask_store(tmp_path / "m.zarr", crashing(), n=10, shape=ds.image_shape, attrs={}, chunk_size=4)
    assert _leftovers(tmp_path, "m.zarr") == []

    with pytest.raises(MaskStoreError, match="got masks for 4 items, expected 10"):
        write_mask_store(tmp_path / "m.zarr", iter([(0, masks[:4])]), n=10, shape=ds.image_shape, attrs={})
    assert _leftovers(tmp_path, "m.zarr") == []


def test_failed_rewrite_keeps_the_previous_store(tmp_path):
    ds = FakeDataset(10)
    masks = random_masks(10, ds.image_shape)
    write(tmp_path / "m.zarr", ds, masks)
    with pytest.raises(MaskStoreError, match="expected 4"):  # out-of-order batches are rejected
        write_mask_store(tmp_path / "m.zarr", iter([(0, masks[:4]), (5, masks[5:])]), n=10,
                         shape=ds.image_shape, attrs={})
    assert _leftovers(tmp_path, "m.zarr") == ["m.zarr"]
    assert torch.equal(MaskStore.open(tmp_path / "m.zarr", dataset=ds).masks(torch.arange(10)), masks)


def test_rejects_masks_of_the_wrong_shape(tmp_path):
    with pytest.raises(MaskStoreError, match="expected bool masks"):
        write_mask_store(tmp_path / "m.zarr", iter([(0, torch.zeros(2, 3, 4, 4, dtype=torch.bool))]), n=2,
                         shape=(3, 5, 5), attrs={})
    assert not (tmp_path / "m.zarr").exists()


def test_store_arguments_are_parsed_and_a_bad_one_is_named():
    from pipeline.core.errors import ConfigError
    from pipeline.maskstore import parse_store_args

    assert parse_store_args(["synthetic=a.zarr", "human=b=c.zarr"]) == {"synthetic": "a.zarr", "human": "b=c.zarr"}
    for bad in ("synthetic", "=a.zarr", "human="):
        with pytest.raises(ConfigError, match=f"got {bad!r}"):
            parse_store_args([bad])
