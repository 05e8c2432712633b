"""`part`: pixel-reweighted AT (Zhang et al. 2024): a full budget on important pixels, a lower one elsewhere.

Importance is Grad-CAM of the model being trained (its last convolutional block, predicted class), computed
on the very batch being attacked, so each map belongs to its own image whatever the shuffling or augmentation.
Budgets follow the protocol's ε: the low budget is a fraction of ε and the warm-up (plain PGD-AT at ε) a
fraction of the epochs, as in the reference (JiachengZ01/PART, `train_eval_part.py`: ε 8/255, low ε 7/255,
20 warm-up epochs of 80).

Two rules pick the important elements (`train.part.rule`):
- `zscore` (default), as PART's `utils.py` (`craft_weight_matrix`, `process_overlay`, `generate_weighted_eps`):
  the CAM scaled to [0, 1], resized bicubically to the image, squared, mapped through matplotlib's `jet`
  colour map, standardised per image over its three colour channels together; the full ε goes to each
  element (pixel and channel) whose z-score is above 1.
- `top_fraction`: the full ε on the top `important_fraction` of pixels by CAM, the same in every channel.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.core.config import Fraction, Share
from pipeline.strategies import Batch, StrategyParams
from pipeline.strategies.madry import Madry

log = logging.getLogger(__name__)

Z_THRESHOLD = 1.0  # PART utils.py generate_weighted_eps: full ε where the standardised map exceeds 1


class PartParams(StrategyParams):
    low_eps_fraction: Fraction = 7 / 8  # train_eval_part.py: --low-epsilon 7/255 of --epsilon 8/255
    warmup_fraction: Share = 1 / 4  # train_eval_part.py: --warm-up 20 of --epochs 80
    rule: Literal["zscore", "top_fraction"] = "zscore"  # zscore: PART utils.py; top_fraction: see module doc
    important_fraction: float = Field(0.5, gt=0.0, le=1.0)  # top_fraction only: share of each CAM at full ε

    def warmup_epochs(self, epochs: int) -> int:
        return int(round(self.warmup_fraction * epochs))


def _unit(cam: torch.Tensor) -> torch.Tensor:
    """Scale each map of B×1×h×w to [0, 1] (a constant map becomes 0)."""
    flat = cam.flatten(1)
    lo, hi = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(cam)


def raw_cam(model, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM for the predicted class at the CAM layer's resolution, before any scaling: B×1×h×w, >= 0."""
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
    return F.relu((weights * act.detach()).sum(1, keepdim=True)).float()


def grad_cam(model, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM for the predicted class, upsampled to x's size and scaled to [0, 1] per image: B×1×H×W."""
    cam = F.interpolate(raw_cam(model, x), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return _unit(cam)


def _jet_table(device, dtype) -> torch.Tensor:
    import matplotlib

    # integer inputs index the colour map's 256-entry table directly: 256×3 RGB
    return torch.as_tensor(matplotlib.colormaps["jet"](range(256))[:, :3], dtype=dtype, device=device)


def _flat_maps(cam: torch.Tensor) -> torch.Tensor:
    """Per image of B×1×h×w: True where the map is constant or not finite. The reference scales each map by
    (max − min), which is 0 there: the map becomes NaN and no element of that image gets the full ε."""
    flat = cam.flatten(1)
    finite = torch.isfinite(flat).all(1)
    lo, hi = flat.nan_to_num().min(1)[0], flat.nan_to_num().max(1)[0]
    return ~finite | (hi <= lo)


def part_zscores(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PART's importance map B×3×H×W from a CAM B×1×h×w (any scale): z-scores of jet((CAM resized)²).

    As PART's utils.py: the CAM scaled to [0, 1] (torchcam's normalisation), resized to `size` bicubically
    (torch's kernel, a = -0.75; the reference resizes with PIL, a = -0.5), squared, coloured with matplotlib's
    256-entry jet (floor(v·256), clipped to the table's ends, as matplotlib does), standardised per image over
    all its elements (population std). A constant or non-finite map (every map of a 1×1 CAM layer) gets z = 0
    everywhere, so none of its elements is important, as in the reference.
    """
    flat_maps = _flat_maps(cam.float())
    cam = _unit(cam.float().nan_to_num())
    if tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam, size=size, mode="bicubic", align_corners=False)
    v = cam.squeeze(1) ** 2
    idx = (v * 256).floor().clamp(0, 255).long()
    rgb = _jet_table(cam.device, cam.dtype)[idx].permute(0, 3, 1, 2)  # B×3×H×W
    flat = rgb.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, keepdim=True, unbiased=False)
    z = (flat - mean) / std.clamp_min(1e-12)
    return z.masked_fill(flat_maps.view(-1, 1), 0.0).view_as(rgb)


def zscore_budget(z: torch.Tensor, eps: float, eps_low: float) -> torch.Tensor:
    """Per-element budget, z's shape: `eps` where the z-score exceeds 1, `eps_low` elsewhere."""
    return torch.where(z > Z_THRESHOLD, torch.full_like(z, eps), torch.full_like(z, eps_low))


def top_fraction_budget(cam: torch.Tensor, eps: float, eps_low: float, important_fraction: float) -> torch.Tensor:
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

    _warned_1x1 = False

    @property
    def eps_low(self) -> float:
        return self.params.low_eps_fraction * self.attack.eps

    def attack_options(self) -> dict:
        # after the warm-up (torchattacks' PGD, start clipped as ours), the reference's part_pgd draws its random
        # start over the full ε, not each element's own budget, and does not clip it to [0, 1]
        options = super().attack_options()
        if options.get("init") == "uniform" and not self.in_warmup():
            options["start_eps"] = self.attack.eps
        return options

    def in_warmup(self) -> bool:
        return self.epoch < self.params.warmup_epochs(self.total_epochs)

    def budget(self, model, batch: Batch):
        if self.in_warmup():
            return self.attack.eps  # warm-up: plain PGD-AT
        p = self.params
        if p.rule == "top_fraction":
            return top_fraction_budget(grad_cam(model, batch.x), self.attack.eps, self.eps_low, p.important_fraction)
        if batch.x.shape[1] != 3:
            raise ValueError(f"train.part.rule: zscore colours the CAM in 3 channels; the images have "
                             f"{batch.x.shape[1]} (use rule: top_fraction)")
        cam = raw_cam(model, batch.x)
        if cam.shape[-2:] == (1, 1) and not self._warned_1x1:
            self._warned_1x1 = True
            net = getattr(model, "module", model)
            log.warning("PART: %s's Grad-CAM layer is 1x1 at %dx%d px, so every map is constant and no element "
                        "gets the full ε (as the reference code); use larger images or rule: top_fraction",
                        getattr(net, "arch", "") or type(net).__name__, batch.x.shape[-2], batch.x.shape[-1])
        z = part_zscores(cam, tuple(batch.x.shape[-2:]))
        return zscore_budget(z, self.attack.eps, self.eps_low).to(batch.x.dtype)

    def stats(self):
        return {"eps_low": self.attack.eps if self.in_warmup() else self.eps_low}
