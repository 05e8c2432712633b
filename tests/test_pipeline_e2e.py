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


TINY = """
teacher: {epochs: 2, batch_size: 128}
train: {epochs: 1, batch_size: 128}
attack: {steps: 2}
evaluate: {eps: [32/255], teacher_eps: [32/255], n_examples: 12}
survey: {per_class: 1, steps: 5}
"""


def make_tiny_repo(root: Path) -> tuple[Path, dict]:
    """A committed copy of the project's code at TINY sizes in `root` (no outputs yet), and the environment to
    run its commands with."""
    for item in ("pipeline", "stages", "conf", "hydra_plugins", "dvc.yaml", ".dvcignore"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / item)
    # The tiny sizes go into the composition's own section (applied after the protocol), so that
    # `dvc exp run -S ...`, which rewrites params.yaml from conf/, keeps them; params.yaml is that composition.
    with open(root / "conf" / "config.yaml", "a") as fh:
        fh.write(TINY)
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(root / "params.yaml", str(root / "conf"), None, "config", "", [])
    (root / ".gitignore").write_text("__pycache__/\n")
    # Bytecode writing on, as on most machines: the stages' own imports write __pycache__/ inside the code
    # folders they depend on, which must not make any stage stale.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    _run(["dvc", "config", "hydra.enabled", "true"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    return root, env


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    return make_tiny_repo(tmp_path_factory.mktemp("repo"))


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
    # the training curves as pictures that open offline, kept in git (not DVC's cache) like the history JSON
    for which in ("teacher", "student"):
        png = root / "data" / which / "history.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        ignored = subprocess.run(["git", "check-ignore", "-q", str(png)], cwd=root, env=env)
        assert ignored.returncode == 1, f"{png} is git-ignored"

    again = _run(["dvc", "repro"], root, env)
    # the two stages that re-read their inputs at every repro, and nothing else
    assert sorted(line for line in again.splitlines() if line.startswith("Running stage")) == [
        "Running stage 'prepare':", "Running stage 'sources':"]
    assert _status(root, env) == set()  # prepare wrote the same bytes: nothing downstream is stale

    shown = _run(["dvc", "metrics", "show", "--json"], root, env)
    assert "clean_acc" in shown and "eps_32_255" in shown


def test_bytecode_caches_make_no_stage_stale(tiny_repo):
    """Importing the code (as `sipat metrics` or a test run does) writes __pycache__/ beside every module."""
    root, env = tiny_repo
    modules = sorted(".".join(f.relative_to(root).with_suffix("").parts) for d in ("pipeline", "stages")
                     for f in (root / d).rglob("*.py") if f.name != "__init__.py")
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % modules
    _run([sys.executable, "-c", code], root, env)
    assert (root / "pipeline" / "strategies" / "__pycache__").is_dir()
    assert (root / "stages" / "__pycache__").is_dir()
    assert _status(root, env) == set()


def _dvc_status(root) -> dict:
    """`dvc status` of the repository at `root`, in this process (a `dvc status` command costs a second of
    start-up each time), run from the root so that stages are named as the command names them."""
    import contextlib

    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        return repo.status()


def _status(root, env) -> set[str]:
    """Stages with changed dependencies (`prepare` and `sources`, which re-read their inputs at every repro and so
    are always listed as "always changed", count only when something else of them changed)."""
    status = _dvc_status(root)
    changed = set()
    for always in ("prepare", "sources"):  # the stages that re-read their inputs at every repro
        record = status.pop(always, ["always changed"])
        assert "always changed" in record
        changed |= {always} if len(record) > 1 else set()
    return set(status) | changed


def _stage_modules() -> dict[str, str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: spec["cmd"].split("-m ")[1].split()[0] for name, spec in stages.items()}


