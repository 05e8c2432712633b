import numpy as np
import pytest
import torch
import torch.nn as nn

import pipeline.evaluation as ev
from pipeline.evaluation import eps_key, evaluate_model


class MeanThreshold(nn.Module):
    """Class 0 when the image mean exceeds 0.5, else class 1."""

    def forward(self, x):
        s = 20 * (x.flatten(1).mean(1) - 0.5)
        return torch.stack([s, -s], 1)


class FakeAutoAttack:
    """Stands in for AutoAttack: per attack, shifts chosen points (by row id in pixel [0,0,0]) by `shift`."""

    def __init__(self, plan, calls):
        self.plan, self.calls = plan, calls
        self.attacks_to_run = []

    def run_standard_evaluation(self, x, y, batch_size):
        (name,) = self.attacks_to_run
        ids = [int(round(float(v) * 100)) for v in x[:, 0, 0, 0]]
        self.calls.append((name, ids))
        out = x.clone()
        for r, pid in enumerate(ids):
            if pid in self.plan.get(name, {}):
                out[r, :, 1:, :] -= self.plan[name][pid]  # leave the id pixel untouched
        return out, None


def _points(n):
    x = torch.full((n, 1, 4, 4), 0.56)
    for i in range(n):
        x[i, 0, 0, 0] = i / 100
    return x


def test_worst_case_accounting_per_point(monkeypatch):
    x = _points(6)
    x[0, :, 1:, :] = 0.2  # point 0 is misclassified before any attack
    y = torch.zeros(6, dtype=torch.long)
    plan = {"apgd-ce": {1: 0.25, 3: 0.4},  # point 3: a "success" outside the 0.3 ball -> must be rejected
            "apgd-t": {2: 0.25}, "fab-t": {5: 0.3}, "square": {}}
    calls = []
    monkeypatch.setattr(ev, "_make_autoattack", lambda *a, **k: FakeAutoAttack(plan, calls))
    res = evaluate_model(MeanThreshold(), x, y, [0.3], n_classes=10, device=torch.device("cpu"))
    assert res["clean_acc"] == pytest.approx(5 / 6)
    assert res["robust_acc"][eps_key(0.3)] == pytest.approx(2 / 6)  # points 3 and 4 survive
    info = res["attacks"][eps_key(0.3)]
    assert info["broken_by"] == {"apgd-ce": 1, "apgd-t": 1, "fab-t": 1, "square": 0}
    assert info["rejected"] == 1
    # each attack only sees points that are still robust; point 0 is never attacked
    assert calls == [("apgd-ce", [1, 2, 3, 4, 5]), ("apgd-t", [2, 3, 4, 5]), ("fab-t", [3, 4, 5]),
                     ("square", [3, 4])]


def test_ladder_carries_broken_points_forward(monkeypatch):
    x = _points(4)
    y = torch.zeros(4, dtype=torch.long)
    calls = []
    plan = {"apgd-ce": {1: 0.2}}
    monkeypatch.setattr(ev, "_make_autoattack", lambda *a, **k: FakeAutoAttack(plan, calls))
    indep = evaluate_model(MeanThreshold(), x, y, [0.2, 0.1], n_classes=10, device=torch.device("cpu"))
    # at 0.1 the 0.2 shift is rejected: independent runs say point 1 is robust there
    assert indep["robust_acc"] == {eps_key(0.1): 1.0, eps_key(0.2): 0.75}
    calls.clear()
    ladder = evaluate_model(MeanThreshold(), x, y, [0.1, 0.2], n_classes=10, device=torch.device("cpu"),
                            ladder=True)
    assert ladder["robust_acc"] == indep["robust_acc"]
    assert ladder["attacks"][eps_key(0.2)]["attacked"] == 4 - 0


def test_ladder_skips_points_broken_at_a_smaller_budget(monkeypatch):
    x = _points(4)
    y = torch.zeros(4, dtype=torch.long)
    calls = []
    monkeypatch.setattr(ev, "_make_autoattack", lambda *a, **k: FakeAutoAttack({"apgd-ce": {2: 0.1}}, calls))
    res = evaluate_model(MeanThreshold(), x, y, [0.1, 0.2], n_classes=10, device=torch.device("cpu"), ladder=True)
    assert res["robust_acc"] == {eps_key(0.1): 0.75, eps_key(0.2): 0.75}
    second = [ids for name, ids in calls if name == "apgd-ce"][1]
    assert 2 not in second and res["attacks"][eps_key(0.2)]["attacked"] == 3


def test_real_autoattack_on_a_tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(12, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correctly classified
    res = evaluate_model(model, x, y, [1 / 255, 64 / 255], n_classes=4, device=torch.device("cpu"))
    r = res["robust_acc"]
    assert res["clean_acc"] == 1.0
    assert r[eps_key(64 / 255)] <= r[eps_key(1 / 255)] <= 1.0
    assert r[eps_key(64 / 255)] < 0.5  # a linear model cannot withstand a quarter of the range
    assert sum(res["attacks"][eps_key(64 / 255)]["broken_by"].values()) == round(12 * (1 - r[eps_key(64 / 255)]))


def test_select_examples_is_seeded():
    class D:
        def __len__(self):
            return 100

    a = ev.select_examples(D(), 10, seed=0)
    assert np.array_equal(a, ev.select_examples(D(), 10, seed=0)) and len(set(a)) == 10
    assert len(ev.select_examples(D(), None, seed=0)) == 100


def test_attack_model_is_a_frozen_fused_copy_with_the_same_outputs_and_input_gradients():
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model("smallcnn", 10)
    model.train()(torch.rand(32, 3, 16, 16))  # batch-norm statistics that are not the identity
    model.eval()
    prepared = ev.attack_model(model, torch.device("cpu"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())  # folded into the convolutions
    assert not any(p.requires_grad for p in prepared.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the caller's model is left as it was
    x = torch.rand(8, 3, 16, 16, requires_grad=True)
    out = model(x)
    (grad,) = torch.autograd.grad(out[:, 3].sum(), [x])
    x2 = x.detach().clone().requires_grad_()
    out2 = prepared(x2)
    out2[:, 3].sum().backward()  # as FAB does: no parameter receives a gradient
    torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x2.grad, grad, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in list(model.parameters()) + list(prepared.parameters()))
