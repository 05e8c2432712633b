"""`part`: pixel-reweighted AT (Zhang et al. 2024): a full budget on important pixels, a lower one elsewhere.

Importance is Grad-CAM of the model being trained (its last convolutional block, predicted class), computed
on the very batch being attacked, so each map belongs to its own image whatever the shuffling or augmentation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.attacks import pgd
from pipeline.strategies import STRATEGIES, Batch, Strategy


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


@STRATEGIES.register("part")
class PART(Strategy):
    name = "part"

    def loss(self, model, batch: Batch):
        a, p = self.attack, self.params.part
        if self.epoch < p.burn_in:
            eps = a.eps  # burn-in: plain PGD-AT
        else:
            eps = part_budget(grad_cam(model, batch.x), a.eps, p.eps_low, p.important_fraction)
        x_adv = pgd(model, batch.x, batch.y, eps=eps, step_size=a.step_size, steps=a.steps,
                    init="uniform" if a.random_start else "none")
        return F.cross_entropy(model(x_adv), batch.y)
