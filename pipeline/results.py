"""Published results: a grid's metrics gathered into a folder with their provenance, and the README section
made from that folder, which names what changed since it was made.

    sipat grid collect digits --out results/digits          # metrics files + provenance.json
    sipat report --metrics-dir results/digits --readme README.md --plot docs/figures/results/digits.png
    sipat report --metrics-dir results/digits --readme README.md --check   # what the test runs

The README's section sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` (NAME: the folder's
name) and is replaced whole; `--check` rebuilds it from the committed files and fails when the README differs,
as it does once the code or parameters its runs were made with change and the section still says "unchanged".
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.core.utils import MARK_KEY, write_json
from pipeline.provenance import PROVENANCE, changes, code_digests, fingerprint, pick, processor

# The stages a student's metrics come out of, upstream of its evaluation.
STAGES = ("prepare", "teacher", "masks_synthetic", "masks_human", "train", "evaluate")
VARYING = ("strategy", "seed")  # what differs between a grid's cells


def stage_inputs(dvc_yaml: str, stages: tuple[str, ...] = STAGES) -> tuple[list[str], list[str]]:
    """The code paths (dependencies outside data/) and parameter keys that `stages` declare in dvc.yaml."""
    spec = (yaml.safe_load(dvc_yaml) or {}).get("stages", {})
    code, params = set(), set()
    for name in stages:
        stage = spec.get(name) or {}
        for dep in stage.get("deps", []):
            if not str(dep).startswith("data/"):
                code.add(str(dep))
        for p in stage.get("params", []):
            if isinstance(p, dict):  # params of another file: `file.yaml: [keys]`
                continue
            params.add(str(p))
    return sorted(code), sorted(params - set(VARYING))


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {repo}: {proc.stderr.strip()}")
    return proc.stdout


def experiment_refs(repo: Path) -> dict[str, str]:
    """Every finished DVC experiment of the repository, any baseline: name -> commit."""
    out = {}
    for line in _git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps").splitlines():
        ref, sha = line.split()
        parts = ref.split("/")
        if len(parts) >= 5 and parts[1] == "exps":  # refs/exps/ab/cdef.../NAME
            out[parts[-1]] = sha
    return out


def collect(repo: Path, grid, out: Path, metrics_path: str = "data/metrics/student.json",
            teacher_path: str = "data/metrics/teacher.json") -> dict[str, Any]:
    """Write every finished cell's metrics (`NAME.json`), the teacher's (`teacher.json`) and `provenance.json`
    into `out`. Returns the provenance. Cells not finished yet are listed in it as missing."""
    refs = experiment_refs(repo)
    out.mkdir(parents=True, exist_ok=True)
    prev = load_provenance(out) if (out / PROVENANCE).is_file() else None
    if prev is not None and prev.get("commit") != grid.rev:
        raise RuntimeError(f"{out} holds runs of commit {prev['commit'][:10]}, grid {grid.name} starts from "
                           f"{grid.rev[:10]}: collect it into another folder")
    write_json(out / "grid.json", asdict(grid))  # resume finds the grid here on a clone without .grid/
    found, missing, times, params_seen = [], [], [], {}
    if prev is not None and prev.get("finished"):
        times.append(int(_dt.datetime.fromisoformat(prev["finished"]).timestamp()))
    dvc_yaml = _git(repo, "show", f"{grid.rev}:dvc.yaml")
    code_paths, keys = stage_inputs(dvc_yaml)
    for cell in grid.cells:
        sha = refs.get(cell.name)
        if sha is None:
            if prev is not None and (out / f"{cell.name}.json").is_file():
                found.append(cell.name)  # collected earlier, on a clone that had its experiment
                continue
            missing.append(cell.name)
            continue
        base = _git(repo, "rev-parse", f"{sha}^").strip()
        if base != grid.rev:
            raise RuntimeError(f"experiment {cell.name} ({sha[:10]}) was run from {base[:10]}, not from grid "
                               f"{grid.name}'s baseline {grid.rev[:10]}: another grid of that name?")
        metrics = json.loads(_git(repo, "show", f"{sha}:{metrics_path}"))
        if metrics.get("strategy") != cell.strategy or metrics.get("seed") != cell.seed:
            raise RuntimeError(f"experiment {cell.name}: its metrics are of strategy {metrics.get('strategy')} "
                               f"seed {metrics.get('seed')}")
        metrics.pop(MARK_KEY, None)
        write_json(out / f"{cell.name}.json", metrics)
        params = yaml.safe_load(_git(repo, "show", f"{sha}:params.yaml"))
        params_seen[cell.name] = pick(params, keys)
        times.append(int(_git(repo, "show", "-s", "--format=%ct", sha).strip()))
        found.append(cell.name)
        if not (out / "teacher.json").exists():
            teacher = json.loads(_git(repo, "show", f"{sha}:{teacher_path}"))
            teacher.pop(MARK_KEY, None)
            write_json(out / "teacher.json", teacher)
    if not found:
        raise RuntimeError(f"grid {grid.name}: no finished experiment yet ({len(missing)} cell(s) pending)")
    first = next(iter(params_seen.values())) if params_seen else prev["params"]
    if prev is not None and params_seen and json.dumps(prev["params"], sort_keys=True, default=str) != \
            json.dumps(first, sort_keys=True, default=str):
        raise RuntimeError(f"the runs collected earlier into {out} had other parameters than these")
    for name, p in params_seen.items():
        if p != first:
            diff = [k for k in first if first[k] != p.get(k)]
            raise RuntimeError(f"experiment {name} was run with other parameters than the grid's first run: "
                               f"{', '.join(diff)}")
    submitted = _dt.datetime.fromisoformat(grid.submitted) if grid.submitted else None
    finished = _dt.datetime.fromtimestamp(max(times))
    code = code_digests(repo, code_paths, rev=grid.rev)
    prov = {
        "grid": grid.name, "protocol": grid.protocol, "overrides": list(grid.overrides),
        "commit": grid.rev, "processor": getattr(grid, "processor", "") or processor(),
        "command": grid_command(grid), "submitted": grid.submitted,
        "finished": finished.isoformat(timespec="seconds"),
        "wall_seconds": round((finished - submitted).total_seconds()) if submitted else None,
        "runs": len(found), "missing": missing,
        "run_seconds": round(sum(float(json.loads((out / f"{n}.json").read_text()).get(k) or 0)
                                 for n in found for k in ("train_seconds", "eval_seconds"))),
        "fingerprint": fingerprint(code, first), "code": code, "params": first,
        "grid_record": asdict(grid),  # grid.json as submitted: restores `sipat grid resume` on another clone
    }
    write_json(out / PROVENANCE, prov)
    return prov


def grid_command(grid) -> str:
    """The command that makes this grid again."""
    strategies = sorted({c.strategy for c in grid.cells}, key=[c.strategy for c in grid.cells].index)
    seeds = sorted({c.seed for c in grid.cells})
    parts = ["sipat grid run --executor", grid.executor, "-p", grid.protocol,
             "--strategies", ",".join(strategies), "--seeds", ",".join(map(str, seeds))]
    parts += [f"-S {o}" for o in grid.overrides]
    if grid.executor == "local":
        parts += ["-j", str(getattr(grid, "jobs", 1))]
    return " ".join(parts)


def load_provenance(folder: Path) -> Optional[dict[str, Any]]:
    path = folder / PROVENANCE
    if not path.is_file():
        return None
    try:
        prov = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    for key in ("commit", "processor", "code", "params", "protocol"):
        if key not in prov:
            raise ValueError(f"{path}: key {key!r} missing (write it with `sipat grid collect`)")
    return prov


def compose(repo: Path, protocol: str, overrides: list[str]) -> dict[str, Any]:
    """conf/ composed as `dvc exp run -S protocol=... -S ...` would write params.yaml."""
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "params.yaml"
        compose_and_dump(target, str(repo / "conf"), None, "config", "", [f"protocol={protocol}", *overrides])
        return yaml.safe_load(target.read_text())


def what_changed(repo: Path, prov: dict[str, Any]) -> list[str]:
    """Code files and parameter values the result's stages read that differ in this working tree."""
    code_paths, keys = stage_inputs((repo / "dvc.yaml").read_text())
    keys = sorted(set(keys) | set(prov.get("params", {})))
    now_code = code_digests(repo, code_paths)
    now_params = pick(compose(repo, prov["protocol"], prov.get("overrides", [])), keys)
    return changes(prov, now_code, now_params)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "not recorded"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def provenance_markdown(prov: dict[str, Any], changed: list[str]) -> str:
    """Where, when and with what a result was made, and whether the code and parameters are still those."""
    missing = prov.get("missing") or []
    lines = [f"Made at commit `{prov['commit'][:10]}` on {prov['processor']} (2 cores), grid `{prov['grid']}`: "
             f"{prov['runs']} runs" + (f", {len(missing)} not finished (" + ", ".join(missing[:4])
                                       + (", …" if len(missing) > 4 else "") + ")" if missing else "")
             + f"; {_duration(prov.get('wall_seconds'))} from submission ({prov.get('submitted') or '?'}) to the "
             f"last result ({prov.get('finished') or '?'}), interruptions included; the runs' own training and "
             f"evaluation add up to {_duration(prov.get('run_seconds'))}. Rebuilt with:", "",
             f"    {prov['command']}", "",
             f"Fingerprint of the code and parameters of the stages that made it (prepare to evaluate): "
             f"`{prov.get('fingerprint', '?')}`."]
    if changed:
        shown = changed[:12]
        lines += ["", "**Since then changed** (these results describe the code at the commit above, not the "
                  "current one): " + "; ".join(f"`{c}`" for c in shown)
                  + (f"; and {len(changed) - len(shown)} more" if len(changed) > len(shown) else "") + "."]
    else:
        lines += ["", "Current: no code file or parameter these stages read has changed since."]
    return "\n".join(lines) + "\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


def replace_section(readme: str, name: str, body: str) -> str:
    """The README with its `results:NAME` section's body replaced."""
    start, end = _markers(name)
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise ValueError(f"README has no section {start} ... {end}: add both lines where the results go")
    return pattern.sub(lambda _m: f"{start}\n{body.rstrip()}\n{end}", readme, count=1)


def section(readme: str, name: str) -> Optional[str]:
    start, end = _markers(name)
    m = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), readme, re.S)
    return m.group(1) if m else None
