"""`sipat report` / `sipat metrics` and the comparison they are built on: runs counted once, averaged only
within groups of comparable runs."""

import hashlib
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.figures import plot_comparison
from pipeline.report import (MISSING, compare, dedupe, load_metrics_dir, plot_path, rows_from_experiments,
                             table_cells, to_markdown)

EPS = ["4/255", "8/255"]


def run_config(dataset="digits", model="smallcnn", epochs=20, beta=6.0):
    """The `run` record the evaluation writes from a checkpoint's metadata."""
    return {"dataset": dataset, "model": model, "image_size": 16,
            "attack": {"eps": 32 / 255, "step_size": 8 / 255, "steps": 10, "random_start": True},
            "optim": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                      "nesterov": False, "schedule": {"kind": "multistep", "milestones": [15], "gamma": 0.1,
                                                      "step_every": 10},
                      "select": "last", "pretrained": False, "trades": {"beta": beta},
                      "fat": {"tau": 0, "dynamic_tau": True, "tau_milestones": [6, 10, 14]}}}


def metrics(strategy, seed, clean, robust, *, recorded=True, n=120, points="p120", ckpt=None, eps=EPS, **run):
    """A student metrics file; `robust` maps 'k/255' to accuracy (absent budgets have no result)."""
    m = {"strategy": strategy, "seed": seed, "role": "student", "model": run.get("model", "smallcnn"),
         "dataset": run.get("dataset", "digits"), "train_eps": "32/255", "eps": list(eps), "n_examples": n,
         "clean_acc": clean, "robust_acc": {"eps_" + k.replace("/", "_"): v for k, v in robust.items()},
         "attacks": {"eps_" + k.replace("/", "_"): {"seconds": 1.0 + seed, "broken_by": {}} for k in robust},
         "eval_seconds": 3.0 + seed, "train_seconds": 10.0}
    if recorded:
        ckpt = ckpt or hashlib.sha256(f"{strategy}{seed}{sorted(run.items())}".encode()).hexdigest()[:16]
        m.update(run=run_config(**run), points_digest=points, checkpoint_sha256=ckpt)
    return m


def src(m, where):
    return dict(m, source=where)


# ------------------------------------------------------------------------------------------ collection

def test_workspace_and_applied_experiment_are_one_run():
    """baseline commit (sip_s) + `dvc exp run -S strategy=sip_h`: the workspace holds the experiment's results."""
    base = metrics("sip_s", 0, 0.96, {"4/255": 0.93, "8/255": 0.92})
    exp = metrics("sip_h", 0, 0.9667, {"4/255": 0.94, "8/255": 0.89})
    applied = dict(exp, eval_seconds=99.0)  # timings are not identity
    files = {"workspace": json.dumps(applied), "main": json.dumps(base), "a1b2c3": json.dumps(exp)}
    read_revs = []

    def read(rev):
        read_revs.append(rev)
        if rev not in files:
            raise FileNotFoundError(rev)
        return files[rev]

    rows = rows_from_experiments([
        {"rev": "workspace", "typ": "baseline", "Experiment": None, "State": None},
        {"rev": "main", "typ": "baseline", "Experiment": None, "State": None},
        # as dvc 3.67 lists a finished `dvc exp run` (a queued one that finished says "Success")
        {"rev": "a1b2c3", "typ": "branch_base", "Experiment": "exp-sip-h", "State": None},
        {"rev": "d4e5f6", "typ": "branch_commit", "Experiment": "exp-queued", "State": "Queued"},
        {"rev": "0a0b0c", "typ": "branch_commit", "Experiment": "exp-failed", "State": "Failed"},
        {"rev": "9f9f9f", "typ": "branch_commit", "Experiment": "exp-not-evaluated", "State": "Success"},
    ], read)
    assert read_revs == ["workspace", "main", "a1b2c3", "9f9f9f"]  # queued and failed ones are not read
    assert [(r["strategy"], r["source"]) for r in rows] == [("sip_h", "workspace"), ("sip_s", "main"),
                                                            ("sip_h", "exp-sip-h")]
    groups, warnings = compare(rows)
    assert warnings == []  # the same run found twice is not a problem
    (g,) = groups
    assert [(r["label"], r["seeds"]) for r in g.rows] == [("SIP-H", [0]), ("SIP-S", [0])]
    assert g.runs[0]["sources"] == ["workspace", "exp-sip-h"]
    assert "1 seed" in g.title and "2 seeds" not in to_markdown(groups)
    _, cells = table_cells(g)
    assert cells[0][1] == ("96.67", True)  # one seed: no "± 0.00"


