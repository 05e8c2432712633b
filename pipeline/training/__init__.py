"""The one training loop shared by the teacher and every student strategy."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pipeline.attacks import pgd
from pipeline.core.config import AttackConfig, OptimConfig
from pipeline.core.errors import TrainingDiverged  # noqa: F401  (re-exported)
from pipeline.data import BatchIterator
from pipeline.strategies import Batch, Strategy
from pipeline.training.augment import crop_flip

log = logging.getLogger(__name__)




@dataclass
class TrainOptions:
    """How (not what) to train: device, precision, augmentation and bookkeeping."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: Optional[torch.dtype] = None  # e.g. torch.bfloat16 on CUDA
    augment: bool = False
    crop_padding: int = 2
    seed: int = 0
    progress: bool = True
    channels_last: bool = False
    resume_path: Optional[Path] = None  # per-epoch state for resuming an interrupted run
    resume_key: str = ""  # identifies the run; a state saved under another key is ignored
    is_main: bool = True  # only rank 0 logs, shows progress, validates and writes files
    stop_after_epoch: Optional[int] = None  # for tests: simulate an interruption after this epoch


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler:
    s = cfg.schedule
    if s.kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=s.milestones, gamma=s.gamma)
    if s.kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_every, gamma=s.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _e: 1.0)


@torch.no_grad()
def _clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def validate(model: nn.Module, batches: BatchIterator, attack: AttackConfig, device: torch.device,
             *, robust: bool = True) -> dict[str, float]:
    """Clean and PGD accuracy (training budget, no mask) on a held-out split."""
    net = getattr(model, "module", model)
    net.eval()
    n = clean = rob = 0
    for x, y, _ in batches:
        x, y = x.to(device), y.to(device)
        n += len(y)
        clean += int(_clean_correct(net, x, y).sum())
        if robust:
            x_adv = pgd(net, x, y, eps=attack.eps, step_size=attack.step_size, steps=attack.steps)
            rob += int(_clean_correct(net, x_adv, y).sum())
    out = {"val_clean_acc": clean / max(n, 1)}
    if robust:
        out["val_pgd_acc"] = rob / max(n, 1)
    return out


