"""Intervals over seeds, paired differences, and the paper's three claims judged on one comparison group.

Runs of one group share the teacher, the train/validation split and the evaluated test points; the student's
seed is what varies. Two strategies trained with the same seed are therefore a pair, and a difference is
judged on the per-seed differences (a paired t interval), which removes what the seeds share.

The claims (paper, sec. 1 and 4.4; Tables 1-3):

- C1: SIP-AT (SIP-S, SIP-H) reaches higher clean accuracy than Madry at the same training ε.
- C2: SIP-AT's robust accuracy at the smallest ε is at least Madry's; at the largest it is comparable or lower;
  the gain shrinks as ε grows.
- C3: synthetic masks give higher clean but lower robust accuracy than human masks (at the training ε).

A claim "holds" when every 95 % interval it rests on (over at least 3 seed pairs) lies on its side, "does not hold" when one lies on the
other side, and is "inconclusive" otherwise. "At least" and "comparable" allow a margin (1 percentage point by
default): SIP-AT is at least Madry's when the interval's lower end is above −margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from scipy import stats

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
LEVEL = 0.95
MARGIN = 1.0  # percentage points
# Fewer pairs give no verdict: with two seeds, equal differences (accuracies are multiples of 1/points) make a
# zero-width interval that would claim a certainty two runs cannot give.
MIN_N = 3


@dataclass(frozen=True)
class Interval:
    """A mean over n values (seeds or seed pairs) and its two-sided t interval; half = nan below n = 2."""

    mean: float
    std: float
    half: float
    n: int

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    def text(self, signed: bool = False) -> str:
        """'+1.23 [0.45, 2.01]' (or without the interval when it cannot be computed)."""
        m = f"{self.mean:+.2f}" if signed else f"{self.mean:.2f}"
        if not math.isfinite(self.half):
            return f"{m} (n={self.n})"
        return f"{m} [{self.lo:.2f}, {self.hi:.2f}]"


def t_interval(values: list[float], level: float = LEVEL) -> Interval:
    """Mean, sample std and the half-width of the t interval (n − 1 degrees of freedom)."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, 0.0, math.nan, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, half, n)


def per_seed(row: dict[str, Any], column: str) -> dict[Any, float]:
    """A table row's accuracy (%) per seed in one column."""
    return dict(row["cells"][column].get("values", {}))


def paired(row: dict[str, Any], ref: dict[str, Any], column: str, ref_column: Optional[str] = None) -> Interval:
    """Row − reference in `column`, over the seeds both have."""
    a, b = per_seed(row, column), per_seed(ref, ref_column or column)
    return t_interval([a[s] - b[s] for s in sorted(a.keys() & b.keys(), key=str)])


def paired_trend(row: dict[str, Any], ref: dict[str, Any], low: str, high: str) -> Interval:
    """How the gain over the reference changes from `low` to `high`: (row − ref)@high − (row − ref)@low."""
    a_lo, a_hi, b_lo, b_hi = (per_seed(row, low), per_seed(row, high), per_seed(ref, low), per_seed(ref, high))
    seeds = sorted(a_lo.keys() & a_hi.keys() & b_lo.keys() & b_hi.keys(), key=str)
    return t_interval([(a_hi[s] - b_hi[s]) - (a_lo[s] - b_lo[s]) for s in seeds])


def above(d: Interval, margin: float = 0.0) -> str:
    """'row > ref': holds when the interval lies above `margin`, fails when it lies below it."""
    if not math.isfinite(d.half) or d.n < MIN_N:
        return UNSURE
    return HOLDS if d.lo > margin else FAILS if d.hi < margin else UNSURE


def below(d: Interval, margin: float = 0.0) -> str:
    return above(Interval(-d.mean, d.std, d.half, d.n), -margin)


def at_least(d: Interval, margin: float) -> str:
    """'row ≥ ref' within a margin (non-inferiority): holds when the lower end is above −margin, fails when the
    whole interval is below 0 and reaches past −margin."""
    if not math.isfinite(d.half) or d.n < MIN_N:
        return UNSURE
    return HOLDS if d.lo > -margin else FAILS if d.hi < 0 else UNSURE


def at_most(d: Interval, margin: float) -> str:
    """'row comparable to or below ref': holds when the upper end is below +margin, fails when the lower end is
    above it."""
    if not math.isfinite(d.half) or d.n < MIN_N:
        return UNSURE
    return HOLDS if d.hi < margin else FAILS if d.lo > margin else UNSURE


def combine(verdicts: list[str]) -> str:
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return FAILS if FAILS in verdicts else UNSURE


