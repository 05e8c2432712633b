import pytest
import torch
import torch.nn.functional as F

from pipeline.core.config import AttackConfig, StudentConfig
from pipeline.models import build_model
from pipeline.strategies import STRATEGIES, Batch, make_strategy
from pipeline.strategies.part import grad_cam, part_budget
from pipeline.strategies.trades import trades_kl
from pipeline.training.augment import crop_flip

ATTACK = AttackConfig(eps=16 / 255, step_size=4 / 255, steps=3)


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    mask = torch.rand(x.shape, generator=g) < 0.5
    return Batch(x, y, torch.arange(n), mask)


def test_all_seven_strategies_are_registered():
    assert set(STRATEGIES.names()) >= {"basic", "madry", "trades", "fat", "part", "sip_s", "sip_h"}
    assert STRATEGIES.get("sip_s").mask_kind == "synthetic"
    assert STRATEGIES.get("sip_h").mask_kind == "human"
    assert STRATEGIES.get("madry").mask_kind is None


@pytest.mark.parametrize("name", ["basic", "madry", "trades", "fat", "part", "sip_s", "sip_h"])
def test_each_strategy_decreases_its_loss_on_a_tiny_batch(name):
    torch.manual_seed(0)
    model = build_model("smallcnn", 4)
    params = StudentConfig(part={"burn_in": 0}, fat={"tau": 1, "dynamic_tau": False})
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


def test_sip_attack_leaves_salient_elements_untouched(monkeypatch):
    import pipeline.strategies.madry as madry_mod

    seen = {}
    real_pgd = madry_mod.pgd

    def spy(*a, **k):
        out = real_pgd(*a, **k)
        seen["x_adv"], seen["mask"] = out, k["mask"]
        return out

    monkeypatch.setattr(madry_mod, "pgd", spy)
    model = build_model("smallcnn", 4)
    b = _batch()
    make_strategy("sip_h", ATTACK).loss(model, b)
    assert seen["mask"] is b.mask
    assert torch.equal(seen["x_adv"][b.mask], b.x[b.mask])
    assert (seen["x_adv"] != b.x)[~b.mask].float().mean() > 0.5
    with pytest.raises(RuntimeError, match="needs masks"):
        make_strategy("sip_s", ATTACK).loss(model, Batch(b.x, b.y, b.index, None))


def test_trades_kl_matches_a_hand_computation():
    la = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    lc = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    pa, pc = F.softmax(la, 1), F.softmax(lc, 1)
    by_hand = (pc * (pc.log() - pa.log())).sum(1).mean()
    assert torch.allclose(trades_kl(la, lc), by_hand)


def test_trades_loss_is_ce_plus_beta_kl(monkeypatch):
    import pipeline.strategies.trades as tr

    torch.manual_seed(0)
    model = build_model("smallcnn", 4).train()
    b = _batch(8)
    fixed = (b.x + 0.01).clamp(0, 1)
    monkeypatch.setattr(tr, "pgd", lambda *a, **k: fixed)
    for beta in (0.0, 6.0):
        strat = make_strategy("trades", ATTACK, StudentConfig(trades={"beta": beta}))
        got = strat.loss(model, b)
        lc, la = model(b.x), model(fixed)
        want = F.cross_entropy(lc, b.y) + beta * trades_kl(la, lc)
        assert torch.allclose(got, want, atol=1e-6)


def test_fat_dynamic_tau_schedule():
    strat = make_strategy("fat", ATTACK, StudentConfig(fat={"tau": 0, "dynamic_tau": True,
                                                              "tau_milestones": [2, 4]}))
    taus = []
    for e in range(6):
        strat.begin_epoch(e)
        taus.append(strat.current_tau())
    assert taus == [0, 0, 1, 1, 2, 2]


def test_part_budget_takes_two_values_and_follows_its_image():
    torch.manual_seed(0)
    model = build_model("smallcnn", 4)
    x = _batch(6).x
    cam = grad_cam(model, x)
    assert cam.shape == (6, 1, 16, 16) and float(cam.min()) >= 0 and float(cam.max()) <= 1
    budget = part_budget(cam, 8 / 255, 7 / 255, 0.5)
    assert torch.allclose(torch.unique(budget), torch.tensor([7 / 255, 8 / 255]))
    assert int((budget == 8 / 255).flatten(1).sum(1).unique()) == 128  # exactly half of each 16x16 map
    # alignment: the map of a sample does not depend on which batch or position it comes in
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    cam_perm = grad_cam(model, x[perm])
    assert torch.allclose(cam_perm, cam[perm], atol=1e-5)
    assert torch.allclose(grad_cam(model, x[2:3]), cam[2:3], atol=1e-5)


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
