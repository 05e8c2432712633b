"""A tiny end-to-end run of the real DVC pipeline in a temporary git repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for item in ("pipeline", "stages", "dvc.yaml"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / item)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["strategy"] = "sip_s"
    params["teacher"].update(epochs=2, batch_size=128)
    params["train"].update(epochs=1, batch_size=128)
    params["attack"]["steps"] = 2
    params["evaluate"].update(eps=["32/255"], teacher_eps=["32/255"], n_examples=12)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("__pycache__/\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    return root, env


def test_dvc_repro_end_to_end(tiny_repo):
    root, env = tiny_repo
    out = _run(["dvc", "repro"], root, env)
    for stage in ("prepare", "teacher", "masks_synthetic", "masks_human", "train", "evaluate_teacher", "evaluate"):
        assert f"'{stage}'" in out
    for which in ("teacher", "student"):
        m = json.loads((root / "data" / "metrics" / f"{which}.json").read_text())
        assert m["n_examples"] == 12 and 0.0 <= m["clean_acc"] <= 1.0
        assert set(m["robust_acc"]) == {"eps_32_255"}
        assert m["robust_acc"]["eps_32_255"] <= m["clean_acc"]
        assert set(m["attacks"]["eps_32_255"]["broken_by"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert json.loads((root / "data/metrics/student.json").read_text())["strategy"] == "sip_s"
    assert (root / "data/masks/synthetic.zarr").is_dir() and (root / "data/masks/human.zarr").is_dir()
    # nothing half-written is left beside the outputs
    assert not [p for p in root.joinpath("data").rglob("*.tmp")]

    again = _run(["dvc", "repro"], root, env)
    assert "Data and pipelines are up to date" in again

    shown = _run(["dvc", "metrics", "show", "--json"], root, env)
    assert "clean_acc" in shown and "eps_32_255" in shown

    # Code edits invalidate exactly the stages that run that code.
    with open(root / "pipeline" / "report.py", "a") as f:
        f.write("\n# edited\n")
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], root, env)
    evaluation = root / "pipeline" / "evaluation.py"
    original = evaluation.read_text()
    evaluation.write_text(original + "\n# edited\n")
    status = _run(["dvc", "status", "--json"], root, env)
    assert set(json.loads(status[status.index("{"):])) == {"teacher", "train", "evaluate_teacher", "evaluate"}
    evaluation.write_text(original)
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], root, env)


def test_experiment_reruns_only_the_student(tiny_repo):
    root, env = tiny_repo
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "baseline"], root, env)
    out = _run(["dvc", "exp", "run", "-S", "strategy=sip_h"], root, env)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    for stage in ("teacher", "masks_synthetic", "masks_human", "evaluate_teacher"):
        assert f"Running stage '{stage}'" not in out
    m = json.loads((root / "data/metrics/student.json").read_text())
    assert m["strategy"] == "sip_h"


def test_queued_grid_runs_in_parallel_and_reports(tiny_repo):
    import time

    root, env = tiny_repo
    _run(["dvc", "exp", "run", "--queue", "-S", "strategy=basic,madry", "-S", "seed=0,1"], root, env)
    _run(["dvc", "queue", "start", "-j", "2"], root, env)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = _run(["dvc", "queue", "status"], root, env)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert status.count("Success") >= 4, status
    _run(["dvc", "queue", "stop"], root, env)
    out = _run([str(Path(sys.executable).parent / "sipat"), "report", "--out", "r.md", "--plot", "r.png"], root, env)
    table = (root / "r.md").read_text()
    for label in ("Basic", "Madry"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} "))
        assert row.rstrip().endswith("| 2 |"), row  # two seeds each
    assert (root / "r.png").stat().st_size > 1000
    assert "runs (DVC experiments)" in out
