"""Guards against wasted reruns and lost files: what a stage records, what is checked before training, what the
project may replace, and what is left behind when a process is killed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import config_from_dict
from pipeline.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- reruns that change nothing

def test_another_strategys_parameter_leaves_the_checkpoint_bytes_identical(digits_root, tmp_path):
    """The checkpoint records the run's own strategy section only, so `train.trades.beta` does not change a
    `basic` student's bytes (and DVC skips its evaluation); its own section still does."""
    from pipeline.models import load_checkpoint
    from pipeline.training.run import train_run

    def run(name, **train):
        raw = {"dataset": "digits", "strategy": "basic", "device": "cpu", "data": {"root": str(digits_root)},
               "train": {"epochs": 1, "batch_size": 256, **train}, "perf": {"amp": "off", "channels_last": "off"}}
        out = tmp_path / name / "model.pt"  # the same file name: torch.save writes it into the archive
        train_run(config_from_dict(raw), "student", out, progress=False)
        return out.read_bytes()

    assert run("a") == run("b", trades={"beta": 1.0}, fat={"omega": 0.5})
    assert "trades" not in load_checkpoint(tmp_path / "a" / "model.pt")[1]["optim"]


def test_teacher_eps_is_a_list_of_its_own():
    """Each evaluation stage declares only its own budgets key: `null` (meaning "the student's") is refused."""
    with pytest.raises(ConfigError, match=r"evaluate\.teacher_eps: .*null is not accepted"):
        config_from_dict({"evaluate": {"teacher_eps": None}})
    assert config_from_dict({"evaluate": {"teacher_eps": ["8/255"]}}).evaluate.teacher_eps == [8 / 255]


def test_dvc_yaml_declares_only_parameters_that_change_outputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    speed_only = {"evaluate.workers", "evaluate.threads_per_worker", "evaluate.batch_size", "perf.resume",
                  "data.num_workers", "evaluate", "perf", "data", "salience", "salience.batch_size"}
    for name, spec in stages.items():
        if name != "prepare":  # prepare reruns at every repro anyway
            assert not speed_only & set(spec.get("params", [])), name
    assert "evaluate.eps" not in stages["evaluate_teacher"]["params"]
    assert "evaluate.teacher_eps" not in stages["evaluate"]["params"]


# ------------------------------------------------------------------------------- checked before training

def test_every_stage_parameter_is_checked_by_prepare(tmp_path, monkeypatch):
    """A misspelt strategy, model or strategy parameter stops `prepare` (the first stage) in seconds."""
    from pipeline.validate import check_config

    check_config(config_from_dict({}))
    for raw, key in [({"strategy": "nope"}, "strategy: unknown strategy 'nope'"),
                     ({"model": "resnet99"}, "model: unknown model"),
                     ({"teacher": {"model": "x"}}, "teacher.model: unknown model"),
                     ({"dataset": "mnist"}, "dataset: unknown dataset"),
                     ({"train": {"trades": {"beta": -1}}}, "train.trades.beta"),
                     ({"train": {"part": {"low_eps_fraction": "9/8"}}}, "train.part.low_eps_fraction"),
                     ({"train": {"tradse": {"beta": 1}}}, "train.tradse: unknown key")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
            check_config(config_from_dict(raw))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"strategy": "nope"}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prepare", "--out", "prepared"])
    with pytest.raises(SystemExit) as exc:
        importlib.import_module("stages.prepare").main()
    msg = str(exc.value.code)
    assert msg.startswith("error: strategy: unknown strategy 'nope'") and "\n" not in msg, msg
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("eps", ["300/255", "256/255", 2])
def test_survey_budgets_above_one_are_refused(eps):
    with pytest.raises(ConfigError, match=r"survey\.eps\.0: .*above 1"):
        config_from_dict({"survey": {"eps": [eps]}})
    assert config_from_dict({"survey": {"eps": ["255/255"]}}).survey.eps == [1.0]


# ------------------------------------------------------------------------------- only the project's own files

