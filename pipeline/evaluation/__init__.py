"""Clean accuracy and AutoAttack (standard, L-inf) robust accuracy at a list of budgets.

AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T, Square) is driven one attack at a time on the
points still robust, and every adversarial point it returns is re-checked here (inside the ε-ball, inside
[0, 1], misclassified) before the point counts as broken. So the robust accuracy is the project's own
worst case per point, with a per-attack breakdown. With `ladder=True`, budgets run in increasing order and a
point broken at a smaller ε is counted broken at every larger one (its adversarial example lies in every
larger ball) without attacking it again.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from pipeline.core.config import format_budget
from pipeline.data import ImageDataset

log = logging.getLogger(__name__)

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


def eps_key(eps: float) -> str:
    """Metric key for a budget: 8/255 -> 'eps_8_255' (safe in DVC metric paths)."""
    return "eps_" + format_budget(eps).replace("/", "_").replace(".", "p")


def select_examples(dataset: ImageDataset, n_examples: Optional[int], seed: int) -> np.ndarray:
    """The evaluated test indices: all, or a seeded random subset of n (sorted)."""
    n = len(dataset)
    if n_examples is None or n_examples >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=n_examples, replace=False))


def stack_examples(dataset: ImageDataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([dataset[int(i)][0] for i in indices])
    y = torch.as_tensor(np.asarray(dataset.labels)[indices], dtype=torch.long)
    return x, y


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    out = [model(xb.to(device)).argmax(1).cpu() for xb in torch.split(x, batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _make_autoattack(model: nn.Module, eps: float, n_classes: int, device: torch.device, seed: int):
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device, seed=seed)
    # Targeted attacks use up to 9 target classes; fewer exist on small label sets.
    aa.apgd_targeted.n_target_classes = max(1, min(9, n_classes - 1))
    aa.fab.n_target_classes = max(1, min(9, n_classes - 1))
    return aa


def autoattack_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, robust: torch.Tensor, eps: float, *,
                      n_classes: int, device: torch.device, batch_size: int, seed: int,
                      attacks: tuple[str, ...] = STANDARD_ATTACKS,
                      on_attack: Optional[Callable[[str, int, int], None]] = None) -> tuple[torch.Tensor, dict]:
    """Run the cascade on the points flagged `robust`; returns the updated flags and points broken per attack."""
    robust = robust.clone()
    if n_classes < 4 and "apgd-t" in attacks:
        # AutoAttack's targeted DLR loss needs at least four classes.
        log.warning("%d classes: skipping apgd-t (needs >= 4 classes)", n_classes)
        attacks = tuple(a for a in attacks if a != "apgd-t")
    aa = _make_autoattack(model, eps, n_classes, device, seed)
    broken_by: dict[str, int] = {}
    rejected = 0
    for name in attacks:
        idx = robust.nonzero().flatten()
        if len(idx) == 0:
            broken_by[name] = 0
            continue
        aa.attacks_to_run = [name]
        xs, ys = x[idx], y[idx]
        x_adv, _ = aa.run_standard_evaluation(xs, ys, batch_size=batch_size)
        x_adv = x_adv.detach().cpu()
        pred = predict(model, x_adv, batch_size, device)
        linf = (x_adv - xs).flatten(1).abs().amax(1)
        valid = (linf <= eps + 1e-5) & (x_adv.flatten(1).amin(1) >= 0) & (x_adv.flatten(1).amax(1) <= 1)
        fooled = (pred != ys) & valid
        rejected += int(((pred != ys) & ~valid).sum())
        robust[idx[fooled]] = False
        broken_by[name] = int(fooled.sum())
        if on_attack is not None:
            on_attack(name, int(fooled.sum()), len(idx))
    if rejected:
        log.warning("eps=%s: %d adversarial points outside the threat model were ignored", format_budget(eps),
                    rejected)
    return robust, {"broken_by": broken_by, "rejected": rejected}


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: list[float], *, n_classes: int,
                   device: torch.device, batch_size: int = 500, seed: int = 0, ladder: bool = False,
                   done: Optional[dict[str, Any]] = None,
                   on_eps_done: Optional[Callable[[str, dict], None]] = None) -> dict[str, Any]:
    """Clean and robust accuracy at every ε; `done` holds per-ε results of an interrupted run to reuse."""
    model = model.to(device).eval()
    n = len(y)
    clean = predict(model, x, batch_size, device) == y
    result: dict[str, Any] = {"n_examples": n, "clean_acc": float(clean.float().mean()) if n else 0.0,
                              "robust_acc": {}, "attacks": {}}
    done = done or {}
    still = clean.clone()
    for eps in sorted(eps_list):
        key = eps_key(eps)
        if key in done:
            entry = done[key]
            still = torch.as_tensor(entry["robust_flags"], dtype=torch.bool)
        else:
            t0 = time.perf_counter()
            start = still if ladder else clean
            log.info("AutoAttack eps=%s on %d/%d points", format_budget(eps), int(start.sum()), n)
            flags, info = autoattack_robust(
                model, x, y, start, eps, n_classes=n_classes, device=device, batch_size=batch_size, seed=seed,
                on_attack=lambda a, k, m: log.info("  %s broke %d of %d", a, k, m))
            entry = {"eps": eps, "robust_acc": float(flags.float().mean()) if n else 0.0, **info,
                     "attacked": int(start.sum()), "seconds": round(time.perf_counter() - t0, 3),
                     "robust_flags": flags.tolist()}
            still = flags
            if on_eps_done is not None:
                on_eps_done(key, entry)
        result["robust_acc"][key] = entry["robust_acc"]
        result["attacks"][key] = {k: v for k, v in entry.items() if k not in ("robust_flags", "robust_acc")}
        log.info("eps=%s robust accuracy %.4f", format_budget(eps), entry["robust_acc"])
    return result
