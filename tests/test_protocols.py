"""The paper's protocols as Hydra configurations (conf/): each loads as `dvc exp run -S protocol=NAME` does,
holds the paper's values, trains one batch on fixture data, and keeps every strategy within its ε."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core.config import Config, config_from_dict, parse_budget
from pipeline.strategies import STRATEGIES, Batch, make_strategy
from tests.conftest import make_cifar_tree, make_cub_tree

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = sorted(p.stem for p in (ROOT / "conf" / "protocol").glob("*.yaml"))


def compose(overrides: tuple[str, ...] = (), tmp: Path | None = None) -> dict:
    """conf/ composed by DVC's own helper (what `dvc exp run -S ...` writes to params.yaml)."""
    import tempfile

    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "params.yaml"
        compose_and_dump(out, str(ROOT / "conf"), None, "config", "", list(overrides))
        return yaml.safe_load(out.read_text())


@functools.lru_cache(maxsize=None)
def protocol(name: str) -> Config:
    return config_from_dict(compose((f"protocol={name}",)), f"protocol {name}")


def test_the_seven_settings_and_the_cub_stand_in_are_there():
    assert PROTOCOLS == sorted(["digits", "cluttered_digits", "cifar10_resnet18", "cifar10_wrn34_10",
                                "cifar100_resnet18", "cifar100_wrn34_10", "cub_resnet50", "cub_densenet121"])


def test_params_yaml_is_the_default_composition():
    """`dvc repro` reads params.yaml as committed; `dvc exp run` rewrites it from conf/: they must agree."""
    assert compose() == yaml.safe_load((ROOT / "params.yaml").read_text())


def test_every_value_in_a_protocol_file_says_where_it_comes_from():
    files = [ROOT / "conf/protocol" / f"{name}.yaml" for name in PROTOCOLS]
    files += sorted((ROOT / "conf").glob("recipe*/*.yaml"))
    assert len(files) == len(PROTOCOLS) + 4  # recipe and recipe_cifar: authors, baselines
    for path in files:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            body = line.split("#")[0]
            if ":" in body and not body.rstrip().endswith(":") and body.split(":")[0].strip() not in (
                    "seed", "split_seed", "chunk_size"):
                assert "#" in line, f"{path.relative_to(ROOT)}:{lineno}: no source comment: {line!r}"


B = parse_budget
CIFAR = dict(eps=B("8/255"), step_size=B("2/255"), steps=10, epochs=100, lr=0.01, batch_size=64,
             schedule=("multistep", [60], 0.1), teacher="wrn34_10", pretrained=False,
             eval_eps=[B(f"{k}/255") for k in (1, 2, 4, 8)])
CUB = dict(eps=B("8/255"), step_size=B("1/255"), steps=32, epochs=80, lr=0.01, batch_size=32,
           schedule=("step", 10, 0.75), teacher="densenet121", pretrained=True,
           eval_eps=[B(f"{k}/255") for k in (1, 2, 4, 8)])