def _user_files(tmp_path: Path) -> dict[str, bytes]:
    """A user's photo, notes and checkpoint: the right formats, but not written by this project."""
    import io

    import torch
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    ckpt = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, ckpt)
    files = {"photo.png": buf.getvalue(), "notes.json": b'{"todo": ["buy milk"]}\n', "my.pt": ckpt.getvalue(),
             "notes.md": b"# my notes\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


def test_files_of_the_right_format_without_the_mark_are_never_replaced(tmp_path):
    from pipeline.core.errors import OutputConflict
    from pipeline.core.utils import atomic_path, write_json

    files = _user_files(tmp_path)
    for name in files:
        with pytest.raises(OutputConflict, match=rf"{name} exists and was not written by this project"):
            with atomic_path(tmp_path / name) as tmp:
                tmp.write_bytes(b"x")
    with pytest.raises(OutputConflict, match="notes.json"):
        write_json(tmp_path / "notes.json", {"a": 1})
    assert {n: (tmp_path / n).read_bytes() for n in files} == files
    write_json(tmp_path / "ours.json", {"a": 1})
    write_json(tmp_path / "ours.json", {"a": 2})  # what the project wrote is replaced
    assert '"written_by": "sipat"' in (tmp_path / "ours.json").read_text()


def test_the_projects_outputs_carry_the_mark(tmp_path):
    import torch

    from pipeline.core.utils import is_marked
    from pipeline.figures import render_mask_grid
    from pipeline.models import build_model, save_checkpoint

    render_mask_grid(torch.rand(2, 3, 8, 8), [("m", torch.rand(2, 3, 8, 8) > 0.5)], ["a", "b"], tmp_path / "g.png",
                     "t")
    save_checkpoint(tmp_path / "c.pt", build_model("smallcnn", 3), {"arch": "smallcnn"})
    assert is_marked(tmp_path / "g.png") and is_marked(tmp_path / "c.pt")
    render_mask_grid(torch.rand(2, 3, 8, 8), [("m", torch.rand(2, 3, 8, 8) > 0.5)], ["a", "b"], tmp_path / "g.png",
                     "again")  # replaced: it carries the mark
    files = _user_files(tmp_path)
    assert not any(is_marked(tmp_path / n) for n in files)


def test_train_stage_refuses_a_users_files_before_training(tmp_path, monkeypatch):
    files = _user_files(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"strategy": "madry"}))
    monkeypatch.chdir(tmp_path)
    for module, argv in [("stages.train", ["teacher", "--out", "my.pt", "--history", "x.json"]),
                         ("stages.train", ["teacher", "--out", "x.pt", "--history", "notes.json"]),
                         ("stages.teacher", ["--out", "my.pt", "--history", "x.json"]),
                         ("stages.evaluate", ["student", "--checkpoint", "x.pt", "--out", "notes.json"])]:
        monkeypatch.setattr(sys, "argv", [module, *argv])
        with pytest.raises(SystemExit) as exc:
            importlib.import_module(module).main()
        msg = str(exc.value.code)
        assert "was not written by this project" in msg and "\n" not in msg, msg
    assert {n: (tmp_path / n).read_bytes() for n in files} == files
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.pt").exists()


def test_masks_show_writes_png_only_and_never_over_a_users_file(tmp_path):
    from test_maskstore import FakeDataset, random_masks, write
    from typer.testing import CliRunner

    from pipeline.cli import app

    files = _user_files(tmp_path)
    ds = FakeDataset(6)
    write(tmp_path / "s.zarr", ds, random_masks(6, ds.image_shape))
    runner = CliRunner()
    for out in ("photo.png", "notes.json", "my.pt", "x.jpg"):
        r = runner.invoke(app, ["masks", "show", str(tmp_path / "s.zarr"), "--out", str(tmp_path / out)])
        text = " ".join(r.output.split())
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert ("was not written by this project" in text) if out == "photo.png" else ("PNG images only" in text)
    assert {n: (tmp_path / n).read_bytes() for n in files} == files
    assert not (tmp_path / "x.jpg").exists()


# ------------------------------------------------------------------------------- messages

def test_cifar_file_with_bytes_keys_says_what_it_found(tmp_path):
    import pickle

    from conftest import make_cifar_tree

    from pipeline.core.errors import DatasetError
    from pipeline.data import load_dataset

    root = make_cifar_tree(tmp_path)
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    entry = pickle.loads(batch.read_bytes())
    batch.write_bytes(pickle.dumps({k.encode(): v for k, v in entry.items()}))
    with pytest.raises(DatasetError, match=r"data_batch_1: expected keys 'data' and 'labels', found b'data'.*bytes"):
        load_dataset("cifar10", str(root), "train", 8)


def test_corrupt_resume_warning_gives_no_torch_advice(tmp_path, caplog):
    """A resume state this project wrote that cannot be read is dropped with one warning, without torch's advice
    to load it with weights_only=False."""
    import torch

    from pipeline.training import RESUME_FORMAT, TrainOptions, _load_resume

    resume = tmp_path / ".model.resume.pt"
    torch.save({"format": RESUME_FORMAT, "x": Foreign()}, resume)  # marked, but not loadable weights-only
    assert _load_resume(TrainOptions(device=torch.device("cpu"), resume_path=resume, resume_key="k")) is None
    assert "cannot be read" in caplog.text and "weights_only" not in caplog.text, caplog.text
    assert not resume.exists()


@pytest.mark.parametrize("content", [b"my notes\n", b"\0" * 300, "foreign-torch"])
def test_a_users_file_at_the_resume_path_is_refused_and_kept(tmp_path, content):
    import torch

    from pipeline.core.errors import OutputConflict
    from pipeline.training import TrainOptions, _load_resume

    resume = tmp_path / ".s.resume.pt"
    if content == "foreign-torch":
        torch.save({"x": Foreign()}, resume)
    else:
        resume.write_bytes(content)
    before = resume.read_bytes()
    with pytest.raises(OutputConflict, match=r"\.s\.resume\.pt is where training keeps its resume state"):
        _load_resume(TrainOptions(device=torch.device("cpu"), resume_path=resume, resume_key="k"))
    assert resume.read_bytes() == before


