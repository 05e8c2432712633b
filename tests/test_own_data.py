"""Your own data: the image-folder dataset (folders or a CSV manifest), human masks from a mask folder or a COCO
file (polygons, RLE), a teacher from a checkpoint file; every bad input named."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import CocoConfig, config_from_dict, load_config
from pipeline.core.errors import CheckpointError, DatasetError
from pipeline.data import load_dataset
from pipeline.human_masks import extract_human, human_masks, mask_source

REPO = Path(__file__).resolve().parents[1]
SIZE = 8  # stored size of the fixture images


def _image(path: Path, value: int, size: tuple[int, int] = (SIZE, SIZE), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def _mask(path: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """A 0/255 PNG salient in the box (x0, y0, x1, y1), exclusive ends; returns the boolean mask."""
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m, mode="L").save(path)
    return m > 0


# (split, class, stem, box): the box of each image's mask
TREE = [("train", "cat", "a", (0, 0, 4, 4)), ("train", "cat", "b", (4, 4, 8, 8)),
        ("train", "dog", "c", (0, 0, 8, 2)), ("test", "cat", "d", (0, 0, 2, 2)), ("test", "dog", "e", (2, 2, 6, 6))]


@pytest.fixture
def tree(tmp_path):
    """train/<class>/*.png (one JPEG), test/<class>/*.png and masks/ mirroring them."""
    root = tmp_path / "mine"
    for k, (split, cls, stem, box) in enumerate(TREE):
        ext = ".jpg" if stem == "b" else ".png"
        _image(root / split / cls / f"{stem}{ext}", 40 * (k + 1))
        _mask(root / "masks" / split / cls / f"{stem}.png", box)
    return root


def _want(box, size=SIZE) -> torch.Tensor:
    m = torch.zeros(3, size, size, dtype=torch.bool)
    m[:, box[1]:box[3], box[0]:box[2]] = True
    return m


def test_a_folder_tree_is_a_dataset_with_classes_by_name_and_items_by_path(tree):
    train = load_dataset("folder", str(tree), "train", 16)
    test = load_dataset("folder", str(tree), "test", 16)
    assert train.class_names == test.class_names == ["cat", "dog"]
    assert train.ids == ["train/cat/a.png", "train/cat/b.jpg", "train/dog/c.png"] and list(train.labels) == [0, 0, 1]
    assert test.ids == ["test/cat/d.png", "test/dog/e.png"] and list(test.labels) == [0, 1]
    x, y, i = train[2]
    assert x.shape == (3, 16, 16) and y == 1 and i == 2 and abs(float(x.mean()) - 120 / 255) < 1e-6
    assert train.has_segmentations and train.fingerprint() == load_dataset("folder", str(tree), "train",
                                                                           16).fingerprint()
    assert sorted(train.source_files()) == ["masks/train/cat/a.png", "masks/train/cat/b.png",
                                            "masks/train/dog/c.png", "train/cat/a.png", "train/cat/b.jpg",
                                            "train/dog/c.png"]


def test_a_csv_manifest_is_the_same_dataset(tree):
    rows = ["path,label,split"] + [f"{s}/{c}/{n}{'.jpg' if n == 'b' else '.png'},{c},{s}" for s, c, n, _ in TREE]
    (tree / "manifest.csv").write_text("\n".join(reversed(rows[1:])).join([rows[0] + "\n", "\n"]))
    train = load_dataset("folder", str(tree), "train", 8)
    assert train.layout == "manifest" and train.ids == ["train/cat/a.png", "train/cat/b.jpg", "train/dog/c.png"]
    assert list(train.labels) == [0, 0, 1] and "manifest.csv" in train.source_files()


@pytest.mark.parametrize("body, named", [
    ("path,label\nx.png,cat\n", "lacks the column(s) split"),
    ("path,label,split\ntrain/cat/a.png,cat,valid\n", "manifest.csv:2: split 'valid'"),
    ("path,label,split\ntrain/cat/a.png,cat,train\ntrain/cat/a.png,dog,train\n", "manifest.csv:3: 'train/cat/a.png' "
                                                                                 "listed twice"),
    ("path,label,split\n../outside.png,cat,train\ntest/cat/d.png,cat,test\n", "leads outside"),
    ("path,label,split\ntrain/cat/a.txt,cat,train\n", "manifest.csv:2: 'train/cat/a.txt' is not an image"),
])
def test_a_bad_manifest_is_named_by_line(tree, body, named):
    (tree / "manifest.csv").write_text(body)
    (tree.parent / "outside.png").write_bytes((tree / "train/cat/a.png").read_bytes())
    with pytest.raises(DatasetError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_dataset("folder", str(tree), "train", 8)


def test_a_symlink_out_of_the_tree_is_refused(tree, tmp_path):
    _image(tmp_path / "secret" / "x.png", 9)
    os.symlink(tmp_path / "secret" / "x.png", tree / "train" / "cat" / "link.png")
    with pytest.raises(DatasetError, match="leads outside"):
        load_dataset("folder", str(tree), "train", 8)


def test_a_tree_without_splits_or_images_is_named(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("folder", str(tmp_path / "nowhere"), "train", 8)
    (tmp_path / "t" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"test does not exist"):
        load_dataset("folder", str(tmp_path / "t"), "train", 8)
    (tmp_path / "t" / "test").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset("folder", str(tmp_path / "t"), "train", 8)


# ------------------------------------------------------------------------------------------------- mask folder

def test_masks_from_the_mask_folder_are_resized_nearest_and_stored_by_index(tree, tmp_path):
    ds = load_dataset("folder", str(tree), "train", 16)
    got = torch.cat([m for _, m in human_masks(ds, progress=False)])
    want = torch.stack([_want(tuple(2 * v for v in box), 16) for s, _, _, box in TREE if s == "train"])
    assert torch.equal(got, want)
    attrs = extract_human(ds, tmp_path / "h.zarr", root=tree, progress=False)
    assert attrs["n"] == 3 and "nearest-neighbour" in attrs["rule"] and attrs["segmentations"].endswith("masks")


def test_mask_problems_are_named(tree):
    ds = load_dataset("folder", str(tree), "train", 8)
    _mask(tree / "masks" / "train" / "cat" / "a.png", (0, 0, 2, 2), size=(10, 8))  # wrong size
    with pytest.raises(DatasetError, match=r"masks/train/cat/a.png is 10×8 but its image .* is 8×8"):
        list(human_masks(ds, progress=False))
    with pytest.raises(DatasetError, match="a mask must have its image's size"):  # whatever `missing` says
        list(human_masks(ds, missing="empty", progress=False))
    _mask(tree / "masks" / "train" / "cat" / "a.png", (0, 0, 2, 2))
    _mask(tree / "masks" / "train" / "cat" / "zz.png", (0, 0, 2, 2))  # for no image
    with pytest.raises(DatasetError, match=r"masks/train/cat/zz.png: a mask for an image that does not exist"):
        list(human_masks(ds, progress=False))
    (tree / "masks" / "train" / "cat" / "zz.png").unlink()
    (tree / "masks" / "train" / "dog" / "c.png").unlink()  # an image without a mask
    with pytest.raises(DatasetError, match=r"1 of 3 image\(s\) of folder/train have no mask:\n  .*dog/c.png"):
        list(human_masks(ds, progress=False))
    it = human_masks(ds, missing="empty", progress=False)
    masks = torch.cat([m for _, m in it])
    assert it.stats["missing_segmentations"] == 1 and not masks[2].any() and masks[0].any()


# ------------------------------------------------------------------------------------------------------ COCO

def _poly(box):
    x0, y0, x1, y1 = box
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _coco(tree: Path, annotations: list, images=None, categories=None) -> Path:
    from pycocotools import mask as cmask

    if images is None:
        images = [{"id": k + 1, "file_name": f"{s}/{c}/{n}{'.jpg' if n == 'b' else '.png'}", "height": SIZE,
                   "width": SIZE} for k, (s, c, n, _) in enumerate(TREE)]
    doc = {"images": images, "annotations": annotations,
           "categories": categories or [{"id": 1, "name": "head"}, {"id": 2, "name": "body"}]}
    path = tree / "annotations.json"
    path.write_text(json.dumps(doc))
    assert cmask  # pycocotools is a dependency
    return path


def _rle(box, compressed=True):
    from pycocotools import mask as cmask

    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = 1
    if compressed:
        rle = cmask.encode(np.asfortranarray(m))
        return {"size": [SIZE, SIZE], "counts": rle["counts"].decode()}
    flat, counts, cur, run = m.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    return {"size": [SIZE, SIZE], "counts": counts + [run]}


def test_coco_polygons_and_rle_give_the_union_of_instances_or_of_named_categories(tree):
    import shutil

    shutil.rmtree(tree / "masks")  # COCO instead of mask files
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _poly((0, 0, 2, 2))},  # a: head
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": _rle((4, 4, 6, 8))},  # a: body, RLE
            {"id": 3, "image_id": 2, "category_id": 2, "segmentation": _rle((0, 4, 8, 8), compressed=False)},
            {"id": 4, "image_id": 3, "category_id": 1, "segmentation": _poly((2, 2, 6, 6)), "iscrowd": 0},
            {"id": 5, "image_id": 5, "category_id": 1, "segmentation": _poly((0, 0, 1, 1))}]  # a test image
    _coco(tree, anns)
    ds = load_dataset("folder", str(tree), "train", SIZE)
    assert not ds.has_segmentations
    src = mask_source(ds, root=tree, coco=CocoConfig(file="annotations.json"))
    got = torch.cat([m for _, m in human_masks(ds, source=src, progress=False)])
    want_a = _want((0, 0, 2, 2)) | _want((4, 4, 6, 8))
    assert torch.equal(got[0], want_a) and torch.equal(got[1], _want((0, 4, 8, 8)))
    assert torch.equal(got[2], _want((2, 2, 6, 6)))
    heads = mask_source(ds, root=tree, coco=CocoConfig(file="annotations.json", categories=["head"]))
    assert heads.absent() == [str(tree / "train/cat/b.jpg")]  # b has a body only
    got = torch.cat([m for _, m in human_masks(ds, source=heads, missing="empty", progress=False)])
    assert torch.equal(got[0], _want((0, 0, 2, 2))) and not got[1].any()
    with pytest.raises(DatasetError, match=r"1 of 3 image\(s\) of folder/train have no mask:\n  .*b.jpg"):
        list(human_masks(ds, source=heads, progress=False))


@pytest.mark.parametrize("change, named", [
    (lambda d: d["annotations"].append({"id": 9, "image_id": 77, "category_id": 1, "segmentation": _poly((0, 0, 2, 2))}),
     "annotation 9: image_id 77 is not an image of the file"),
    (lambda d: d["images"].append({"id": 8, "file_name": "train/cat/ghost.png", "height": 8, "width": 8}),
     "image id 8: file_name 'train/cat/ghost.png' matches no image"),
    (lambda d: d["images"].append({"id": 8, "file_name": "../../etc/passwd", "height": 8, "width": 8}),
     "leads outside the data root"),
    (lambda d: d["annotations"].append({"id": 9, "image_id": 1, "category_id": 1, "segmentation": [[1, 2, 3]]}),
     "annotation 9: polygons must be lists of at least 3 x, y pairs"),
    (lambda d: d["annotations"].append({"id": 9, "image_id": 1, "category_id": 5, "segmentation": _poly((0, 0, 2, 2))}),
     "annotation 9: category_id 5 is not a category"),
    (lambda d: d.pop("annotations"), "not a COCO instances file"),
])
def test_a_bad_coco_file_is_named(tree, change, named):
    doc = json.loads(_coco(tree, [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _poly((0, 0, 2, 2))}])
                     .read_text())
    change(doc)
    (tree / "annotations.json").write_text(json.dumps(doc))
    ds = load_dataset("folder", str(tree), "train", SIZE)
    with pytest.raises(DatasetError, match=named.replace("(", r"\(").replace(")", r"\)")):
        mask_source(ds, root=tree, coco=CocoConfig(file="annotations.json"))


def test_coco_image_of_another_size_unknown_category_and_a_path_out_of_the_root(tree):
    images = [{"id": 1, "file_name": "a.png", "height": 8, "width": 10}]  # a bare name: the one image a.png
    _coco(tree, [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _poly((0, 0, 2, 2))}], images=images)
    ds = load_dataset("folder", str(tree), "train", SIZE)
    src = mask_source(ds, root=tree, coco=CocoConfig(file="annotations.json"))
    with pytest.raises(DatasetError, match=r"train/cat/a.png is 8×8, the file says 10×8"):
        list(human_masks(ds, source=src, missing="empty", progress=False))
    with pytest.raises(DatasetError, match=r"categories: 'tail' not among the file's categories \(body, head\)"):
        mask_source(ds, root=tree, coco=CocoConfig(file="annotations.json", categories=["tail"]))
    with pytest.raises(DatasetError, match="human_masks.coco.file: '../x.json' leads outside"):
        mask_source(ds, root=tree, coco=CocoConfig(file="../x.json"))


def test_a_coco_key_is_checked_in_params():
    from pipeline.core.config import ConfigError

    raw = load_config(REPO / "params.yaml").model_dump()
    raw["human_masks"]["coco"] = {"file": "a.json", "categorys": ["x"]}
    with pytest.raises(ConfigError, match="human_masks.coco.categorys"):
        config_from_dict(raw, "params")


# -------------------------------------------------------------------------------------------- teacher import

def _cfg(tree: Path, checkpoint: Path, normalization: str = "dataset"):
    raw = load_config(REPO / "params.yaml").model_dump()
    raw.update(dataset="folder", device="cpu")
    raw["data"].update(root=str(tree), image_size=SIZE)
    raw["teacher"].update(checkpoint=str(checkpoint), input_normalization=normalization)
    return config_from_dict(raw, "params")


@pytest.mark.parametrize("wrap", ["plain", "wrapped"])
def test_a_plain_state_dict_becomes_the_teacher(tree, tmp_path, wrap):
    from pipeline.models import build_model, load_checkpoint
    from pipeline.training.run import import_teacher

    torch.manual_seed(0)
    net = build_model("smallcnn", 2).net
    state = net.state_dict()
    if wrap == "wrapped":  # as many published checkpoints: {"state_dict": {"module.<key>": ...}}
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(state, tmp_path / "robust.pt")
    summary = import_teacher(_cfg(tree, tmp_path / "robust.pt", "imagenet"), tmp_path / "teacher.pt")
    model, meta = load_checkpoint(tmp_path / "teacher.pt")
    assert meta["role"] == "teacher" and meta["strategy"] == "imported" and meta["arch"] == "smallcnn"
    assert meta["imported_from"]["format"] == "state_dict" and summary["imported_from"]["sha256"]
    assert meta["imported_from"]["input_normalization"] == "imagenet" and meta["mean"] == [0.485, 0.456, 0.406]
    x = torch.rand(2, 3, SIZE, SIZE)
    mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
    assert torch.allclose(model(x), net.eval()((x - mean) / std))


def test_a_state_dict_that_does_not_fit_is_named(tree, tmp_path):
    from pipeline.models import build_model
    from pipeline.training.run import import_teacher

    state = build_model("smallcnn", 2).net.state_dict()
    first = next(iter(state))
    state.pop(first)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=rf"1 missing \(e.g. {first}\), 1 unexpected \(e.g. extra.weight\)"):
        import_teacher(_cfg(tree, tmp_path / "bad.pt"), tmp_path / "teacher.pt")
    assert not (tmp_path / "teacher.pt").exists()
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt"):
        import_teacher(_cfg(tree, tmp_path / "junk.pt"), tmp_path / "teacher.pt")


def test_a_project_checkpoint_for_other_data_is_refused(tree, tmp_path):
    from pipeline.models import build_model, save_checkpoint
    from pipeline.training.run import import_teacher

    model = build_model("smallcnn", 3)
    save_checkpoint(tmp_path / "other.pt", model, {"arch": "smallcnn", "num_classes": 3, "mean": [0.0] * 3,
                                                    "std": [1.0] * 3, "role": "student", "dataset": "cub"})
    with pytest.raises(CheckpointError, match="classes: checkpoint 3, configured 2"):
        import_teacher(_cfg(tree, tmp_path / "other.pt"), tmp_path / "teacher.pt")


def test_the_cli_writes_a_human_store_from_a_coco_file(tree, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    _coco(tree, [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _poly((0, 0, 2, 2))},
                 {"id": 2, "image_id": 2, "category_id": 2, "segmentation": _poly((0, 0, 4, 4))}])
    args = ["masks", "human", "--dataset", "folder", "--root", str(tree), "--out", str(tmp_path / "h.zarr"),
            "--image-size", "8", "--params", str(tmp_path / "none.yaml"), "--coco", "annotations.json", "-q"]
    res = CliRunner().invoke(app, args + ["--category", "head"], terminal_width=200)
    assert res.exit_code == 1 and "2 of 3 image(s) of folder/train have no mask" in res.output, res.output
    res = CliRunner().invoke(app, args + ["--missing", "empty"], terminal_width=200)
    assert res.exit_code == 0 and "wrote" in res.output and "3 human masks" in res.output, res.output
    attrs = json.loads((tmp_path / "h.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["segmentations"]["categories"] == "all" and attrs["counts"]["missing_segmentations"] == 1


def test_export_round_trips_and_never_replaces_a_foreign_folder(tree, tmp_path):
    from pipeline.core.errors import OutputConflict
    from pipeline.export import export_folder

    splits = {s: load_dataset("folder", str(tree), s, SIZE) for s in ("train", "test")}
    summary = export_folder(splits, tmp_path / "out", progress=False)
    assert summary == {"images": 5, "masks": 5}
    again = load_dataset("folder", str(tmp_path / "out"), "train", SIZE)
    assert again.class_names == ["cat", "dog"] and list(again.labels) == list(splits["train"].labels)
    assert all(torch.equal(again.image_uint8(i), splits["train"].image_uint8(i)) for i in range(3))
    files = torch.cat([m for _, m in human_masks(again, progress=False)])
    coco = mask_source(again, root=tmp_path / "out", coco=CocoConfig(file="annotations.json"))
    assert torch.equal(files, torch.cat([m for _, m in human_masks(again, source=coco, progress=False)]))
    assert torch.equal(files, torch.cat([m for _, m in human_masks(splits["train"], progress=False)]))
    export_folder(splits, tmp_path / "out", progress=False)  # its own output: replaced
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep")
    with pytest.raises(OutputConflict):
        export_folder(splits, tmp_path / "foreign", progress=False)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep"
