"""The paper-style comparison of evaluated runs: one table per group of comparable runs.

A run is identified by what it is, not by where it was found: by its checkpoint's hash and parameters when its
metrics record them, else by the metrics themselves (timings aside). So the workspace and the experiment whose
results it holds are one run. Seeds are averaged only within a group of runs that share dataset, model,
training budget and schedule, evaluated test points and ε set; strategy-specific parameters (such as
`trades.beta`) belong to the strategy and split its row when they differ within a group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from pipeline.claims import Claim, Interval, judge, paired, t_interval
from pipeline.core.config import OptimConfig, format_budget

log = logging.getLogger(__name__)


# Row order of the paper's tables; unknown strategies follow alphabetically.
STRATEGY_ORDER = ["basic", "madry", "trades", "fat", "part", "sip_h", "sip_s"]
LABELS = {"basic": "Basic", "madry": "Madry", "trades": "TRADES", "fat": "FAT", "part": "PART",
          "sip_h": "SIP-H", "sip_s": "SIP-S"}
MISSING = "—"  # a cell without a result

# Keys that say how long something took, or where it was found: never part of what a run is.
_NOT_IDENTITY = ("eval_seconds", "train_seconds", "source")
# Sections of the student's optimiser parameters that belong to one strategy (trades, fat, part, ...).
# What a run records under `optim` besides the optimiser itself are strategy sections (train.<strategy>).
OPTIM_KEYS = frozenset(OptimConfig.model_fields)


def is_metrics(obj: Any) -> bool:
    return isinstance(obj, dict) and "clean_acc" in obj and isinstance(obj.get("robust_acc"), dict)


def metrics_problem(obj: dict[str, Any]) -> Optional[str]:
    """Why an evaluation result cannot be used (an accuracy that is no number in [0, 1]), or None."""
    def bad(v: Any) -> bool:
        return isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0

    if bad(obj.get("clean_acc")):
        return f"clean_acc is {obj.get('clean_acc')!r}, not an accuracy in [0, 1]"
    wrong = [k for k, v in obj["robust_acc"].items() if v is not None and bad(v)]
    if wrong:
        return f"robust_acc.{wrong[0]} is {obj['robust_acc'][wrong[0]]!r}, not an accuracy in [0, 1]"
    return None


def _is_student(obj: Any) -> bool:
    return is_metrics(obj) and obj.get("role", "student") == "student"


def load_metrics_dir(folder: str | Path) -> list[dict[str, Any]]:
    """Every JSON file under `folder` that looks like an evaluation result (student runs only)."""
    rows = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping %s: %s", path, err)
            continue
        if _is_student(obj):
            problem = metrics_problem(obj)
            if problem is not None:
                log.warning("skipping %s: %s", path, problem)
                continue
            rows.append(dict(obj, source=str(path)))
    return rows


def rows_from_experiments(exp_rows: list[dict[str, Any]], read: Callable[[str], str]) -> list[dict]:
    """Student metrics of the workspace, each listed commit and each finished experiment of `exp_show` rows.

    `exp_rows` are `dvc.api.exp_show()` rows; `read(rev)` returns the student metrics file at a revision. The
    file is read whole: exp_show's flattened columns are shared between metric files and may omit keys that
    only some files have. The same run found in several places (the workspace holding an applied experiment,
    a commit and its unchanged workspace) is returned once per place; `compare` counts it once.
    """
    out = []
    for row in exp_rows:
        rev = row.get("rev")
        if row.get("State") not in (None, "Success") or not rev:
            continue  # queued, running or failed
        try:
            metrics = json.loads(read(rev))
        except (FileNotFoundError, json.JSONDecodeError, OSError, KeyError):
            continue  # never evaluated
        if _is_student(metrics):
            problem = metrics_problem(metrics)
            if problem is not None:
                log.warning("skipping the metrics of %s: %s", row.get("Experiment") or rev, problem)
                continue
            out.append(dict(metrics, source=row.get("Experiment") or rev))
    return out


# ============================================================================================ identity

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _eps_key(text: Any) -> str:
    """'8/255' -> 'eps_8_255', the metric key the evaluation writes for that budget."""
    return "eps_" + str(text).replace("/", "_").replace(".", "p")


def eps_value(key: str) -> float:
    """The budget of a metric key ('eps_8_255' -> 8/255); unreadable keys sort last."""
    m = re.fullmatch(r"eps_(\d+)_(\d+)", key)
    if m:
        return int(m.group(1)) / int(m.group(2))
    try:
        return float(key.removeprefix("eps_").replace("p", "."))
    except ValueError:
        return math.inf


def eps_label(key: str) -> str:
    m = re.fullmatch(r"eps_(\d+)_(\d+)", key)
    return f"{m.group(1)}/{m.group(2)}" if m else key.removeprefix("eps_").replace("p", ".")


def eps_columns(m: dict[str, Any]) -> tuple[str, ...]:
    """The budgets a run was evaluated at (metric keys, ascending): its `eps` list, else its results' keys."""
    listed = m.get("eps")
    keys = [_eps_key(e) for e in listed] if isinstance(listed, list) and listed else list(m["robust_acc"])
    return tuple(sorted(set(keys), key=eps_value))


