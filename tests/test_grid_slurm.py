"""`sipat grid` against a real one-node SLURM (tools/slurm_local.sh), on the embedded default at tiny sizes.

One grid of 2 strategies x 2 seeds lands as 4 DVC experiments in the submitting repository with the teacher
trained once; one of its student jobs is requeued while training and must end with the metrics of the same cell
run without requeue (forced again in its clone afterwards); a second grid over the first one's teacher and masks
holds a cell with a bad parameter, which fails alone. Skipped, with the reason, where SLURM cannot start.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

TINY = """
teacher: {epochs: 1, batch_size: 128}
train: {epochs: 2, batch_size: 128}
attack: {steps: 2}
evaluate: {eps: [32/255], teacher_eps: [32/255], n_examples: 10, chunk_size: 5, workers: 2}
"""
TIMINGS = {"eval_seconds", "timing"}


def _run(args, cwd, env, timeout=600):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def slurm():
    """The one-node SLURM of tools/slurm_local.sh, started if it is not running."""
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (apt-get install slurmctld slurmd slurm-client munge; .ci/run does)")
    proc = subprocess.run(["bash", str(REPO / "tools" / "slurm_local.sh")], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"one-node SLURM cannot start here: {proc.stderr.strip().splitlines()[-1:]}")


def _jobs() -> list[str]:
    return subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split()


@pytest.fixture(scope="module")
def repo(slurm, tmp_path_factory):
    """A committed tiny project (no outputs yet: the shared job builds them)."""
    from dvc.utils.hydra import compose_and_dump

    root = tmp_path_factory.mktemp("grid") / "repo"
    root.mkdir()
    for item in ("pipeline", "stages", "conf", "dvc.yaml"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / item)
    with open(root / "conf" / "config.yaml", "a") as fh:
        fh.write(TINY)
    compose_and_dump(root / "params.yaml", str(root / "conf"), None, "config", "", [])
    (root / ".gitignore").write_text("__pycache__/\n/.grid/\n")
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "hydra.enabled", "true"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        _run(cmd, root, env)
    yield root, env
    ids = _grid_ids(root)
    for job in {j.split("_")[0] for j in _jobs()} & ids:  # nothing of this test keeps running
        subprocess.run(["scancel", job], capture_output=True)


def _grid_ids(root: Path) -> set[str]:
    ids = set()
    for f in root.glob(".grid/*/grid.json"):
        g = json.loads(f.read_text())
        ids |= {str(g["shared_job_id"])} | {c["job_id"].split("_")[0] for c in g["cells"] if c["job_id"]}
    return ids - {"None"}


def _sipat(root, env, *args, timeout=300):
    return _run([str(BIN / "sipat"), *args], root, env, timeout=timeout)


def _status(root, env, name) -> dict[str, dict]:
    out = _sipat(root, env, "grid", "status", name, "--json")
    return {c["name"]: c for c in map(json.loads, out.splitlines()) if c}


def test_dry_run_submits_nothing(repo):
    root, env = repo
    out = _sipat(root, env, "grid", "run", "-e", "slurm", "--name", "dry", "--strategies", "madry,sip_s",
                 "--seeds", "0,1", "-S", "train.epochs=1", "-R", "student.time_min=5", "--dry-run")
    assert "shared job (the shared stages, once; SLURM gives its id at submission) [gpus=0 cpus=2" in out
    assert "job array of 4 (after the shared job succeeds (afterok)) [gpus=0 cpus=2 mem=4GB time=5min" in out
    for cell in ("dry-madry-s0", "dry-madry-s1", "dry-sip_s-s0", "dry-sip_s-s1"):
        assert (f"dvc exp run -n {cell} -S protocol=digits -S train.epochs=1 -S strategy={cell.split('-')[1]} "
                f"-S seed={cell[-1]} evaluate") in out
        assert f"dvc exp push --no-cache origin {cell}" in out
    assert "nothing submitted" in out
    names = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
    assert not [n for n in names if n.startswith("dry")] and not (root / ".grid" / "dry").exists()


def _wait(root, names, deadline, on_poll=None):
    """Poll the grids' states in-process (a `sipat` start per poll would cost the jobs CPU time)."""
    from pipeline import grid as g

    while time.time() < deadline:
        if on_poll is not None:
            on_poll()
        states = {n: {c.name: c.state for c in g.status(g.Grid.load(root / ".grid" / n))[0]} for n in names}
        if all(s in ("done", "failed") for cells in states.values() for s in cells.values()):
            return
        time.sleep(1)
    raise AssertionError(f"grids not finished in time: {states}")