def _changed_deps(root) -> dict[str, set[str]]:
    """Per stage, the dependencies `dvc status` reports changed: code and data paths as dvc.yaml names them,
    parameters as `params.yaml:NAME` (NAME as the stage declares it: a key or a whole section)."""
    changed = {}
    for stage, records in _dvc_status(root).items():
        for record in records:
            if isinstance(record, dict):
                for path, what in record.get("changed deps", {}).items():
                    names = [f"{path}:{k}" for k in what] if isinstance(what, dict) else [path]
                    changed.setdefault(stage, set()).update(names)
    return changed


def test_an_edit_reruns_exactly_the_stages_that_run_the_edited_code(tiny_repo):
    """Every library and stage module: `dvc status` names the stages whose imports reach it, no more."""
    from test_dvc_deps import _closure

    root, env = tiny_repo
    runs = {stage: {str(f.relative_to(REPO)) for f in _closure(mod)} for stage, mod in _stage_modules().items()}
    # one file of every code dependency dvc.yaml lists (a folder: its first module), and the modules no stage
    # lists (the CLI, the report): that each stage lists exactly the code it imports is test_dvc_deps' check;
    # this one checks that DVC sees an edit through every kind of entry
    deps = {d for spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
            for d in spec.get("deps", []) if d.split("/")[0] in ("pipeline", "stages")}
    files = sorted({d if d.endswith(".py") else str(min((root / d).rglob("*.py")).relative_to(root))
                    for d in deps} | {"pipeline/cli.py", "pipeline/report.py", "pipeline/grid.py"})
    assert len(files) > 20
    # All edited at once, in one status (~2 s each here): DVC names every changed entry of every stage, so the
    # stages that one file's edit alone would rerun are those naming an entry that holds the file.
    originals = {rel: (root / rel).read_text() for rel in files}
    try:
        for rel, text in originals.items():
            (root / rel).write_text(text + "\n# edited\n")
        changed = _changed_deps(root)
    finally:
        for rel, text in originals.items():
            (root / rel).write_text(text)
    for rel in files:
        seen = {stage for stage, entries in changed.items()
                if any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in entries)}
        assert seen == {stage for stage, code in runs.items() if rel in code}, rel
    for rel in ("pipeline/cli.py", "pipeline/report.py"):  # reporting and the CLI rerun nothing
        assert not any(rel in code for code in runs.values())
    assert _status(root, env) == set()


# Which stages a change of each parameter reruns (directly; their consumers follow when they run).
PARAM_EFFECTS = {
    ("strategy",): {"student_masks", "train"},
    ("model",): {"train"},
    ("seed",): {"train"},
    ("device",): {"teacher", "masks_synthetic", "train", "evaluate_teacher", "evaluate", "survey_images_teacher",
                  "survey_images_student"},
    ("data", "image_size"): {"prepare", "teacher", "masks_synthetic", "masks_human", "train", "evaluate_teacher",
                             "evaluate", "survey_images_teacher", "survey_images_student"},
    ("data", "val_fraction"): {"teacher", "train"},
    ("data", "split_seed"): {"train"},  # the student's split; the teacher has its own
    ("teacher", "split_seed"): {"teacher"},
    ("seed_scope",): {"evaluate"},  # recorded in the metrics (seed 0: every derived seed still agrees)
    ("attack", "steps"): {"teacher", "train"},
    ("teacher", "epochs"): {"teacher"},
    ("train", "epochs"): {"train"},
    ("salience", "fraction"): {"masks_synthetic"},
    ("salience", "chunk_size"): {"masks_synthetic", "masks_human"},
    ("human_masks", "threshold"): {"masks_human"},
    ("evaluate", "n_examples"): {"evaluate_teacher", "evaluate"},
    ("perf", "amp"): {"teacher", "train"},
    ("survey", "per_class"): {"survey_images_teacher", "survey_images_student"},
    ("evaluate", "eps"): {"evaluate"},
    ("evaluate", "teacher_eps"): {"evaluate_teacher"},
    ("train", "trades", "beta"): {"train"},  # the checkpoint records sip_s's section only: see below
    # speed only: nothing reruns
    ("evaluate", "workers"): set(),
    ("evaluate", "threads_per_worker"): set(),
    ("evaluate", "batch_size"): set(),
    ("perf", "resume"): set(),
    ("data", "num_workers"): set(),
    ("salience", "batch_size"): set(),
}
NEW_VALUES = {"strategy": "madry", "model": "resnet18", "seed": 7, "device": "cpu", "image_size": 12,
              "val_fraction": 0.2, "steps": 3, "epochs": 9, "fraction": 0.25, "chunk_size": 64,
              "threshold": 0.25, "n_examples": 10, "amp": "off", "per_class": 2, "eps": ["16/255", "32/255"],
              "teacher_eps": ["16/255"], "beta": 6.0, "workers": 3, "threads_per_worker": 2, "batch_size": 100,
              "resume": False, "num_workers": 1, "split_seed": 3, "seed_scope": "split"}