class Foreign:
    """An object that a weights-only load refuses."""


# ------------------------------------------------------------------------------- mask stores

def test_swapped_chunks_are_refused_by_name(tmp_path):
    """Two valid chunks swapped inside one store decode fine and keep the totals: only the per-chunk digests
    recorded at write time tell them apart."""
    import shutil

    from test_maskstore import FakeDataset, random_masks, write
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.core.errors import MaskStoreError
    from pipeline.maskstore import MaskStore

    ds = FakeDataset(12)
    path = tmp_path / "s.zarr"
    write(path, ds, random_masks(12, ds.image_shape), chunk=4)
    MaskStore.open(path, dataset=ds)
    a, b = path / "c" / "1" / "0", path / "c" / "2" / "0"
    shutil.copy(a, tmp_path / "x")
    shutil.copy(b, a)
    shutil.copy(tmp_path / "x", b)
    with pytest.raises(MaskStoreError, match=r"2 of 3 chunk\(s\) hold other masks than were written there.*c/1/0, "
                                             r"c/2/0"):
        MaskStore.open(path, dataset=ds)
    r = CliRunner().invoke(app, ["masks", "inspect", str(path)])
    assert r.exit_code == 1 and "c/1/0" in r.output and "all present" not in r.output


# ------------------------------------------------------------------------------- no orphans

_POOL_SCRIPT = """
import multiprocessing as mp, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pipeline.evaluation import _init_worker

def sleeper():
    print(os.getpid(), flush=True)
    time.sleep(300)

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=_init_worker, initargs=({}, ctx.Queue(), 1)) as pool:
        for _ in range(2):
            pool.submit(sleeper)
        time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\\nState:\\tZ" in state  # exited; only its parent's reaping is left


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_evaluation_workers_exit_when_their_parent_is_killed(tmp_path):
    import signal
    import subprocess
    import time

    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    try:
        pids = [int(proc.stdout.readline()) for _ in range(2)]
        assert not any(_gone(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup of any kind runs in the parent
        proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if not _gone(p)]
    for p in left:
        __import__("os").kill(p, signal.SIGKILL)
    assert not left, "evaluation workers outlived their killed parent"


# ------------------------------------------------------------------------------- params.yaml and dvc exp run

@pytest.mark.slow
def test_exp_run_refuses_to_discard_edits_of_params_yaml(tmp_path):
    """`dvc exp run -S` rewrites params.yaml from conf/: an edit made in params.yaml stops it (one line naming
    the key) and stays; params.yaml as conf/ composes it, or as an experiment left it, runs."""
    import os
    import shutil
    import subprocess

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*args):
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    shutil.copytree(REPO / "hydra_plugins", tmp_path / "hydra_plugins", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("a: 1\nsection: {b: 2, c: 8/255}\n")
    (tmp_path / "params.yaml").write_text("a: 1\nsection:\n  b: 2\n  c: 8/255\n")
    (tmp_path / "stage.py").write_text(  # fails when a is 9
        "import shutil, sys\nif 'a: 9' in open('params.yaml').read():\n    sys.exit(1)\n"
        "shutil.copy('params.yaml', 'out.txt')\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n"
                                       "    params: [a, section]\n    outs: [out.txt]\n")
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "hydra.enabled", "true"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        assert run(*cmd).returncode == 0, cmd
    assert run("dvc", "exp", "run", "-S", "a=3").returncode == 0  # params.yaml as conf/ composes it
    assert run("dvc", "exp", "run", "-S", "a=4").returncode == 0  # as the experiment left it
    edited = "a: 1\nsection:\n  b: 5\n  c: 8/255\n"
    (tmp_path / "params.yaml").write_text(edited)
    for args in (["-S", "a=3"], ["--queue", "-S", "a=5"]):
        r = run("dvc", "exp", "run", *args)
        err = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode != 0 and len(err) == 1, r.stderr
        assert "params.yaml differs from the composition of conf/ in section.b" in err[0] and "-S" in err[0]
        assert (tmp_path / "params.yaml").read_text() == edited  # the edit is kept
    # an edit next to a line that does not parse: refused, not rewritten from conf/
    broken = "a: 1\nsection:\n  b: 5\n  c: 8/255\noops: [unclosed\n"
    (tmp_path / "params.yaml").write_text(broken)
    r = run("dvc", "exp", "run", "-S", "a=3")
    assert r.returncode != 0 and "params.yaml does not parse (line" in r.stderr, r.stderr
    assert (tmp_path / "params.yaml").read_text() == broken
    # a run that fails leaves DVC's composition behind: the next run is not refused over edits nobody made
    (tmp_path / "params.yaml").write_text("a: 1\nsection:\n  b: 2\n  c: 8/255\n")
    assert run("dvc", "exp", "run", "-S", "a=9").returncode != 0
    assert "a: 9" in (tmp_path / "params.yaml").read_text()
    r = run("dvc", "exp", "run", "-S", "a=3")
    assert r.returncode == 0, r.stderr
