"""Survey image sets: a balanced seeded pool, attacks that spend the budget, 8-bit PNGs inside the ε-ball."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import CheckpointError, OutputConflict
from pipeline.data import load_dataset
from pipeline.models import build_model, load_checkpoint, save_checkpoint
from pipeline.survey.images import (build_image_set, is_grey, quantise_into_ball, run_attack, select_example_images,
                                    select_pool)
from pipeline.survey.manifest import read_image_set


def tiny_checkpoint(path: Path, num_classes: int = 10, seed: int = 0) -> Path:
    """An untrained smallcnn: the survey needs a model to attack, not a good one."""
    torch.manual_seed(seed)
    model = build_model("smallcnn", num_classes)
    save_checkpoint(path, model, {"arch": "smallcnn", "num_classes": num_classes, "mean": [0.0] * 3,
                                  "std": [1.0] * 3, "role": "teacher", "dataset": "digits"})
    return path


@pytest.fixture(scope="module")
def digits_test(digits_root):
    return load_dataset("digits", str(digits_root), "test", 16)


@pytest.fixture(scope="module")
def model_and_meta(tmp_path_factory):
    return load_checkpoint(tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt"))


def test_pool_is_class_balanced_seeded_and_distinct_from_the_examples():
    labels = np.repeat(np.arange(6), 9)
    pool = select_pool(labels, 5, seed=3)
    assert np.array_equal(np.bincount(labels[pool]), [5] * 6)
    assert len(set(pool.tolist())) == 30
    assert np.array_equal(pool, select_pool(labels, 5, seed=3))
    assert not np.array_equal(pool, select_pool(labels, 5, seed=4))
    small = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    assert np.array_equal(np.bincount(small[select_pool(small, 5, 0)]), [2, 5])  # all of a smaller class
    ex = select_example_images(labels, pool, seed=3)
    assert len(ex) == 2 and not set(ex.tolist()) & set(pool.tolist()) and labels[ex[0]] != labels[ex[1]]


def test_rounding_stays_inside_the_ball_and_is_nearest_inside_it():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (64, 3, 5, 5), generator=g, dtype=torch.uint8)
    for k in (1, 2, 8):
        # attack outputs may overshoot the ball by float error or more; they may sit between grid levels
        noise = (torch.rand(clean.shape, generator=g) * 2 - 1) * (k + 0.9)
        x_adv = ((clean.float() + noise) / 255).clamp(0, 1)
        q = quantise_into_ball(x_adv, clean, k)
        d = q.to(torch.int16) - clean.to(torch.int16)
        assert q.dtype == torch.uint8 and int(d.abs().max()) <= k
        inside = noise.abs() <= k - 0.5  # away from the boundary rounding to nearest is unconstrained
        nearest = (x_adv * 255).round().to(torch.int16)
        assert torch.equal(q.to(torch.int16)[inside], nearest[inside])
    exact = (clean.float() + 3) / 255  # an attack that spent exactly 3/255 keeps it after rounding
    assert int((quantise_into_ball(exact.clamp(0, 1), clean, 3).int() - clean.int()).abs().max()) == 3


@pytest.mark.parametrize("attack", ["apgd-ce", "pgd"])
def test_image_set_files_manifest_and_summary(tmp_path, digits_test, model_and_meta, attack):
    model, meta = model_and_meta
    out = tmp_path / "teacher"
    summary = build_image_set(model, meta, digits_test, out, version="teacher", eps_list=[2 / 255, 8 / 255],
                              per_class=1, attack=attack, steps=5, seed=0, batch_size=7,
                              device=torch.device("cpu"), progress=False)
    info, rows = read_image_set(out)
    assert info["attack"]["name"] == attack and info["attack"]["norm"] == "Linf" and info["eps_255"] == [2, 8]
    pool = [r for r in rows if r["role"] == "pool"]
    assert len(pool) == 10 * 3 and len(rows) == 12 * 3
    assert sorted(int(r["label"]) for r in pool if r["eps_255"] == "0") == list(range(10))
    clean = {int(r["index"]): np.asarray(Image.open(out / r["file"])).astype(int)
             for r in rows if r["eps_255"] == "0"}
    for r in rows:
        img = Image.open(out / r["file"])
        assert img.mode == "RGB" and img.size == (16, 16)
        arr = np.asarray(img).astype(int)
        k, linf = int(r["eps_255"]), int(r["linf_255"])
        assert np.abs(arr - clean[int(r["index"])]).max() == linf <= k  # the PNG as stored is inside its ball
        if k:
            assert linf == k and r["attack"] == attack  # the attack spends its budget
            # the digits are grey: a perturbed one stays grey, so colour cannot give the perturbation away
            assert r["constraint"] == "grey" and (arr == arr[:, :, :1]).all()
        # "still adversarial" is the model's verdict on the stored 8-bit image
        with torch.no_grad():
            pred = int(model(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255).argmax(1))
        assert pred == int(r["pred"]) and (r["still_adversarial"] == "True") == (pred != int(r["label"]))
    assert summary["all_inside_ball"] and info["summary"] == summary
    assert set(summary["per_eps"]) == {"eps_0_255", "eps_2_255", "eps_8_255"}
    assert summary["per_eps"]["eps_8_255"]["linf_255_max"] == 8 and summary["n_pool"] == 10
    for ex in info["examples"]:
        assert (out / ex["clean"]).is_file() and (out / ex["perturbed"]).is_file()
    assert [ex["eps_255"] for ex in info["examples"]] == [8, 2]
    with open(out / "manifest.csv", newline="") as f:
        assert next(csv.reader(f))[:4] == ["file", "version", "role", "index"]
    assert not list(tmp_path.glob(".*.tmp"))


class _Tinted:
    """A dataset whose odd-numbered images are tinted (no longer grey); everything else from `base`."""

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def image_uint8(self, i: int) -> torch.Tensor:
        img = self.base.image_uint8(i).clone()
        if i % 2:
            img[0] = img[0] // 2 + 100
        return img


@pytest.mark.parametrize("attack", ["apgd-ce", "pgd"])
def test_grey_images_get_one_delta_shared_by_their_channels(attack, model_and_meta):
    model, _ = model_and_meta
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 1, 16, 16), generator=g, dtype=torch.uint8).expand(-1, 3, -1, -1).clone()
    x[3:, 0] = x[3:, 0] // 2  # three colour images in the same batch
    grey = is_grey(x)
    assert grey.tolist() == [True] * 3 + [False] * 3
    y = torch.arange(6) % 10
    x_adv = run_attack(model, x.float() / 255, y, 8 / 255, attack=attack, steps=4, seed=0, grey=grey)
    q = quantise_into_ball(x_adv, x, 8)
    d = q.to(torch.int16) - x.to(torch.int16)
    assert int(d.abs().max()) == 8
    assert bool(is_grey(q[:3]).all()) and bool(is_grey(d[:3]).all())  # one δ for all channels
    assert not bool(is_grey(d[3:]).any())  # colour images keep a δ per channel
    unconstrained = run_attack(model, x.float() / 255, y, 8 / 255, attack=attack, steps=4, seed=0)
    assert not bool(is_grey(quantise_into_ball(unconstrained, x, 8)[:3]).all())  # what the constraint prevents


def test_image_set_of_a_partly_grey_dataset_records_the_constraint(tmp_path, digits_test, model_and_meta):
    model, meta = model_and_meta
    out = tmp_path / "set"
    build_image_set(model, meta, _Tinted(digits_test), out, version="v", eps_list=[4 / 255, 16 / 255],
                    per_class=1, attack="apgd-ce", steps=3, seed=0, batch_size=64, device=torch.device("cpu"),
                    progress=False)
    info, rows = read_image_set(out)
    seen = set()
    for r in rows:
        arr = np.asarray(Image.open(out / r["file"])).astype(int)
        clean = np.asarray(Image.open(out / r["file"].replace(f"_e{int(r['eps_255']):03d}", "_e000"))).astype(int)
        k = int(r["eps_255"])
        assert np.abs(arr - clean).max() <= k
        grey_clean = bool((clean == clean[:, :, :1]).all())
        assert grey_clean == (int(r["index"]) % 2 == 0)
        if k == 0:
            assert r["constraint"] == "none"
            continue
        assert r["constraint"] == ("grey" if grey_clean else "per-channel")
        if grey_clean:
            assert (arr == arr[:, :, :1]).all(), r["file"]  # no perturbed image of a grey image has colour
        seen.add(r["constraint"])
    assert seen == {"grey", "per-channel"}
    n_grey = sum(int(i) % 2 == 0 for i in {r["index"] for r in rows})
    assert info["attack"]["grey_images"] == n_grey and set(info["attack"]["constraint"]) == {"grey", "per-channel"}
    assert info["summary"]["grey_pool_images"] == sum(int(i) % 2 == 0 for i in info["pool"])


def test_image_set_is_reproducible(tmp_path, digits_test, model_and_meta):
    model, meta = model_and_meta
    kw = dict(version="v", eps_list=[4 / 255], per_class=1, attack="pgd", steps=3, seed=1, batch_size=64,
              device=torch.device("cpu"), progress=False)
    build_image_set(model, meta, digits_test, tmp_path / "a", **kw)
    build_image_set(model, meta, digits_test, tmp_path / "b", **kw)
    for f in sorted((tmp_path / "a" / "images").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / "images" / f.name).read_bytes()


def test_refuses_foreign_output_and_mismatched_model(tmp_path, digits_test, model_and_meta):
    model, meta = model_and_meta
    kw = dict(version="v", eps_list=[4 / 255], per_class=1, attack="pgd", steps=1, seed=0, batch_size=64,
              device=torch.device("cpu"), progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputConflict, match="not a survey image set"):
        build_image_set(model, meta, digits_test, tmp_path / "mine", **kw)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(CheckpointError, match="3 classes"):
        build_image_set(model, dict(meta, num_classes=3), digits_test, tmp_path / "x", **kw)
    # an existing set is replaced whole
    build_image_set(model, meta, digits_test, tmp_path / "set", **kw)
    build_image_set(model, meta, digits_test, tmp_path / "set", **dict(kw, eps_list=[2 / 255]))
    assert json.loads((tmp_path / "set" / "set.json").read_text())["eps_255"] == [2]
    assert not list((tmp_path / "set" / "images").glob("*_e004.png"))


def test_images_command(tmp_path, digits_root):
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"dataset": "digits", "device": "cpu", "data": {"root": str(digits_root)},
                                      "survey": {"per_class": 1, "steps": 2, "attack": "pgd", "eps": ["8/255"]}}))
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "sets" / "v1"
    runner = CliRunner()
    r = runner.invoke(app, ["survey", "images", "--checkpoint", str(ckpt), "--version", "v1", "--out", str(out),
                            "--params", str(params), "-q"])
    assert r.exit_code == 0, r.output
    assert "inside its ε-ball after 8-bit rounding: yes" in " ".join(r.output.split())
    info, rows = read_image_set(out)
    assert info["version"] == "v1" and info["checkpoint_sha256"] and len(rows) == 12 * 2
    for args, message in ((["--checkpoint", str(tmp_path / "none.pt"), "--version", "v2"], "checkpoint not found"),
                          (["--checkpoint", str(ckpt), "--version", "a/b"], "version name 'a/b'")):
        r = runner.invoke(app, ["survey", "images", *args, "--params", str(params), "--out", str(tmp_path / "x")])
        assert r.exit_code == 1 and message in " ".join(r.output.split()) and "Traceback" not in r.output