@pytest.fixture(scope="module")
def param_effects(tiny_repo) -> dict[tuple, set[str]]:
    """Per key of PARAM_EFFECTS, the stages `dvc status` finds stale when that key alone changes. Keys of
    different top-level sections change together, one status per batch: a stage names each changed parameter
    dependency (a key, or a section holding it), and within a batch a name belongs to one key only."""
    root, env = tiny_repo
    params_file = root / "params.yaml"
    original = params_file.read_text()
    batches: list[list[tuple]] = []
    for key in PARAM_EFFECTS:
        batch = next((b for b in batches if key[0] not in {k[0] for k in b}), None)
        if batch is None:
            batches.append(batch := [])
        batch.append(key)
    effects = {}
    try:
        for batch in batches:
            params = yaml.safe_load(original)
            for key in batch:
                node = params
                for part in key[:-1]:
                    node = node.setdefault(part, {})
                assert node.get(key[-1]) != NEW_VALUES[key[-1]], key
                node[key[-1]] = NEW_VALUES[key[-1]]
            params_file.write_text(yaml.safe_dump(params, sort_keys=False))
            changed = _changed_deps(root)
            for key in batch:
                dotted = ".".join(key)
                effects[key] = {stage for stage, names in changed.items() for name in names
                                if name.startswith("params.yaml:")
                                and (dotted + ".").startswith(name.removeprefix("params.yaml:") + ".")}
    finally:
        params_file.write_text(original)
    assert len(batches) < len(PARAM_EFFECTS) / 3 and _status(root, env) == set()
    return effects


@pytest.mark.parametrize("key", list(PARAM_EFFECTS), ids=".".join)
def test_a_parameter_change_reruns_exactly_the_stages_that_read_it(param_effects, key):
    assert param_effects[key] == PARAM_EFFECTS[key]


def test_a_sip_s_student_is_not_retrained_when_the_human_masks_change(tiny_repo):
    """train reads the record of the one store its strategy reads (student_masks), not both stores."""
    root, env = tiny_repo
    params_file = root / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    assert params["strategy"] == "sip_s"
    params["human_masks"]["threshold"] = 0.25
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = _run(["dvc", "repro"], root, env)
        assert "Running stage 'masks_human'" in out and "Running stage 'student_masks'" in out, out
        assert "Running stage 'train'" not in out and "Running stage 'evaluate'" not in out, out
    finally:
        params_file.write_text(original)
        _run(["dvc", "repro"], root, env)


def test_another_strategys_parameter_does_not_rerun_the_evaluation(tiny_repo):
    """`train.trades.beta` reruns the (sip_s) student's training, whose checkpoint comes out byte-identical:
    its evaluation is not rerun."""
    root, env = tiny_repo
    params_file = root / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["train"]["trades"]["beta"] = 6.0  # the default is 1.0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = _run(["dvc", "repro"], root, env)
        ran = [line for line in out.splitlines() if line.startswith("Running stage")]
        assert sorted(ran) == ["Running stage 'prepare':", "Running stage 'sources':", "Running stage 'train':"], ran
    finally:
        params_file.write_text(original)
        _run(["dvc", "repro"], root, env)
    assert _status(root, env) == set()


