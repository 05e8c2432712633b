"""Nothing lost, nothing silently wrong: user files inside output folders and at the resume path survive,
stores without their integrity record and student checkpoints are refused, odd image modes are normalised in one
place, malformed index files are named by line."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import DatasetError, OutputConflict
from pipeline.core.utils import atomic_path, check_output
from pipeline.data.cub import CUBDataset, to_8bit
from pipeline.human_masks import human_masks
from pipeline.maskstore import MaskStore, verify_store
from pipeline.maskstore.writer import write_mask_store
from tests.conftest import make_cub_tree


def _store(path, n=8, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(0)
    masks = torch.rand((n, *shape), generator=g) < 0.3
    write_mask_store(path, [(0, masks)], n=n, shape=shape, attrs={"kind": "synthetic"}, chunk_size=4)
    return masks


def test_a_users_file_inside_a_mask_store_is_never_deleted(tmp_path):
    store = tmp_path / "store.zarr"
    _store(store)
    (store / "NOTES.txt").write_text("my notes")
    with pytest.raises(OutputConflict, match=r"also holds NOTES\.txt"):
        check_output(store, is_dir=True)
    with pytest.raises(OutputConflict):
        _store(store)
    assert (store / "NOTES.txt").read_text() == "my notes"
    (store / "NOTES.txt").unlink()
    _store(store)  # the store alone is the project's to replace


def test_a_store_that_lost_its_integrity_record_is_refused(tmp_path):
    store = tmp_path / "s.zarr"
    _store(store)
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["totals"]
    (store / "zarr.json").write_text(json.dumps(meta))
    a, b = store / "c" / "0" / "0", store / "c" / "1" / "0"
    tmp = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(tmp)
    _, problems = verify_store(store)
    assert any("integrity record is missing" in p for p in problems)
    with pytest.raises(Exception, match="integrity record is missing"):
        MaskStore.open(store)


def test_a_student_checkpoint_is_not_a_teacher(tmp_path, digits_root):
    from pipeline.core.config import config_from_dict
    from pipeline.data import load_dataset
    from pipeline.strategies import builtin  # noqa: F401
    from pipeline.synthetic_masks import extract_synthetic
    from pipeline.training.run import train_run

    cfg = config_from_dict({"data": {"root": str(digits_root)}, "strategy": "basic", "device": "cpu",
                            "train": {"epochs": 1}, "attack": {"steps": 1}, "perf": {"resume": False}})
    train_run(cfg, "student", tmp_path / "student.pt", progress=False)
    ds = load_dataset(cfg.dataset, cfg.data.root, "train", cfg.data.image_size)
    with pytest.raises(DatasetError, match=r"student\.pt is a student checkpoint \(strategy basic\), not a teacher"):
        extract_synthetic(tmp_path / "student.pt", ds, tmp_path / "m.zarr", progress=False, device="cpu")
    assert not (tmp_path / "m.zarr").exists()


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_images_are_scaled_not_clipped(mode):
    arr16 = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
    img = Image.fromarray(arr16.astype(np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    out = np.asarray(to_8bit(img, "RGB"))
    assert out.shape == (8, 8, 3) and out.max() == 63000 * 255 // 65535 and (out < 255).mean() > 0.99


def test_palette_segmentation_is_an_index_map_and_float_images_are_refused():
    idx = np.zeros((4, 4), dtype=np.uint8)
    idx[1:3, 1:3] = 1
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 = red: luminance 76, below 0.5 if taken as grey
    assert np.array_equal(np.asarray(to_8bit(pal, "L")) == 255, idx == 1)
    with pytest.raises(ValueError, match="float image has no defined value range"):
        to_8bit(Image.fromarray(np.zeros((2, 2), dtype=np.float32), mode="F"), "L")


def test_16_bit_and_palette_segmentations_give_the_masks_their_values_say(tmp_path):
    root = make_cub_tree(tmp_path / "CUB_200_2011", soft_segmentations=False)
    seg_files = sorted((root / "segmentations").rglob("*.png"))
    first, second = seg_files[0], seg_files[1]
    a = np.asarray(Image.open(first))
    rim = np.zeros_like(a, dtype=np.uint16)
    rim[a > 0] = 102 * 257  # 102/255 as 16 bits: below the 0.5 level
    Image.fromarray(rim).save(first)
    pal = Image.fromarray((np.asarray(Image.open(second)) > 0).astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(second)
    ds = CUBDataset(root, "train", 16)
    names = [str(ds.segmentation_path(i)) for i in range(len(ds))]
    masks = torch.cat([m for _, m in human_masks(ds, threshold=0.5, batch_size=16, workers=1, progress=False)])
    assert not bool(masks[names.index(str(first))].any())  # the faint rim stays below 0.5
    assert bool(masks[names.index(str(second))].any())     # index 1 is the object, not a dark red


@pytest.mark.parametrize("file, edit, message", [
    ("images.txt", lambda t: t + "\n1 001.Bird_0/Bird_0_0001_2.jpg\n", r"images\.txt:\d+: id 1 given twice"),
    ("train_test_split.txt", lambda t: t.replace("\n1 1\n", "\n1 yes\n", 1).replace("1 1\n", "1 yes\n", 1),
     r"train_test_split\.txt:1: 'yes' is not 1 \(train\) or 0 \(test\)"),
    ("images.txt", lambda t: "one 001.Bird_0/Bird_0_0000_1.jpg\n" + t, r"images\.txt:1: the id 'one' is not a whole"),
])
def test_malformed_index_files_are_named_by_line(tmp_path, file, edit, message):
    root = make_cub_tree(tmp_path / "CUB_200_2011")
    path = root / file
    path.write_text(edit(path.read_text()))
    with pytest.raises(DatasetError, match=message):
        CUBDataset(root, "train", 16)


def test_atomic_path_refuses_a_folder_holding_a_users_file_before_the_work(tmp_path):
    store = tmp_path / "m.zarr"
    _store(store)
    (store / "c" / "mine.txt").write_text("x")
    ran = []
    with pytest.raises(OutputConflict):
        with atomic_path(store, is_dir=True):
            ran.append(1)
    assert not ran and (store / "c" / "mine.txt").exists()
    shutil.rmtree(store)
