import numpy as np
import pytest
import torch

from pipeline.data import BatchIterator, DatasetError, load_dataset, train_val_split
from tests.conftest import make_cifar_tree, make_cub_tree


def test_cub_loader_reads_the_released_layout(cub_root):
    train = load_dataset("cub", str(cub_root), "train", 16)
    test = load_dataset("cub", str(cub_root), "test", 16)
    assert (len(train), len(test)) == (9, 3)  # 3 classes x (3 train + 1 test)
    x, y, i = train[1]  # image id 2 is grayscale on disk
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grayscale -> 3 equal channels
    assert (y, i) == (0, 1)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train.class_names[2] == "003.Bird_2"
    assert train.has_segmentations
    assert train.segmentation_path(0).suffix == ".png" and train.segmentation_path(0).is_file()
    assert train.fingerprint() != test.fingerprint()
    assert load_dataset("cub", str(cub_root), "train", 16).fingerprint() == train.fingerprint()
    assert load_dataset("cub", str(cub_root), "train", 12).fingerprint() != train.fingerprint()


def test_cub_errors_name_what_is_missing(tmp_path, cub_root):
    with pytest.raises(DatasetError, match="does not exist.*vision.caltech.edu"):
        load_dataset("cub", str(tmp_path / "nowhere"), "train", 16)
    with pytest.raises(DatasetError, match="data.root"):
        load_dataset("cub", None, "train", 16)
    (cub_root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="classes.txt"):
        load_dataset("cub", str(cub_root), "train", 16)


def test_cub_missing_image_and_bad_line(tmp_path):
    root = make_cub_tree(tmp_path / "c")
    ds = load_dataset("cub", str(root), "train", 16)
    victim = root / "images" / ds.relpaths[4]
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"\[4\].*{victim.name}"):
        ds[4]
    (root / "image_class_labels.txt").write_text("1 1\n2\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt:2"):
        load_dataset("cub", str(root), "train", 16)


@pytest.mark.parametrize("name, n_cls", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickle_layout(tmp_path, name, n_cls):
    root = make_cifar_tree(tmp_path, name)
    train = load_dataset(name, str(root), "train", 32)
    test = load_dataset(name, str(root), "test", 32)
    assert len(train) == (30 if name == "cifar10" else 6) and len(test) == 6
    assert train.num_classes == n_cls
    x, y, i = train[3]
    assert x.shape == (3, 32, 32) and 0 <= y < n_cls and i == 3
    small = load_dataset(name, str(root), "train", 16)
    assert small[0][0].shape == (3, 16, 16)
    with pytest.raises(DatasetError, match="cs.toronto.edu"):
        load_dataset(name, str(tmp_path / "missing"), "train", 32)


def test_digits_default_is_a_cub_tree(digits_root):
    train = load_dataset("digits", str(digits_root), "train", 16)
    test = load_dataset("digits", str(digits_root), "test", 16)
    assert len(train) + len(test) == 1797 and abs(len(test) - 359) <= 5
    assert train.num_classes == 10 and train.has_segmentations
    assert (digits_root / "segmentations").is_dir()


def test_train_val_split_is_seeded_stratified_and_disjoint():
    labels = np.repeat(np.arange(5), 20)
    tr, va = train_val_split(labels, 0.1, seed=3)
    assert len(va) == 10 and len(tr) == 90
    assert not set(tr) & set(va)
    assert np.bincount(labels[va]).tolist() == [2] * 5
    tr2, va2 = train_val_split(labels, 0.1, seed=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, train_val_split(labels, 0.1, seed=4)[1])


def test_batches_carry_their_dataset_index(cub_root):
    ds = load_dataset("cub", str(cub_root), "train", 16)
    for preload in (False, True):
        if preload:
            ds.preload()
        it = BatchIterator(ds, [7, 1, 4, 2, 8], batch_size=2, shuffle=True, seed=1)
        seen = []
        for x, y, idx in it:
            for row in range(len(idx)):
                assert torch.equal(x[row], ds[int(idx[row])][0])
                assert int(y[row]) == int(ds.labels[int(idx[row])])
            seen += idx.tolist()
        assert sorted(seen) == [1, 2, 4, 7, 8]
        it.set_epoch(0)
        assert [i for _, _, b in it for i in b.tolist()] == seen  # same epoch, same order (resumable)
    orders = set()
    for epoch in range(4):
        it.set_epoch(epoch)
        orders.add(tuple(i for _, _, b in it for i in b.tolist()))
    assert len(orders) > 1  # reshuffled between epochs