def test_forced_reruns_write_identical_outputs(tiny_repo):
    """Training and mask extraction on the CPU are deterministic and store no timings: same bytes, same hashes."""
    root, env = tiny_repo

    def outs() -> dict[str, str]:
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        # history.json is an uncached plot that records epoch timings; nothing depends on it (its picture,
        # history.png, draws no timings and must come out identical)
        return {f"{stage}:{o['path']}": o["md5"] for stage in ("teacher", "masks_synthetic", "masks_human", "train")
                for o in lock[stage]["outs"] if not o["path"].endswith("history.json")}

    before = outs()
    assert len(before) == 6
    for stage in ("teacher", "masks_synthetic", "masks_human", "train"):
        _run(["dvc", "repro", "-f", "-s", stage], root, env)
    assert outs() == before
    assert _status(root, env) == set()


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


def test_a_protocol_is_selected_with_one_override(tiny_repo):
    """`dvc exp run -S protocol=NAME` composes conf/ into params.yaml: read from the queued experiment (nothing
    runs; a queued experiment is a stash commit holding its composed params.yaml)."""
    root, env = tiny_repo
    _run(["dvc", "exp", "run", "--queue", "-S", "protocol=cluttered_digits", "-S", "strategy=sip_h"], root, env)
    try:
        params = yaml.safe_load(_run(["git", "show", "refs/exps/celery/stash:params.yaml"], root, env))
        assert (params["dataset"], params["strategy"], params["attack"]["eps"]) == ("cluttered_digits", "sip_h",
                                                                                    "8/255")
        assert params["train"]["epochs"] == 1 and params["train"]["fat"]["omega"] == 0.001
        assert params["train"]["trades"]["beta"] == 1.0  # recipe=authors, the default
        # a config group of its own: the baselines' repositories' choices where the paper is silent
        _run(["dvc", "exp", "run", "--queue", "-S", "protocol=cifar10_resnet18", "-S", "recipe=baselines"], root, env)
        params = yaml.safe_load(_run(["git", "show", "refs/exps/celery/stash:params.yaml"], root, env))
        assert params["train"]["trades"]["beta"] == 6.0 and params["train"]["weight_decay"] == 0.0002
        assert params["data"]["augment"] is True
    finally:
        _run(["dvc", "queue", "remove", "--all"], root, env)


def _end_queue_workers(root: Path, wait: float = 20.0) -> None:
    """DVC's queue workers outlive `dvc queue stop` for a while (and, idle, for good): end those working in
    `root`, so that the suite leaves no process behind."""
    import os
    import signal
    import time

    def workers() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                cwd = Path(os.readlink(entry / "cwd"))
            except OSError:
                continue
            if b"queue-worker" in cmd and (cwd == root.resolve() or root.resolve() in cwd.parents):
                found.append(int(entry.name))
        return found

    deadline = time.monotonic() + wait
    while workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in workers():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_queued_grid_runs_in_parallel_and_reports(tiny_repo):
    import time

    root, env = tiny_repo
    # two runs, so that both workers run at once and the report pairs two seeds (basic: the fastest to train)
    _run(["dvc", "exp", "run", "--queue", "-S", "strategy=basic", "-S", "seed=0,1"], root, env)
    # The queue's workers run detached and may keep inherited pipes open: no captured output for this call.
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120, check=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = _run(["dvc", "queue", "status"], root, env)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert status.count("Success") >= 2, status
    _run(["dvc", "queue", "stop"], root, env)
    _end_queue_workers(root)
    out = _run([str(Path(sys.executable).parent / "sipat"), "report", "--out", "r.md", "--plot", "r.png"], root, env)
    plots = list(root.glob("r_*.png"))  # one plot per group of comparable runs, named after the group
    table = (root / "r.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| Basic <sub>"))
    assert "(2 seeds)" in row, row
    assert len(plots) == 1 and plots[0].stat().st_size > 1000
    assert "(DVC experiments)" in out
