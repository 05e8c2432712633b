"""A grid of student runs (strategies x seeds) as DVC experiments, run by the local DVC queue or by SLURM.

On SLURM (submitted with submitit) the pipeline's DAG becomes jobs: one job builds the shared stages (prepare,
teacher, masks, the teacher's evaluation) once, in its own clone of the committed baseline; then a job array,
one task per (strategy, seed), starts after it succeeds (``afterok``). Each task works in its own clone on the
shared file system, takes the shared stages' lock and outputs (from the repository's DVC cache, shared by every
clone), runs ``dvc exp run -n NAME -S ...`` and pushes the experiment back to the submitting repository
(``dvc exp push``), where ``dvc exp show`` and ``sipat report`` see it like a local one.

A requeued task (preemption, ``scontrol requeue``, a time limit reached) continues in the same clone: training
resumes from its per-epoch state, evaluation from its finished chunks. Everything a grid is lives in its work
folder: ``grid.json`` (the cells, their jobs and logs), ``logs/`` (submitit's), ``shared/`` and ``cells/<name>/``
(a clone ``repo/`` and ``state.json`` each).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.utils import MARK_KEY, write_json
from pipeline.provenance import processor

# Stages the jobs of one grid share: everything upstream of the student, and the teacher's evaluation.
SHARED_TARGETS = ("masks_synthetic", "masks_human", "evaluate_teacher")
# What a cell builds: the student and its evaluation (the survey image sets are per checkpoint, not per grid).
CELL_TARGETS = ("evaluate",)
# Stage modules that run as several processes under torchrun when a job has several GPUs.
TORCHRUN_MODULES = ("stages.train", "stages.masks_synthetic", "stages.evaluate")
RESOURCES_FILE = Path("conf") / "resources.yaml"


class Resources(BaseModel):
    """What one SLURM job asks for."""

    model_config = ConfigDict(extra="forbid")
    gpus: int = Field(0, ge=0)           # per job (one node); more than one: the stages run under torchrun
    cpus: int = Field(2, ge=1)           # cpus per task
    mem_gb: float = Field(4, gt=0)
    time_min: int = Field(60, ge=1)      # time limit; a job that reaches it is requeued and resumes
    partition: Optional[str] = None
    account: Optional[str] = None

    def describe(self) -> str:
        return (f"gpus={self.gpus} cpus={self.cpus} mem={self.mem_gb:g}GB time={self.time_min}min "
                f"partition={self.partition or '(default)'} account={self.account or '(default)'}")


class JobResources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shared: Resources = Resources()
    student: Resources = Resources()


def load_resources(repo: Path, protocol: str, overrides: list[str]) -> JobResources:
    """Resources of the shared job and of each student job: ``conf/resources.yaml`` (``default``, then the
    protocol's entry), then ``KEY=VALUE`` overrides (``time_min=30`` for both, ``shared.gpus=2`` for one)."""
    path = repo / RESOURCES_FILE
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    raw = raw or {}
    unknown = set(raw) - {"default", "protocols"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} (expected default, protocols)")
    merged: dict[str, dict[str, Any]] = {"shared": {}, "student": {}}

    def apply(section: Any, where: str) -> None:
        if section is None:
            return
        if not isinstance(section, dict):
            raise ValueError(f"{where}: expected a mapping")
        for key, value in section.items():
            if key in merged:
                if not isinstance(value, dict):
                    raise ValueError(f"{where}.{key}: expected a mapping")
                merged[key].update(value)
            else:
                for job in merged.values():
                    job[key] = value

    apply(raw.get("default"), f"{path}: default")
    apply((raw.get("protocols") or {}).get(protocol), f"{path}: protocols.{protocol}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"resource override {item!r}: expected KEY=VALUE (e.g. time_min=30, shared.gpus=2)")
        parsed = None if value.lower() in ("", "null", "none") else yaml.safe_load(value)
        apply(_nest(key.split("."), parsed), f"resource override {item!r}")
    try:
        return JobResources(**merged)
    except ValidationError as err:  # one line per bad key, without pydantic's links
        lines = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in err.errors()]
        raise ValueError(f"resources for protocol {protocol!r}: " + "; ".join(lines)) from None


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    return {keys[0]: value} if len(keys) == 1 else {keys[0]: _nest(keys[1:], value)}


# ================================================================================================ the grid

@dataclass
class Cell:
    name: str                 # the DVC experiment's name
    strategy: str
    seed: int
    job_id: Optional[str] = None
    log: Optional[str] = None


@dataclass
class Grid:
    name: str
    repo: str                 # the submitting repository (experiments are pushed here)
    rev: str                  # the committed baseline every clone starts from
    cache: str                # the repository's DVC cache, shared by every clone
    workdir: str
    executor: Literal["local", "slurm"]
    protocol: str
    overrides: list[str]      # -S overrides of every job (besides protocol, strategy, seed)
    resources: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    shared_job_id: Optional[str] = None
    shared_log: Optional[str] = None
    submitted: str = ""
    shared_from: Optional[str] = None  # the work folder of an earlier grid whose shared stages this one uses
    jobs: int = 1             # local: runs at once (each held to cores / jobs threads)
    processor: str = ""       # the submitting machine's processor (timings are read against it)

    @property
    def shared_dir(self) -> Path:
        return Path(self.shared_from or self.workdir) / "shared"

    @property
    def base_overrides(self) -> list[str]:
        return [f"protocol={self.protocol}", *self.overrides]

    def cell_overrides(self, cell: Cell) -> list[str]:
        return [*self.base_overrides, f"strategy={cell.strategy}", f"seed={cell.seed}"]

    def save(self) -> None:
        write_json(Path(self.workdir) / "grid.json", asdict(self))

    @classmethod
    def load(cls, workdir: Path) -> "Grid":
        path = workdir / "grid.json"
        if not path.is_file():
            raise FileNotFoundError(f"no grid in {workdir} (grid.json missing)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        raw.pop(MARK_KEY, None)  # the mark every JSON this project writes carries
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        missing = sorted(f.name for f in fields(cls) if f.name not in raw and f.default is MISSING
                         and f.default_factory is MISSING)
        if unknown or missing:
            raise ValueError(f"{path}: " + "; ".join(
                ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
                + ([f"missing key(s) {', '.join(missing)}"] if missing else []))
                + " (a grid.json written by another version of sipat?)")
        try:
            raw["cells"] = [Cell(**c) for c in raw["cells"]]
        except TypeError as err:
            raise ValueError(f"{path}: a cell is malformed ({err})") from None
        return cls(**raw)


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {repo}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def _dvc_cache_dir(repo: Path) -> Path:
    proc = subprocess.run([_tool("dvc"), "cache", "dir"], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc cache dir in {repo}: {proc.stderr.strip()}")
    return (repo / proc.stdout.strip()).resolve()


def _tool(name: str) -> str:
    """A command of this environment (dvc, python) even where the caller's PATH lacks it."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def plan(repo: Path, protocol: str, strategies: list[str], seeds: list[int], overrides: list[str], *,
         executor: str, name: Optional[str], workdir: Optional[Path], resources: list[str],
         shared_from: Optional[str] = None, jobs: int = 1) -> tuple[Grid, list[str]]:
    """The grid to submit (nothing written yet) and every problem that would make any of it fail, one line each
    (`validate`); submit only when there are none. ``shared_from``: the name or work folder of an earlier grid of
    the same baseline whose teacher and masks to use."""
    repo = repo.resolve()
    if not (repo / "dvc.yaml").is_file() or not (repo / ".dvc").is_dir():
        raise FileNotFoundError(f"{repo} is not a DVC project (dvc.yaml, .dvc/): run this in the project's root")
    if _git(repo, "status", "--porcelain", "--untracked-files=no"):
        raise RuntimeError(f"{repo} has uncommitted changes: commit them first, each job starts from the commit")
    problems: list[str] = []
    if not strategies or not seeds:
        problems.append("a grid needs at least one strategy and one seed")
    for values, what in ((strategies, "--strategies"), (seeds, "--seeds")):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            problems.append(f"{what}: {', '.join(twice)} given twice (each cell must have its own name)")
    for o in overrides:
        key = o.partition("=")[0]
        if "=" not in o or key in ("protocol", "strategy", "seed"):
            problems.append(f"-S {o!r}: expected KEY=VALUE, and protocol, strategy and seed have their own options")
    if jobs < 1:
        problems.append(f"--jobs {jobs}: at least one experiment must run at a time")
    rev = _git(repo, "rev-parse", "HEAD")
    name = name or f"{protocol}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    if not _NAME.match(name):
        problems.append(f"grid name {name!r}: letters, digits, '.', '_' and '-' only")
    workdir = (workdir or repo / ".grid" / name).resolve()
    if workdir.exists() and not workdir.is_dir():
        problems.append(f"--workdir {workdir} is a file, not a folder")
    elif (workdir / "grid.json").exists():
        problems.append(f"grid {name} exists ({workdir}): `sipat grid resume {name}`")
    try:
        res = load_resources(repo, protocol, resources).model_dump()
    except ValueError as err:
        problems.append(str(err))
        res = JobResources().model_dump()
    cells = [Cell(f"{name}-{st}-s{seed}", st, seed) for seed in dict.fromkeys(seeds)
             for st in dict.fromkeys(strategies)]  # seed by seed: a grid stopped half-way holds whole seeds
    grid = Grid(name=name, repo=str(repo), rev=rev, cache=str(_dvc_cache_dir(repo)), workdir=str(workdir),
                executor=executor, protocol=protocol, overrides=list(overrides), resources=res,
                cells=cells, processor=processor(), jobs=jobs)
    if shared_from is not None:
        if executor != "slurm":
            problems.append("--shared-from needs --executor slurm (a local grid's runs share the teacher through "
                            "DVC's run cache)")
        else:
            try:
                other = find_grid(repo, None if "/" in shared_from else shared_from,
                                  Path(shared_from) if "/" in shared_from else None)
                problems += _shared_mismatch(grid, other)
                grid.shared_from, grid.shared_job_id = other.workdir, other.shared_job_id
                grid.shared_log = other.shared_log
            except (FileNotFoundError, ValueError) as err:
                problems.append(f"--shared-from {shared_from}: {err}")
    if not any(p.startswith(("-S ", "a grid needs")) for p in problems):
        problems += _cell_problems(grid)
    if executor == "local" and not problems:
        taken = sorted({c.name for c in cells} & _taken_names(repo))
        if taken:
            problems.append(f"experiment name(s) already used in this repository: {', '.join(taken[:5])}"
                            + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
                            + " (another grid of this name? choose another --name, or `dvc exp remove` them)")
    return grid, problems


def _compose(repo: Path, protocol: str, overrides: list[str]) -> dict[str, Any]:
    from pipeline.results import compose

    return compose(repo, protocol, overrides)


def _cell_problems(grid: Grid) -> list[str]:
    """Each cell's parameters composed as its job will compose them, then checked as `prepare` checks them."""
    from pipeline.core.config import config_from_dict
    from pipeline.core.errors import ConfigError
    from pipeline.validate import check_config

    problems: list[str] = []
    seen: set[str] = set()
    for cell in grid.cells:
        where = f"{cell.name} (-S " + " -S ".join(grid.cell_overrides(cell)) + ")"
        try:
            params = _compose(Path(grid.repo), grid.protocol, [*grid.overrides, f"strategy={cell.strategy}",
                                                               f"seed={cell.seed}"])
            check_config(config_from_dict(params, "the composed parameters"))
        except ConfigError as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()
                     and not line.startswith("invalid parameters in")]
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors: unknown keys, bad values
            lines = [str(err).splitlines()[0]]
        else:
            continue
        for line in lines:
            if line not in seen:  # one line per problem, not per cell it recurs in
                seen.add(line)
                problems.append(f"{where}: {line}")
    return problems


def _shared_mismatch(grid: Grid, other: "Grid") -> list[str]:
    """Why `other`'s teacher and masks do not fit `grid`: another baseline, or another value of a parameter
    that the shared stages read (student-only keys and the order of -S do not matter)."""
    from pipeline.provenance import pick
    from pipeline.results import stage_inputs

    if other.rev != grid.rev:
        return [f"--shared-from {other.name}: it was built from {other.rev[:10]}, this grid starts from "
                f"{grid.rev[:10]}: its teacher and masks may come from other code"]
    _, keys = stage_inputs(_git(Path(grid.repo), "show", f"{grid.rev}:dvc.yaml"),
                           ("prepare", "teacher", "masks_synthetic", "masks_human", "evaluate_teacher"))
    mine = pick(_compose(Path(grid.repo), grid.protocol, grid.overrides), keys)
    theirs = pick(_compose(Path(grid.repo), other.protocol, other.overrides), keys)
    differ = [k for k in keys if mine.get(k) != theirs.get(k)]
    return [f"--shared-from {other.name}: its shared stages ran with other values of {', '.join(differ)}"] if differ \
        else []


def _taken_names(repo: Path) -> set[str]:
    """Experiment names already used here: finished experiments and the DVC queue's tasks."""
    proc = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=repo,
                          capture_output=True, text=True)
    names = {line.rsplit("/", 1)[-1] for line in proc.stdout.split() if line.count("/") >= 4}
    queue = subprocess.run([_tool("dvc"), "queue", "status"], cwd=repo, capture_output=True, text=True)
    for line in queue.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2:
            names.add(parts[1])
    return names


def _s(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("-S", o)]


def _clone_commands(grid: Grid, repo: str) -> list[list[str]]:
    """What `_clone` runs when the clone is not there yet (a requeued or resumed job reuses it)."""
    return [["git", "clone", "-q", "--no-checkout", grid.repo, f"{repo}.tmp"],
            ["git", "-C", f"{repo}.tmp", "checkout", "-q", grid.rev], ["mv", f"{repo}.tmp", repo]]


def shared_commands(grid: Grid) -> list[list[str]]:
    """What the shared job runs, in order (the exp run in its clone)."""
    return [*_clone_commands(grid, f"{grid.shared_dir}/repo"),
            ["dvc", "exp", "run", *_s(grid.base_overrides), *SHARED_TARGETS]]


def cell_commands(grid: Grid, cell: Cell) -> list[list[str]]:
    """What one student job runs, in order (all but the clone in its clone)."""
    return [*_clone_commands(grid, f"{grid.workdir}/cells/{cell.name}/repo"),
            # after taking dvc.lock and the uncached outputs of the shared stages from the shared job's clone
            ["dvc", "checkout", "--with-deps", *SHARED_TARGETS],
            ["git", "checkout", "-q", grid.rev, "--", "params.yaml"],
            _exp_run(grid, cell),
            ["dvc", "exp", "push", "--no-cache", "origin", cell.name]]


def _exp_run(grid: Grid, cell: Cell) -> list[str]:
    return ["dvc", "exp", "run", "-n", cell.name, *_s(grid.cell_overrides(cell)), *CELL_TARGETS]


def describe(grid: Grid, cells: Optional[list[Cell]] = None, shared: bool = True) -> list[str]:
    """Every job, its resources and its command lines (``--dry-run``)."""
    res = JobResources(**grid.resources)
    q = shlex.join
    lines = [f"grid {grid.name}: {len(grid.cells)} cell(s), baseline {grid.rev[:10]} of {grid.repo}",
             f"work folder {grid.workdir}; DVC cache {grid.cache}"]
    cells = grid.cells if cells is None else cells
    if grid.executor == "local":
        for c in cells:
            lines.append(f"queue {c.name}: dvc exp run --queue -n {c.name} {q(_s(grid.cell_overrides(c)))}")
        lines.append(f"then: dvc queue start -j {grid.jobs} (each run held to its share of the cores)")
        return lines
    if grid.shared_from is not None:
        shared = False
        lines.append(f"shared stages: those of the grid in {grid.shared_from}")
    if shared:
        lines.append(f"shared job (the shared stages, once; SLURM gives its id at submission) "
                     f"[{res.shared.describe()}]")
        lines += [f"    {q(c)}" for c in shared_commands(grid)]
        dep = "after the shared job succeeds (afterok)"
    elif grid.shared_job_id and read_state(grid.shared_dir).get("state") != DONE:
        dep = f"after job {grid.shared_job_id} succeeds (afterok)"
    else:
        dep = "shared stages already built: no dependency"
    if not cells:
        return lines
    kind = "job array" if len(cells) > 1 else "one job"
    lines.append(f"{kind} of {len(cells)} ({dep}) [{res.student.describe()}]")
    for i, c in enumerate(cells):
        lines.append(f"  [{i}] {c.name}")
        lines += [f"    {q(cmd)}" for cmd in cell_commands(grid, c)]
    return lines


# ================================================================================================ job bodies

def _env(grid: Grid, res: Resources) -> dict[str, str]:
    """The jobs' environment: this Python's tools first, torchrun for the stages when there are several GPUs."""
    path = [str(Path(sys.executable).parent)]
    if res.gpus > 1:
        path.insert(0, str(Path(grid.workdir) / "bin"))
    return dict(os.environ, PATH=os.pathsep.join([*path, os.environ.get("PATH", "")]), DVC_NO_ANALYTICS="1",
                SIPAT_NPROC=str(res.gpus), SIPAT_PYTHON=sys.executable)


def _write_torchrun_shim(grid: Grid) -> None:
    """A ``python`` on the jobs' PATH that starts the stages that support several processes under torchrun
    (one per GPU) and anything else as itself: dvc.yaml's commands stay as they are."""
    shim = Path(grid.workdir) / "bin" / "python"
    shim.parent.mkdir(parents=True, exist_ok=True)
    cases = "|".join(f'"-m {m}"' for m in TORCHRUN_MODULES)
    shim.write_text("#!/bin/sh\n# written by sipat grid: the stages of dvc.yaml under torchrun, one process per GPU\n"
                    f'case "$1 $2" in {cases})\n'
                    '  exec "$SIPAT_PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$SIPAT_NPROC" "$@";;\n'
                    'esac\nexec "$SIPAT_PYTHON" "$@"\n')
    shim.chmod(0o755)


class Interrupted(RuntimeError):
    """A job step ended by a signal: a requeue, a preemption or a cancellation (SLURM's record tells which)."""


def _run_logged(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env)
    if proc.returncode < 0:
        raise Interrupted(f"{shlex.join(cmd)} was stopped by signal {-proc.returncode} (in {cwd})")
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode} (in {cwd})")