def test_same_run_without_recorded_configuration_is_found_once():
    old = metrics("madry", 1, 0.9, {"4/255": 0.8, "8/255": 0.7}, recorded=False)
    runs, warnings = dedupe([src(old, "workspace"), src(dict(old, eval_seconds=1234.0), "exp-x")])
    assert len(runs) == 1 and runs[0]["sources"] == ["workspace", "exp-x"] and warnings == []


def test_true_duplicates_collapse_with_a_warning_naming_both_sources():
    a = metrics("madry", 0, 0.90, {"4/255": 0.8, "8/255": 0.7}, ckpt="aaaaaaaaaaaaaaaa")
    b = metrics("madry", 0, 0.91, {"4/255": 0.8, "8/255": 0.7}, ckpt="bbbbbbbbbbbbbbbb")  # retrained elsewhere
    c = metrics("madry", 1, 0.92, {"4/255": 0.8, "8/255": 0.7})
    groups, warnings = compare([src(a, "exp-one"), src(b, "exp-two"), src(c, "exp-three")])
    assert len(warnings) == 1
    assert "madry seed 0" in warnings[0] and "exp-one" in warnings[0] and "exp-two" in warnings[0]
    (row,) = groups[0].rows
    assert row["seeds"] == [0, 1] and row["cells"]["clean"]["n"] == 2
    assert row["cells"]["clean"]["mean"] == pytest.approx(91.0)  # 90 and 92: the second seed-0 run is dropped

    # One checkpoint evaluated twice with different results: counted once, with a warning.
    d = dict(a, clean_acc=0.5)
    _, warnings = compare([src(a, "workspace"), src(d, "exp-re-evaluated")])
    assert len(warnings) == 1 and "evaluated twice" in warnings[0] and "exp-re-evaluated" in warnings[0]


# ---------------------------------------------------------------------------------------------- groups

def test_two_datasets_at_one_commit_give_two_tables():
    rows = [metrics("madry", s, 0.9, {"4/255": 0.8, "8/255": 0.7}) for s in (0, 1)]
    rows += [metrics("madry", s, 0.5, {"4/255": 0.3, "8/255": 0.2}, dataset="cifar10", model="resnet18")
             for s in (0, 1, 2)]
    groups, _ = compare([src(r, f"exp-{i}") for i, r in enumerate(rows)])
    assert [(g.key["dataset"], g.key["model"], g.rows[0]["seeds"]) for g in groups] == [
        ("cifar10", "resnet18", [0, 1, 2]), ("digits", "smallcnn", [0, 1])]
    assert groups[0].title == ("cifar10 · resnet18 · training ε 32/255 · 120 test points · 3 seeds varying the "
                               "student only")
    assert groups[0].rows[0]["cells"]["clean"]["mean"] == pytest.approx(50.0)
    assert len({g.slug for g in groups}) == 2
    md = to_markdown(groups)
    assert md.count("| Strategy |") == 2 and "## cifar10 · resnet18" in md and "## digits · smallcnn" in md


