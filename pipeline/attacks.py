"""L-inf PGD, written once for every training strategy.

This file is where the salience mask enters the attack: `project` zeroes the perturbation on salient
elements (δ' = δ·(1−M), eq. 9 of the paper) at the random start and after every step, so an adversarial input
built with a mask equals the clean input exactly wherever M = 1. Evaluation never passes a mask.

The same routine serves the baselines: a per-element budget tensor (PART), a custom loss (TRADES' KL term)
and early stopping τ steps after misclassification (FAT).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

Budget = float | torch.Tensor
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def project(delta: torch.Tensor, x: torch.Tensor, eps: Budget, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project δ onto the ε-ball, keep x+δ in [0, 1], and zero δ on salient elements (mask == True)."""
    if isinstance(eps, torch.Tensor):
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        delta = delta.clamp(-eps, eps)
    delta = (x + delta).clamp_(0.0, 1.0) - x
    if mask is not None:
        delta = delta.masked_fill(mask, 0.0)
    return delta


def _ce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: Budget, step_size: Budget, steps: int,
        mask: Optional[torch.Tensor] = None, init: Literal["uniform", "normal", "none"] = "uniform",
        init_std: float = 0.001, start_eps: Optional[float] = None, loss_fn: Optional[LossFn] = None,
        tau: Optional[int] = None, noise_std: float = 0.0,
        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Return x + δ maximising `loss_fn(model(x + δ), y)` with sign-gradient steps (Madry et al.).

    eps, step_size: floats, or tensors broadcastable to x (per-element budgets).
    mask: bool tensor shaped like x; True marks salient elements that must stay unperturbed.
    init: uniform in the ε-ball (Madry), N(0, init_std²) (TRADES), or none.
    start_eps: with init uniform, draw the start in the ball of this scalar budget and take it as drawn (neither
        clipped to `eps` nor to [0, 1]; the mask still applies) until the first step projects it, as PART's
        reference `part_pgd` (`craft_ae.py`) starts over the full ε whatever the per-element budget.
    tau: if set, an example stops moving once it has been misclassified at tau further steps (FAT).
    noise_std: N(0, noise_std²) added to every step of the examples still moving, before the projection
        (FAT's ω, `earlystop.py`), to escape flat regions.
    The model is put in eval mode while attacking (batch-norm statistics see only clean training batches)
    and restored afterwards. Gradients flow only to δ, never to the weights. Under an enclosing
    `torch.autocast` the forward passes run in reduced precision while δ, the projection and the mask stay fp32.
    """
    if mask is not None and mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match input shape {tuple(x.shape)}")
    loss_fn = loss_fn or _ce_sum
    model = getattr(model, "module", model)  # attack the bare network, not a DistributedDataParallel wrapper
    was_training = model.training
    model.eval()
    x = x.detach()
    if init == "uniform":
        noise = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        delta = (noise * 2 - 1) * (eps if start_eps is None else start_eps)
    elif init == "normal":
        delta = init_std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    elif init == "none":
        delta = torch.zeros_like(x)
    else:
        raise ValueError(f"unknown init {init!r}")
    if init == "uniform" and start_eps is not None:
        delta = delta if mask is None else delta.masked_fill(mask, 0.0)
    else:
        delta = project(delta, x, eps, mask)

    active = budget = None
    if tau is not None:
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        budget = torch.full((x.shape[0],), int(tau), dtype=torch.long, device=x.device)
    try:
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            loss = loss_fn(logits.float(), y)
            if tau is not None:
                wrong = logits.detach().argmax(1) != y
                active &= ~(wrong & (budget <= 0))  # spent: freeze this example for good
                budget -= (wrong & active).long()
                if not bool(active.any()):
                    delta = delta.detach()
                    break
            (grad,) = torch.autograd.grad(loss, delta)
            step = step_size * grad.sign()
            if noise_std > 0:
                step = step + noise_std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            if active is not None:
                step = step * active.view(-1, *([1] * (x.dim() - 1)))
            delta = project(delta.detach() + step, x, eps, mask)
    finally:
        model.train(was_training)
    return (x + delta).detach()