@pytest.mark.timeout(2400)
def _kill_training(clone: Path) -> bool:
    """SIGKILL the training process working in `clone` (not a requeue: the job step dies)."""
    import signal

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if b"stages.train" in cmd and cwd == clone:
            os.kill(int(entry.name), signal.SIGKILL)
            return True
    return False


def _same_as_uninterrupted(root, env, name):
    """The cell's experiment metrics and checkpoint equal those of its training and evaluation forced again,
    uninterrupted, in its clone (timings aside)."""
    got = json.loads(_run(["git", "show", f"refs/exps/{_exp_ref(root, env, name)}:data/metrics/student.json"],
                          root, env))
    clone = root / f".grid/g/cells/{name}/repo"
    # with the job's CPU budget (-R cpus=1): torch's thread count changes float reductions, so the bytes
    same_cpus = dict(env, SIPAT_CPUS="1")
    for stage in ("train", "evaluate"):
        _run(["dvc", "repro", "-f", "-s", stage], clone, same_cpus)
    want = json.loads((clone / "data/metrics/student.json").read_text())
    # every key but the timings, the checkpoint's hash included: the same bytes
    assert {k: v for k, v in got.items() if k not in TIMINGS} == {k: v for k, v in want.items() if k not in TIMINGS}
    lock = yaml.safe_load(_run(["git", "show", f"refs/exps/{_exp_ref(root, env, name)}:dvc.lock"], root, env))
    md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "data/student/model.pt")
    kept, fresh = (torch.load(p, map_location="cpu", weights_only=True)
                   for p in (root / ".dvc/cache/files/md5" / md5[:2] / md5[2:], clone / "data/student/model.pt"))
    assert kept["meta"] == fresh["meta"] and kept["state_dict"].keys() == fresh["state_dict"].keys()
    assert all(torch.equal(kept["state_dict"][k], fresh["state_dict"][k]) for k in fresh["state_dict"])