def test_paper_datasets_note_fewer_than_five_seeds():
    """The paper averages five seeds (sec. 4.3): a paper dataset's group says which rows have fewer."""
    rows = [metrics("madry", s, 0.5, {"8/255": 0.2}, dataset="cifar10", model="resnet18") for s in range(5)]
    rows += [metrics("trades", s, 0.5, {"8/255": 0.2}, dataset="cifar10", model="resnet18") for s in range(3)]
    rows += [metrics("madry", s, 0.9, {"8/255": 0.7}) for s in range(3)]  # the embedded digits: 3 are fine
    groups, _ = compare([src(r, f"exp-{i}") for i, r in enumerate(rows)])
    cifar, digits = groups
    assert any("5 seeds" in n and "TRADES 3" in n and "Madry" not in n for n in cifar.notes)
    assert not any("5 seeds" in n for n in digits.notes)


def test_two_evaluation_subsets_and_training_budgets_are_not_averaged():
    rows = [metrics("madry", 0, 0.90, {"4/255": 0.8, "8/255": 0.7}, n=120, points="subset-a"),
            metrics("madry", 1, 0.80, {"4/255": 0.7, "8/255": 0.6}, n=359, points="subset-b"),
            metrics("madry", 2, 0.85, {"4/255": 0.7, "8/255": 0.6}, n=120, points="subset-c"),  # same n, other points
            metrics("madry", 3, 0.70, {"4/255": 0.6, "8/255": 0.5}, epochs=5)]
    groups, warnings = compare([src(r, f"f{i}") for i, r in enumerate(rows)])
    assert warnings == [] and len(groups) == 4
    assert all(len(g.runs) == 1 for g in groups)
    assert len({g.title for g in groups}) == 4 and len({g.slug for g in groups}) == 4  # made unique
    assert sum("359 test points" in g.title for g in groups) == 1
    assert any("5 epochs" in g.details for g in groups) and any("subset subset-c" in g.details for g in groups)
    # Without recorded configurations, the number of points still separates them.
    old = [metrics("madry", 0, 0.9, {"4/255": 0.8, "8/255": 0.7}, recorded=False, n=120),
           metrics("madry", 1, 0.8, {"4/255": 0.7, "8/255": 0.6}, recorded=False, n=359)]
    groups, _ = compare([src(r, f"o{i}") for i, r in enumerate(old)])
    assert len(groups) == 2 and "not recorded" in groups[0].details


def test_eps_sets_differ_and_a_missing_eps_column_is_a_dash(tmp_path):
    full = metrics("madry", 0, 0.9, {"4/255": 0.8, "8/255": 0.7})
    other_set = metrics("madry", 1, 0.9, {"8/255": 0.7}, eps=["8/255"])
    missing = metrics("trades", 0, 0.88, {"4/255": 0.82}, eps=EPS)  # evaluated at 8/255 but no result there
    groups, _ = compare([src(full, "a"), src(other_set, "b"), src(missing, "c")])
    assert sorted(len(g.columns) for g in groups) == [2, 3]  # clean + 8/255 apart from clean + 4/255 + 8/255
    g = next(g for g in groups if len(g.columns) == 3)
    head, cells = table_cells(g)
    assert head == ["Strategy", "Clean", "ε = 4/255", "ε = 8/255", "seeds"]
    assert cells[1] == [("TRADES", False), ("88.00", False), ("82.00", True), (MISSING, False), ("1", False)]
    assert cells[0][3] == ("70.00", True)
    assert any(MISSING in n for n in g.notes)
    assert (f"| TRADES <sub>(1 seed)</sub> | 88.00<br><sub>(n=1)</sub> | **82.00**<br><sub>(n=1)</sub> | {MISSING} |"
            in to_markdown(groups))
    plot_comparison(g, tmp_path / "p.png")  # the missing point is a gap in the line
    with Image.open(tmp_path / "p.png") as img:
        assert img.format == "PNG"


