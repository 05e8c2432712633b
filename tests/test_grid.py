"""`sipat grid` without a cluster: resources, job descriptions, SLURM's array ids, the torchrun wrapper."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import grid as g

REPO = Path(__file__).resolve().parents[1]


def test_resources_come_from_the_protocol_then_the_command_line():
    res = g.load_resources(REPO, "cifar10_resnet18", [])
    assert (res.shared.gpus, res.shared.time_min, res.student.time_min) == (1, 1440, 480)
    res = g.load_resources(REPO, "cifar10_resnet18", ["time_min=30", "shared.gpus=4", "partition=gpu"])
    assert (res.shared.gpus, res.shared.time_min, res.student.gpus, res.student.time_min) == (4, 30, 1, 30)
    assert res.shared.partition == res.student.partition == "gpu"
    digits = g.load_resources(REPO, "digits", ["account=null"])
    assert (digits.student.gpus, digits.student.cpus, digits.student.account) == (0, 2, None)


@pytest.mark.parametrize("bad, named", [("gpu=1", "gpu"), ("cpus=0", "cpus"), ("time_min", "KEY=VALUE"),
                                        ("student.mem_gb=-1", "mem_gb")])
def test_bad_resources_are_named(bad, named):
    with pytest.raises(ValueError, match=named):
        g.load_resources(REPO, "digits", [bad])


def test_every_protocol_has_resources_that_load():
    conf = yaml.safe_load((REPO / "conf" / "resources.yaml").read_text())
    protocols = {p.stem for p in (REPO / "conf" / "protocol").glob("*.yaml")}
    assert set(conf["protocols"]) == protocols
    for p in protocols:
        g.load_resources(REPO, p, [])


def _grid(executor="slurm", **res) -> g.Grid:
    return g.Grid(name="t", repo="/r", rev="a" * 40, cache="/r/.dvc/cache", workdir="/r/.grid/t", executor=executor,
                  protocol="digits", overrides=["train.epochs=1"],
                  resources=g.JobResources(student=g.Resources(**res)).model_dump(),
                  cells=[g.Cell("t-madry-s0", "madry", 0), g.Cell("t-sip_s-s1", "sip_s", 1)])


def test_describe_prints_every_job_its_resources_and_commands():
    lines = "\n".join(g.describe(_grid(gpus=2, partition="gpu")))
    assert "shared job (the shared stages, once; SLURM gives its id at submission) [gpus=0 cpus=2 mem=4GB " \
           "time=60min" in lines
    # the clone as `_clone` makes it, and the baseline's params.yaml restored before each (re)run
    assert "git clone -q --no-checkout /r /r/.grid/t/cells/t-madry-s0/repo.tmp" in lines
    assert "git checkout -q " + "a" * 40 + " -- params.yaml" in lines
    one = "\n".join(g.describe(_grid(), cells=[g.Cell("t-madry-s0", "madry", 0)], shared=False))
    assert "one job of 1 (shared stages already built: no dependency)" in one and "shared job" not in one
    assert "job array of 2 (after the shared job succeeds (afterok)) [gpus=2 cpus=2 mem=4GB time=60min " \
           "partition=gpu" in lines
    assert "dvc exp run -S protocol=digits -S train.epochs=1 masks_synthetic masks_human evaluate_teacher" in lines
    assert "dvc exp run -n t-sip_s-s1 -S protocol=digits -S train.epochs=1 -S strategy=sip_s -S seed=1 evaluate" in lines
    assert "dvc exp push --no-cache origin t-madry-s0" in lines
    local = "\n".join(g.describe(_grid("local")))
    assert "dvc exp run --queue -n t-madry-s0 -S protocol=digits -S train.epochs=1 -S strategy=madry -S seed=0" in local
    assert "then: dvc queue start -j 1" in local


def test_slurm_array_task_ids():
    assert g._expand_tasks("3") == ["3"]
    assert g._expand_tasks("0-3%2") == ["0", "1", "2", "3"]
    assert g._expand_tasks("1,4-5") == ["1", "4", "5"]


def test_the_torchrun_wrapper_wraps_only_the_distributed_stages(tmp_path):
    grid = _grid(gpus=2)
    grid.workdir = str(tmp_path)
    g._write_torchrun_shim(grid)
    shim = tmp_path / "bin" / "python"
    env = {"SIPAT_PYTHON": sys.executable, "SIPAT_NPROC": "2", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(shim), "-c", "print('plain')"], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "plain"
    text = shim.read_text()
    for module in g.TORCHRUN_MODULES:
        assert f'"-m {module}"' in text
    assert '-m torch.distributed.run --standalone --nproc-per-node "$SIPAT_NPROC"' in text


def test_a_grid_needs_a_committed_dvc_project(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a DVC project"):
        g.plan(tmp_path, "digits", ["madry"], [0], [], executor="slurm", name=None, workdir=None, resources=[])


# ------------------------------------------------------------------------- checked before anything is submitted

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A committed DVC project with this repository's dvc.yaml, params.yaml and conf/ (nothing run)."""
    import shutil

    root = tmp_path_factory.mktemp("grid-project")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "conf", root / "conf")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "b"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


