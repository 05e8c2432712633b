"""README, "Your own data", run as written in a tiny repository of its own (a file of its own, so that it runs
beside the other end-to-end tests under `make test`'s workers)."""

import json
import shutil
import sys

import pytest
import torch

from test_pipeline_e2e import _run, _status, make_tiny_repo

pytestmark = pytest.mark.slow


def test_your_own_data_worked_example(tmp_path):
    """The digits exported as an image folder with a mask folder and a COCO file, then SIP-H on it (everything
    trained on the folder); then the same with the COCO file and a teacher from a checkpoint file."""
    root, env = make_tiny_repo(tmp_path / "repo")
    with open(root / ".gitignore", "a") as fh:
        fh.write("/data/own/\n")  # as the project's own .gitignore
    _run([sys.executable, "-m", "pipeline.cli", "data", "export", "--out", "data/own/digits", "-q"], root, env)
    assert (root / "data/own/digits/masks/train").is_dir() and (root / "data/own/digits/annotations.json").is_file()
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "own data", "--allow-empty"], root, env)
    folder = ["-S", "dataset=folder", "-S", "data.root=data/own/digits", "-S", "strategy=sip_h"]
    out = _run(["dvc", "exp", "run", *folder], root, env)
    assert "Running stage 'masks_human'" in out and "Running stage 'evaluate'" in out
    m = json.loads((root / "data/metrics/student.json").read_text())
    assert m["strategy"] == "sip_h" and m["dataset"] == "folder" and m["n_examples"] == 12
    human = json.loads((root / "data/masks/human.zarr/zarr.json").read_text())["attributes"]
    assert human["segmentations"].endswith("masks") and "nearest-neighbour" in human["rule"]

    shutil.copy(root / "data/teacher/model.pt", root / "data/own/teacher.pt")
    out = _run(["dvc", "exp", "run", *folder, "-S", "human_masks.coco={file: annotations.json}",
                "-S", "teacher.checkpoint=data/own/teacher.pt"], root, env)
    assert "Running stage 'masks_human'" in out and "Running stage 'teacher'" in out
    human = json.loads((root / "data/masks/human.zarr/zarr.json").read_text())["attributes"]
    assert human["segmentations"]["coco"].endswith("annotations.json") and human["n"] == 1438
    meta = torch.load(root / "data/teacher/model.pt", weights_only=True)["meta"]
    assert meta["imported_from"]["path"] == "data/own/teacher.pt" and meta["imported_from"]["format"] == "sipat"
    synthetic = json.loads((root / "data/masks/synthetic.zarr/zarr.json").read_text())["attributes"]
    assert synthetic["teacher"]["imported_from"] == meta["imported_from"]  # the store names the file
    # a replaced checkpoint file (same path, same parameters) reruns the teacher once `sources` has read it
    assert "teacher" not in _status(root, env)
    blob = torch.load(root / "data/own/teacher.pt", weights_only=True)
    blob["meta"]["note"] = "fine-tuned elsewhere"
    torch.save(blob, root / "data/own/teacher.pt")
    _run(["dvc", "repro", "sources"], root, env)
    assert "teacher" in _status(root, env) and "masks_human" not in _status(root, env)