def test_different_seed_counts_and_strategy_parameters_are_flagged():
    rows = [metrics("madry", s, 0.90 + s / 100, {"4/255": 0.8, "8/255": 0.7}) for s in (0, 1, 2)]
    rows += [metrics("sip_s", 0, 0.95, {"4/255": 0.9, "8/255": 0.75})]
    rows += [metrics("trades", 0, 0.93, {"4/255": 0.85, "8/255": 0.72}, beta=6.0),
             metrics("trades", 1, 0.91, {"4/255": 0.86, "8/255": 0.71}, beta=1.0)]
    rows += [metrics("madry", 3, 0.93, {"4/255": 0.8, "8/255": 0.7}, beta=1.0)]  # beta is not madry's parameter
    (g,), warnings = compare([src(r, f"e{i}") for i, r in enumerate(rows)])
    assert warnings == []
    assert [(r["label"], len(r["seeds"])) for r in g.rows] == [
        ("Madry", 4), ("TRADES (beta 1)", 1), ("TRADES (beta 6)", 1), ("SIP-S", 1)]
    assert "1–4 seeds (differs by strategy)" in g.title
    assert any("Seed counts differ" in n and "Madry 4" in n and "SIP-S 1" in n for n in g.notes)
    assert any("trades.beta" in n and "not averaged" in n for n in g.notes)
    madry = g.rows[0]["cells"]["clean"]
    assert madry["mean"] == pytest.approx(91.5) and madry["std"] == pytest.approx(1.2909944, rel=1e-6)


# ------------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def metrics_dir(tmp_path):
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    for s in (0, 1):
        (d / f"madry-{s}.json").write_text(json.dumps(metrics("madry", s, 0.80 + s / 50, {"4/255": 0.7,
                                                                                         "8/255": 0.5})))
        (d / "sub" / f"sip_s-{s}.json").write_text(json.dumps(metrics("sip_s", s, 0.90, {"4/255": 0.75,
                                                                                          "8/255": 0.40})))
    # The same sip_s seed 0 result copied elsewhere, and the same run on CIFAR-10.
    (d / "copy.json").write_text((d / "sub" / "sip_s-0.json").read_text())
    (d / "cifar.json").write_text(json.dumps(metrics("madry", 0, 0.5, {"4/255": 0.3, "8/255": 0.2},
                                                     dataset="cifar10", model="resnet18")))
    # madry seed 0 trained again (another checkpoint): still one seed.
    (d / "retrained.json").write_text(json.dumps(metrics("madry", 0, 0.5, {"4/255": 0.1, "8/255": 0.1},
                                                         ckpt="0123456789abcdef")))
    teacher = dict(metrics("madry", 9, 0.1, {"8/255": 0.1}), role="teacher")
    (d / "teacher.json").write_text(json.dumps(teacher))
    (d / "junk.json").write_text("{not json")
    return d


def test_report_cli_writes_one_section_and_plot_per_group_and_prints_tables(metrics_dir, tmp_path):
    out, png = tmp_path / "r" / "comparison.md", tmp_path / "r" / "comparison.png"
    res = CliRunner().invoke(app, ["report", "--metrics-dir", str(metrics_dir), "--out", str(out), "--plot",
                                   str(png)])
    assert res.exit_code == 0, res.output
    md = out.read_text()
    assert md.count("| Strategy |") == 2 and "(3 seeds)" not in md  # the teacher (seed 9) is no student
    sip = next(line for line in md.splitlines() if line.startswith("| SIP-S"))
    assert sip.startswith("| SIP-S <sub>(2 seeds)</sub> |")  # the copy of seed 0 is not a third seed
    for slug in ("cifar10_resnet18_eps32-255_n120", "digits_smallcnn_eps32-255_n120"):
        path = plot_path(png, slug)
        assert f"](comparison_{slug}.png)" in md
        with Image.open(path) as img:
            assert img.format == "PNG"
    assert not png.exists()
    text = " ".join(res.output.split())
    assert "digits · smallcnn · training ε 32/255 · 120 test points · 2 seeds" in text
    assert "cifar10 · resnet18" in text and "SIP-S" in text and "2 plot(s)" in text and "5 run(s)" in text
    assert "warning: strategy madry seed 0: two different runs of the same configuration" in text
    assert "madry-0.json" in text and "retrained.json" in text