@pytest.mark.parametrize("args, problem", [
    (["--strategies", "madry,nope"], "unknown strategy 'nope'"),
    (["-S", "train.epochz=3"], "train.epochz"),
    (["-S", "train.epochs=-1"], "train.epochs: Input should be greater than"),
    (["-p", "no_such_protocol"], "no_such_protocol"),
    (["--strategies", "madry,madry", "--seeds", "0,0"], "--strategies: madry given twice"),
    (["-j", "0"], "--jobs 0: at least one experiment"),
    (["-R", "cpus=zero"], "student.cpus: Input should be a valid integer"),
    (["--shared-from", "other"], "--shared-from needs --executor slurm"),
    (["--workdir", "afile"], "is a file, not a folder"),
])
def test_a_bad_grid_is_refused_in_one_line_per_problem_before_submission(project, monkeypatch, args, problem):
    from typer.testing import CliRunner

    from pipeline.cli import app

    (project / "afile").write_text("x")
    monkeypatch.chdir(project)
    # every problem refused with and without --dry-run; the real submission is tried for two of them only,
    # as the same check precedes both (the suite's time)
    runs = ([], ["--dry-run"]) if args[0] in ("--strategies", "-S") and problem.startswith(("unknown", "train")) \
        else (["--dry-run"],)
    for dry in runs:
        res = CliRunner().invoke(app, ["grid", "run", "--name", "bad", "--strategies", "madry", "--seeds", "0",
                                       *args, *dry], terminal_width=200)
        text = " ".join(res.output.split())
        assert res.exit_code == 1 and problem in text and "nothing submitted" in text, res.output
        assert "Traceback" not in res.output and "https://" not in res.output
    assert not (project / ".grid" / "bad").exists()
    queue = subprocess.run([str(Path(sys.executable).parent / "dvc"), "queue", "status"], cwd=project,
                           capture_output=True, text=True).stdout
    assert "bad-" not in queue


def test_a_grid_json_from_another_version_is_named(tmp_path):
    (tmp_path / "grid.json").write_text(json.dumps({"name": "x", "extra": 1}))
    with pytest.raises(ValueError, match=r"grid\.json: unknown key\(s\) extra; missing key\(s\) "):
        g.Grid.load(tmp_path)


# ------------------------------------------------------------------------- a local run whose process was killed

def _processes_under(root: Path) -> list[int]:
    """Processes working in `root` or below (the queue's worker and its run), this test's own excluded."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) != os.getpid() and str(proc.joinpath("cwd").readlink()).startswith(str(root)):
                out.append(int(proc.name))
        except OSError:
            continue
    return out


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="finds the queue's processes through /proc")
def test_a_local_run_whose_process_was_killed_is_failed_and_queued_again(tmp_path):
    """A session that ends kills the queue's worker and its run; DVC still calls the run Running and would wait
    on it forever. Status must call it failed and resume must queue it again under the same name."""
    import signal
    import time

    root = tmp_path / "p"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages:\n  work:\n    cmd: python -c \"import time; time.sleep(300)\"\n"
                                   "    params: [seed]\n")
    (root / "params.yaml").write_text("protocol: digits\nstrategy: madry\nseed: 0\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], [g._tool("dvc"), "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "b"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    grid = g.Grid(name="t", repo=str(root), rev=g._git(root, "rev-parse", "HEAD"), cache="",
                  workdir=str(tmp_path / "w"), executor="local", protocol="digits", overrides=[], resources={},
                  cells=[g.Cell("t-madry-s0", "madry", 0)], jobs=1)
    g._submit_local(grid, grid.cells)
    assert [s.state for s in g.status(grid)[0]] == [g.PENDING]
    try:
        g.start_local_workers(grid, 1)
        deadline = time.time() + 120
        while time.time() < deadline:
            running = g.status(grid)[0][0].state == g.RUNNING and list(root.glob(".dvc/tmp/exps/run/*/*.json"))
            if running and len(_processes_under(root)) >= 3:  # the worker, its run, the stage's command
                break
            time.sleep(1)
        else:
            pytest.fail(f"the queued run did not start: {g.status(grid)[0]}")
    finally:
        for pid in _processes_under(root):  # as a closed session would: everything at once, no clean-up
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    cell = g.status(grid)[0][0]
    assert cell.state == g.FAILED and "stopped while running" in cell.detail, cell
    assert [c.name for c in g.to_resume(grid)] == ["t-madry-s0"]

    g._submit_local(grid, g.to_resume(grid))
    queue = subprocess.run([g._tool("dvc"), "queue", "status"], cwd=root, capture_output=True, text=True).stdout
    assert [line.split()[-1] for line in queue.splitlines() if "t-madry-s0" in line] == ["Queued"], queue
    assert [s.state for s in g.status(grid)[0]] == [g.PENDING]
