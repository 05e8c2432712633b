"""`part`: pixel-reweighted AT (Zhang et al. 2024): a full budget on important pixels, a lower one elsewhere.

Importance is Grad-CAM of the model being trained (its last convolutional block, predicted class), computed
on the very batch being attacked, so each map belongs to its own image whatever the shuffling or augmentation.
Budgets follow the protocol's ε: the low budget is a fraction of ε and the warm-up (plain PGD-AT at ε) a
fraction of the epochs, as in the reference (JiachengZ01/PART, `train_eval_part.py`: ε 8/255, low ε 7/255,
20 warm-up epochs of 80).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.core.config import Fraction, Share
from pipeline.strategies import Batch, StrategyParams
from pipeline.strategies.madry import Madry


class PartParams(StrategyParams):
    low_eps_fraction: Fraction = 7 / 8  # train_eval_part.py: --low-epsilon 7/255 of --epsilon 8/255
    warmup_fraction: Share = 1 / 4  # train_eval_part.py: --warm-up 20 of --epochs 80
    important_fraction: float = Field(0.5, gt=0.0, le=1.0)  # share of each CAM that gets the full ε

    def warmup_epochs(self, epochs: int) -> int:
        return int(round(self.warmup_fraction * epochs))


def grad_cam(model, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM for the predicted class, upsampled to x's size and scaled to [0, 1] per image: B×1×H×W."""
    model = getattr(model, "module", model)  # the bare network under DistributedDataParallel
    layer = model.cam_module()
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x.detach())
            act = store["act"]
            score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act.detach()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    flat = cam.flatten(1)
    lo, hi = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(cam)


def part_budget(cam: torch.Tensor, eps: float, eps_low: float, important_fraction: float) -> torch.Tensor:
    """Per-pixel budget B×1×H×W: `eps` on the top `important_fraction` of each CAM, `eps_low` elsewhere."""
    flat = cam.flatten(1)
    k = max(1, int(round(important_fraction * flat.shape[1])))
    # rank pixels within each image; ties broken by position so exactly k pixels are important
    order = flat.argsort(dim=1, descending=True, stable=True)
    important = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order[:, :k], True)
    budget = torch.where(important, torch.full_like(flat, eps), torch.full_like(flat, eps_low))
    return budget.view_as(cam)


class PART(Madry, name="part"):
    Params = PartParams

    @property
    def eps_low(self) -> float:
        return self.params.low_eps_fraction * self.attack.eps

    def in_warmup(self) -> bool:
        return self.epoch < self.params.warmup_epochs(self.total_epochs)

    def budget(self, model, batch: Batch):
        if self.in_warmup():
            return self.attack.eps  # warm-up: plain PGD-AT
        p = self.params
        return part_budget(grad_cam(model, batch.x), self.attack.eps, self.eps_low, p.important_fraction)

    def stats(self):
        return {"eps_low": self.attack.eps if self.in_warmup() else self.eps_low}
