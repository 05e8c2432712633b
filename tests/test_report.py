import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app, rows_from_experiments
from pipeline.report import aggregate, to_markdown


def _write(folder, strategy, seed, clean, r4, r8):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{strategy}-{seed}.json").write_text(json.dumps({
        "strategy": strategy, "seed": seed, "role": "student", "clean_acc": clean,
        "robust_acc": {"eps_8_255": r8, "eps_4_255": r4}}))


@pytest.fixture
def metrics(tmp_path):
    d = tmp_path / "m"
    _write(d, "madry", 0, 0.80, 0.70, 0.50)
    _write(d, "madry", 1, 0.82, 0.72, 0.52)
    _write(d / "sub", "sip_s", 0, 0.90, 0.75, 0.40)
    _write(d / "sub", "sip_s", 1, 0.88, 0.73, 0.42)
    _write(d, "basic", 0, 0.99, 0.10, 0.00)
    (d / "teacher.json").write_text(json.dumps({"strategy": "madry", "seed": 9, "role": "teacher",
                                                 "clean_acc": 0.1, "robust_acc": {"eps_8_255": 0.1}}))
    (d / "junk.json").write_text("{not json")
    return d


def test_aggregate_means_stds_and_order(metrics):
    from pipeline.report import load_metrics_dir

    agg = aggregate(load_metrics_dir(metrics))
    assert agg["strategies"] == ["basic", "madry", "sip_s"]  # paper order, teacher file ignored
    assert agg["columns"] == ["clean", "eps_4_255", "eps_8_255"]
    m = agg["table"]["madry"]["clean"]
    assert m["mean"] == pytest.approx(81.0) and m["std"] == pytest.approx(1.41421356, rel=1e-6) and m["n"] == 2
    assert agg["table"]["basic"]["eps_8_255"] == {"mean": 0.0, "std": 0.0, "n": 1}


def test_markdown_marks_the_best_per_column(metrics):
    from pipeline.report import load_metrics_dir

    md = to_markdown(aggregate(load_metrics_dir(metrics)))
    lines = md.strip().splitlines()
    assert lines[0].startswith("| Strategy | Clean | ε = 4/255 | ε = 8/255")
    basic, madry, sip = lines[2], lines[3], lines[4]
    assert "**99.00**" in basic  # best clean; a single seed shows no spread
    assert "**74.00 ± 1.41**" in sip  # best at 4/255
    assert "**51.00 ± 1.41**" in madry  # best at 8/255
    assert madry.count("**") == 2 and sip.startswith("| SIP-S")


def test_report_cli_writes_table_and_plot(metrics, tmp_path):
    out, png = tmp_path / "r.md", tmp_path / "r.png"
    res = CliRunner().invoke(app, ["report", "--metrics-dir", str(metrics), "--out", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "SIP-S" in out.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cli_errors_clearly(tmp_path):
    res = CliRunner().invoke(app, ["report", "--metrics-dir", str(tmp_path / "none")])
    assert res.exit_code == 1 and "not found" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["report", "--metrics-dir", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "no evaluated student runs" in res.output


def test_rows_from_experiments_reads_each_finished_revision():
    files = {"abc": json.dumps({"strategy": "madry", "seed": 1, "role": "student", "clean_acc": 0.8,
                                "robust_acc": {"eps_8_255": 0.5}}),
             "workspace": json.dumps({"strategy": "sip_s", "seed": 0, "clean_acc": 0.9, "robust_acc": {}})}

    def read(rev):
        if rev not in files:
            raise FileNotFoundError(rev)
        return files[rev]

    rows = rows_from_experiments([
        {"rev": "workspace", "typ": "baseline", "Experiment": None, "State": None},
        {"rev": "main", "typ": "baseline", "Experiment": None, "State": None},
        {"rev": "abc", "typ": "branch_commit", "Experiment": "exp-a", "State": "Success"},
        {"rev": "def", "typ": "branch_commit", "Experiment": "exp-b", "State": "Queued"},
        {"rev": "ghi", "typ": "branch_commit", "Experiment": "exp-c", "State": "Success"},  # no metrics
    ], read)
    assert [(r["strategy"], r["seed"], r["source"]) for r in rows] == [("sip_s", 0, "workspace"),
                                                                      ("madry", 1, "exp-a")]


def test_metrics_cli_prints_one_row_per_file_in_percent(metrics):
    teacher, student = metrics / "teacher.json", metrics / "sub" / "sip_s-1.json"
    res = CliRunner().invoke(app, ["metrics", str(teacher), str(student)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    header = next(line for line in lines if "strategy" in line).split()
    assert header == ["file", "strategy", "seed", "points", "clean", "4/255", "8/255"]  # ε ascending
    assert next(line for line in lines if line.strip().startswith("teacher")).split() == \
        ["teacher", "madry", "9", "?", "10.00", "–", "10.00"]  # no 4/255 in the teacher's file
    assert next(line for line in lines if line.strip().startswith("sip_s-1")).split() == \
        ["sip_s-1", "sip_s", "1", "?", "88.00", "73.00", "42.00"]


def test_metrics_cli_names_a_missing_or_foreign_file(metrics, tmp_path):
    res = CliRunner().invoke(app, ["metrics", str(tmp_path / "gone.json")])
    assert res.exit_code == 1 and "gone.json" in res.output and "not found" in res.output
    res = CliRunner().invoke(app, ["metrics", str(metrics / "junk.json")])
    assert res.exit_code == 1 and "junk.json" in res.output and "not valid JSON" in res.output