def _ended_state(err: BaseException) -> str:
    # a step stopped by a signal is "interrupted", not "failed": a requeued job restarts from it
    return "interrupted" if isinstance(err, (Interrupted, KeyboardInterrupt)) else "failed"


def _write_state(folder: Path, state: str, **extra: Any) -> None:
    write_json(folder / "state.json", {"state": state, "time": _dt.datetime.now().isoformat(timespec="seconds"),
                                       "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0")), **extra})


def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _clone(grid: Grid, repo: Path, env: dict[str, str]) -> None:
    """A clone of the baseline commit whose DVC cache is the repository's (made once; reused when requeued)."""
    if not repo.is_dir():
        tmp = repo.with_name(repo.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a clone cut short by an earlier attempt of this job
        _run_logged(["git", "clone", "-q", "--no-checkout", grid.repo, str(tmp)], repo.parent, env)
        _run_logged(["git", "checkout", "-q", grid.rev], tmp, env)
        os.replace(tmp, repo)
    from dvc.config import Config

    # what `dvc cache dir --local` and `dvc config --local cache.shared group` write, without two dvc starts
    with Config(str(repo / ".dvc")).edit("local") as conf:
        conf["cache"]["dir"] = grid.cache
        conf["cache"]["shared"] = "group"


def _uncached_outputs(repo: Path, stages: set[str]) -> list[str]:
    """Outputs, metrics and plots of these stages that DVC keeps in git rather than in its cache."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text()).get("stages", {})
    found = []
    for name in stages:
        for kind in ("outs", "metrics", "plots"):
            for item in spec.get(name, {}).get(kind, []) or []:
                if isinstance(item, dict):
                    (path, opts), = item.items()
                    if opts and opts.get("cache") is False:
                        found.append(path)
    return found


def _upstream(repo: Path, targets: tuple[str, ...]) -> set[str]:
    """The stages these targets run: themselves and everything they depend on, by dvc.yaml's paths."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text()).get("stages", {})
    producer = {}
    for name, st in spec.items():
        for kind in ("outs", "metrics", "plots"):
            for item in st.get(kind, []) or []:
                producer[next(iter(item)) if isinstance(item, dict) else item] = name
    seen, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name in seen or name not in spec:
            continue
        seen.add(name)
        todo += [producer[d] for d in spec[name].get("deps", []) or [] if d in producer]
    return seen


class SharedJob:
    """The shared stages, once per grid, in ``<workdir>/shared/repo``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __call__(self) -> str:
        grid, folder = self.grid, self.grid.shared_dir
        folder.mkdir(parents=True, exist_ok=True)
        env = _env(grid, JobResources(**grid.resources).shared)
        _write_state(folder, "running")
        try:
            _clone(grid, folder / "repo", env)
            _run_logged([_tool("dvc"), "exp", "run", *_s(grid.base_overrides), *SHARED_TARGETS], folder / "repo", env)
        except BaseException as err:
            _write_state(folder, _ended_state(err), error=str(err))
            raise
        _write_state(folder, "done")
        return "done"

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)  # rerun in the same clone: resumes


class CellJob:
    """One (strategy, seed): a DVC experiment in ``<workdir>/cells/<name>/repo``, pushed to the repository."""

    def __init__(self, grid: Grid, cell: Cell) -> None:
        self.grid, self.cell = grid, cell

    def __call__(self) -> str:
        grid, cell = self.grid, self.cell
        folder = Path(grid.workdir) / "cells" / cell.name
        folder.mkdir(parents=True, exist_ok=True)
        repo = folder / "repo"
        env = _env(grid, JobResources(**grid.resources).student)
        prepared = bool(read_state(folder).get("prepared"))
        _write_state(folder, "running", prepared=prepared)
        try:
            _clone(grid, repo, env)
            if not prepared:  # the shared stages as the shared job left them: lock file, uncached outputs, then the cache
                shared = grid.shared_dir / "repo"
                shutil.copy2(shared / "dvc.lock", repo / "dvc.lock")
                for rel in _uncached_outputs(shared, _upstream(shared, SHARED_TARGETS)):
                    if (shared / rel).is_file():
                        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(shared / rel, repo / rel)
                _run_logged([_tool("dvc"), "checkout", "--with-deps", *SHARED_TARGETS], repo, env)
                prepared = True
                _write_state(folder, "running", prepared=True)
            if not _has_experiment(repo, cell.name):
                # an earlier attempt that failed leaves its composed params.yaml: back to the baseline's, so the
                # rerun composes from the same start as the first run did
                _run_logged(["git", "checkout", "-q", grid.rev, "--", "params.yaml"], repo, env)
                _run_logged([_tool("dvc"), *_exp_run(grid, cell)[1:]], repo, env)
            _push(repo, cell.name, env)
        except BaseException as err:
            _write_state(folder, _ended_state(err), prepared=prepared, error=str(err))
            raise
        _write_state(folder, "done", prepared=True)
        return "done"

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)  # rerun in the same clone: resumes


def _has_experiment(repo: Path, name: str) -> bool:
    refs = _git(repo, "for-each-ref", "--format=%(refname)", "refs/exps/")
    return any(r.rsplit("/", 1)[-1] == name for r in refs.splitlines())


def _push(repo: Path, name: str, env: dict[str, str]) -> None:
    """``dvc exp push`` to the submitting repository; a few tries, as other jobs push there at the same time."""
    import time

    for attempt in range(5):
        try:
            _run_logged([_tool("dvc"), "exp", "push", "--no-cache", "origin", name], repo, env)
            return
        except RuntimeError:
            if attempt == 4:
                raise
            time.sleep(2 + 3 * attempt)


# ================================================================================================ submission

def _executor(grid: Grid, res: Resources, job_name: str, dependency: Optional[str]):
    import submitit

    # a job that reaches its time limit is requeued (and resumes) up to 20 times
    executor = submitit.AutoExecutor(folder=Path(grid.workdir) / "logs", cluster="slurm", slurm_max_num_timeout=20)
    params: dict[str, Any] = {}
    if res.account:
        params["slurm_account"] = res.account
    if res.partition:
        params["slurm_partition"] = res.partition
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    if dependency:
        params["slurm_dependency"] = dependency
        # a failed shared job cancels the array instead of leaving it pending forever
        params["slurm_additional_parameters"] = {"kill-on-invalid-dep": "yes"}
    executor.update_parameters(name=job_name, timeout_min=res.time_min, cpus_per_task=res.cpus, mem_gb=res.mem_gb,
                               slurm_stderr_to_stdout=True, **params)
    return executor


def submit(grid: Grid, cells: Optional[list[Cell]] = None) -> Grid:
    """Submit the grid (or the given cells of it; the shared job only when it has not succeeded)."""
    Path(grid.workdir).mkdir(parents=True, exist_ok=True)
    cells = grid.cells if cells is None else cells
    if grid.executor == "local":
        return _submit_local(grid, cells)
    for tool in ("sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: --executor slurm needs the SLURM client commands")
    res = JobResources(**grid.resources)
    if max(res.shared.gpus, res.student.gpus) > 1:
        _write_torchrun_shim(grid)
    dependency = None
    shared = shared_state(grid)
    if shared in (PENDING, RUNNING):  # keep the shared job SLURM still has: a second one would redo its work
        dependency = f"afterok:{grid.shared_job_id}"
    elif shared != DONE and grid.shared_from is None:  # failed, or lost: build the shared stages again
        job = _executor(grid, res.shared, f"{grid.name}-shared", None).submit(SharedJob(grid))
        grid.shared_job_id, grid.shared_log = str(job.job_id), str(job.paths.stdout)
        dependency = f"afterok:{job.job_id}"
    elif shared != DONE:
        raise RuntimeError(f"the shared stages of {grid.shared_from} did not finish ({shared}): resume that grid")
    grid.submitted = grid.submitted or _dt.datetime.now().isoformat(timespec="seconds")
    grid.save()
    if not cells:
        return grid
    executor = _executor(grid, res.student, grid.name, dependency)
    with executor.batch():
        jobs = [executor.submit(CellJob(grid, c)) for c in cells]
    for c, job in zip(cells, jobs):
        c.job_id, c.log = str(job.job_id), str(job.paths.stdout)
    grid.save()
    return grid


def _local_env(jobs: int) -> dict[str, str]:
    """The queue workers' environment: this Python's tools first, and each of the `jobs` runs that share this
    machine's cores held to its share of them (torch's default of one thread per core in every run made a
    teacher epoch take 300 s instead of 6-14 s with two runs on two cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = str(max(1, cores // max(1, jobs)))
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                SIPAT_CPUS=share, OMP_NUM_THREADS=share, MKL_NUM_THREADS=share)


def start_local_workers(grid: Grid, jobs: int) -> None:
    """`dvc queue start -j JOBS` for a local grid, its output kept out of the caller's pipe (the workers outlive
    this command and would hold a pipe open until the last run ends)."""
    log_path = Path(grid.workdir) / "queue-workers.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        subprocess.run([_tool("dvc"), "queue", "start", "-j", str(jobs)], cwd=grid.repo, env=_local_env(jobs),
                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=True)


@contextlib.contextmanager
def _at_baseline(grid: Grid) -> Iterator[None]:
    """The repository's workspace at the grid's baseline while runs are queued: DVC's queue takes the code as
    the workspace holds it then, so a resumed cell runs the same code as its grid even after HEAD has moved.
    The workspace must be clean to be moved; it is put back as it was."""
    repo = Path(grid.repo)
    head = _git(repo, "rev-parse", "HEAD")
    if head == grid.rev:
        yield
        return
    if _git(repo, "status", "--porcelain", "--untracked-files=no"):
        raise RuntimeError(f"grid {grid.name} runs the code of {grid.rev[:10]}, HEAD is {head[:10]} with "
                           f"uncommitted changes: commit or stash them, so that the baseline can be checked out "
                           f"while the runs are queued")
    branch = subprocess.run(["git", "symbolic-ref", "-q", "--short", "HEAD"], cwd=repo, capture_output=True,
                            text=True).stdout.strip()
    print(f"queueing at grid {grid.name}'s baseline {grid.rev[:10]} (HEAD {head[:10]} is restored after)",
          flush=True)
    _git(repo, "checkout", "-q", "--detach", grid.rev)
    try:
        yield
    finally:
        _git(repo, "checkout", "-q", branch or head)


def _submit_local(grid: Grid, cells: list[Cell]) -> Grid:
    repo = Path(grid.repo)
    queued: list[str] = []
    found = _queue_entries(repo)
    for c in cells:
        task, state = found.get(c.name, ("", ""))
        if state == "Running" and _gone_pid(repo, task) is not None:
            # the queue would wait forever on a run whose process is gone: mark it failed first (DVC finds no
            # process to signal and records a failure), so that the name is free to be queued again
            subprocess.run([_tool("dvc"), "queue", "kill", c.name], cwd=repo, capture_output=True)
        if state:
            subprocess.run([_tool("dvc"), "queue", "remove", c.name], cwd=repo, capture_output=True)
    with _at_baseline(grid):
        try:
            for c in cells:
                _run_logged([_tool("dvc"), "exp", "run", "--queue", "-n", c.name, *_s(grid.cell_overrides(c))],
                            repo, _local_env(grid.jobs))
                queued.append(c.name)
        except BaseException:
            # all or nothing: a grid half in the queue would run at the next `dvc queue start` with no grid.json
            if queued:
                subprocess.run([_tool("dvc"), "queue", "remove", *queued], cwd=repo, capture_output=True)
            raise
    grid.submitted = grid.submitted or _dt.datetime.now().isoformat(timespec="seconds")
    grid.save()
    return grid


# ================================================================================================ status

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
_SLURM_STATES = {"PENDING": PENDING, "REQUEUED": PENDING, "REQUEUE_HOLD": PENDING, "REQUEUE_FED": PENDING,
                 "CONFIGURING": RUNNING, "RUNNING": RUNNING, "COMPLETING": RUNNING, "SUSPENDED": RUNNING,
                 "STAGE_OUT": RUNNING, "SIGNALING": RUNNING, "RESIZING": RUNNING, "COMPLETED": DONE}


@dataclass
class CellStatus:
    name: str
    state: str                # pending | running | done | failed
    job_id: Optional[str]
    detail: str               # SLURM's state and reason; for a failure, the log to read
    log: Optional[str]


def _expand_tasks(spec: str) -> list[str]:
    """SLURM's ArrayTaskId (``3``, ``0-5%2``, ``1,4-6``) as task numbers."""
    out = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def slurm_jobs() -> tuple[dict[str, dict[str, str]], str]:
    """SLURM's own record of every job it knows, by id (``123`` or ``123_4``), and where it came from: sacct
    (accounting storage) where the cluster has it, else the controller's memory (``scontrol show job``, which
    keeps finished jobs for MinJobAge)."""
    proc = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Reason", "-S", "now-30days"],
                          capture_output=True, text=True)
    if proc.returncode == 0 and "disabled" not in proc.stderr:
        jobs = {}
        for line in proc.stdout.splitlines():
            job_id, state, code, reason = (line.split("|") + ["", "", "", ""])[:4]
            jobs[job_id] = {"JobState": state.split()[0], "ExitCode": code, "Reason": reason}
        return jobs, "sacct"
    proc = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True)
    jobs = {}
    for line in proc.stdout.splitlines():
        rec = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "ArrayJobId" in rec and "ArrayTaskId" in rec:
            for task in _expand_tasks(rec["ArrayTaskId"]):
                jobs[f"{rec['ArrayJobId']}_{task}"] = rec
        elif "JobId" in rec:
            jobs[rec["JobId"]] = rec
    return jobs, "scontrol (no accounting storage)"