def test_report_cli_errors_clearly(tmp_path):
    res = CliRunner().invoke(app, ["report", "--metrics-dir", str(tmp_path / "none")])
    assert res.exit_code == 1 and "not found" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["report", "--metrics-dir", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "no evaluated student runs" in res.output


def test_load_metrics_dir_skips_teachers_and_broken_files(metrics_dir):
    rows = load_metrics_dir(metrics_dir)
    assert len(rows) == 7 and all(r["role"] == "student" for r in rows)
    assert {r["source"] for r in rows} >= {str(metrics_dir / "copy.json"), str(metrics_dir / "sub" / "sip_s-0.json")}


def test_metrics_cli_prints_one_row_per_file_in_percent(metrics_dir):
    teacher, student = metrics_dir / "teacher.json", metrics_dir / "sub" / "sip_s-1.json"
    res = CliRunner().invoke(app, ["metrics", str(teacher), str(student)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    header = next(line for line in lines if "strategy" in line).split()
    assert header == ["file", "strategy", "seed", "points", "clean", "4/255", "8/255"]  # ε ascending
    assert next(line for line in lines if line.strip().startswith("teacher")).split() == \
        ["teacher", "madry", "9", "120", "10.00", MISSING, "10.00"]  # no 4/255 in the teacher's file
    assert next(line for line in lines if line.strip().startswith("sip_s-1")).split() == \
        ["sip_s-1", "sip_s", "1", "120", "90.00", "75.00", "40.00"]


def test_metrics_cli_names_a_missing_or_foreign_file(metrics_dir, tmp_path):
    res = CliRunner().invoke(app, ["metrics", str(tmp_path / "gone.json")])
    assert res.exit_code == 1 and "gone.json" in res.output and "not found" in res.output
    res = CliRunner().invoke(app, ["metrics", str(metrics_dir / "junk.json")])
    assert res.exit_code == 1 and "junk.json" in res.output and "not valid JSON" in res.output


def test_metrics_reads_the_evaluation_files_dvc_yaml_declares(tmp_path, monkeypatch):
    """`sipat metrics` without arguments: the evaluation stages' metrics, not other stages' (the survey's)."""
    import yaml

    stages = {
        "evaluate": {"cmd": "python -m stages.evaluate student --checkpoint m.pt --out out/student.json",
                     "metrics": [{"out/student.json": {"cache": False}}]},
        "survey_images_student": {"cmd": "python -m stages.survey_images student --metrics out/survey.json",
                                  "metrics": [{"out/survey.json": {"cache": False}}]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "student.json").write_text(json.dumps(
        {"strategy": "sip_s", "seed": 0, "n_examples": 10, "clean_acc": 0.9, "robust_acc": {"eps_8_255": 0.5}}))
    (tmp_path / "out" / "survey.json").write_text(json.dumps({"images": 3}))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["metrics"])
    assert res.exit_code == 0, res.output
    assert "sip_s" in res.output and "90.00" in res.output and "survey" not in res.output


def test_metrics_that_are_no_accuracies_are_named_not_counted(metrics_dir, tmp_path, caplog):
    bad = metrics("madry", 5, "abc", {"4/255": 0.7, "8/255": 0.5})
    (metrics_dir / "bad.json").write_text(json.dumps(bad))
    rows = load_metrics_dir(metrics_dir)
    assert all(r["source"] != str(metrics_dir / "bad.json") for r in rows)
    assert "bad.json: clean_acc is 'abc', not an accuracy in [0, 1]" in caplog.text
    res = CliRunner().invoke(app, ["metrics", str(metrics_dir / "bad.json")])
    assert res.exit_code == 1 and "bad.json: clean_acc is 'abc'" in " ".join(res.output.split())


def test_report_refuses_a_users_markdown_before_writing_any_plot(metrics_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# my project\n")
    res = CliRunner().invoke(app, ["report", "--metrics-dir", str(metrics_dir), "--out", str(readme), "--plot",
                                   str(tmp_path / "p.png")])
    assert res.exit_code == 1 and "was not written by this project" in " ".join(res.output.split())
    assert readme.read_text() == "# my project\n" and not list(tmp_path.glob("p_*.png"))
