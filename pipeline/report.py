"""The paper-style comparison: strategies × (clean, each ε), mean ± std over seeds, best in bold, and a plot."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

log = logging.getLogger(__name__)

# Row order of the paper's tables; unknown strategies follow alphabetically.
STRATEGY_ORDER = ["basic", "madry", "trades", "fat", "part", "sip_h", "sip_s"]
LABELS = {"basic": "Basic", "madry": "Madry", "trades": "TRADES", "fat": "FAT", "part": "PART",
          "sip_h": "SIP-H", "sip_s": "SIP-S"}


def is_metrics(obj: Any) -> bool:
    return isinstance(obj, dict) and "clean_acc" in obj and isinstance(obj.get("robust_acc"), dict)


def load_metrics_dir(folder: str | Path) -> list[dict[str, Any]]:
    """Every JSON file under `folder` that looks like an evaluation result (student runs only)."""
    rows = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping %s: %s", path, err)
            continue
        if is_metrics(obj) and obj.get("role", "student") == "student":
            obj = dict(obj, source=str(path))
            rows.append(obj)
    return rows


def _eps_sort_key(key: str) -> float:
    m = re.fullmatch(r"eps_(\d+)_(\d+)", key)
    if m:
        return int(m.group(1)) / int(m.group(2))
    return float(key.removeprefix("eps_").replace("p", ".")) if key.startswith("eps_") else 0.0


def _eps_label(key: str) -> str:
    m = re.fullmatch(r"eps_(\d+)_255", key)
    return f"ε = {m.group(1)}/255" if m else key


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Group by strategy (one value per seed); returns columns and per-strategy mean/std/n in percent."""
    by_strategy: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[str, set] = defaultdict(set)
    columns: set[str] = set()
    for r in rows:
        s = r.get("strategy", "?")
        seed = r.get("seed")
        if seed in seeds[s]:
            log.warning("strategy %s seed %s appears twice; both runs are counted", s, seed)
        seeds[s].add(seed)
        by_strategy[s]["clean"].append(100.0 * float(r["clean_acc"]))
        for k, v in r["robust_acc"].items():
            by_strategy[s][k].append(100.0 * float(v))
            columns.add(k)
    cols = ["clean"] + sorted(columns, key=_eps_sort_key)
    order = [s for s in STRATEGY_ORDER if s in by_strategy] + sorted(set(by_strategy) - set(STRATEGY_ORDER))
    table = {}
    for s in order:
        table[s] = {}
        for c in cols:
            vals = np.asarray(by_strategy[s].get(c, []), dtype=float)
            table[s][c] = {"mean": float(vals.mean()) if len(vals) else float("nan"),
                           "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, "n": int(len(vals))}
    return {"columns": cols, "strategies": order, "table": table}


def to_markdown(agg: dict[str, Any]) -> str:
    cols, table = agg["columns"], agg["table"]
    best = {c: max((table[s][c]["mean"] for s in agg["strategies"] if table[s][c]["n"]), default=None) for c in cols}
    head = ["Strategy"] + ["Clean" if c == "clean" else _eps_label(c) for c in cols] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in agg["strategies"]:
        cells = [LABELS.get(s, s)]
        for c in cols:
            e = table[s][c]
            if not e["n"]:
                cells.append("–")
                continue
            txt = f"{e['mean']:.2f} ± {e['std']:.2f}" if e["n"] > 1 else f"{e['mean']:.2f}"  # no spread from one seed
            cells.append(f"**{txt}**" if best[c] is not None and abs(e["mean"] - best[c]) < 1e-9 else txt)
        cells.append(str(max(table[s][c]["n"] for c in cols)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict[str, Any], out: str | Path, title: Optional[str] = None) -> None:
    """Accuracy against ε, one line per strategy (clean accuracy at ε = 0), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.core.utils import atomic_path

    cols = agg["columns"]
    xs = [0.0] + [_eps_sort_key(c) * 255 for c in cols[1:]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in agg["strategies"]:
        e = agg["table"][s]
        ax.errorbar(xs, [e[c]["mean"] for c in cols], yerr=[e[c]["std"] for c in cols], marker="o",
                    capsize=3, label=LABELS.get(s, s), linestyle="--" if s.startswith("sip") else "-")
    ax.set_xlabel("ε (×1/255); 0 = clean")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def summary_table(runs: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per metrics file (name → metrics): strategy, seed, points, clean and robust accuracy (%)."""
    eps_keys = sorted({k for m in runs.values() for k in m["robust_acc"]}, key=_eps_sort_key)
    head = ["file", "strategy", "seed", "points", "clean"] + [_eps_label(k).removeprefix("ε = ")
                                                                      for k in eps_keys]
    rows = []
    for name, m in runs.items():
        acc = [f"{100 * float(m['robust_acc'][k]):.2f}" if k in m["robust_acc"] else "–" for k in eps_keys]
        rows.append([name, str(m.get("strategy", "?")), str(m.get("seed", "?")),
                     str(m.get("n_examples", "?")), f"{100 * float(m['clean_acc']):.2f}", *acc])
    return head, rows