def _one(job_id: Optional[str], log: Optional[str], folder: Path, jobs: dict[str, dict[str, str]]) -> tuple[str, str]:
    rec = jobs.get(job_id or "")
    marker = read_state(folder)
    if rec is not None:
        slurm_state = rec.get("JobState", "UNKNOWN")
        state = _SLURM_STATES.get(slurm_state, FAILED)
        reason = rec.get("Reason", "None")
        detail = slurm_state + (f" ({reason})" if reason not in ("None", "") else "")
        if state == FAILED:
            detail += f", exit {rec.get('ExitCode', '?')}: see {log}"
        return state, detail
    # SLURM has forgotten the job: the job's own record of how it ended
    if marker.get("state") == DONE:
        return DONE, "finished (job no longer known to SLURM)"
    if marker.get("state") == FAILED:
        return FAILED, f"{marker.get('error', 'failed')}: see {log}"
    if marker.get("state") == "interrupted":
        return FAILED, f"interrupted and not restarted ({marker.get('error', 'a signal')}): resume the grid"
    if marker.get("state") == "running":
        return FAILED, f"stopped while running (job no longer known to SLURM): see {log}; resume the grid"
    return FAILED, "never ran (job unknown to SLURM): resume the grid"


def status(grid: Grid) -> tuple[list[CellStatus], str]:
    """Every cell's state (and the shared job's, first), and where SLURM's record came from."""
    work = Path(grid.workdir)
    if grid.executor == "local":
        return _status_local(grid), "dvc queue status"
    jobs, source = slurm_jobs()
    out = []
    if grid.shared_job_id is not None or read_state(grid.shared_dir):
        state, detail = _one(grid.shared_job_id, grid.shared_log, grid.shared_dir, jobs)
        out.append(CellStatus("(shared stages)", state, grid.shared_job_id, detail, grid.shared_log))
    for c in grid.cells:
        state, detail = _one(c.job_id, c.log, work / "cells" / c.name, jobs)
        out.append(CellStatus(c.name, state, c.job_id, detail, c.log))
    return out, source


