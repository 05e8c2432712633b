"""Intervals over seeds, paired differences to Madry, the verdicts on the paper's claims, and a report that
stays readable at 80 columns."""

import json
import math

import pytest
from scipy import stats
from typer.testing import CliRunner

from pipeline.claims import FAILS, HOLDS, UNSURE, Interval, at_least, at_most, paired, t_interval
from pipeline.cli import app
from pipeline.report import accuracy_table, compare, difference_table, text_table
from tests.test_report import metrics, src

EPS4 = ["4/255", "8/255", "16/255", "32/255"]


def test_t_interval_matches_scipy():
    vals = [90.1, 91.3, 89.7, 92.0, 90.6]
    ci = t_interval(vals)
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=sum(vals) / 5, scale=stats.sem(vals))
    assert ci.lo == pytest.approx(lo) and ci.hi == pytest.approx(hi) and ci.n == 5
    assert math.isnan(t_interval([1.0]).half) and t_interval([]).n == 0


def test_paired_interval_removes_what_seeds_share():
    """Seed effects shared by both strategies cancel: the paired interval is narrow where an unpaired one is
    wide."""
    seed_effect = [0.0, 4.0, -3.0, 6.0, -5.0]
    a = {"cells": {"clean": {"values": {s: 90 + e + 1.0 + 0.1 * s for s, e in enumerate(seed_effect)}}}}
    b = {"cells": {"clean": {"values": {s: 90 + e for s, e in enumerate(seed_effect)}}}}
    d = paired(a, b, "clean")
    assert d.n == 5 and d.mean == pytest.approx(1.2) and d.lo > 0
    unpaired = t_interval(list(a["cells"]["clean"]["values"].values()))
    assert unpaired.half > 10 * d.half
    # only seeds both have are paired
    del b["cells"]["clean"]["values"][4]
    assert paired(a, b, "clean").n == 4


@pytest.mark.parametrize("mean, half, want_at_least, want_at_most", [
    (0.2, 0.5, HOLDS, HOLDS),       # [-0.3, 0.7]: within the 1-point margin both ways
    (-3.0, 0.5, FAILS, HOLDS),      # clearly below
    (3.0, 0.5, HOLDS, FAILS),       # clearly above
    (-0.5, 2.0, UNSURE, UNSURE),    # too wide to tell
])
def test_margin_verdicts(mean, half, want_at_least, want_at_most):
    d = Interval(mean, 1.0, half, 5)
    assert at_least(d, 1.0) == want_at_least and at_most(d, 1.0) == want_at_most


def _grid(sip_clean_gain, sip_robust_gain, seeds=5, human_robust_extra=2.0):
    """Madry, SIP-S and SIP-H over `seeds` seeds with chosen gains over Madry (percentage points) per ε."""
    rows = []
    for s in range(seeds):
        jitter = 0.3 * ((s * 7) % 5 - 2) / 2  # seed-to-seed variation shared by the strategies of one seed
        base = {"clean": 80.0, "4/255": 70.0, "8/255": 60.0, "16/255": 45.0, "32/255": 30.0}
        noise = 0.05 * (s % 3 - 1)
        for name, gain in (("madry", None), ("sip_s", 0.0), ("sip_h", human_robust_extra)):
            clean = base["clean"] + jitter + (0 if gain is None else sip_clean_gain - (0.5 if name == "sip_h" else 0))
            rob = {e: base[e] + jitter + (0 if gain is None else sip_robust_gain[i] + gain * (i / 3)) + noise
                   for i, e in enumerate(EPS4)}
            rows.append(src(metrics(name, s, clean / 100, {e: v / 100 for e, v in rob.items()}, eps=EPS4),
                            f"{name}-{s}"))
    (g,), _ = compare(rows)
    return g


def test_claims_hold_on_a_grid_shaped_like_the_paper():
    g = _grid(sip_clean_gain=3.0, sip_robust_gain=[0.5, 0.0, -2.0, -6.0])
    verdict = {c.name: c.verdict for c in g.claims}
    assert verdict == {"C1": HOLDS, "C2": HOLDS, "C3": HOLDS}, [c.parts for c in g.claims]


def test_claims_fail_or_stay_open_when_the_data_say_so():
    g = _grid(sip_clean_gain=-3.0, sip_robust_gain=[-4.0, -4.0, -4.0, -4.0], human_robust_extra=-3.0)
    verdict = {c.name: c.verdict for c in g.claims}
    assert verdict["C1"] == FAILS and verdict["C2"] == FAILS and verdict["C3"] == FAILS
    one = _grid(3.0, [0.5, 0.0, -2.0, -6.0], seeds=1)  # one seed: no interval, nothing can be concluded
    assert {c.verdict for c in one.claims} == {UNSURE}
    assert any("inconclusive at n = 1 seed" in p for c in one.claims for p in c.parts)
    no_madry = compare([r for r in (src(metrics("sip_s", 0, 0.9, {"4/255": 0.5}), "x"),)])[0][0]
    assert {c.verdict for c in no_madry.claims} == {"not testable"}


def test_tables_stack_into_80_columns_without_cutting_a_number():
    g = _grid(3.0, [0.5, 0.0, -2.0, -6.0])
    for table in (accuracy_table(g), difference_table(g)):
        lines = text_table(*table, width=80)
        assert max(len(line) for line in lines) <= 80
        text = "\n".join(lines)
        for row in table[1]:
            for lines_, _best in row:
                for t in lines_:
                    assert t in text  # every number whole
    wide = text_table(*accuracy_table(g), width=50)
    assert max(len(line) for line in wide) <= 50 and sum(line.startswith("Strategy") for line in wide) >= 2


def test_report_cli_at_80_columns_prints_every_number_and_the_verdicts(tmp_path, monkeypatch):
    g = _grid(3.0, [0.5, 0.0, -2.0, -6.0])
    d = tmp_path / "m"
    d.mkdir()
    for i, r in enumerate(g.runs):
        (d / f"{i}.json").write_text(json.dumps({k: v for k, v in r.items() if k not in ("source", "sources")}))
    monkeypatch.setenv("COLUMNS", "80")
    res = CliRunner().invoke(app, ["report", "--metrics-dir", str(d), "--out", str(tmp_path / "r.md"),
                                   "--plot", str(tmp_path / "r.png")], terminal_width=80)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "…" not in res.output
    for row in accuracy_table(g)[1]:
        for cell_lines, _ in row[1:]:
            assert cell_lines[0] in res.output and cell_lines[1] in res.output
    for claim in ("C1 HOLDS", "C2 HOLDS", "C3 HOLDS"):
        assert claim in res.output
    md = (tmp_path / "r.md").read_text()
    assert "**C1 holds**" in md and "Paired difference to Madry" in md


def test_two_pairs_give_no_verdict_even_with_a_zero_width_interval():
    from pipeline.claims import above

    assert above(Interval(4.46, 0.0, 0.0, 2)) == UNSURE  # two equal differences: no certainty
    assert above(Interval(4.46, 0.0, 0.0, 3)) == HOLDS