PAPER = {  # paper sec. 4.3 (training) and 4.4 (evaluation); batch size 32 on CUB: the authors' run_training.py
    "cifar10_resnet18": dict(CIFAR, dataset="cifar10", model="resnet18"),
    "cifar10_wrn34_10": dict(CIFAR, dataset="cifar10", model="wrn34_10"),
    "cifar100_resnet18": dict(CIFAR, dataset="cifar100", model="resnet18"),
    "cifar100_wrn34_10": dict(CIFAR, dataset="cifar100", model="wrn34_10"),
    "cub_resnet50": dict(CUB, dataset="cub", model="resnet50"),
    "cub_densenet121": dict(CUB, dataset="cub", model="densenet121"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_protocol_values_are_the_papers(name):
    cfg, want = protocol(name), PAPER[name]
    assert (cfg.dataset, cfg.model, cfg.teacher.model) == (want["dataset"], want["model"], want["teacher"])
    assert cfg.attack.eps == pytest.approx(want["eps"]) and cfg.attack.step_size == pytest.approx(want["step_size"])
    assert cfg.attack.steps == want["steps"]
    for opt in (cfg.teacher, cfg.train):
        assert (opt.epochs, opt.lr, opt.batch_size, opt.pretrained) == (want["epochs"], want["lr"],
                                                                         want["batch_size"], want["pretrained"])
        s = opt.schedule
        kind, when, gamma = want["schedule"]
        assert (s.kind, s.milestones if kind == "multistep" else s.step_every, s.gamma) == (kind, when, gamma)
        assert opt.select == "clean"  # the authors' model selection
    assert cfg.evaluate.eps == pytest.approx(want["eval_eps"]) and cfg.evaluate.n_examples is None
    assert cfg.human_masks.threshold == 0.5


@pytest.mark.parametrize("name", sorted(PAPER))
def test_learning_rate_schedule_lands_on_the_papers_epochs(name):
    from pipeline.training import make_optimizer, make_scheduler

    cfg = protocol(name)
    opt = make_optimizer(torch.nn.Linear(1, 1), cfg.train)
    sched = make_scheduler(opt, cfg.train)
    lrs = []
    for _ in range(cfg.train.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if name.startswith("cifar"):  # 0.01, x0.1 after 60 epochs
        want = [0.01] * 60 + [0.001] * 40
    else:  # 0.01, x0.75 every ten epochs
        want = [0.01 * 0.75 ** (e // 10) for e in range(80)]
    assert lrs == pytest.approx(want)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_baseline_schedules_scale_with_the_protocol(name):
    """FAT's τ grows at 50/120 and 90/120 of the run; PART warms up for 1/4 of it (20 of 80 on CUB)."""
    cfg = protocol(name)
    n = cfg.train.epochs
    fat = make_strategy("fat", cfg.attack, cfg.train, n)
    taus = [(fat.begin_epoch(e), fat.current_tau())[1] for e in range(n)]
    assert taus == [0] * round(n * 50 / 120) + [1] * (round(n * 90 / 120) - round(n * 50 / 120)) + \
        [2] * (n - round(n * 90 / 120))
    part = make_strategy("part", cfg.attack, cfg.train, n)
    warm = [(part.begin_epoch(e), part.in_warmup())[1] for e in range(n)]
    assert warm == [True] * round(n / 4) + [False] * (n - round(n / 4))
    if n == 80:
        assert sum(warm) == 20  # train_eval_part.py: --warm-up 20 of --epochs 80
    assert part.eps_low == pytest.approx(cfg.attack.eps * 7 / 8)


@pytest.mark.parametrize("strategy", STRATEGIES.names())
@pytest.mark.parametrize("name", PROTOCOLS)
def test_no_strategy_perturbs_beyond_eps(name, strategy):
    """One batch at the protocol's attack, at the first epoch (PART's warm-up, FAT's τ = 0) and the last:
    the budget (a tensor for PART) and max |δ| stay within attack.eps, and masked elements stay untouched."""
    from pipeline.models import build_model

    cfg = protocol(name)
    torch.manual_seed(0)
    model = build_model("smallcnn", 3)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 8, 8, generator=g)
    batch = Batch(x, torch.tensor([0, 1, 2]), torch.arange(3), torch.rand(x.shape, generator=g) < 0.3)
    n = cfg.train.epochs
    strat = make_strategy(strategy, cfg.attack, cfg.train, n)
    eps = cfg.attack.eps
    for epoch in (0, n - 1):
        strat.begin_epoch(epoch)
        budget = torch.as_tensor(strat.budget(model, batch))
        assert float(budget.max()) <= eps + 1e-7
        if strategy == "part" and epoch == n - 1:
            assert float(budget.min()) == pytest.approx(eps * 7 / 8)
        delta = strat.adversarial(model, batch) - x
        assert float(delta.abs().max()) <= eps + 1e-6
        if strat.mask_kind is not None:
            assert not delta[batch.mask].any()


@pytest.fixture(scope="module")
def fixture_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("protocol_data")
    return {"cub": make_cub_tree(base / "CUB_200_2011"),
            "cifar10": make_cifar_tree(base / "cifar", "cifar10", per_file=2),
            "cifar100": make_cifar_tree(base / "cifar", "cifar100", per_file=2)}


@pytest.mark.parametrize("name", PROTOCOLS)
def test_each_protocol_trains_one_batch_on_fixture_data(name, fixture_roots, tmp_path):
    """The protocol as `dvc exp run -S protocol=NAME -S ...` composes it, shrunk only where the fixture or the
    CPU needs it (image size, one attack step, no ImageNet download, one epoch), through the train stage's
    own entry point."""
    from pipeline.training.run import train_run

    cfg = protocol(name)
    root = fixture_roots["cifar10" if cfg.dataset == "cifar10" else "cifar100" if cfg.dataset == "cifar100"
                         else "cub"]  # the embedded data sets read any CUB tree
    size = 32 if cfg.model == "densenet121" else 8  # DenseNet's four poolings need 32 pixels
    raw = compose((f"protocol={name}", "strategy=part", f"data.root={root}", f"data.image_size={size}",
                   "data.num_workers=0", "attack.steps=1", "train.epochs=1", "train.pretrained=false",
                   "train.batch_size=64", "device=cpu"))
    small = config_from_dict(raw, name)
    assert (small.dataset, small.model, small.attack.eps) == (cfg.dataset, cfg.model, cfg.attack.eps)
    summary = train_run(small, "student", tmp_path / "model.pt", progress=False)
    assert len(summary["history"]) == 1 and (tmp_path / "model.pt").is_file()


# ------------------------------------------------------------------------------ the CUB stand-in

def test_cluttered_digits_segment_the_digit_alone():
    """Each canvas is max(clutter, digit); the segmentation is the digit's strokes only; clutter comes from
    other images of the same group (split) and is drawn the same way for the same seed."""
    import numpy as np

    from pipeline.data.cluttered import clutter_digits

    images = np.zeros((6, 8, 8))
    for i in range(6):
        images[i, 1:7, 1 + i % 3: 3 + i % 3] = 16 if i < 3 else 8  # group 0 draws at 255, group 1 at 128
    groups = np.array([0, 0, 0, 1, 1, 1])
    canvas, seg = clutter_digits(images, groups, canvas=16, fragments=4, fragment_size=3, seed=0)
    assert canvas.shape == seg.shape == (6, 16, 16) and canvas.dtype == seg.dtype == np.uint8
    assert set(np.unique(seg)) <= {0, 255}
    for i in range(6):
        level = 255 if i < 3 else 128
        assert (seg[i] == 255).sum() == (images[i] >= 4).sum()  # the whole digit, nothing else
        assert (canvas[i][seg[i] == 255] == level).all()
        assert set(np.unique(canvas[i])) <= {0, level}  # fragments only from the same group
    assert (canvas[seg == 0] > 0).any()  # clutter lies outside the segmentation
    again, seg_again = clutter_digits(images, groups, canvas=16, fragments=4, fragment_size=3, seed=0)
    assert np.array_equal(again, canvas) and np.array_equal(seg_again, seg)


def test_cluttered_digits_are_a_registered_cub_tree(tmp_path):
    from pipeline.data import DATASETS, load_dataset
    from pipeline.human_masks import human_masks

    spec = DATASETS.get("cluttered_digits")
    summary = spec.embedded_writer(tmp_path / "cl")
    train = load_dataset("cluttered_digits", str(tmp_path / "cl"), "train", 16)
    test = load_dataset("cluttered_digits", str(tmp_path / "cl"), "test", 16)
    assert (len(train), len(test), train.num_classes) == (summary["train"], summary["test"], 10) == (1438, 359, 10)
    assert train.has_segmentations and train.image_shape == (3, 16, 16)
    masks = next(iter(human_masks(train, batch_size=64, workers=1, progress=False)))[1]
    share = masks.float().mean().item()
    assert 0.05 < share < 0.2  # the digit is a small part of a cluttered canvas
    x = torch.stack([train[i][0] for i in range(64)])
    assert (x[~masks] > 0).float().mean() > 0.05  # clutter outside the human mask


def test_readme_protocol_table_is_the_conf_files():
    """README's table lists exactly the protocol files, each with its own training attack."""
    from pipeline.core.config import format_budget

    section = (ROOT / "README.md").read_text().split("## Running on real data")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `") and "protocol=" not in line]
    table = {line.split("`")[1]: [c.strip() for c in line.split("|")[1:-1]] for line in rows}
    assert sorted(table) == PROTOCOLS
    for name, cells in table.items():
        a = protocol(name).attack
        assert cells[4] == f"ε {format_budget(a.eps)}, {a.steps} × {format_budget(a.step_size)}", name


RECIPES = {  # where the paper is silent: the authors' code (default) or the baselines' repositories
    "authors": dict(beta=1.0, cifar=dict(weight_decay=1e-6, augment=False), cub=dict(weight_decay=1e-6, augment=False)),
    "baselines": dict(beta=6.0, cifar=dict(weight_decay=2e-4, augment=True), cub=dict(weight_decay=1e-6, augment=False)),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_sets_what_the_paper_leaves_open(name, recipe):
    """authors: TRADES β 1.0 (trades_loss' default, as Temp_CVPR train_model.py calls it), weight decay 1e-6,
    no augmentation; baselines: β 6.0 and, on CIFAR, 2e-4 with crop (padding 4) + flip. CUB has no baseline
    code: its weight decay and augmentation stay the authors' under both."""
    overrides = (f"protocol={name}",) if recipe == "authors" else (f"protocol={name}", f"recipe={recipe}")
    cfg = config_from_dict(compose(overrides), f"protocol {name}, recipe {recipe}")
    want = RECIPES[recipe]
    family = want["cifar"] if name.startswith("cifar") else want["cub"]
    assert make_strategy("trades", cfg.attack, cfg.train).params.beta == want["beta"]
    assert cfg.train.weight_decay == cfg.teacher.weight_decay == pytest.approx(family["weight_decay"])
    assert cfg.data.augment is family["augment"]
    if name.startswith("cifar"):
        assert cfg.data.crop_padding == 4
    assert make_strategy("part", cfg.attack, cfg.train).params.rule == "zscore"  # PART utils.py, both recipes
