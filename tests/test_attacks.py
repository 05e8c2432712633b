import pytest
import torch
import torch.nn as nn

from pipeline.attacks import pgd, project
from pipeline.models import build_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("smallcnn", 4)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=g)
    x[0] = 0.0  # corners of the box: the [0, 1] clamp must bind
    x[1] = 1.0
    return x, torch.randint(0, 4, (8,), generator=g)


@pytest.mark.parametrize("eps", [4 / 255, 32 / 255])
def test_pgd_stays_in_the_ball_and_the_box(model, batch, eps):
    x, y = batch
    x_adv = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=5)
    d = x_adv - x
    assert float(d.abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(d.abs().max()) > eps / 2  # it did move


def test_pgd_increases_the_loss(model, batch):
    x, y = batch
    model.eval()
    ce = nn.CrossEntropyLoss()
    x_adv = pgd(model, x, y, eps=16 / 255, step_size=4 / 255, steps=10, init="none")
    with torch.no_grad():
        assert ce(model(x_adv), y) > ce(model(x), y)


def test_mask_keeps_salient_elements_exactly(model, batch):
    x, y = batch
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.4
    x_adv = pgd(model, x, y, eps=32 / 255, step_size=8 / 255, steps=7, mask=mask)
    assert torch.equal(x_adv[mask], x[mask])  # bit-exact, not approximately
    assert float((x_adv - x)[~mask].abs().max()) > 0


def test_mask_shape_is_checked(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="mask shape"):
        pgd(model, x, y, eps=0.1, step_size=0.1, steps=1, mask=torch.zeros(8, 1, 16, 16, dtype=torch.bool))


def test_per_element_budget(model, batch):
    x, y = batch
    eps = torch.full((8, 1, 16, 16), 2 / 255)
    eps[:, :, :8] = 16 / 255
    x_adv = pgd(model, x, y, eps=eps, step_size=4 / 255, steps=5)
    d = (x_adv - x).abs()
    assert float(d[:, :, 8:].max()) <= 2 / 255 + 1e-6
    assert float(d[:, :, :8].max()) > 2 / 255


def test_training_mode_is_restored_and_weights_get_no_grad(model, batch):
    x, y = batch
    model.train()
    pgd(model, x, y, eps=0.1, step_size=0.05, steps=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_fat_early_stop_tau(batch):
    x, y = batch

    class Const(nn.Module):
        """Predicts class 0 always: examples with y != 0 are misclassified from the start."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, inp):
            out = torch.zeros(inp.shape[0], 4)
            out[:, 0] = 1.0
            return out + self.w * 0 + inp.flatten(1).sum(1, keepdim=True) * 1e-3

    y = torch.tensor([0, 1, 0, 2, 0, 3, 0, 1])
    wrong = y != 0
    for tau in (0, 2):
        x_adv = pgd(Const(), x, y, eps=0.5, step_size=0.01, steps=6, init="none", tau=tau)
        moved = (x_adv - x).flatten(1).abs().amax(1)
        if tau == 0:
            assert torch.all(moved[wrong] == 0)  # stopped before any step
        else:  # exactly tau steps of 0.01 after the (immediate) misclassification
            interior = (x > 0.05) & (x < 0.95)
            d = (x_adv - x).abs()
            for i in torch.nonzero(wrong).flatten():
                assert torch.allclose(d[i][interior[i]], torch.full_like(d[i][interior[i]], 0.02), atol=1e-6)
        assert torch.all(moved[~wrong] > 0)  # correctly classified ones keep moving


def test_project_zeroes_masked_delta():
    x = torch.full((1, 1, 2, 2), 0.5)
    delta = torch.tensor([[[[0.3, -0.3], [0.01, 0.6]]]])
    mask = torch.tensor([[[[True, False], [False, False]]]])
    out = project(delta, x, 0.1, mask)
    assert torch.allclose(out, torch.tensor([[[[0.0, -0.1], [0.01, 0.1]]]]))
