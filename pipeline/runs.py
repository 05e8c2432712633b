"""End-to-end runs built from the library pieces: train a teacher or a student, evaluate a checkpoint.

Stages and the CLI call these functions; nothing here knows about DVC.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import Config, format_budget
from pipeline.data import BatchIterator, ImageDataset, load_dataset, train_val_split
from pipeline.evaluation import evaluate_model, select_examples, stack_examples
from pipeline.models import build_model, load_checkpoint, save_checkpoint
from pipeline.strategies import make_strategy
from pipeline.training import TrainOptions, fit
from pipeline.utils import resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)

MASK_STORES = {"synthetic": "data/masks/synthetic.zarr", "human": "data/masks/human.zarr"}


def load_split(cfg: Config, split: str) -> ImageDataset:
    return load_dataset(cfg.dataset, cfg.data.root, split, cfg.data.image_size)


def train_options(cfg: Config, device: torch.device, **kw) -> TrainOptions:
    return TrainOptions(device=device, augment=cfg.data.augment, crop_padding=cfg.data.crop_padding, **kw)


def train_run(cfg: Config, role: str, out: str | Path, *, mask_store: Optional[str | Path] = None,
              device: Optional[torch.device] = None, resume_path: Optional[Path] = None,
              progress: bool = True) -> dict[str, Any]:
    """Train the teacher (`role="teacher"`: Madry PGD-AT) or the student (strategy from `cfg.strategy`).

    Writes a checkpoint to `out` and returns the training summary (also stored in the checkpoint).
    """
    device = device or resolve_device(cfg.device)
    seed = cfg.teacher.seed if role == "teacher" else cfg.seed
    seed_everything(seed)
    if role == "teacher":
        strategy_name, optim, arch = "madry", cfg.teacher, cfg.teacher.model
    elif role == "student":
        strategy_name, optim, arch = cfg.strategy, cfg.train, cfg.model
    else:
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")

    strategy = make_strategy(strategy_name, cfg.attack, cfg.train, optim.epochs)
    ds = load_split(cfg, "train")
    masks = None
    if strategy.mask_kind is not None:
        # Opened before any training so that a wrong or missing store stops the run at once.
        from pipeline.maskstore import MaskStore

        path = Path(mask_store or MASK_STORES[strategy.mask_kind])
        masks = MaskStore.open(path, dataset=ds, device=device, kind=strategy.mask_kind).masks

    train_idx, val_idx = train_val_split(ds.labels, cfg.data.val_fraction, cfg.data.split_seed)
    pin = device.type == "cuda"
    train_batches = BatchIterator(ds, train_idx, optim.batch_size, shuffle=True, seed=seed,
                                  num_workers=cfg.data.num_workers, pin_memory=pin)
    val_batches = BatchIterator(ds, val_idx, max(optim.batch_size, 256), shuffle=False,
                                num_workers=cfg.data.num_workers, pin_memory=pin)
    model = build_model(arch, ds.num_classes, ds.mean, ds.std, pretrained=optim.pretrained).to(device)
    log.info("%s: %s on %s (%d train / %d val images, %s), strategy %s, eps %s, %d epochs on %s", role, arch,
             cfg.dataset, len(train_idx), len(val_idx), "x".join(map(str, ds.image_shape)), strategy_name,
             format_budget(cfg.attack.eps), optim.epochs, device)
    t0 = time.perf_counter()
    summary = fit(model, strategy, train_batches, val_batches, optim, cfg.attack,
                  train_options(cfg, device, seed=seed, resume_path=resume_path, progress=progress), masks=masks)
    summary["train_seconds"] = round(time.perf_counter() - t0, 2)
    meta = {
        "arch": arch, "num_classes": ds.num_classes, "mean": list(ds.mean), "std": list(ds.std),
        "image_shape": list(ds.image_shape), "dataset": cfg.dataset, "dataset_fingerprint": ds.fingerprint(),
        "role": role, "strategy": strategy_name, "seed": seed, "attack": cfg.attack.model_dump(),
        "optim": optim.model_dump(), "summary": summary,
    }
    save_checkpoint(out, model, meta)
    return summary


def evaluate_run(cfg: Config, checkpoint: str | Path, out: str | Path, *, device: Optional[torch.device] = None,
                 partial_path: Optional[Path] = None, eps: Optional[list[float]] = None) -> dict[str, Any]:
    """AutoAttack evaluation of a checkpoint on the test split; writes the metrics JSON to `out`.

    `partial_path` keeps finished budgets so an interrupted evaluation does not redo them; `eps` overrides
    `cfg.evaluate.eps`.
    """
    import json

    device = device or resolve_device(cfg.device)
    seed_everything(cfg.evaluate.seed)
    model, meta = load_checkpoint(checkpoint, device)
    ds = load_split(cfg, "test")
    ev = cfg.evaluate
    eps_list = sorted(eps or ev.eps)
    idx = select_examples(ds, ev.n_examples, ev.seed)
    x, y = stack_examples(ds, idx)
    done: dict[str, Any] = {}
    if partial_path is not None and Path(partial_path).is_file():
        saved = json.loads(Path(partial_path).read_text())
        if saved.get("key") == _partial_key(checkpoint, idx, cfg):
            done = saved["done"]
            log.info("reusing %d finished budget(s) from %s", len(done), partial_path)

    def keep(key: str, entry: dict) -> None:
        if partial_path is not None:
            done[key] = entry
            write_json(partial_path, {"key": _partial_key(checkpoint, idx, cfg), "done": done})

    t0 = time.perf_counter()
    res = evaluate_model(model, x, y, eps_list, n_classes=meta["num_classes"], device=device,
                         batch_size=ev.batch_size, seed=ev.seed, ladder=ev.ladder, done=done, on_eps_done=keep)
    metrics = {"strategy": meta["strategy"], "seed": meta["seed"], "role": meta["role"], "model": meta["arch"],
               "dataset": meta["dataset"], "train_eps": format_budget(meta["attack"]["eps"]),
               "eps": [format_budget(e) for e in eps_list], **res,
               "eval_seconds": round(time.perf_counter() - t0, 2),
               "train_seconds": meta["summary"].get("train_seconds")}
    write_json(out, metrics)
    if partial_path is not None and Path(partial_path).exists():
        Path(partial_path).unlink()
    return metrics


def _partial_key(checkpoint: str | Path, idx, cfg: Config) -> str:
    from pipeline.utils import sha256_file

    return f"{sha256_file(checkpoint, 16)}|{len(idx)}|{int(sum(idx))}|{cfg.evaluate.seed}|{cfg.evaluate.ladder}"

