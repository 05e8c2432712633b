"""Bad input, as a careless user or an adversarial tester gives it: outputs that are not ours are never
replaced, damaged mask stores and checkpoints are refused with one line, dataset index files cannot reach
outside the dataset, CIFAR pickles cannot run code, and provenance is checked where it is used."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_cifar_tree, make_cub_tree
from test_maskstore import FakeDataset, random_masks, write
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.config import config_from_dict
from pipeline.core.errors import (CheckpointError, ConfigError, DatasetError, MaskStoreError, OutputConflict,
                                  expected_errors)
from pipeline.core.utils import atomic_path, resolve_device, write_json
from pipeline.data import content_fingerprint, load_dataset
from pipeline.maskstore import MaskStore, verify_store
from pipeline.models import build_model, check_checkpoint_matches, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    result.text = " ".join(result.output.split())
    return result


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def ckpt_meta(**over) -> dict:
    meta = {"arch": "smallcnn", "num_classes": 10, "mean": [0.0] * 3, "std": [1.0] * 3, "image_shape": [3, 16, 16],
            "dataset": "digits", "dataset_fingerprint": "f" * 16, "role": "teacher", "strategy": "madry", "seed": 0,
            "attack": {"eps": 32 / 255}}
    meta.update(over)
    return meta


def save_ckpt(path: Path, **over) -> Path:
    meta = ckpt_meta(**over)
    save_checkpoint(path, build_model(meta["arch"], meta["num_classes"]), meta)
    return path


# ------------------------------------------------------------------------------- 1. outputs that are not ours

def test_human_masks_out_onto_the_dataset_tree_is_refused(tmp_path):
    root = make_cub_tree(tmp_path / "CUB_200_2011")
    before = tree_files(root)
    r = cli("masks", "human", "--root", root, "--image-size", "8", "--out", root, "--params", tmp_path / "none.yaml",
            "-q")
    assert r.exit_code == 1 and "folder with files this project did not write" in r.text
    assert tree_files(root) == before


def test_show_out_onto_a_user_folder_or_file_is_refused(tmp_path):
    root = make_cub_tree(tmp_path / "CUB_200_2011")
    assert cli("masks", "human", "--root", root, "--image-size", "8", "--out", tmp_path / "h.zarr",
               "--params", tmp_path / "none.yaml", "-q").exit_code == 0
    folder = tmp_path / "somefolder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    r = cli("masks", "show", tmp_path / "h.zarr", "--out", folder, "--n", "2")
    assert r.exit_code == 1 and "somefolder" in r.text and (folder / "notes.txt").read_text() == "mine"
    notes = tmp_path / "notes.png"  # a PNG name, but a user's text inside
    notes.write_text("not a picture")
    r = cli("masks", "show", tmp_path / "h.zarr", "--out", notes, "--n", "2")
    assert r.exit_code == 1 and "not written by this project" in r.text and notes.read_text() == "not a picture"
    # What this project wrote is replaced as before.
    assert cli("masks", "show", tmp_path / "h.zarr", "--out", tmp_path / "m.png", "--n", "2").exit_code == 0
    assert cli("masks", "show", tmp_path / "h.zarr", "--out", tmp_path / "m.png", "--n", "3").exit_code == 0
    assert cli("masks", "human", "--root", root, "--image-size", "8", "--out", tmp_path / "h.zarr",
               "--params", tmp_path / "none.yaml", "-q").exit_code == 0


@pytest.mark.parametrize("kind,content", [("json", b"\x00\x01binary"), ("torch", b"{}"),
                                          ("text", b"\x89PNG\r\n\x1a\n")])
def test_files_of_another_kind_are_not_replaced(tmp_path, kind, content):
    path = tmp_path / "out.bin"
    path.write_bytes(content)
    with pytest.raises(OutputConflict, match="out.bin"):
        with atomic_path(path, kind=kind) as tmp:
            tmp.write_text("{}")
    assert path.read_bytes() == content


def test_a_folder_output_replaces_only_its_own_kind(tmp_path):
    ds = FakeDataset(6)
    write(tmp_path / "s.zarr", ds, random_masks(6, ds.image_shape))
    write(tmp_path / "s.zarr", ds, random_masks(6, ds.image_shape, seed=1))  # a store replaces a store
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty", ds, random_masks(6, ds.image_shape))  # nothing to lose in an empty folder
    (tmp_path / "f.zarr").write_text("x")
    with pytest.raises(OutputConflict, match="is a file"):
        write(tmp_path / "f.zarr", ds, random_masks(6, ds.image_shape))


def test_temporary_folders_of_a_killed_write_are_cleaned(tmp_path):
    out = tmp_path / "out.json"
    code = ("import time\nfrom pipeline.core.utils import atomic_path\n"
            f"with atomic_path({str(out)!r}) as t:\n"
            "    t.write_text('{}'); print('in', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "in"
        stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.json.")]
        assert len(stale) == 1
        write_json(out, {"a": 1})  # the writer is alive: its folder stays
        assert stale[0].exists()
    finally:
        proc.kill()  # SIGKILL: no `finally` runs in it
        proc.wait()
    lookalikes = [tmp_path / ".out.json.keepme.tmp", tmp_path / ".other.json.abcdefgh.tmp"]
    for p in lookalikes:
        p.mkdir()
    write_json(out, {"a": 2})
    assert not stale[0].exists() and all(p.exists() for p in lookalikes)
    assert json.loads(out.read_text()) == {"written_by": "sipat", "a": 2}


# ------------------------------------------------------------------------------- 2. damaged mask stores

def _store(tmp_path, n=10, chunk=4):
    ds = FakeDataset(n)
    masks = random_masks(n, ds.image_shape)
    write(tmp_path / "s.zarr", ds, masks, chunk=chunk)
    return tmp_path / "s.zarr", ds, masks


def test_missing_chunk_is_refused_and_reported(tmp_path):
    path, ds, _ = _store(tmp_path)
    shutil.rmtree(path / "c" / "1")
    with pytest.raises(MaskStoreError, match=r"1 of 3 chunk\(s\) missing: c/1/0"):
        MaskStore.open(path, dataset=ds)
    r = cli("masks", "inspect", path)
    assert r.exit_code == 1 and "c/1/0" in r.text and "damaged" in r.text
    shutil.rmtree(path / "c")
    with pytest.raises(MaskStoreError, match="3 of 3 chunk"):
        MaskStore.open(path, dataset=ds)
    r = cli("masks", "show", path, "--out", tmp_path / "m.png")
    assert r.exit_code == 1 and not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("memory_limit", [1 << 30, 0])
def test_corrupt_chunk_is_one_error(tmp_path, memory_limit):
    path, ds, _ = _store(tmp_path)
    (path / "c" / "2" / "0").write_bytes(os.urandom(40))
    with pytest.raises(MaskStoreError, match="cannot be decoded: c/2/0"):
        MaskStore.open(path, dataset=ds, memory_limit=memory_limit)
    r = cli("masks", "inspect", path)
    assert r.exit_code == 1 and "c/2/0" in r.text


def test_changed_content_disagrees_with_the_recorded_totals(tmp_path):
    import zarr

    path, ds, masks = _store(tmp_path)
    arr = zarr.open_array(str(path), mode="r+").with_config({"write_empty_chunks": True})
    arr[0:4] = 0  # decodable, but four masks emptied
    with pytest.raises(MaskStoreError, match="empty masks, but the store recorded"):
        MaskStore.open(path, dataset=ds)
    _, problems = verify_store(path)
    assert problems


def test_all_empty_chunks_are_written_and_accepted(tmp_path):
    ds = FakeDataset(9)
    masks = torch.zeros((9, *ds.image_shape), dtype=torch.bool)
    masks[8] = True
    write(tmp_path / "z.zarr", ds, masks, chunk=4)
    assert sorted(p.name for p in (tmp_path / "z.zarr" / "c").iterdir()) == ["0", "1", "2"]
    store = MaskStore.open(tmp_path / "z.zarr", dataset=ds)
    assert store.attrs["totals"]["empty_masks"] == 8 and torch.equal(store.masks(range(9)), masks)


def test_provenance_of_the_teacher_is_checked(tmp_path):
    ds = FakeDataset(6)
    path = tmp_path / "t.zarr"
    from pipeline.maskstore.writer import write_mask_store

    attrs = {"kind": "synthetic", "dataset": ds.name, "split": "train", "image_size": ds.image_size,
             "fingerprint": ds.fingerprint(), "teacher": {"sha256": "abc", "dataset": "cifar10",
                                                          "dataset_fingerprint": "0123456789abcdef"}}
    write_mask_store(path, [(0, random_masks(6, ds.image_shape))], n=6, shape=ds.image_shape, attrs=attrs)
    with pytest.raises(MaskStoreError, match="teacher trained on cifar10"):
        MaskStore.open(path, dataset=ds)
    attrs["teacher"]["dataset_fingerprint"] = ds.fingerprint()
    write_mask_store(path, [(0, random_masks(6, ds.image_shape))], n=6, shape=ds.image_shape, attrs=attrs)
    MaskStore.open(path, dataset=ds, expect={"teacher_sha256": "abc"})
    with pytest.raises(MaskStoreError, match="not from this run's teacher"):
        MaskStore.open(path, dataset=ds, expect={"teacher_sha256": "def"})


# ------------------------------------------------------------------------------- 3. paths outside the dataset

@pytest.mark.parametrize("entry", ["ABS", "../../../outside.jpg", "../../../../etc/passwd"])
def test_index_entries_outside_the_root_are_refused(tmp_path, entry):
    root = make_cub_tree(tmp_path / "a" / "b" / "CUB_200_2011")
    outside = tmp_path / "a" / "outside.jpg"
    shutil.copy(next((root / "images").rglob("*.jpg")), outside)
    entry = str(tmp_path / "a" / "outside.jpg") if entry == "ABS" else entry
    lines = (root / "images.txt").read_text().splitlines()
    lines[0] = f"1 {entry}"
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="leads outside"):
        load_dataset("cub", str(root), "train", 8)


def test_symlinks_out_of_the_tree_are_refused(tmp_path):
    root = make_cub_tree(tmp_path / "CUB_200_2011")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    img = next((root / "images").rglob("*.jpg"))
    img.unlink()
    img.symlink_to(outside)
    with pytest.raises(DatasetError, match="leads outside"):
        for split in ("train", "test"):
            load_dataset("cub", str(root), split, 8)
    root2 = make_cub_tree(tmp_path / "two" / "CUB_200_2011")
    ds = load_dataset("cub", str(root2), "train", 8)
    seg = ds.segmentation_path(0)
    seg.unlink()
    seg.symlink_to(outside)
    with pytest.raises(DatasetError, match="segmentation"):
        ds.segmentation_path(0)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_cifar_pickle_runs_nothing(tmp_path):
    root = make_cifar_tree(tmp_path / "cifar")
    marker = tmp_path / "ran"
    with open(root / "cifar-10-batches-py" / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "x": _Evil(marker)}, fh)
    with pytest.raises(DatasetError, match="refused to load posix.system"):
        load_dataset("cifar10", str(root), "test", 32)
    assert not marker.exists()


def test_protocol_2_cifar_pickles_still_load(tmp_path):
    root = make_cifar_tree(tmp_path / "cifar")
    base = root / "cifar-10-batches-py"
    for f in base.iterdir():  # rewrite as the released files are: protocol 2, numpy arrays inside
        obj = pickle.loads(f.read_bytes())
        f.write_bytes(pickle.dumps(obj, protocol=2))
    ds = load_dataset("cifar10", str(root), "train", 32)
    assert len(ds) == 30 and ds.num_classes == 10


# ------------------------------------------------------------------------------- 4. provenance where it is used

def test_checkpoint_of_another_dataset_is_refused(tmp_path, digits_root):
    ckpt = save_ckpt(tmp_path / "cifar.pt", dataset="cifar10", image_shape=[3, 32, 32])
    digits = load_dataset("digits", str(digits_root), "test", 32)
    with pytest.raises(CheckpointError, match="dataset: checkpoint cifar10, configured digits"):
        check_checkpoint_matches(load_checkpoint(ckpt)[1], digits, ckpt)

    from pipeline.evaluation.run import evaluate_run

    cfg = config_from_dict({"dataset": "digits", "device": "cpu", "data": {"root": str(digits_root), "image_size": 32}})
    with pytest.raises(CheckpointError, match="cifar10"):
        evaluate_run(cfg, ckpt, tmp_path / "metrics.json")
    assert not (tmp_path / "metrics.json").exists()

    from pipeline.synthetic_masks import extract_synthetic

    train = load_dataset("digits", str(digits_root), "train", 32)
    with pytest.raises(CheckpointError, match="cifar10"):
        extract_synthetic(ckpt, train, tmp_path / "s.zarr", device="cpu", progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_split_fingerprints_are_checked(tmp_path, digits_root):
    test = load_dataset("digits", str(digits_root), "test", 16)
    meta = ckpt_meta(dataset_fingerprints={"train": "x", "test": test.fingerprint()})
    check_checkpoint_matches(meta, test, "m.pt")
    meta["dataset_fingerprints"]["test"] = "0" * 16
    with pytest.raises(CheckpointError, match="test split fingerprint"):
        check_checkpoint_matches(meta, test, "m.pt")


def test_content_fingerprint_follows_replaced_image_files(tmp_path):
    root = make_cub_tree(tmp_path / "CUB_200_2011")
    splits = [load_dataset("cub", str(root), s, 8) for s in ("train", "test")]
    before = content_fingerprint(splits, progress=False)
    img = next((root / "images").rglob("*.jpg"))
    shutil.copy(next(p for p in (root / "images").rglob("*.jpg") if p != img), img)  # same ids and labels
    after = content_fingerprint([load_dataset("cub", str(root), s, 8) for s in ("train", "test")], progress=False)
    assert splits[0].fingerprint() == load_dataset("cub", str(root), "train", 8).fingerprint()
    assert before["sha256"] != after["sha256"] and before["files"] == after["files"]


def _run_stage(monkeypatch, tmp_path, params: dict, module: str, *argv) -> str:
    import importlib

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [module, *map(str, argv)])
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main()
    msg = str(exc.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_prepare_names_every_unreadable_image(tmp_path, monkeypatch):
    root = make_cub_tree(tmp_path / "CUB_200_2011")
    bad = sorted((root / "images").rglob("*.jpg"))[:2]
    for p in bad:
        p.write_bytes(b"not a jpeg")
    msg = _run_stage(monkeypatch, tmp_path, {"dataset": "cub", "data": {"root": str(root), "image_size": 8}},
                     "stages.prepare", "--out", tmp_path / "prepared")
    assert "2 image(s) cannot be decoded" in msg and all(p.name in msg for p in bad)
    assert not (tmp_path / "prepared").exists()


# ------------------------------------------------------------------------------- 5. one line, not a traceback

@pytest.mark.parametrize("damage", ["truncated", "random", "state_dict", "arch", "no_meta"])
def test_damaged_checkpoints_are_one_line(tmp_path, damage):
    path = save_ckpt(tmp_path / "model.pt")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "random":
        path.write_bytes(os.urandom(2048))
    elif damage == "state_dict":
        torch.save(build_model("smallcnn", 10).state_dict(), path)
    elif damage == "arch":
        blob = torch.load(path, weights_only=True)
        blob["meta"]["arch"] = "resnet18"
        torch.save(blob, path)
    else:
        blob = torch.load(path, weights_only=True)
        del blob["meta"]["num_classes"]
        torch.save(blob, path)
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(path)


def test_evaluate_stage_ends_damaged_checkpoint_in_one_line(tmp_path, monkeypatch, digits_root):
    (tmp_path / "model.pt").write_bytes(os.urandom(1000))
    msg = _run_stage(monkeypatch, tmp_path, {"dataset": "digits", "device": "cpu", "data": {"root": str(digits_root)}},
                     "stages.evaluate", "student", "--checkpoint", "model.pt", "--out", "m.json")
    assert "model.pt" in msg


def test_corrupt_resume_state_is_dropped_with_a_warning(tmp_path, caplog):
    from pipeline.training import TrainOptions, _load_resume

    resume = tmp_path / ".model.resume.pt"
    from pipeline.training import RESUME_FORMAT

    torch.save({"format": RESUME_FORMAT, "model": {"w": torch.zeros(3)}}, resume)
    data = resume.read_bytes()
    resume.write_bytes(data[: len(data) // 2])  # ours, truncated
    assert _load_resume(TrainOptions(device=torch.device("cpu"), resume_path=resume, resume_key="k")) is None
    assert not resume.exists() and "cannot be read" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="device: 'cuda'"):
        resolve_device("cuda")


def test_ctrl_c_is_one_line():
    with pytest.raises(SystemExit) as exc:
        with expected_errors():
            raise KeyboardInterrupt
    assert str(exc.value.code).startswith("interrupted")


@pytest.mark.parametrize("raw,key", [
    ({"train": {"lr": ".inf"}}, r"train\.lr: Input should be a finite number"),
    ({"teacher": {"momentum": "nan"}}, r"teacher\.momentum"),
    ({"attack": {"eps": "4/255", "step_size": "8/255"}}, r"attack\.step_size: .*8/255 is larger than eps 4/255"),
    ({"attack": {"eps": "4/255"}}, r"attack\.step_size: .*8/255 is larger than eps 4/255"),  # the default step
    ({"teacher": {"schedule": {"milestones": [-3]}}}, r"teacher\.schedule\.milestones"),
])
def test_config_rejects_non_finite_steps_above_budget_and_negative_milestones(raw, key):
    raw = yaml.safe_load(yaml.safe_dump(raw).replace("'.inf'", ".inf").replace("'nan'", ".nan"))
    with pytest.raises(ConfigError, match=key):
        config_from_dict(raw)


def test_ctrl_c_in_the_cli_is_one_line():
    import typer

    from pipeline.cli import _errors

    with pytest.raises(typer.Exit) as exc:
        with _errors():
            raise KeyboardInterrupt
    assert exc.value.exit_code == 130


def test_prepare_manifest_follows_the_data_and_replaces_only_its_own_output(tmp_path, monkeypatch):
    import importlib

    root = make_cub_tree(tmp_path / "CUB_200_2011")
    params = {"dataset": "cub", "data": {"root": str(root), "image_size": 8}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    prepare = importlib.import_module("stages.prepare")

    def run() -> dict:
        monkeypatch.setattr(sys, "argv", ["prepare", "--out", "prepared"])
        prepare.main()
        return json.loads((tmp_path / "prepared" / "manifest.json").read_text())

    first = run()
    assert run() == first  # unchanged data: byte-identical manifest, so DVC reruns nothing after it
    img = sorted((root / "images").rglob("*.jpg"))
    shutil.copy(img[1], img[0])
    changed = run()
    assert changed["content"]["sha256"] != first["content"]["sha256"]
    assert changed["train_fingerprint"] == first["train_fingerprint"]  # sample order alone would miss it
    shutil.rmtree(tmp_path / "prepared")
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "mine.txt").write_text("x")
    with pytest.raises(SystemExit, match="folder with files this project did not write"):
        run()
    assert (tmp_path / "prepared" / "mine.txt").exists()