@dataclass
class Claim:
    name: str          # C1, C2, C3
    statement: str
    verdict: str       # holds | does not hold | inconclusive | not testable
    parts: list[str]   # one line per piece of evidence: what, interval, its verdict


def _row(group, strategy: str) -> Optional[dict[str, Any]]:
    # a strategy split by its own parameters: the first row (the table notes the split)
    return next((r for r in group.rows if r["strategy"] == strategy), None)


def _untestable(name: str, statement: str, missing: list[str]) -> Claim:
    return Claim(name, statement, "not testable", [f"needs {', '.join(missing)} in this group"])


def _n_text(verdict: str, n: int) -> str:
    return f"{verdict} at n = {n} seed{'s' if n != 1 else ''}" if verdict == UNSURE else verdict


def judge(group, margin: float = MARGIN) -> list[Claim]:
    """C1-C3 on one comparison group (paired over seeds, 95 % t intervals)."""
    eps = [c for c in group.columns if c != "clean"]
    madry, sips = _row(group, "madry"), [(s, _row(group, s)) for s in ("sip_s", "sip_h")]
    sips = [(s, r) for s, r in sips if r is not None]
    label = {"sip_s": "SIP-S", "sip_h": "SIP-H"}
    out = []

    c1 = "SIP-AT reaches higher clean accuracy than Madry at the same training ε"
    if madry is None or not sips:
        out.append(_untestable("C1", c1, ["Madry", "SIP-S or SIP-H"]))
    else:
        parts, verdicts = [], []
        for s, r in sips:
            d = paired(r, madry, "clean")
            v = above(d)
            verdicts.append(v)
            parts.append(f"{label[s]} − Madry, clean: {d.text(signed=True)} → {_n_text(v, d.n)}")
        out.append(Claim("C1", c1, _overall(verdicts), parts))

    c2 = (f"SIP-AT's robust accuracy is at least Madry's at the smallest ε (within {margin:g} pt), comparable or "
          f"lower at the largest, the gain shrinking as ε grows")
    if madry is None or not sips or len(eps) < 2:
        out.append(_untestable("C2", c2, ["Madry", "SIP-S or SIP-H", "two budgets or more"]))
    else:
        low, high = eps[0], eps[-1]
        lo_t, hi_t = _eps_text(low), _eps_text(high)
        parts, verdicts = [], []
        for s, r in sips:
            d_lo, d_hi, trend = paired(r, madry, low), paired(r, madry, high), paired_trend(r, madry, low, high)
            vs = [at_least(d_lo, margin), at_most(d_hi, margin), below(trend)]
            verdicts.append(combine(vs))
            parts += [f"{label[s]} − Madry at ε {lo_t}: {d_lo.text(signed=True)} → {_n_text(vs[0], d_lo.n)}",
                      f"{label[s]} − Madry at ε {hi_t}: {d_hi.text(signed=True)} → {_n_text(vs[1], d_hi.n)}",
                      f"{label[s]}'s gain at {hi_t} minus at {lo_t}: {trend.text(signed=True)} → "
                      f"{_n_text(vs[2], trend.n)}"]
        out.append(Claim("C2", c2, _overall(verdicts), parts))

    c3 = "synthetic masks give higher clean but lower robust accuracy (at the training ε) than human masks"
    sip_s, sip_h = _row(group, "sip_s"), _row(group, "sip_h")
    train_col = _training_column(group)
    if sip_s is None or sip_h is None or train_col is None:
        out.append(_untestable("C3", c3, ["SIP-S", "SIP-H", "a result at the training ε"]))
    else:
        d_clean, d_rob = paired(sip_s, sip_h, "clean"), paired(sip_s, sip_h, train_col)
        vs = [above(d_clean), below(d_rob)]
        out.append(Claim("C3", c3, combine(vs), [
            f"SIP-S − SIP-H, clean: {d_clean.text(signed=True)} → {_n_text(vs[0], d_clean.n)}",
            f"SIP-S − SIP-H at ε {_eps_text(train_col)}: {d_rob.text(signed=True)} → {_n_text(vs[1], d_rob.n)}"]))
    return out


def _overall(verdicts: list[str]) -> str:
    """Both SIP variants: their common verdict, else 'mixed'."""
    return verdicts[0] if len(set(verdicts)) == 1 else "mixed (see each variant)"


def _eps_text(column: str) -> str:
    from pipeline.report import eps_label

    return eps_label(column)


def _training_column(group) -> Optional[str]:
    """The column of the group's training ε, if it was evaluated there."""
    from pipeline.report import eps_value

    a = (group.key.get("attack") or {}).get("eps") if group.key.get("recorded") else None
    if a is None:
        return None
    return next((c for c in group.columns if c != "clean" and abs(eps_value(c) - float(a)) < 1e-9), None)
