"""Strategies: one module each, registered by name, parameters validated by their own models, one PGD call."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.core.config import AttackConfig, ConfigError, StudentConfig
from pipeline.models import build_model
from pipeline.strategies import STRATEGIES, Batch, Strategy, make_strategy, strategy_params
from pipeline.strategies.part import grad_cam, part_zscores, raw_cam, top_fraction_budget, zscore_budget
from pipeline.strategies.trades import trades_kl
from pipeline.training.augment import crop_flip

ATTACK = AttackConfig(eps=16 / 255, step_size=4 / 255, steps=3)


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    mask = torch.rand(x.shape, generator=g) < 0.5
    return Batch(x, y, torch.arange(n), mask)


def test_all_seven_strategies_are_registered_under_their_class_name():
    assert set(STRATEGIES.names()) >= {"basic", "madry", "trades", "fat", "part", "sip_s", "sip_h"}
    assert STRATEGIES.get("sip_s").mask_kind == "synthetic"
    assert STRATEGIES.get("sip_h").mask_kind == "human"
    assert STRATEGIES.get("madry").mask_kind is None
    for name in STRATEGIES:
        assert STRATEGIES.get(name).name == name


def test_a_new_strategy_is_one_class_statement():
    class Doubled(Strategy, name="_doubled_for_test"):
        def loss(self, model, batch):
            return 2 * F.cross_entropy(model(self.adversarial(model, batch)), batch.y)

    try:
        assert STRATEGIES.get("_doubled_for_test") is Doubled
        strat = make_strategy("_doubled_for_test", ATTACK)
        assert torch.isfinite(strat.loss(build_model("smallcnn", 4), _batch(4)))
    finally:
        STRATEGIES._items.pop("_doubled_for_test")


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_each_strategy_decreases_its_loss_on_a_tiny_batch(name):
    torch.manual_seed(0)
    model = build_model("smallcnn", 4)
    params = StudentConfig(part={"warmup_fraction": 0}, fat={"tau": 1, "dynamic_tau": False})
    strat = make_strategy(name, ATTACK, params, total_epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    b = _batch()
    losses = []
    for _ in range(25):
        model.train()
        loss = strat.loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_each_strategy_stays_within_eps(name):
    """The budget (PART's tensor included) and the attack's actual δ never exceed attack.eps, at any epoch."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 4)
    strat = make_strategy(name, ATTACK, StudentConfig(), total_epochs=8)
    b = _batch(8)
    for epoch in (0, 7):
        strat.begin_epoch(epoch)
        budget = torch.as_tensor(strat.budget(model, b))
        assert float(budget.max()) <= ATTACK.eps + 1e-7
        delta = strat.adversarial(model, b) - b.x
        assert float(delta.abs().max()) <= ATTACK.eps + 1e-6
        if strat.mask_kind is not None:
            assert torch.equal(delta[b.mask], torch.zeros_like(delta[b.mask]))


def test_sip_attack_leaves_salient_elements_untouched():
    model = build_model("smallcnn", 4)
    b = _batch()
    x_adv = make_strategy("sip_h", ATTACK).adversarial(model, b)
    assert torch.equal(x_adv[b.mask], b.x[b.mask])
    assert (x_adv != b.x)[~b.mask].float().mean() > 0.5
    with pytest.raises(RuntimeError, match="needs masks"):
        make_strategy("sip_s", ATTACK).loss(model, Batch(b.x, b.y, b.index, None))


def test_strategy_sections_are_validated_by_name():
    bad = StudentConfig(trades={"betta": 1}, fatt={"tau": 1}, part={"low_eps_fraction": "9/8"})
    with pytest.raises(ConfigError) as err:
        strategy_params(bad, ATTACK)  # every section: what the prepare stage checks before any training
    msg = str(err.value)
    assert "train.trades.betta: unknown key" in msg
    assert "train.fatt: unknown key" in msg
    assert "train.part.low_eps_fraction" in msg  # a low budget above ε is refused
    with pytest.raises(ConfigError, match="train.fat.tau_milestones"):
        strategy_params(StudentConfig(fat={"tau_milestones": ["3/4", "1/4"]}), ATTACK)
    # a strategy reads (and checks) its own section only
    with pytest.raises(ConfigError, match="train.trades.betta"):
        make_strategy("trades", ATTACK, bad)
    assert make_strategy("madry", ATTACK, bad).name == "madry"


def test_importing_the_package_or_one_strategy_imports_no_other_strategy():
    """The teacher imports `madry` alone: an edit of another strategy's module must not retrain it."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.strategies import madry; from pipeline.training import run; "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.strategies.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pipeline.strategies.madry']"


def test_trades_kl_matches_a_hand_computation():
    la = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    lc = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    pa, pc = F.softmax(la, 1), F.softmax(lc, 1)
    by_hand = (pc * (pc.log() - pa.log())).sum(1).mean()
    assert torch.allclose(trades_kl(la, lc), by_hand)


def test_trades_loss_is_ce_plus_beta_kl(monkeypatch):
    from pipeline.strategies.trades import Trades

    torch.manual_seed(0)
    model = build_model("smallcnn", 4).train()
    b = _batch(8)
    fixed = (b.x + 0.01).clamp(0, 1)
    seen = {}

    def fake(self, model, batch, **overrides):
        seen.update(overrides)
        return fixed

    monkeypatch.setattr(Trades, "adversarial", fake)
    for beta in (0.0, 6.0):
        strat = make_strategy("trades", ATTACK, StudentConfig(trades={"beta": beta}))
        got = strat.loss(model, b)
        lc, la = model(b.x), model(fixed)
        want = F.cross_entropy(lc, b.y) + beta * trades_kl(la, lc)
        assert torch.allclose(got, want, atol=1e-6)
    assert seen["init"] == "normal" and seen["init_std"] == 0.001  # TRADES' start, trades.py


def test_fat_tau_follows_the_reference_schedule():
    """FAT.py: τ = 0 for epochs 1-50, 1 for 51-90, 2 for 91-120 (1-based); here 0-based, as fractions."""
    strat = make_strategy("fat", ATTACK, StudentConfig(), total_epochs=120)
    taus = []
    for e in range(120):
        strat.begin_epoch(e)
        taus.append(strat.current_tau())
    assert taus == [0] * 50 + [1] * 40 + [2] * 30
    strat = make_strategy("fat", ATTACK, StudentConfig(), total_epochs=12)  # scaled to a shorter run
    assert [(strat.begin_epoch(e), strat.current_tau())[1] for e in range(12)] == [0] * 5 + [1] * 4 + [2] * 3
    fixed = make_strategy("fat", ATTACK, StudentConfig(fat={"tau": 3, "dynamic_tau": False}), total_epochs=120)
    fixed.begin_epoch(100)
    assert fixed.current_tau() == 3


def test_fat_adds_omega_noise_to_each_step(monkeypatch):
    import pipeline.strategies as base

    seen = {}
    real = base.pgd

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(base, "pgd", spy)
    make_strategy("fat", ATTACK, total_epochs=120).adversarial(build_model("smallcnn", 4), _batch(4))
    assert seen["noise_std"] == 0.001 and seen["tau"] == 0


def test_part_warmup_then_low_budget_scaled_to_eps():
    """train_eval_part.py: 20 warm-up epochs of 80 at full ε, then 7/255 of 8/255 on unimportant pixels."""
    attack = AttackConfig(eps=8 / 255, step_size=2 / 255, steps=2)
    torch.manual_seed(0)
    model = build_model("smallcnn", 4)
    strat = make_strategy("part", attack, StudentConfig(), total_epochs=80)
    b = _batch(4)
    strat.begin_epoch(19)
    assert strat.budget(model, b) == attack.eps
    strat.begin_epoch(20)
    budget = strat.budget(model, b)
    assert torch.allclose(torch.unique(budget), torch.tensor([7 / 255, 8 / 255]))
    wide = make_strategy("part", AttackConfig(eps=32 / 255, step_size=8 / 255, steps=2), StudentConfig(), 80)
    wide.begin_epoch(79)
    assert torch.allclose(torch.unique(wide.budget(model, b)), torch.tensor([28 / 255, 32 / 255]))


def test_part_top_fraction_budget_takes_two_values_and_follows_its_image():
    torch.manual_seed(0)
    model = build_model("smallcnn", 4)
    x = _batch(6).x
    cam = grad_cam(model, x)
    assert cam.shape == (6, 1, 16, 16) and float(cam.min()) >= 0 and float(cam.max()) <= 1
    budget = top_fraction_budget(cam, 8 / 255, 7 / 255, 0.5)
    assert torch.allclose(torch.unique(budget), torch.tensor([7 / 255, 8 / 255]))
    assert int((budget == 8 / 255).flatten(1).sum(1).unique()) == 128  # exactly half of each 16x16 map
    # alignment: the map of a sample does not depend on which batch or position it comes in
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    cam_perm = grad_cam(model, x[perm])
    assert torch.allclose(cam_perm, cam[perm], atol=1e-5)
    assert torch.allclose(grad_cam(model, x[2:3]), cam[2:3], atol=1e-5)


def test_part_zscore_rule_on_a_hand_computed_cam():
    """PART utils.py: jet(CAM²), standardised per image over its 12 elements, full ε where z > 1, per channel.

    CAM [[1, 0], [0, 0]]: jet(1) = (0.5, 0, 0), jet(0) = (0, 0, 0.5). Red holds 0.5 at the hot pixel, blue 0.5 at
    the three cold ones, the other 8 elements 0: mean 1/6, std 1/(3·√2), so z = √2 for 0.5 and -√2/2 for 0.
    """
    cam = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]) * 3.0  # any scale: the CAM is first scaled to [0, 1]
    z = part_zscores(cam, (2, 2))
    hi, lo = 2 ** 0.5, -(2 ** 0.5) / 2
    want = torch.tensor([[[hi, lo], [lo, lo]], [[lo, lo], [lo, lo]], [[lo, hi], [hi, hi]]])
    assert z.shape == (1, 3, 2, 2)
    assert torch.allclose(z[0], want, atol=1e-5)
    budget = zscore_budget(z, 8 / 255, 7 / 255)
    full = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 1], [1, 1]]], dtype=torch.bool)
    assert torch.equal(budget[0] == 8 / 255, full)
    assert torch.equal(budget[0] == 7 / 255, ~full)


def test_part_zscores_match_matplotlib_jet_and_numpy_standardisation():
    import matplotlib
    import numpy as np

    g = torch.Generator().manual_seed(0)
    cam = torch.rand(3, 1, 5, 5, generator=g)
    z = part_zscores(cam, (5, 5)).numpy()
    for i in range(3):
        c = cam[i, 0].numpy().astype(np.float64)
        c = (c - c.min()) / (c.max() - c.min())
        rgb = matplotlib.colormaps["jet"](c ** 2)[:, :, :3]  # the reference's float call (256-entry table)
        want = ((rgb - rgb.mean()) / rgb.std()).transpose(2, 0, 1)
        assert np.allclose(z[i], want, atol=1e-4)


def test_part_default_rule_is_per_channel_and_top_fraction_stays_selectable():
    torch.manual_seed(0)
    model = build_model("smallcnn", 4)
    b = _batch(6)
    eps = ATTACK.eps
    z_rule = make_strategy("part", ATTACK, StudentConfig(part={"warmup_fraction": 0}), total_epochs=4)
    assert z_rule.params.rule == "zscore"
    budget = z_rule.budget(model, b)
    assert budget.shape == (6, 3, 16, 16) and bool(budget.max() <= torch.tensor(eps))  # eps as float32
    assert torch.allclose(torch.unique(budget), torch.tensor([7 / 8 * eps, eps]))
    z = part_zscores(raw_cam(model, b.x), (16, 16))
    assert torch.equal(budget == eps, z > 1)
    assert bool((budget[:, 0] != budget[:, 2]).any())  # channels of one pixel differ
    top = make_strategy("part", ATTACK, StudentConfig(part={"warmup_fraction": 0, "rule": "top_fraction"}), 4)
    assert top.budget(model, b).shape == (6, 1, 16, 16)
    with pytest.raises(ConfigError, match="train.part.rule"):
        make_strategy("part", ATTACK, StudentConfig(part={"rule": "top_half"}), 4)


def test_joint_crop_flip_moves_mask_with_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 12, 12, generator=g)
    mask = x > 0.7  # the mask is a function of the pixel values ...
    xa, ma = crop_flip(x, mask, 3, torch.Generator().manual_seed(1))
    assert xa.shape == x.shape and ma.shape == mask.shape and ma.dtype == torch.bool
    assert torch.equal(ma, xa > 0.7)  # ... so it must still be after the same transform (padding -> 0)
    assert not torch.equal(xa, x)
    xb, _ = crop_flip(x, None, 3, torch.Generator().manual_seed(1))
    assert torch.equal(xa, xb)


def test_trades_makes_three_train_mode_passes_and_batch_norm_sees_the_clean_batch_twice(monkeypatch):
    """trades.py: model(x_natural) for the CE term, then model(x_adv) and model(x_natural) for the KL term."""
    from pipeline.strategies.trades import Trades

    torch.manual_seed(0)
    model = build_model("resnet18", 4).train()
    b = _batch(8)
    fixed = (b.x + 0.05).clamp(0, 1)
    monkeypatch.setattr(Trades, "adversarial", lambda self, model, batch, **kw: fixed)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()) if m.training else None)
    make_strategy("trades", ATTACK, StudentConfig()).loss(model, b)
    assert len(seen) == 3 and torch.equal(seen[0], seen[2]) and not torch.equal(seen[0], seen[1])
    assert int(bn.num_batches_tracked) == 3


def test_part_random_start_spans_the_full_eps_after_the_warm_up(monkeypatch):
    """craft_ae.py part_pgd: X + U(-ε, ε) whatever the per-element budget, projected only by the first step."""
    import pipeline.attacks as attacks

    torch.manual_seed(0)
    model = build_model("smallcnn", 4)
    b = _batch(16)
    x = torch.full_like(b.x, 0.5)  # away from [0, 1]'s ends: the start is not clipped there anyway
    batch = Batch(x, b.y, b.index, None)
    starts = []
    real_project = attacks.project

    def spy(delta, x, eps, mask=None):
        starts.append(delta.detach().clone())
        return real_project(delta, x, eps, mask)

    monkeypatch.setattr(attacks, "project", spy)
    strat = make_strategy("part", ATTACK, StudentConfig(part={"warmup_fraction": 0}), total_epochs=4)
    budget = strat.budget(model, batch)
    assert bool((budget < ATTACK.eps - 1e-6).any())  # some elements have the low budget
    strat.adversarial(model, batch, steps=1)
    assert len(starts) == 1  # projected once, by the step: the start is taken as drawn
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    strat.adversarial(model, batch, steps=1)
    delta0 = seen[-1] - x
    low = budget < ATTACK.eps - 1e-6
    assert float(delta0.abs().max()) <= ATTACK.eps + 1e-6
    assert float(delta0[low].abs().max()) > strat.eps_low + 1e-4  # beyond the low budget: drawn over the full ε


def test_part_constant_or_nonfinite_cam_gives_no_element_the_full_eps(caplog):
    """The reference scales each CAM by (max − min): a constant map is NaN and no element exceeds z = 1."""
    flat = torch.zeros(2, 1, 4, 4)
    flat[1] = 3.0
    nan = torch.full((1, 1, 4, 4), float("nan"))
    z = part_zscores(torch.cat([flat, nan]), (8, 8))
    assert z.shape == (3, 3, 8, 8) and not bool((z > 1).any())
    # resnet18_tv at 32 px: layer4 is 1×1, every map constant; no element at the full ε, one warning per run
    torch.manual_seed(0)
    model = build_model("resnet18_tv", 4)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=g)
    batch = Batch(x, torch.tensor([0, 1, 2, 3]), torch.arange(4), None)
    assert raw_cam(model, x).shape[-2:] == (1, 1)
    strat = make_strategy("part", ATTACK, StudentConfig(part={"warmup_fraction": 0}), total_epochs=4)
    with caplog.at_level("WARNING"):
        b1 = strat.budget(model, batch)
        strat.budget(model, batch)
    assert torch.allclose(b1, torch.full_like(b1, strat.eps_low))
    warnings = [r for r in caplog.records if "1x1" in r.getMessage()]
    assert len(warnings) == 1 and "resnet18_tv's" in warnings[0].getMessage() and "32x32" in warnings[0].getMessage()
