"""Published results cannot go stale silently: `sipat grid collect` records what made them, `sipat report
--readme` publishes them with what changed since, and `--check` fails on a section that claims to be current
when it is not. The last tests rebuild every published results section of this README from its committed
metrics folder."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.grid import Cell, Grid
from pipeline.provenance import code_digests, processor
from pipeline.results import collect, experiment_refs, replace_section, section, stage_inputs, what_changed
from tests.test_report import metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted(p.parent for p in (ROOT / "results").glob("*/provenance.json"))


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_stage_inputs_are_the_code_and_keys_of_prepare_to_evaluate():
    code, keys = stage_inputs((ROOT / "dvc.yaml").read_text())
    assert {"stages/train.py", "stages/evaluate.py", "pipeline/training", "pipeline/evaluation",
            "pipeline/strategies", "pipeline/synthetic_masks.py"} <= set(code)
    assert not any(c.startswith("data/") for c in code) and "stages/survey_images.py" not in code
    assert {"train", "attack", "evaluate.eps", "evaluate.n_examples", "teacher", "salience.fraction"} <= set(keys)
    assert "strategy" not in keys and "seed" not in keys  # what varies between a grid's cells


@pytest.fixture
def repo_with_grid(tmp_path):
    """A git repository with the project's dvc.yaml, conf/ and code, and a grid of two finished experiments
    (commits on refs/exps, as DVC stores them) over its baseline."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("conf", "pipeline", "stages"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    base = _git(repo, "rev-parse", "HEAD")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    cells = []
    for strategy in ("madry", "sip_s"):
        name = f"g-{strategy}-s0"
        _git(repo, "checkout", "-q", "--detach", base)
        (repo / "data" / "metrics").mkdir(parents=True, exist_ok=True)
        m = metrics(strategy, 0, 0.9, {"4/255": 0.8, "8/255": 0.7})
        (repo / "data/metrics/student.json").write_text(json.dumps(m))
        (repo / "data/metrics/teacher.json").write_text(json.dumps(dict(m, role="teacher", strategy="madry")))
        (repo / "params.yaml").write_text(yaml.safe_dump(dict(params, strategy=strategy, seed=0)))
        _git(repo, "add", "-f", "data/metrics", "params.yaml")
        _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", name)
        _git(repo, "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/{name}", "HEAD")
        cells.append(Cell(name, strategy, 0))
    _git(repo, "checkout", "-q", "--detach", base)
    grid = Grid(name="g", repo=str(repo), rev=base, cache="", workdir=str(tmp_path / "w"), executor="local",
                protocol="digits", overrides=[], resources={}, cells=cells + [Cell("g-fat-s0", "fat", 0)],
                submitted="2026-01-01T10:00:00", jobs=2, processor="Test CPU")
    return repo, grid


def test_collect_writes_metrics_and_provenance_and_nothing_changed_yet(repo_with_grid):
    repo, grid = repo_with_grid
    assert set(experiment_refs(repo)) == {"g-madry-s0", "g-sip_s-s0"}
    out = repo / "results" / "g"
    prov = collect(repo, grid, out)
    assert sorted(p.name for p in out.iterdir()) == ["g-madry-s0.json", "g-sip_s-s0.json", "grid.json",
                                                    "provenance.json", "teacher.json"]
    assert prov["runs"] == 2 and prov["missing"] == ["g-fat-s0"] and prov["processor"] == "Test CPU"
    assert prov["commit"] == grid.rev and "pipeline/training/__init__.py" in prov["code"]
    assert prov["command"] == "sipat grid run --executor local -p digits --strategies madry,sip_s,fat --seeds 0 -j 2"
    assert prov["params"]["train"]["epochs"] == 20 and "strategy" not in prov["params"]
    assert what_changed(repo, prov) == []


def test_what_changed_names_code_files_and_parameter_values(repo_with_grid):
    repo, grid = repo_with_grid
    prov = collect(repo, grid, repo / "results" / "g")
    with open(repo / "pipeline" / "strategies" / "madry.py", "a") as f:
        f.write("# edited\n")
    proto = repo / "conf" / "protocol" / "digits.yaml"
    proto.write_text(proto.read_text().replace("epochs: 20", "epochs: 21", 1))
    (repo / "stages" / "survey_images.py").write_text("# not a stage of the results\n")
    changed = what_changed(repo, prov)
    assert "pipeline/strategies/madry.py" in changed
    assert any(c.startswith("teacher.epochs: 20 → 21") or c.startswith("train.epochs: 20 → 21") for c in changed)
    assert not any("survey" in c for c in changed)


def test_collect_refuses_an_experiment_of_another_baseline(repo_with_grid):
    repo, grid = repo_with_grid
    grid.rev = _git(repo, "rev-parse", "refs/exps/" + "/".join([grid.rev[:2], grid.rev[2:], "g-madry-s0"]))
    with pytest.raises(RuntimeError, match="was run from"):
        collect(repo, grid, repo / "results" / "g")