def _recorded(m: dict[str, Any]) -> Optional[dict[str, Any]]:
    run = m.get("run")
    return run if isinstance(run, dict) else None


def comparable_key(m: dict[str, Any]) -> dict[str, Any]:
    """What runs must share to be averaged together: dataset, model, training budget and schedule, evaluated
    points and ε set. Metrics that do not record their run's configuration fall back to dataset, model,
    training ε, number of evaluated points and ε set (and never share a group with ones that do)."""
    eps = list(eps_columns(m))
    run = _recorded(m)
    if run is None:
        return {"recorded": False, "dataset": m.get("dataset"), "model": m.get("model"),
                "train_eps": m.get("train_eps"), "n_examples": m.get("n_examples"), "eps": eps}
    optim = run.get("optim") or {}
    scope = m.get("seed_scope", "student")
    return {"recorded": True, "dataset": run.get("dataset", m.get("dataset")),
            "model": run.get("model", m.get("model")), "image_size": run.get("image_size"),
            "attack": run.get("attack"),
            "optim": {k: v for k, v in optim.items() if not _strategy_section(k, m.get("strategy"))},
            "n_examples": m.get("n_examples"), "eps": eps, "seed_scope": scope,
            # with seed_scope split or all each seed draws its own points: the same seed shares them
            "points": m.get("points_digest") if scope == "student" else "drawn per seed"}


def _strategy_section(key: str, strategy: Any) -> bool:
    return key not in OPTIM_KEYS


def strategy_params(m: dict[str, Any]) -> dict[str, Any]:
    """The parameters of the run's own strategy (e.g. {'trades.beta': 6.0}); empty when none are recorded."""
    run, s = _recorded(m), m.get("strategy")
    section = (run.get("optim") or {}).get(s) if run is not None else None
    return {f"{s}.{k}": v for k, v in sorted(section.items())} if isinstance(section, dict) else {}


def _without_timings(m: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in m.items() if k not in _NOT_IDENTITY}
    if isinstance(out.get("attacks"), dict):
        out["attacks"] = {k: {kk: vv for kk, vv in a.items() if kk != "seconds"} if isinstance(a, dict) else a
                          for k, a in out["attacks"].items()}
    return out


def run_identity(m: dict[str, Any]) -> str:
    """Which run a metrics file describes: the checkpoint's hash, its parameters and what was evaluated, when
    recorded; else the metrics content without timings and source."""
    if m.get("checkpoint_sha256"):
        return _digest({"checkpoint": m["checkpoint_sha256"], "run": m.get("run"), "points": m.get("points_digest"),
                        "n_examples": m.get("n_examples"), "eps": eps_columns(m)})
    return _digest(_without_timings(m))


def _results(m: dict[str, Any]) -> Any:
    return m.get("clean_acc"), m.get("robust_acc")


def _source(m: dict[str, Any]) -> str:
    return str(m.get("source", "?"))


