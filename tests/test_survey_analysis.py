"""Survey analysis: Wilson intervals, d′, recovery of a known detection curve, export -> analyze, DVC wiring."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.survey.analysis import ResponsesError, analyse, dprime, read_responses, simulate_responses, wilson

ROOT = Path(__file__).resolve().parents[1]
CURVES = {"teacher": {0: 0.12, 4: 0.18, 8: 0.35, 16: 0.7, 32: 0.92},
          "student": {0: 0.08, 4: 0.1, 8: 0.25, 16: 0.55, 32: 0.85}}


def test_wilson_reference_values_and_edges():
    lo, hi = wilson(np.array([0, 5, 10, 0]), np.array([10, 10, 10, 0]))
    assert np.allclose(lo, [0.0, 0.2366, 0.7225, 0.0], atol=1e-4)
    assert np.allclose(hi, [0.2775, 0.7634, 1.0, 1.0], atol=1e-4)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8])
def test_wilson_intervals_cover_the_truth_about_95_percent_of_the_time(p):
    rng = np.random.default_rng(0)
    n = 200
    k = rng.binomial(n, p, size=4000)
    lo, hi = wilson(k, np.full_like(k, n))
    assert 0.93 <= float(np.mean((lo <= p) & (p <= hi))) <= 0.975


def test_dprime_log_linear_correction():
    d, lo, hi = dprime(80, 100, 20, 100)
    nd = NormalDist()
    assert d == pytest.approx(nd.inv_cdf(80.5 / 101) - nd.inv_cdf(20.5 / 101)) and lo < d < hi
    perfect, _, _ = dprime(100, 100, 0, 100)  # finite, where the uncorrected d' is infinite
    assert np.isfinite(perfect) and perfect > 4
    assert dprime(30, 100, 30, 100)[0] == pytest.approx(0.0)


def _intervals(result, curves):
    """(truth, 95 % interval, counts) of every false-alarm, detection and d′ cell of an analysis."""
    nd = NormalDist()
    for version, curve in curves.items():
        e = result["versions"][version]
        fa = e["false_alarm"]
        yield curve[0], fa["ci95"], (fa["said_perturbed"], fa["n"])
        for k in sorted(curve)[1:]:
            c = e["detection"][f"eps_{k}_255"]
            yield curve[k], c["ci95"], (c["said_perturbed"], c["n"])
            yield nd.inv_cdf(curve[k]) - nd.inv_cdf(curve[0]), c["dprime_ci95"], None


def test_known_detection_curve_is_recovered_within_its_intervals(tmp_path):
    csv_path = tmp_path / "responses.csv"
    simulate_responses(CURVES, 160, seed=0, out=csv_path)
    result = analyse(read_responses(csv_path))
    assert result["n_participants"] == 160 and result["n_answers"] == 160 * 50
    for version in CURVES:
        e = result["versions"][version]
        assert e["participants"] == 80 and e["false_alarm"]["n"] == 800
        assert all(c["n"] == 800 for c in e["detection"].values())
        rates = [e["detection"][f"eps_{k}_255"]["rate"] for k in (4, 8, 16, 32)]
        assert rates == sorted(rates)
    cells = list(_intervals(result, CURVES))
    misses = [(truth, ci) for truth, ci, _ in cells if not ci[0] <= truth <= ci[1]]
    assert len(cells) == 18 and len(misses) <= 2, misses  # 18 intervals at 95 %: about one miss expected
    for truth, _, counts in cells:  # and nothing is far off: every rate inside its 99.9 % interval
        if counts:
            lo, hi = wilson(*counts, z=NormalDist().inv_cdf(0.9995))
            assert lo <= truth <= hi
    pooled = result["versions"]["all"]["detection"]["eps_32_255"]
    assert pooled["n"] == 1600 and abs(pooled["rate"] - (0.92 + 0.85) / 2) < 0.03


def test_intervals_have_their_nominal_coverage_over_many_simulated_surveys():
    hits = total = 0
    for seed in range(40):
        result = analyse([{"participant": r["participant"], "version": r["version"], "eps_255": r["eps_255"],
                           "said": r["answer"] == "perturbed", "completed": True}
                          for r in simulate_responses(CURVES, 40, seed=seed)])
        for truth, ci, _ in _intervals(result, CURVES):
            hits += ci[0] <= truth <= ci[1]
            total += 1
    assert total == 40 * 18 and 0.92 <= hits / total <= 0.98, hits / total


def test_analyze_command_writes_metrics_table_and_plot(tmp_path):
    runner = CliRunner()
    sim = tmp_path / "sim.csv"
    r = runner.invoke(app, ["survey", "simulate", "--out", str(sim), "--participants", "20"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["survey", "analyze", str(sim), "--out", str(tmp_path / "an"), "--title", "simulated"])
    assert r.exit_code == 0, r.output
    assert "false-alarm rate" in " ".join(r.output.split()) and "32/255" in r.output
    metrics = json.loads((tmp_path / "an" / "detection.json").read_text())
    assert set(metrics["versions"]) == {"teacher", "student", "all"}
    assert (tmp_path / "an" / "detection.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "an" / "detection.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 5 and {r["eps_255"] for r in rows} == {"0", "4", "8", "16", "32"}
    bad = runner.invoke(app, ["survey", "simulate", "--out", str(sim), "--curve", "4:0.5"])
    assert bad.exit_code != 0 and "k = 0" in bad.output


@pytest.mark.parametrize("content,message", [
    (None, "responses file not found"),
    ("participant,version,answer\n1,a,perturbed\n", "missing column(s) ['eps_255']"),
    ("participant,version,eps_255,answer\n1,a,4,perturbed\n1,a,x,perturbed\n", ":3: eps_255 must be an integer"),
    ("participant,version,eps_255,answer\n1,a,4,yes\n", ":2: answer must be perturbed or unperturbed"),
    ("participant,version,eps_255,answer\n", "no responses to analyse"),
])
def test_bad_responses_files_are_reported_by_line(tmp_path, content, message):
    path = tmp_path / "r.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ResponsesError) as err:
        analyse(read_responses(path))
    assert message in str(err.value)
    r = CliRunner().invoke(app, ["survey", "analyze", str(path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output


def test_export_command(tmp_path):
    from pipeline.survey.store import PoolImage, SurveyStore

    db = tmp_path / "responses.sqlite"
    store = SurveyStore(db, seed=1)
    pool = [PoolImage(i, f"img{i}", i % 3, {k: f"images/{i}_{k}.png" for k in (0, 2, 8)},
                      {k: k > 0 for k in (0, 2, 8)}) for i in range(4)]
    _, p1 = store.join({"a": pool}, 2, external_id="x1")
    _, p2 = store.join({"a": pool}, 2)
    for pos in range(1, 7):
        assert store.answer(p1.id, pos, "perturbed") == "ok"
    assert store.answer(p2.id, 1, "unperturbed") == "ok"
    store.close()
    out = tmp_path / "exported.csv"
    r = CliRunner().invoke(app, ["survey", "export", "--db", str(db), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "7 answers from 2 participants" in " ".join(r.output.split())
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["participant"], r["position"]) for r in rows] == [("1", str(i)) for i in range(1, 7)] + [("2", "1")]
    assert [r["completed"] for r in rows] == ["1"] * 6 + ["0"]
    assert {r["pool_index"] for r in rows[:6]} and sorted(int(r["eps_255"]) for r in rows[:6]) == [0, 0, 2, 2, 8, 8]
    result = analyse(read_responses(out), completed_only=True)
    assert result["n_participants"] == 1 and result["versions"]["a"]["false_alarm"]["rate"] == 1.0
    codes = {str(p.id): p.completion_code for p in (p1, p2)}
    assert [r["completion_code"] for r in rows] == [codes[r["participant"]] for r in rows]  # to check codes against
    assert len(set(codes.values())) == 2 and all(len(c) == 10 for c in codes.values())
    # exporting again (while answers come in) replaces the project's own CSV
    store = SurveyStore(db, seed=1)
    assert store.answer(p2.id, 2, "perturbed") == "ok"
    store.close()
    r = CliRunner().invoke(app, ["survey", "export", "--db", str(db), "--out", str(out)])
    assert r.exit_code == 0 and "8 answers from 2 participants" in " ".join(r.output.split()), r.output
    missing = CliRunner().invoke(app, ["survey", "export", "--db", str(tmp_path / "none.sqlite"), "--out", str(out)])
    assert missing.exit_code == 1 and "response database not found" in missing.output
    assert not (tmp_path / "none.sqlite").exists()


def test_outputs_are_replaced_whole_or_not_at_all(tmp_path):
    runner = CliRunner()
    sim = tmp_path / "sim.csv"
    for seed in ("1", "2"):  # the project's own CSV is replaced
        r = runner.invoke(app, ["survey", "simulate", "--out", str(sim), "--participants", "4", "--seed", seed])
        assert r.exit_code == 0, r.output
    runner.invoke(app, ["survey", "simulate", "--out", str(tmp_path / "again.csv"), "--participants", "4",
                        "--seed", "2"])
    assert sim.read_text() == (tmp_path / "again.csv").read_text()
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\n1,2\n")
    for cmd in (["survey", "simulate", "--out", str(notes)], ["survey", "export", "--db", str(tmp_path / "x.sqlite"),
                                                               "--out", str(notes)]):
        if cmd[1] == "export":
            from pipeline.survey.store import SurveyStore
            SurveyStore(tmp_path / "x.sqlite").close()
        r = runner.invoke(app, cmd)
        flat = " ".join(r.output.split())
        assert r.exit_code == 1 and "is not a file written by this project" in flat and "Traceback" not in r.output
        assert "writes written" not in flat and notes.read_text() == "my,own\n1,2\n"
    # a second analysis into the same folder replaces all three files
    other = tmp_path / "other.csv"
    simulate_csv(other, 6, seed=3)
    out = tmp_path / "an"
    for responses, n in ((sim, 4), (other, 6)):
        r = runner.invoke(app, ["survey", "analyze", str(responses), "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "detection.json").read_text())["n_participants"] == n
    assert (out / "detection.csv").read_bytes() == _analysis_files(other, tmp_path / "ref")["csv"]
    assert (out / "detection.png").read_bytes() == _analysis_files(other, tmp_path / "ref")["png"]
    # ... or none of them: a file there that the project did not write stops the analysis before anything is written
    (out / "detection.csv").write_text("kept\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = runner.invoke(app, ["survey", "analyze", str(sim), "--out", str(out)])
    assert r.exit_code == 1 and "detection.csv" in r.output and "Traceback" not in r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def simulate_csv(path, n: int, seed: int) -> str:
    simulate_responses(CURVES, n, seed=seed, out=path)
    return path.read_text()


def _analysis_files(responses, out) -> dict[str, bytes]:
    from pipeline.survey.analysis import write_analysis

    paths = write_analysis(analyse(read_responses(responses)), out)
    return {k: p.read_bytes() for k, p in paths.items()}


def test_analysis_table_fits_80_columns_and_prints_no_minus_zero(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import pipeline.survey.cli as survey_cli

    # d′ slightly below zero at 4/255 (rounds to -0.00) and clearly negative at 32/255, for a long version name
    rows = ([(0, i < 501) for i in range(1001)] + [(4, i < 500) for i in range(1000)]
            + [(32, i < 10) for i in range(1000)])
    path = tmp_path / "r.csv"
    path.write_text("participant,version,eps_255,answer\n" + "".join(
        f"{i % 40},student_v2,{k},{'perturbed' if said else 'unperturbed'}\n" for i, (k, said) in enumerate(rows)))
    result = analyse(read_responses(path))
    d4 = result["versions"]["student_v2"]["detection"]["eps_4_255"]
    assert -0.005 < d4["dprime"] < 0 and result["versions"]["student_v2"]["detection"]["eps_32_255"]["dprime"] < -2
    out = io.StringIO()
    monkeypatch.setattr(survey_cli, "console", Console(file=out, width=80, color_system=None))
    r = CliRunner().invoke(app, ["survey", "analyze", str(path), "--out", str(tmp_path / "an")])
    assert r.exit_code == 0, r.output
    text = out.getvalue()
    assert "-0.00" not in text and "0.00 [" in text
    table = [line for line in text.splitlines() if "/255" in line or "student_v2" in line]
    assert len(table) == 3  # one line per row: no cell wrapped
    for line in table:
        assert len(line) <= 80 and (line.count("[") == line.count("]") == 1 or "—" in line), line


def test_survey_params_are_checked():
    from pipeline.core.config import ConfigError, config_from_dict, load_config

    cfg = load_config(ROOT / "params.yaml")
    assert [round(e * 255) for e in cfg.survey.eps] == [4, 8, 16, 32]
    with pytest.raises(ConfigError, match=r"survey.eps.0: .*not a multiple of 1/255"):
        config_from_dict({"survey": {"eps": [0.01]}})
    with pytest.raises(ConfigError, match="survey.attack"):
        config_from_dict({"survey": {"attack": "fgsm"}})
    with pytest.raises(ConfigError, match="survey.colour: unknown key"):
        config_from_dict({"survey": {"colour": 1}})


def test_analysis_pipeline_stage_lists_its_code_and_stays_out_of_the_default_pipeline():
    # its code dependencies are checked with every other stage's in test_dvc_deps.py
    stage = yaml.safe_load((ROOT / "survey" / "dvc.yaml").read_text())["stages"]["survey_analysis"]
    assert stage["wdir"] == ".." and "data/survey/responses.csv" in stage["deps"]
    main = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert not [name for name, s in main.items() if "data/survey/responses.csv" in s.get("deps", [])]
    assert {"survey_images_teacher", "survey_images_student"} <= set(main)