def test_readme_section_published_then_checked_then_stale(repo_with_grid, monkeypatch):
    repo, grid = repo_with_grid
    collect(repo, grid, repo / "results" / "g")
    readme = repo / "README.md"
    readme.write_text("# Project\n\nintro\n\n<!-- results:g -->\nold\n<!-- /results:g -->\n\ntail\n")
    monkeypatch.chdir(repo)
    args = ["report", "--metrics-dir", "results/g", "--readme", "README.md", "--plot", "docs/figures/g.png"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    assert text.startswith("# Project\n\nintro\n\n") and text.endswith("\n\ntail\n")
    body = section(text, "g")
    assert "Made at commit" in body and "Test CPU" in body and "Current: no code file" in body
    assert "| Madry <sub>(1 seed)</sub>" in body and "(docs/figures/g_digits_smallcnn" in body
    assert list((repo / "docs" / "figures").glob("g_*.png"))
    res = CliRunner().invoke(app, args + ["--check"])
    assert res.exit_code == 0 and "up to date" in res.output
    # the code changes: the section still says "Current", so the check fails and names the command
    with open(repo / "pipeline" / "attacks.py", "a") as f:
        f.write("# edited\n")
    res = CliRunner().invoke(app, args + ["--check"])
    assert res.exit_code == 1 and "sipat report --metrics-dir results/g --readme README.md" in res.output
    # republished: honest about the change, and the check passes again
    assert CliRunner().invoke(app, args).exit_code == 0
    body = section(readme.read_text(), "g")
    assert "Since then changed" in body and "`pipeline/attacks.py`" in body
    assert CliRunner().invoke(app, args + ["--check"]).exit_code == 0


def test_replace_section_needs_both_markers():
    with pytest.raises(ValueError, match="no section"):
        replace_section("# x\n<!-- results:a -->\n", "a", "body")
    assert replace_section("<!-- results:a -->\nx\n<!-- /results:a -->", "a", "y") == \
        "<!-- results:a -->\ny\n<!-- /results:a -->"


def test_code_digests_of_the_working_tree_and_a_commit_agree():
    rev = _git(ROOT, "rev-parse", "HEAD")
    paths = ["pipeline/claims.py", "pipeline/strategies"]
    at_head = code_digests(ROOT, paths, rev=rev)
    now = code_digests(ROOT, paths)
    dirty = _git(ROOT, "status", "--porcelain", "--", *paths)
    if not dirty:
        assert at_head == now
    assert all(not k.endswith(".pyc") for k in now) and processor()


@pytest.mark.parametrize("folder", RESULTS, ids=[p.name for p in RESULTS])
def test_published_results_sections_are_what_the_committed_metrics_give(folder, monkeypatch):
    """The README's tables, verdicts and freshness line, rebuilt offline from results/NAME (a section that says
    "Current" while the code its runs were made with has changed fails here)."""
    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(app, ["report", "--metrics-dir", str(folder.relative_to(ROOT)), "--readme",
                                   "README.md", "--plot", f"docs/figures/results/{folder.name}.png", "--check"])
    assert res.exit_code == 0, res.output


def test_a_grid_goes_on_from_its_published_record_on_a_clone_without_its_work_folder(repo_with_grid):
    """The work folder and the experiments are gone (a new clone): status and collect go on from results/."""
    from pipeline import grid as g

    repo, grid = repo_with_grid
    grid.save = lambda: None
    collect(repo, grid, repo / "results" / "g")
    assert json.loads((repo / "results/g/grid.json").read_text())["name"] == "g"
    grid.repo = str(repo)
    rec = json.loads((repo / "results/g/grid.json").read_text())
    rec["workdir"] = str(repo / ".grid" / "g")
    (repo / "results/g/grid.json").write_text(json.dumps(rec))
    for ref in _git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split():
        _git(repo, "update-ref", "-d", ref)  # the experiments are not on this clone
    restored = g.find_grid(repo, "g", None)
    assert (repo / ".grid/g/grid.json").is_file() and restored.rev == grid.rev
    assert g.published_runs(restored) == {"g-madry-s0", "g-sip_s-s0"}
    prov = collect(repo, restored, repo / "results" / "g")  # the earlier runs stay collected
    assert prov["runs"] == 2 and prov["missing"] == ["g-fat-s0"]


def test_the_readme_summary_of_verdicts_agrees_with_the_published_sections():
    """The table of verdicts at the top of "Results" is written by hand: each of its cells starts with the verdict
    that the section of its protocol computed."""
    import re

    text = (ROOT / "README.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Claim |"))
    protocols = [cell.strip(" `") for cell in header.strip("|").split("|")[1:]]
    assert protocols and all(f"<!-- results:{p} -->" in text for p in protocols), protocols
    rows = [line for line in text.splitlines() if re.match(r"\| C\d ", line)]
    assert len(rows) == 3
    for row in rows:
        claim, *cells = [c.strip() for c in row.strip("|").split("|")]
        name = claim.split()[0]
        for protocol, cell in zip(protocols, cells, strict=True):
            computed = re.search(rf"^- \*\*{name} ([^*(]+?)(?: \(see each variant\))?\*\*:", section(text, protocol),
                                 re.M).group(1)
            assert cell.startswith(computed), (name, protocol, cell, computed)