def dedupe(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each run once, in the order first found; returns the runs (with `sources`, every place each was found)
    and warnings.

    The same run found in several places is silent. Two runs of one strategy, seed and configuration
    (different checkpoints: e.g. retrained on other hardware) are one seed, not two: the first is kept and a
    warning names both sources; so does one checkpoint evaluated twice with different results.
    """
    warnings: list[str] = []
    by_identity: dict[str, dict[str, Any]] = {}
    for r in rows:
        ident = run_identity(r)
        first = by_identity.get(ident)
        if first is None:
            by_identity[ident] = dict(r, sources=[_source(r)])
            continue
        first["sources"].append(_source(r))
        if _results(first) != _results(r):
            warnings.append(f"{_describe(r)}: one checkpoint evaluated twice with different results "
                            f"({first['sources'][0]}; {_source(r)}); counted once, from {first['sources'][0]}")
        else:
            log.info("%s found in %s and %s: one run", _describe(r), first["sources"][0], _source(r))
    by_config: dict[str, dict[str, Any]] = {}
    kept = []
    for r in by_identity.values():
        key = _digest({"strategy": r.get("strategy"), "seed": r.get("seed"), "group": comparable_key(r),
                       "params": strategy_params(r)})
        first = by_config.get(key)
        if first is None:
            by_config[key] = r
            kept.append(r)
            continue
        warnings.append(f"{_describe(r)}: two different runs of the same configuration "
                        f"({first['sources'][0]}; {r['sources'][0]}); counted once, from {first['sources'][0]}")
    return kept, warnings


def _describe(m: dict[str, Any]) -> str:
    return f"strategy {m.get('strategy', '?')} seed {m.get('seed', '?')}"


# ============================================================================================== groups

@dataclass
class Group:
    """Runs that may be averaged together, and their table: rows strategies, columns clean and each ε."""

    key: dict[str, Any]
    digest: str
    runs: list[dict[str, Any]]
    columns: list[str]  # "clean", then metric keys of ε ascending
    rows: list[dict[str, Any]]  # {"strategy", "label", "params", "seeds",
    #                               "cells": {column: {mean, std, n, ci, values: {seed: accuracy %}}}}
    notes: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    title: str = ""
    details: str = ""
    slug: str = ""


# What a seed varied (seed_scope), as the table title says it
SCOPE_TEXT = {"student": "varying the student only", "split": "varying the student, split and points",
              "all": "varying the student, split, points and teacher"}
PAPER_SEEDS = 5  # the paper repeats every experiment five times (sec. 4.3)
PAPER_DATASETS = ("cifar10", "cifar100", "cub")


def _percent(value: Any) -> Optional[float]:
    try:
        v = 100.0 * float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _seed_order(seed: Any) -> tuple[bool, float, str]:
    return (not isinstance(seed, int), seed if isinstance(seed, int) else 0, str(seed))


def _strategy_order(name: str) -> tuple[int, str]:
    return (STRATEGY_ORDER.index(name), "") if name in STRATEGY_ORDER else (len(STRATEGY_ORDER), name)


def _fmt_value(v: Any, key: str = "") -> str:
    if isinstance(v, float):
        return format_budget(v) if "eps" in key and 0 <= v <= 1 else f"{v:g}"  # budgets as n/255
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(x, key) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt_value(x, k)}" for k, x in v.items()) + "}"
    return str(v)


def _build_rows(runs: list[dict[str, Any]], columns: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    notes = []
    by_strategy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_strategy[str(r.get("strategy", "?"))].append(r)
    rows = []
    for s in sorted(by_strategy, key=_strategy_order):
        variants: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in by_strategy[s]:
            variants[_digest(strategy_params(r))].append(r)
        split = len(variants) > 1
        if split:
            differing = sorted({k for rs in variants.values() for k, v in strategy_params(rs[0]).items()
                                if any(strategy_params(o[0]).get(k) != v for o in variants.values())})
            notes.append(f"{LABELS.get(s, s)} runs differ in {', '.join(differing)}: one row per value, "
                         f"not averaged together.")
        for members in sorted(variants.values(), key=lambda rs: json.dumps(strategy_params(rs[0]), default=str)):
            params = strategy_params(members[0])
            label = LABELS.get(s, s)
            if split:
                label += " (" + ", ".join(f"{k.split('.', 1)[-1]} {_fmt_value(v, k)}" for k, v in params.items()
                                          if k in differing) + ")"
            cells = {}
            for c in columns:
                values = {m.get("seed"): _percent(m["clean_acc"] if c == "clean" else m["robust_acc"].get(c))
                          for m in members}
                values = {k: v for k, v in sorted(values.items(), key=lambda kv: _seed_order(kv[0]))
                          if v is not None}
                ci = t_interval(list(values.values()))
                cells[c] = {"mean": ci.mean if ci.n else float("nan"), "std": ci.std if ci.n > 1 else 0.0,
                            "n": ci.n, "ci": ci, "values": values}
            rows.append({"strategy": s, "label": label, "params": params, "cells": cells,
                         "seeds": sorted({m.get("seed") for m in members}, key=_seed_order)})
    counts = {r["label"]: len(r["seeds"]) for r in rows}
    if len(set(counts.values())) > 1:
        notes.append("Seed counts differ between rows: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                     + "; a mean over fewer seeds is less certain.")
    if {str(r.get("dataset")) for r in runs} & set(PAPER_DATASETS):
        short = {k: v for k, v in counts.items() if v < PAPER_SEEDS}
        if short:
            notes.append(f"The paper averages {PAPER_SEEDS} seeds (sec. 4.3); fewer here: "
                         + ", ".join(f"{k} {v}" for k, v in short.items()) + ".")
    if any(not e["n"] for r in rows for e in r["cells"].values()):
        notes.append(f"{MISSING}: no result at this budget in these runs' metrics.")
    return rows, notes


def _seed_text(rows: list[dict[str, Any]]) -> str:
    counts = sorted({len(r["seeds"]) for r in rows})
    if len(counts) == 1:
        return f"{counts[0]} seed" + ("s" if counts[0] != 1 else "")
    return f"{counts[0]}–{counts[-1]} seeds (differs by strategy)"


def _budget(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format_budget(float(v))
    return "?" if v is None else str(v)


def _train_eps(key: dict[str, Any]) -> str:
    return _budget((key.get("attack") or {}).get("eps") if key["recorded"] else key.get("train_eps"))


def _points_text(key: dict[str, Any]) -> str:
    n = key.get("n_examples")
    return f"{n} test points" if n is not None else "test points not recorded"


def _schedule_text(s: Any) -> str:
    if not isinstance(s, dict):
        return "schedule ?"
    kind = s.get("kind")
    if kind == "multistep":
        return f"lr ×{_fmt_value(s.get('gamma'))} at epochs {', '.join(map(str, s.get('milestones') or [])) or '—'}"
    if kind == "step":
        return f"lr ×{_fmt_value(s.get('gamma'))} every {s.get('step_every')} epochs"
    return "constant lr" if kind == "none" else f"schedule {_fmt_value(s)}"


def _details(key: dict[str, Any]) -> str:
    evaluated = ", ".join(eps_label(e) for e in key["eps"])
    points = _points_text(key) + (f" (subset {key['points']})" if key.get("points") else "")
    evaluation = f"Evaluation: AutoAttack (standard, L∞) at ε = {evaluated} on {points}."
    if not key["recorded"]:
        return ("Training budget and schedule are not recorded in these metrics (written before runs stored "
                "their configuration): grouped by dataset, model, training ε, number of evaluated points and ε "
                "set only. " + evaluation)
    a, o = key.get("attack") or {}, key.get("optim") or {}
    parts = [f"{o.get('epochs', '?')} epochs", f"batch {o.get('batch_size', '?')}",
             f"lr {_fmt_value(o.get('lr', '?'))}", _schedule_text(o.get("schedule")),
             f"momentum {_fmt_value(o.get('momentum', '?'))}" + (" (Nesterov)" if o.get("nesterov") else ""),
             f"weight decay {_fmt_value(o.get('weight_decay', '?'))}", f"model selection: {o.get('select', '?')}"]
    if o.get("pretrained"):
        parts.append("pretrained")
    parts += [f"{k} {_fmt_value(v, k)}" for k, v in o.items() if k not in OptimConfig.model_fields]
    pgd = (f"PGD {a.get('steps', '?')} steps of {_budget(a.get('step_size'))} within ε = {_train_eps(key)}"
           + ("" if a.get("random_start", True) else ", no random start"))
    size = key.get("image_size")
    return (f"Training: {', '.join(parts)}; {pgd}" + (f"; images {size}×{size}" if size else "") + ". "
            + evaluation)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def compare(rows: Iterable[dict[str, Any]]) -> tuple[list[Group], list[str]]:
    """Metrics rows (from `load_metrics_dir` or `rows_from_experiments`) -> comparable groups and warnings.

    Each group has its own title (dataset, model, training ε, evaluated points, seeds), a details line with
    the full training and evaluation protocol, and a slug for file names; titles and slugs are unique (a short
    digest of the group is added where two groups would otherwise read the same).
    """
    runs, warnings = dedupe(rows)
    buckets: dict[str, list[dict[str, Any]]] = defaultdict(list)
    keys: dict[str, dict[str, Any]] = {}
    for r in runs:
        key = comparable_key(r)
        d = _digest(key)
        keys[d] = key
        buckets[d].append(r)
    groups = []
    for d, members in buckets.items():
        key = keys[d]
        columns = ["clean"] + list(key["eps"])
        table_rows, notes = _build_rows(members, columns)
        groups.append(Group(key=key, digest=d, runs=members, columns=columns, rows=table_rows, notes=notes))
    groups.sort(key=lambda g: (str(g.key.get("dataset")), str(g.key.get("model")), not g.key["recorded"],
                               eps_value(_eps_key(_train_eps(g.key))), g.key.get("n_examples") or 0, g.digest))
    for g in groups:
        g.title = (f"{g.key.get('dataset') or '?'} · {g.key.get('model') or '?'} · "
                   f"training ε {_train_eps(g.key)} · {_points_text(g.key)} · {_seed_text(g.rows)}"
                   + (f" {SCOPE_TEXT[g.key['seed_scope']]}" if g.key.get("seed_scope") in SCOPE_TEXT else ""))
        g.details = _details(g.key)
        g.claims = judge(g)
        g.slug = _slug(f"{g.key.get('dataset') or 'unknown'}_{g.key.get('model') or 'unknown'}_"
                       f"eps{_train_eps(g.key).replace('/', '-')}_n{g.key.get('n_examples') or 'all'}")
    for attr, extra in (("title", lambda g: f" [{g.digest[:6]}]"), ("slug", lambda g: f"_{g.digest[:6]}")):
        seen: dict[str, int] = defaultdict(int)
        for g in groups:
            seen[getattr(g, attr)] += 1
        for g in groups:
            if seen[getattr(g, attr)] > 1:
                setattr(g, attr, getattr(g, attr) + extra(g))
    return groups, warnings


# ============================================================================================== output

def table_cells(group: Group) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of a group's table as (text, is best in its column) cells; accuracy in %."""
    best = {c: max((r["cells"][c]["mean"] for r in group.rows if r["cells"][c]["n"]), default=None)
            for c in group.columns}
    head = ["Strategy"] + ["Clean" if c == "clean" else f"ε = {eps_label(c)}" for c in group.columns] + ["seeds"]
    out = []
    for r in group.rows:
        cells = [(r["label"], False)]
        for c in group.columns:
            e = r["cells"][c]
            if not e["n"]:
                cells.append((MISSING, False))
                continue
            txt = f"{e['mean']:.2f} ± {e['std']:.2f}" if e["n"] > 1 else f"{e['mean']:.2f}"  # no spread from 1 seed
            if e["n"] < len(r["seeds"]):
                txt += f" (n={e['n']})"
            cells.append((txt, best[c] is not None and abs(e["mean"] - best[c]) < 1e-9))
        cells.append((str(len(r["seeds"])), False))
        out.append(cells)
    return head, out


REFERENCE = "madry"  # the paired differences are to this strategy's runs of the same seeds
Cell = tuple[list[str], bool]  # the lines of a table cell, and whether it is best in its column


def _heads(group: Group) -> list[str]:
    return ["Clean" if c == "clean" else f"ε {eps_label(c)}" for c in group.columns]


def _interval_lines(ci: Interval, signed: bool = False) -> list[str]:
    mean = f"{ci.mean:+.2f}" if signed else f"{ci.mean:.2f}"
    if ci.n > 1 and math.isfinite(ci.half):
        # an accuracy lies in [0, 100]: its interval is cut there (a difference's is not)
        lo, hi = (ci.lo, ci.hi) if signed else (max(0.0, ci.lo), min(100.0, ci.hi))
        return [mean + ("" if signed else f" ± {ci.std:.2f}"), f"[{lo:.2f}, {hi:.2f}]"]
    return [mean, f"(n={ci.n})"]


def accuracy_table(group: Group) -> tuple[list[str], list[list[Cell]]]:
    """Accuracy (%) per strategy and column: mean ± std over seeds, then the 95 % t interval of the mean."""
    best = {c: max((r["cells"][c]["mean"] for r in group.rows if r["cells"][c]["n"]), default=None)
            for c in group.columns}
    out = []
    for r in group.rows:
        cells: list[Cell] = [([r["label"], f"{len(r['seeds'])} seed" + ("s" if len(r["seeds"]) != 1 else "")],
                              False)]
        for c in group.columns:
            e = r["cells"][c]
            if not e["n"]:
                cells.append(([MISSING], False))
                continue
            cells.append((_interval_lines(e["ci"]), best[c] is not None and abs(e["mean"] - best[c]) < 1e-9))
        out.append(cells)
    return ["Strategy"] + _heads(group), out


def difference_table(group: Group, ref: str = REFERENCE) -> Optional[tuple[list[str], list[list[Cell]]]]:
    """Each strategy minus `ref` over the seeds both have (percentage points): mean, then its 95 % interval.
    None when the group has no `ref` runs."""
    base = next((r for r in group.rows if r["strategy"] == ref), None)
    if base is None:
        return None
    out = []
    for r in group.rows:
        if r is base:
            continue
        pairs = len(set(r["seeds"]) & set(base["seeds"]))
        cells: list[Cell] = [([r["label"], f"{pairs} pair" + ("s" if pairs != 1 else "")], False)]
        for c in group.columns:
            d = paired(r, base, c)
            cells.append((_interval_lines(d, signed=True) if d.n else [MISSING], False))
        out.append(cells)
    return ["− " + LABELS.get(ref, ref)] + _heads(group), out


def claim_lines(group: Group) -> list[str]:
    """One verdict line per claim, then its evidence, indented."""
    lines = []
    for c in group.claims:
        lines.append(f"{c.name} {c.verdict.upper()}: {c.statement}.")
        lines += [f"    {p}" for p in c.parts]
    return lines


def text_table(head: list[str], rows: list[list[Cell]], width: int = 80) -> list[str]:
    """A plain-text table no wider than `width`: the first column repeats and the others are split into as
    many stacked blocks as needed, so no cell is ever cut. Best cells are marked with '*'."""
    def show(cell: Cell) -> list[str]:
        lines, best = cell
        return [f"{t}*" if best and i == 0 else t for i, t in enumerate(lines)]

    body = [[show(c) for c in r] for r in rows]
    widths = [max([len(head[j])] + [len(line) for r in body for line in r[j]]) for j in range(len(head))]
    blocks, current, used = [], [], widths[0]
    for j in range(1, len(head)):
        if current and used + 2 + widths[j] > width:
            blocks.append(current)
            current, used = [], widths[0]
        current.append(j)
        used += 2 + widths[j]
    if current:
        blocks.append(current)
    out = []
    for k, cols in enumerate(blocks):
        if k:
            out.append("")
        cols = [0] + cols
        line = lambda parts: "  ".join(  # noqa: E731
            p.ljust(widths[j]) if j == 0 else p.rjust(widths[j]) for j, p in zip(cols, parts)).rstrip()
        out.append(line([head[j] for j in cols]))
        out.append(line(["-" * widths[j] for j in cols]))
        for r in body:
            height = max(len(r[j]) for j in cols)
            for i in range(height):
                out.append(line([r[j][i] if i < len(r[j]) else "" for j in cols]))
    return out


def _md_table(head: list[str], rows: list[list[Cell]]) -> list[str]:
    def cell(c: Cell, first: bool) -> str:
        lines, best = c
        top = f"**{lines[0]}**" if best else lines[0]
        rest = [f"<sub>{t}</sub>" for t in lines[1:]]
        return "<br>".join([top, *rest]) if not first else top + "".join(f" <sub>({t})</sub>" for t in lines[1:])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell(c, j == 0) for j, c in enumerate(r)) + " |" for r in rows]
    return out


