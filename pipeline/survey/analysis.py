"""Detection rates from exported survey responses: per budget and version, Wilson intervals, false alarms, d′.

Each answer counts as one Bernoulli trial: "perturbed" on a perturbed image is a hit, on an unperturbed
image a false alarm. Answers of one participant are not independent (people differ in how readily they say
"perturbed"), so the intervals describe the answers collected, and are narrower than intervals over people.
d′ = z(hit rate) − z(false-alarm rate) with the log-linear correction (add ½ to each count and 1 to each total,
so rates of 0 or 1 stay finite); its interval is the delta-method one (Macmillan & Creelman).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import random
from pathlib import Path
from statistics import NormalDist
from typing import Any, Iterable, Optional

import numpy as np

from pipeline.core.errors import SipatError
from pipeline.core.utils import MARK_KEY, MARK_VALUE, PNG_MARK, atomic_path

Z95 = NormalDist().inv_cdf(0.975)
REQUIRED = ("participant", "version", "eps_255", "answer")
ALL = "all"
TABLE_FIELDS = ("version", "eps_255", "n", "said_perturbed", "rate", "ci95_low", "ci95_high", "dprime",
                "dprime_ci95_low", "dprime_ci95_high")


class ResponsesError(SipatError, ValueError):
    """A responses file that cannot be analysed (missing, wrong columns, bad values)."""


def wilson(k: np.ndarray | int, n: np.ndarray | int, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for k successes in n trials (n = 0 gives [0, 1])."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    safe = np.maximum(n, 1.0)
    p = k / safe
    denom = 1 + z * z / safe
    centre = (p + z * z / (2 * safe)) / denom
    half = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe)) / denom
    lo, hi = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    return np.where(n > 0, lo, 0.0), np.where(n > 0, hi, 1.0)


def dprime(hits: int, n_signal: int, false_alarms: int, n_noise: int, z: float = Z95) -> tuple[float, float, float]:
    """(d′, lower, upper) with the log-linear correction and a delta-method 95 % interval."""
    nd = NormalDist()
    h = (hits + 0.5) / (n_signal + 1)
    f = (false_alarms + 0.5) / (n_noise + 1)
    zh, zf = nd.inv_cdf(h), nd.inv_cdf(f)
    d = zh - zf
    var = h * (1 - h) / ((n_signal + 1) * nd.pdf(zh) ** 2) + f * (1 - f) / ((n_noise + 1) * nd.pdf(zf) ** 2)
    se = math.sqrt(var)
    return d, d - z * se, d + z * se


def read_responses(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an exported responses CSV (`sipat survey export`), checked and typed."""
    path = Path(path)
    if not path.is_file():
        raise ResponsesError(f"responses file not found: {path} (export it with `sipat survey export`)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ResponsesError(f"{path}: missing column(s) {missing}; expected the CSV written by "
                                 f"`sipat survey export`")
        rows = []
        for line, r in enumerate(reader, start=2):
            try:
                k = int(r["eps_255"])
            except (TypeError, ValueError):
                raise ResponsesError(f"{path}:{line}: eps_255 must be an integer, got {r['eps_255']!r}") from None
            if k < 0 or k > 255:
                raise ResponsesError(f"{path}:{line}: eps_255 {k} is outside 0..255")
            if r["answer"] not in ("perturbed", "unperturbed"):
                raise ResponsesError(f"{path}:{line}: answer must be perturbed or unperturbed, got {r['answer']!r}")
            if not r["version"]:
                raise ResponsesError(f"{path}:{line}: empty version")
            rows.append({"participant": r["participant"], "version": r["version"], "eps_255": k,
                         "said": r["answer"] == "perturbed", "completed": r.get("completed", "1") != "0"})
    return rows


