"""What a seed varies (seed_scope): the composition derives the seeds, the config checks them, the report
groups and titles by them."""

import pytest
import yaml

from pipeline.core.config import ConfigError, config_from_dict
from pipeline.report import compare
from tests.test_protocols import PROTOCOLS, compose
from tests.test_report import metrics, src

SEEDS = ("data.split_seed", "evaluate.seed", "teacher.seed", "teacher.split_seed")


def _get(d, key):
    a, b = key.split(".")
    return d[a][b]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_paper_protocols_vary_the_split_and_embedded_ones_the_student(protocol):
    d = compose((f"protocol={protocol}", "seed=3"))
    want = "split" if protocol.startswith(("cifar", "cub")) else "student"
    assert d["seed_scope"] == want
    derived = {"student": (), "split": ("data.split_seed", "evaluate.seed")}[want]
    for key in SEEDS:
        assert _get(d, key) == (3 if key in derived else 0), key
    config_from_dict(d, protocol)  # and the config accepts it


@pytest.mark.parametrize("scope, varied", [("student", ()), ("split", ("data.split_seed", "evaluate.seed")),
                                           ("all", SEEDS)])
def test_scope_override_derives_the_seeds(scope, varied):
    d = compose(("protocol=cifar10_resnet18", f"seed_scope={scope}", "seed=7"))
    assert d["seed_scope"] == scope
    assert {k: _get(d, k) for k in SEEDS} == {k: 7 if k in varied else 0 for k in SEEDS}


def test_a_scope_the_seeds_do_not_follow_is_refused_by_name():
    d = compose(("seed_scope=all", "seed=2"))
    d["teacher"]["seed"] = 0
    with pytest.raises(ConfigError, match=r"seed_scope 'all' makes teacher.seed equal to seed \(2\)"):
        config_from_dict(d, "params.yaml")


@pytest.mark.parametrize("key", ["seed", "data.split_seed", "teacher.seed", "evaluate.seed", "survey.seed"])
def test_seeds_beyond_what_torch_can_hold_are_refused_in_prepare_not_after_the_teacher(key):
    d = yaml.safe_load(yaml.safe_dump(compose()))
    if "." in key:
        a, b = key.split(".")
        d[a][b] = 99999999999999999999
    else:
        d[key] = 99999999999999999999
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + r": Input should be less than or equal to"):
        config_from_dict(d, "params.yaml")


def test_report_pairs_seeds_that_drew_their_own_points_and_says_what_varied():
    rows = []
    for s in range(3):
        for strategy in ("madry", "sip_s"):
            m = metrics(strategy, s, 0.9, {"4/255": 0.8, "8/255": 0.7}, points=f"points-of-seed-{s}")
            rows.append(src(dict(m, seed_scope="split"), f"{strategy}{s}"))
    groups, _ = compare(rows)
    assert len(groups) == 1 and "3 seeds varying the student, split and points" in groups[0].title
    student_only = [src(metrics("madry", s, 0.9, {"4/255": 0.8, "8/255": 0.7}, points=f"p{s}"), f"m{s}")
                    for s in range(2)]
    assert len(compare(student_only)[0]) == 2  # other points under seed_scope student: never averaged


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_paper_protocols_compute_in_fp32_and_the_fast_path_is_one_override_away(protocol):
    """The references ran fp32; perf=fast is bf16 autocast on CUDA (nothing changes on a CPU)."""
    paper = protocol.startswith(("cifar", "cub"))
    cfg = config_from_dict(compose((f"protocol={protocol}",)), protocol)
    assert cfg.perf.autocast(cuda=True) == (None if paper else "bfloat16")
    fast = config_from_dict(compose((f"protocol={protocol}", "perf=fast")), protocol)
    assert fast.perf.autocast(cuda=True) == "bfloat16" and fast.perf.autocast(cuda=False) is None
    fp32 = config_from_dict(compose((f"protocol={protocol}", "perf=fp32")), protocol)
    assert fp32.perf.autocast(cuda=True) is None and fp32.perf.use_channels_last(cuda=True)


def test_budgets_have_one_spelling_so_a_reordered_list_reruns_nothing():
    """DVC compares the list as written: [8/255, 4/255] would rerun an evaluation identical to [4/255, 8/255]."""
    with pytest.raises(ConfigError, match=r"evaluate\.eps: .*increasing order"):
        config_from_dict({"evaluate": {"eps": ["8/255", "4/255"]}})
    with pytest.raises(ConfigError, match=r"evaluate\.teacher_eps: .*once"):
        config_from_dict({"evaluate": {"teacher_eps": ["8/255", "8/255"]}})
    assert config_from_dict({"evaluate": {"eps": ["4/255", "8/255"]}}).evaluate.eps == [4 / 255, 8 / 255]