def group_markdown(group: Group, plot: Optional[str] = None, level: int = 2) -> str:
    """One group: heading (its title), protocol, accuracy table, paired differences to Madry, the claims'
    verdicts, notes and, when given, the plot's relative path."""
    head, rows = accuracy_table(group)
    lines = ["#" * level + " " + group.title, "", group.details, "",
             "Accuracy (%): mean ± std over seeds, below it the 95 % t interval of the mean; best mean per column "
             "in bold.", "", *_md_table(head, rows)]
    diff = difference_table(group)
    if diff is not None:
        lines += ["", f"Paired difference to {LABELS[REFERENCE]} (percentage points; the same seed shares the "
                  "teacher, split and evaluated points): mean, below it the 95 % t interval.", "",
                  *_md_table(*diff)]
    if group.claims:
        lines += ["", "The paper's claims on this group (computed; 95 % intervals, a margin of "
                  "1 percentage point for \"at least\" and \"comparable\"):", ""]
        for c in group.claims:
            lines.append(f"- **{c.name} {c.verdict}**: {c.statement}.")
            lines += [f"  - {p}" for p in c.parts]
    if group.notes:
        lines += [""] + [f"- {n}" for n in group.notes]
    if plot:
        lines += ["", f"![accuracy against ε: {group.title}]({plot})"]
    return "\n".join(lines) + "\n"