def _cell(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson(k, n)
    return {"n": n, "said_perturbed": k, "rate": round(k / n, 4) if n else None,
            "ci95": [round(float(lo), 4), round(float(hi), 4)]}


def analyse(rows: Iterable[dict[str, Any]], *, completed_only: bool = False) -> dict[str, Any]:
    """Detection rate per budget and version (and all versions pooled), false alarms, d′ per budget."""
    rows = [r for r in rows if r["completed"] or not completed_only]
    if not rows:
        raise ResponsesError("no responses to analyse" + (" from participants who completed the survey"
                                                          if completed_only else ""))
    versions = sorted({r["version"] for r in rows})
    groups = {v: [r for r in rows if r["version"] == v] for v in versions}
    if len(versions) > 1:
        groups[ALL] = rows
    out: dict[str, Any] = {"n_answers": len(rows), "n_participants": len({r["participant"] for r in rows}),
                           "completed_only": completed_only, "versions": {}}
    for name, rs in groups.items():
        said = np.array([r["said"] for r in rs], dtype=bool)
        eps = np.array([r["eps_255"] for r in rs])
        ks = sorted(set(eps.tolist()))
        noise = eps == 0
        fa, n_noise = int(said[noise].sum()), int(noise.sum())
        entry: dict[str, Any] = {"participants": len({r["participant"] for r in rs}), "answers": len(rs),
                                 "false_alarm": _cell(fa, n_noise), "detection": {}}
        for k in ks:
            if k == 0:
                continue
            sel = eps == k
            hit, n_sig = int(said[sel].sum()), int(sel.sum())
            cell = _cell(hit, n_sig)
            if n_noise:
                d, lo, hi = dprime(hit, n_sig, fa, n_noise)
                cell.update(dprime=round(d, 4), dprime_ci95=[round(lo, 4), round(hi, 4)])
            entry["detection"][f"eps_{k}_255"] = cell
        out["versions"][name] = entry
    return out


def _num(x: float, spec: str = ".2f") -> str:
    """`x` formatted with `spec`, without the sign of a value that rounds to zero ("-0.00" -> "0.00")."""
    text = format(x, spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(version, ε, n, rate, 95 % CI, d′ [95 % CI]) rows for printing; ε = 0 is the false-alarm row."""
    out = []
    for v, e in result["versions"].items():
        fa = e["false_alarm"]
        if fa["n"]:
            out.append((v, "0", str(fa["n"]), f"{100 * fa['rate']:.1f} %",
                        f"{100 * fa['ci95'][0]:.1f}–{100 * fa['ci95'][1]:.1f} %", "—"))
        for key, c in e["detection"].items():
            k = key.split("_")[1]
            d = (f"{_num(c['dprime'])} [{_num(c['dprime_ci95'][0])}, {_num(c['dprime_ci95'][1])}]"
                 if "dprime" in c else "—")
            out.append((v, f"{k}/255", str(c["n"]), f"{100 * c['rate']:.1f} %",
                        f"{100 * c['ci95'][0]:.1f}–{100 * c['ci95'][1]:.1f} %", d))
    return out


def plot_detection(result: dict[str, Any], out: str | Path, title: str = "") -> None:
    """Fig. 5 of the paper: the share of images called "perturbed" per budget (ε = 0: unperturbed), per version,
    with 95 % Wilson intervals."""
    with atomic_path(out) as tmp:
        _detection_figure(result, title).savefig(tmp, format="png", dpi=120, metadata=PNG_MARK)


def _detection_figure(result: dict[str, Any], title: str):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = list(result["versions"])
    levels = sorted({0} | {int(k.split("_")[1]) for e in result["versions"].values() for k in e["detection"]})
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(names)
    colours = ["#3057d5", "#d98b1f", "#5a9e4b", "#9b59b6", "#c0392b", "#7f8c8d"]
    for i, name in enumerate(names):
        e = result["versions"][name]
        cells = [e["false_alarm"] if k == 0 else e["detection"].get(f"eps_{k}_255") for k in levels]
        xs = [j + (i - (len(names) - 1) / 2) * width for j, c in enumerate(cells) if c and c["n"]]
        cs = [c for c in cells if c and c["n"]]
        rate = np.array([100 * c["rate"] for c in cs])
        err = np.array([[100 * (c["rate"] - c["ci95"][0]) for c in cs], [100 * (c["ci95"][1] - c["rate"]) for c in cs]])
        colour = "#333333" if name == ALL else colours[i % len(colours)]
        ax.bar(xs, rate, width * 0.92, yerr=err, capsize=3, color=colour, alpha=0.85,
               label=f"{name} ({e['participants']} participants)")
    ax.axhline(50, color="#999999", lw=0.8, ls=":")
    ax.set_xticks(range(len(levels)), ["0\n(unperturbed)" if k == 0 else f"{k}/255" for k in levels])
    ax.set_xlabel("attack budget ε")
    ax.set_ylabel('answered "perturbed" (%)')
    ax.set_ylim(0, 100)
    # below the axes, where it covers no bar (bars near 100 % reach the top)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(3, len(names)), frameon=False)
    ax.set_title(title or f"Human detection of perturbations ({result['n_answers']} answers)", fontsize=10)
    return fig


def _is_table_csv(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return tuple(next(csv.reader([f.readline()]), [])) == TABLE_FIELDS
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def write_analysis(result: dict[str, Any], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """detection.json (metrics), detection.csv (the table) and detection.png (the plot) in `out_dir`.

    The three are replaced together or not at all: each is checked (only what this project wrote there is
    replaced) and written to a temporary file before any of them is renamed into place.
    """
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "detection.json", "csv": out_dir / "detection.csv", "png": out_dir / "detection.png"}
    fig = _detection_figure(result, title)
    with contextlib.ExitStack() as stack:
        tmp = {"json": stack.enter_context(atomic_path(paths["json"])),
               "csv": stack.enter_context(atomic_path(paths["csv"], owned=_is_table_csv)),
               "png": stack.enter_context(atomic_path(paths["png"]))}
        tmp["json"].write_text(json.dumps({MARK_KEY: MARK_VALUE, **result}, indent=2) + "\n")
        with open(tmp["csv"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(TABLE_FIELDS)
            for v, e in result["versions"].items():
                fa = e["false_alarm"]
                w.writerow([v, 0, fa["n"], fa["said_perturbed"], fa["rate"], *fa["ci95"], "", "", ""])
                for key, c in e["detection"].items():
                    w.writerow([v, int(key.split("_")[1]), c["n"], c["said_perturbed"], c["rate"], *c["ci95"],
                                c.get("dprime", ""), *c.get("dprime_ci95", ["", ""])])
        fig.savefig(tmp["png"], format="png", dpi=120, metadata=PNG_MARK)
    return paths


def simulate_responses(curves: dict[str, dict[int, float]], n_participants: int, *,
                       images_per_participant: int = 10, seed: int = 0,
                       out: Optional[str | Path] = None) -> list[dict[str, Any]]:
    """Responses of simulated participants who call an image at budget k/255 "perturbed" with probability
    `curves[version][k]` (k = 0: the false-alarm rate), in the export format; written to `out` if given.

    Participants alternate between versions and see every pool image at every budget, like real ones.
    """
    from pipeline.survey.store import EXPORT_FIELDS, is_export_csv

    rng = random.Random(seed)
    versions = sorted(curves)
    rows = []
    for pid in range(1, n_participants + 1):
        v = versions[(pid - 1) % len(versions)]
        levels = sorted(curves[v])
        trials = [(img, k) for img in range(images_per_participant) for k in levels]
        rng.shuffle(trials)
        for pos, (img, k) in enumerate(trials, start=1):
            said = rng.random() < curves[v][k]
            rows.append({"participant": pid, "external_id": f"sim{pid}", "version": v, "position": pos,
                         "pool_index": img, "image_id": f"simulated-{img}", "label": 0, "eps_255": k,
                         "eps": round(k / 255, 8), "perturbed": int(k > 0),
                         "answer": "perturbed" if said else "unperturbed", "said_perturbed": int(said),
                         "correct": int(said == (k > 0)), "still_adversarial": "", "file": "", "shown_at": "",
                         "answered_at": "", "response_ms": "", "client_ms": "", "started_at": "", "completed": 1,
                         "completion_code": ""})
    if out is not None:
        with atomic_path(out, owned=is_export_csv) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=EXPORT_FIELDS)
            w.writeheader()
            w.writerows(rows)
    return rows