def test_grid_on_slurm_lands_as_experiments_survives_a_requeue_and_resumes_a_killed_run(repo):
    root, env = repo
    start = time.time()
    common = ["-e", "slurm", "-R", "cpus=1", "-R", "mem_gb=2", "-R", "time_min=20"]
    _sipat(root, env, "grid", "run", "--name", "g", "--strategies", "basic,madry", "--seeds", "0,1", *common)
    # a grid with a bad parameter is refused before anything is submitted
    bad = subprocess.run([str(BIN / "sipat"), "grid", "run", "--name", "bad", "--strategies", "no_such_strategy",
                          "--seeds", "0", "--shared-from", "g", *common], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "unknown strategy 'no_such_strategy'" in bad.stderr, bad.stderr
    assert not (root / ".grid" / "bad").exists()
    grid = json.loads((root / ".grid/g/grid.json").read_text())
    target = next(c for c in grid["cells"] if c["name"] == "g-madry-s0")
    resume_file = root / ".grid/g/cells/g-madry-s0/repo/data/student/.model.resume.pt"
    killed_clone = root / ".grid/g/cells/g-madry-s1/repo"
    requeued, killed = [], []
    stop = threading.Event()

    def interrupt():
        # An epoch here takes about a second: watch every 20 ms, in a thread of its own, for the per-epoch state
        # of the first epoch, and interrupt during the second.
        while not stop.is_set() and not (requeued and killed):
            # g-madry-s1: SIGKILL its training process (not a requeue): the run itself fails
            if not killed and (killed_clone / "data/student/.model.resume.pt").exists() \
                    and _kill_training(killed_clone):
                killed.append(time.time())
            # g-madry-s0: requeued by SLURM
            if not requeued and resume_file.exists():
                _run(["scontrol", "requeue", target["job_id"]], root, env)
                requeued.append(time.time())
                # SLURM holds a requeued job back for two minutes (BeginTime); once pending again, let it start
                for _ in range(120):
                    state = subprocess.run(["squeue", "-h", "-j", target["job_id"], "-o", "%T"],
                                           capture_output=True, text=True).stdout.strip()
                    if state == "PENDING":
                        _run(["scontrol", "update", f"JobId={target['job_id']}", "StartTime=now"], root, env)
                        break
                    time.sleep(0.5)
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt, daemon=True)
    watcher.start()
    try:
        _wait(root, ["g"], time.time() + 2200)
    finally:
        stop.set()
        watcher.join(timeout=60)
    g = _status(root, env, "g")
    assert requeued, "the student job finished its training before it could be requeued"
    assert killed, "g-madry-s1 finished its training before it could be killed"
    assert g["g-madry-s1"]["state"] == "failed", g
    assert [c["state"] for n, c in g.items() if n != "g-madry-s1"] == ["done"] * 4, g
    # resume: the killed run's clone goes back to the baseline's params.yaml and the run completes
    out = _sipat(root, env, "grid", "resume", "g")
    assert "resubmitted 1 run(s)" in out and "shared job" not in out.split("job array")[0].split("one job")[0]
    _wait(root, ["g"], time.time() + 1200)
    g = _status(root, env, "g")
    assert [c["state"] for c in g.values()] == ["done"] * 5, g
    print(f"grid wall time {time.time() - start:.0f} s")

    # every run is an experiment of the submitting repository; the teacher was trained once, by the shared job
    shown = _run(["dvc", "exp", "show", "--json"], root, env)
    names = {n for n in ("g-basic-s0", "g-basic-s1", "g-madry-s0", "g-madry-s1") if f'"{n}"' in shown}
    assert len(names) == 4, shown[-3000:]
    logs = {c["name"]: Path(c["log"]).read_text() for c in g.values()}
    assert "Running stage 'teacher'" in logs.pop("(shared stages)")
    assert all("Running stage 'teacher'" not in text and "Running stage 'train'" in text for text in logs.values())
    # -R cpus=1: the evaluation runs one worker with one thread although params.yaml asks for two workers
    assert all("1 worker(s) x 1 thread(s)" in text for text in logs.values()), logs["g-basic-s0"][-2000:]

    # the requeued job ran twice in the same clone, resumed training, and ends as the uninterrupted cell
    assert json.loads((root / ".grid/g/cells/g-madry-s0/state.json").read_text())["restarts"] >= 1
    assert "resuming from" in logs["g-madry-s0"]
    _same_as_uninterrupted(root, env, "g-madry-s0")
    # so does the killed one, resumed by `sipat grid resume`
    _same_as_uninterrupted(root, env, "g-madry-s1")

    # the report counts four runs
    out = _sipat(root, env, "report", "--out", "r.md", "--plot", "r.png")
    assert "from 4 run(s)" in out, out


def test_resume_keeps_a_shared_job_that_is_still_pending(repo):
    """A held shared job is pending, not failed: resume submits no second one."""
    root, env = repo
    _sipat(root, env, "grid", "run", "--name", "h", "--strategies", "basic", "--seeds", "5", "-e", "slurm",
           "-R", "cpus=1", "-R", "mem_gb=1", "-R", "time_min=5", "-S", "teacher.seed=5")
    grid = json.loads((root / ".grid/h/grid.json").read_text())
    shared = str(grid["shared_job_id"])
    try:
        _run(["scontrol", "hold", shared], root, env)
        out = _sipat(root, env, "grid", "resume", "h")
        assert "nothing to resume" in out, out
        after = json.loads((root / ".grid/h/grid.json").read_text())
        assert str(after["shared_job_id"]) == shared
        names = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
        assert names.count("h-shared") == 1, names
    finally:
        for job in {shared} | {c["job_id"].split("_")[0] for c in grid["cells"] if c["job_id"]}:
            subprocess.run(["scancel", job], capture_output=True)


def _exp_ref(root, env, name) -> str:
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], root, env).split()
    return next(r for r in refs if r.endswith("/" + name)).removeprefix("refs/exps/")
