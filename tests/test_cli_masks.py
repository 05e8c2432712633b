"""`sipat masks ...` and the two DVC stages, on a tiny CUB tree with a tiny teacher."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_salience import make_cub_tree, save_tiny_checkpoint  # noqa: E402

from pipeline.cli import app  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.maskstore import MaskStore, MaskStoreError  # noqa: E402

runner = CliRunner()


def write_params(path: Path, root: Path, size: int = 8, **salience) -> Path:
    params = {"dataset": "cub", "device": "cpu", "data": {"root": str(root), "image_size": size},
              "salience": {"fraction": 0.5, "target": "label", "batch_size": 4, "chunk_size": 4, **salience}}
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def setup(tmp_path):
    root = make_cub_tree(tmp_path / "CUB_200_2011")
    return {"root": root, "ckpt": save_tiny_checkpoint(tmp_path / "teacher.pt"),
            "params": write_params(tmp_path / "params.yaml", root), "tmp": tmp_path,
            "ds": load_dataset("cub", str(root), "train", 8)}


def invoke(*args):
    """Run the CLI; `.text` is its output with rich's line wrapping undone."""
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    result.text = " ".join(result.output.split())
    return result


def test_synthetic_human_inspect_show(setup):
    tmp, ds = setup["tmp"], setup["ds"]
    r = invoke("masks", "synthetic", "--checkpoint", setup["ckpt"], "--params", setup["params"],
               "--out", tmp / "s.zarr", "--fraction", "0.3", "--target", "predicted", "-q")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.text and "6 synthetic masks" in r.text
    s = MaskStore.open(tmp / "s.zarr", dataset=ds, kind="synthetic")
    assert s.attrs["params"]["fraction"] == 0.3 and s.attrs["params"]["target"] == "predicted"
    assert s.attrs["root"] == str(setup["root"]) and s.attrs["image_size"] == 8

    r = invoke("masks", "human", "--root", setup["root"], "--out", tmp / "h.zarr", "--image-size", "8",
               "--threshold", "0.6", "--params", tmp / "absent.yaml", "-q")
    assert r.exit_code == 0, r.output
    h = MaskStore.open(tmp / "h.zarr", dataset=ds, kind="human")
    assert h.attrs["params"]["threshold"] == 0.6
    assert int(h.masks(torch.arange(len(ds))).sum()) == 5 * 3 * 2 * 2  # 2×2 cores at 180 (>= 0.6 × 255), one empty

    r = invoke("masks", "inspect", tmp / "s.zarr")
    assert r.exit_code == 0, r.output
    for text in ("synthetic", "6 × 3×8×8", s.attrs["fingerprint"], "bits/element", "p95", "sha256"):
        assert text in r.text, text

    r = invoke("masks", "show", tmp / "s.zarr", "--other", tmp / "h.zarr", "--out", tmp / "fig.png", "--n", "3")
    assert r.exit_code == 0, r.output
    with Image.open(tmp / "fig.png") as img:
        assert img.format == "PNG" and min(img.size) > 100


def test_clear_errors_without_tracebacks(setup):
    tmp = setup["tmp"]
    r = invoke("masks", "inspect", tmp / "nothing.zarr")
    assert r.exit_code == 1 and "does not exist" in r.text
    r = invoke("masks", "synthetic", "--checkpoint", tmp / "nope.pt", "--params", setup["params"],
               "--out", tmp / "s.zarr")
    assert r.exit_code == 1 and "checkpoint not found" in r.text
    assert not (tmp / "s.zarr").exists()
    r = invoke("masks", "synthetic", "--checkpoint", setup["ckpt"], "--params", setup["params"], "--out",
               tmp / "s.zarr", "--fraction", "1.5")
    assert r.exit_code == 2 and "(0, 1]" in r.text
    r = invoke("masks", "human", "--root", tmp / "nowhere", "--image-size", "8", "--out", tmp / "h.zarr")
    assert r.exit_code == 1 and "does not exist" in r.text

    # A store of another image size cannot be shown beside this one.
    invoke("masks", "human", "--root", setup["root"], "--image-size", "8", "--out", tmp / "h8.zarr", "-q",
           "--params", tmp / "absent.yaml")
    invoke("masks", "human", "--root", setup["root"], "--image-size", "6", "--out", tmp / "h6.zarr", "-q",
           "--params", tmp / "absent.yaml")
    r = invoke("masks", "show", tmp / "h8.zarr", "--other", tmp / "h6.zarr", "--out", tmp / "f.png")
    assert r.exit_code == 1 and "image shape" in r.text and not (tmp / "f.png").exists()


def test_stages_write_stores_and_an_unavailable_human_store(setup, monkeypatch):
    from stages import masks_human, masks_synthetic

    tmp = setup["tmp"]
    work = tmp / "work"
    (work / "data" / "teacher").mkdir(parents=True)
    setup["ckpt"].rename(work / "data" / "teacher" / "model.pt")
    write_params(work / "params.yaml", setup["root"])
    monkeypatch.chdir(work)
    monkeypatch.setattr("sys.argv", ["masks_synthetic", "--teacher", "data/teacher/model.pt",
                                     "--out", "data/masks/synthetic.zarr"])
    masks_synthetic.main()
    monkeypatch.setattr("sys.argv", ["masks_human", "--out", "data/masks/human.zarr"])
    masks_human.main()
    assert len(MaskStore.open("data/masks/synthetic.zarr", dataset=setup["ds"], kind="synthetic")) == 6
    assert len(MaskStore.open("data/masks/human.zarr", dataset=setup["ds"], kind="human")) == 6

    # Without segmentations (as for CIFAR) the human stage succeeds with a store that sip_h will refuse.
    bare = make_cub_tree(tmp / "bare" / "CUB_200_2011", segmentations=False)
    write_params(work / "params.yaml", bare)
    masks_human.main()
    with pytest.raises(MaskStoreError, match="holds no human masks: .*no human segmentations"):
        MaskStore.open("data/masks/human.zarr", dataset=load_dataset("cub", str(bare), "train", 8), kind="human")
    r = invoke("masks", "inspect", "data/masks/human.zarr")
    assert r.exit_code == 0 and "no human segmentations" in r.text