def to_markdown(groups: list[Group], plots: Optional[dict[str, str]] = None) -> str:
    """The whole comparison: one section per group; `plots` maps group slugs to plot paths."""
    plots = plots or {}
    intro = ("# Comparison of training strategies\n\nRuns are averaged only within a section: same dataset, "
             "model, training budget and schedule, evaluated test points and ε set. "
             f"{len(groups)} group(s), {sum(len(g.runs) for g in groups)} run(s).\n")
    return "\n".join([intro] + [group_markdown(g, plots.get(g.slug)) for g in groups])


def plot_path(base: str | Path, slug: str) -> Path:
    """Where a group's plot goes: `reports/comparison.png` -> `reports/comparison_<slug>.png`."""
    base = Path(base)
    return base.with_name(f"{base.stem}_{slug}{base.suffix or '.png'}")


def summary_table(runs: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per metrics file (name → metrics): strategy, seed, points, clean and robust accuracy (%)."""
    eps_keys = sorted({k for m in runs.values() for k in m["robust_acc"]}, key=eps_value)
    head = ["file", "strategy", "seed", "points", "clean"] + [eps_label(k) for k in eps_keys]
    rows = []
    for name, m in runs.items():
        acc = []
        for k in eps_keys:
            v = _percent(m["robust_acc"].get(k))
            acc.append(MISSING if v is None else f"{v:.2f}")
        rows.append([name, str(m.get("strategy", "?")), str(m.get("seed", "?")),
                     str(m.get("n_examples", "?")), f"{100 * float(m['clean_acc']):.2f}", *acc])
    return head, rows