def _experiment_names(repo: Path, rev: str) -> set[str]:
    """Names of the finished DVC experiments of baseline `rev` (their refs: refs/exps/ab/cdef.../NAME)."""
    proc = subprocess.run(["git", "for-each-ref", "--format=%(refname)", f"refs/exps/{rev[:2]}/{rev[2:]}/"],
                          cwd=repo, capture_output=True, text=True)
    return {line.rsplit("/", 1)[-1] for line in proc.stdout.split()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a number reused by another program after a restart is not the run
        with contextlib.suppress(OSError):
            return b"dvc" in cmdline.read_bytes()
    return True


def _gone_pid(repo: Path, task: str) -> Optional[int]:
    """The process id of a run the queue still calls Running although its process has ended without a result (a
    killed worker, a machine restarted, a session closed), else None. DVC keeps the run's process record in
    .dvc/tmp/exps/run/<rev>/<rev>.json; with no record yet (a run starting) the run counts as alive."""
    for info in (repo / ".dvc" / "tmp" / "exps" / "run").glob(f"{task}*/{task}*.json"):
        try:
            rec = json.loads(info.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        pid = rec.get("pid")
        if isinstance(pid, int) and (rec.get("returncode") is not None or not _pid_alive(pid)):
            return pid
    return None


# When a name is in the queue more than once (a failed run queued again), the most advanced entry counts.
_QUEUE_RANK = {"Success": 0, "Running": 1, "Queued": 2, "Failed": 3}


def _queue_entries(repo: Path) -> dict[str, tuple[str, str]]:
    """`dvc queue status` as {name: (task id, status)}."""
    proc = subprocess.run([_tool("dvc"), "queue", "status"], cwd=repo, capture_output=True, text=True)
    found: dict[str, tuple[str, str]] = {}
    for line in proc.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[-1] in _QUEUE_RANK:
            task, name, state = parts[0], parts[1], parts[-1]
            if name not in found or _QUEUE_RANK[state] < _QUEUE_RANK[found[name][1]]:
                found[name] = (task, state)
    return found


def _status_local(grid: Grid) -> list[CellStatus]:
    repo = Path(grid.repo)
    found = _queue_entries(repo)
    finished = _experiment_names(repo, grid.rev)
    published = published_runs(grid)
    mapping = {"Queued": PENDING, "Running": RUNNING, "Success": DONE, "Failed": FAILED}
    out = []
    for c in grid.cells:
        if c.name in found:
            task, state = found[c.name]
            gone = _gone_pid(repo, task) if state == "Running" else None
            if gone is not None:
                out.append(CellStatus(c.name, FAILED, None, f"stopped while running (its process {gone} has "
                                      f"ended without a result): resume the grid", None))
            else:
                out.append(CellStatus(c.name, mapping[state], None, state, None))
        elif c.name in finished:
            out.append(CellStatus(c.name, DONE, None, "finished (experiment of the baseline)", None))
        elif c.name in published:
            out.append(CellStatus(c.name, DONE, None, "finished (its metrics are in results/)", None))
        else:  # the queue was lost (a restarted machine, a cleared .dvc/tmp): nothing will run it
            out.append(CellStatus(c.name, FAILED, None, "lost: neither queued nor finished; resume the grid",
                                  None))
    return out


def find_grid(repo: Path, name: Optional[str], workdir: Optional[Path]) -> Grid:
    """A grid by work folder, by name (under ``.grid/``), or the most recently submitted one."""
    if workdir is not None:
        return Grid.load(workdir)
    base = repo.resolve() / ".grid"
    if name is not None:
        if not (base / name / "grid.json").is_file():
            restored = _restore_published(repo.resolve(), name)
            if restored is not None:
                return restored
        return Grid.load(base / name)
    grids = sorted(base.glob("*/grid.json"), key=lambda p: p.stat().st_mtime)
    if not grids:
        raise FileNotFoundError(f"no grid under {base}: submit one with `sipat grid run`")
    return Grid.load(grids[-1].parent)


def _restore_published(repo: Path, name: str) -> Optional[Grid]:
    """A grid whose work folder is gone (a new clone, a cleaned machine) but whose record was published with its
    results (`results/*/grid.json`, committed): its work folder is made again from that record, so that
    `sipat grid status` and `resume` go on where it stopped."""
    for record in sorted(repo.glob("results/*/grid.json")):
        try:
            raw = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if raw.get("name") != name or raw.get("repo") not in (str(repo), None):
            continue
        work = Path(raw.get("workdir") or repo / ".grid" / name)
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy2(record, work / "grid.json")
        print(f"grid {name}: work folder restored from {record.relative_to(repo)}", flush=True)
        return Grid.load(work)
    return None


def published_runs(grid: Grid) -> set[str]:
    """Cells whose metrics were collected into a results folder of the repository (`sipat grid collect`):
    finished, even where the experiment itself is gone (another clone)."""
    done = set()
    for folder in sorted(Path(grid.repo).glob("results/*")):
        record = folder / "grid.json"
        try:
            if json.loads(record.read_text()).get("name") != grid.name:
                continue
        except (OSError, json.JSONDecodeError):
            continue
        done |= {c.name for c in grid.cells if (folder / f"{c.name}.json").is_file()}
    return done


def shared_state(grid: Grid) -> str:
    """The shared stages' job: done (its own record says so), pending or running (SLURM has it), else failed."""
    if read_state(grid.shared_dir).get("state") == DONE:
        return DONE
    if not grid.shared_job_id:
        return FAILED
    jobs, _ = slurm_jobs()
    state, _ = _one(grid.shared_job_id, grid.shared_log, grid.shared_dir, jobs)
    return state


def to_resume(grid: Grid) -> list[Cell]:
    """Cells to submit again: failed ones, or ones SLURM lost; pending, running and finished ones stay."""
    states = {s.name: s.state for s in status(grid)[0]}
    return [c for c in grid.cells if states.get(c.name) == FAILED]