def fit(model: nn.Module, strategy: Strategy, train_batches: BatchIterator, val_batches: Optional[BatchIterator],
        cfg: OptimConfig, attack: AttackConfig, opts: TrainOptions,
        masks: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, Any]:
    """Train `model` in place with `strategy`; returns the history and the selected epoch.

    `masks(index) -> bool tensor` supplies per-sample salience masks when the strategy needs them.
    With `cfg.select` other than "last", the weights of the best validation epoch are restored at the end.
    """
    device = opts.device
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, Optional[dict]] = (-math.inf, -1, None)
    start_epoch = 0
    aug_gen = torch.Generator().manual_seed(opts.seed + 7)

    state = _load_resume(opts)
    if state is not None:
        getattr(model, "module", model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        aug_gen.set_state(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        history = _decode_history(state["history"])
        best = (state["best_score"], int(state["best_epoch"]), state.get("best_model"))
        start_epoch = int(state["epoch"]) + 1
        if opts.is_main:
            log.info("resuming from %s at epoch %d/%d", opts.resume_path, start_epoch + 1, cfg.epochs)

    amp = (torch.autocast(device.type, dtype=opts.amp_dtype) if opts.amp_dtype is not None
           else contextlib.nullcontext())
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        strategy.begin_epoch(epoch)
        train_batches.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(train_batches, mininterval=2.0, desc=f"{strategy.name} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   leave=False, disable=not (opts.progress and opts.is_main))
        for bi, (x, y, idx) in enumerate(bar):
            x = x.to(device, non_blocking=True)
            if opts.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            mask = masks(idx) if (masks is not None and strategy.mask_kind) else None
            if opts.augment:
                x, mask = crop_flip(x, mask, opts.crop_padding, aug_gen)
            with amp:
                loss = strategy.loss(model, Batch(x, y, idx, mask))
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"{strategy.name}: non-finite loss ({loss.item()}) at epoch {epoch + 1}, "
                                       f"batch {bi} (dataset indices {idx[:8].tolist()}...)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
        sched.step()
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                               "train_loss": float(loss_sum) / max(seen, 1)}
        row.update(strategy.stats())
        if val_batches is not None and len(val_batches.indices) > 0 and opts.is_main:
            row.update(validate(model, val_batches, attack, device, robust=cfg.select != "clean"))
        row["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        score = {"last": float(epoch), "clean": row.get("val_clean_acc", 0.0),
                 "robust": row.get("val_pgd_acc", 0.0)}[cfg.select]
        if score >= best[0] or cfg.select == "last":
            best = (score, epoch, None if cfg.select == "last" else _cpu_state(model))
        if opts.is_main:
            log.info("%s epoch %d/%d  " + "  ".join(f"{k}=%.4g" for k in row if k not in ("epoch",)),
                     strategy.name, epoch + 1, cfg.epochs, *[row[k] for k in row if k not in ("epoch",)])
        if opts.resume_path is not None and opts.is_main:
            _save_resume(opts, model, opt, sched, aug_gen, history, best, epoch)
        if opts.stop_after_epoch is not None and epoch + 1 >= opts.stop_after_epoch:
            raise KeyboardInterrupt(f"stopped after epoch {epoch + 1} (stop_after_epoch)")

    if cfg.select != "last" and best[2] is not None:
        getattr(model, "module", model).load_state_dict(best[2])
    return {"history": history, "selected_epoch": best[1] + 1, "select": cfg.select}


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in getattr(model, "module", model).state_dict().items()}


def _decode_history(rows: list) -> list[dict]:
    return [dict(r) for r in rows]


RESUME_FORMAT = "sipat-resume-v1"  # also the mark that lets a later run replace it


def _load_resume(opts: TrainOptions) -> Optional[dict]:
    path = opts.resume_path
    if path is None or not Path(path).is_file():
        return None
    import pickle

    why = None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text would advise weights_only=False: never for a cache
        why = "it holds objects other than tensors and plain data"
    except Exception as err:  # noqa: BLE001 - a damaged cache only costs the epochs it held
        why = f"damaged or truncated ({type(err).__name__})"
    else:
        if not isinstance(state, dict) or "key" not in state:
            why = f"not a resume state (a {type(state).__name__})"
    if why is not None:
        from pipeline.core.errors import OutputConflict
        from pipeline.core.utils import is_marked

        # ours, if damaged, still holds the format tag in its bytes (torch.save stores the pickle uncompressed)
        ours = is_marked(path, "torch") or RESUME_FORMAT.encode() in Path(path).read_bytes()
        if not ours:  # not a state this project wrote: never delete or replace it
            raise OutputConflict(f"{path} is where training keeps its resume state, but it holds a file this "
                                 f"project did not write ({why}); move it away, or set perf.resume: false")
        if opts.is_main:
            log.warning("ignoring %s and starting from epoch 1: it cannot be read (%s)", path, why)
            Path(path).unlink(missing_ok=True)
        return None
    if state.get("format") != RESUME_FORMAT:  # written by an earlier version: a state like this one, unmarked
        if opts.is_main:
            log.info("ignoring %s: a resume state of an earlier version", path)
            Path(path).unlink(missing_ok=True)
        return None
    if state.get("key") != opts.resume_key:
        if opts.is_main:
            log.info("ignoring %s: it belongs to another run configuration", path)
        return None
    return state


def _save_resume(opts: TrainOptions, model, opt, sched, aug_gen, history, best, epoch: int) -> None:
    from pipeline.core.utils import atomic_path

    state = {"format": RESUME_FORMAT, "key": opts.resume_key, "model": _cpu_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
             "best_score": float(best[0]), "best_epoch": int(best[1]), "epoch": epoch}
    if best[2] is not None:
        state["best_model"] = best[2]
    with atomic_path(opts.resume_path) as tmp:
        torch.save(state, tmp)

