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


def train_run(cfg: Config, role: str, out: str | Path, *, mask_store: Optional[str | Path] = None,
              device: Optional[torch.device] = None, progress: bool = True,
              stop_after_epoch: Optional[int] = None) -> dict[str, Any]:
    """Train the teacher (`role="teacher"`: Madry PGD-AT) or the student (strategy from `cfg.strategy`).

    Writes a checkpoint to `out` and returns the training summary (also stored in the checkpoint). Under
    `torchrun` (WORLD_SIZE > 1) it trains with DistributedDataParallel: `batch_size` stays the global batch,
    split evenly over the processes, so the learning-rate schedule needs no change; rank 0 validates and writes.
    """
    from pipeline.distributed import init_from_env, shutdown

    out = Path(out)
    dist = init_from_env(device or resolve_device(cfg.device))
    try:
        return _train(cfg, role, out, dist, mask_store=mask_store, progress=progress,
                      stop_after_epoch=stop_after_epoch)
    finally:
        shutdown(dist)


def _train(cfg: Config, role: str, out: Path, dist, *, mask_store, progress: bool,
           stop_after_epoch: Optional[int]) -> dict[str, Any]:
    device = dist.device
    seed = cfg.teacher.seed if role == "teacher" else cfg.seed
    seed_everything(seed + dist.rank)  # ranks draw different PGD starts, like independent batches would
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
                                  num_workers=cfg.data.num_workers, pin_memory=pin, rank=dist.rank,
                                  world_size=dist.world_size)
    val_batches = BatchIterator(ds, val_idx, max(optim.batch_size, 256), shuffle=False,
                                num_workers=cfg.data.num_workers, pin_memory=pin)
    model = build_model(arch, ds.num_classes, ds.mean, ds.std, pretrained=optim.pretrained).to(device)
    perf = cfg.perf
    cuda = device.type == "cuda"
    channels_last = perf.channels_last == "on" or (perf.channels_last == "auto" and cuda)
    amp = torch.bfloat16 if perf.amp == "bf16" or (perf.amp == "auto" and cuda) else None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if perf.compile:
        net = torch.compile(net)
    if dist.is_main:
        log.info("%s: %s on %s (%d train / %d val images, %s), strategy %s, eps %s, %d epochs on %s%s%s", role,
                 arch, cfg.dataset, len(train_idx), len(val_idx), "x".join(map(str, ds.image_shape)),
                 strategy_name, format_budget(cfg.attack.eps), optim.epochs, device,
                 f" x{dist.world_size} processes" if dist.world_size > 1 else "",
                 f" (amp {amp}, channels_last {channels_last}, compile {perf.compile})" if cuda or amp else "")
    run_key = _run_key(cfg, role, ds.fingerprint(), dist.world_size)
    resume = out.parent / f".{out.stem}.resume.pt" if perf.resume else None
    opts = TrainOptions(device=device, amp_dtype=amp, augment=cfg.data.augment, crop_padding=cfg.data.crop_padding,
                        seed=seed, progress=progress, channels_last=channels_last, resume_path=resume,
                        resume_key=run_key, is_main=dist.is_main, stop_after_epoch=stop_after_epoch)
    t0 = time.perf_counter()
    summary = fit(net, strategy, train_batches, val_batches, optim, cfg.attack, opts, masks=masks)
    summary["train_seconds"] = round(time.perf_counter() - t0, 2)
    summary["processes"] = dist.world_size
    if dist.world_size > 1:
        # DDP keeps the weights identical (batch-norm statistics are rank 0's, broadcast at every forward);
        # check it rather than trust it before writing a single checkpoint.
        from pipeline.distributed import all_gather_objects

        digests = all_gather_objects(_digest(model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"model replicas diverged across the {dist.world_size} processes: {digests}")
        summary["replica_digest"] = digests[0]
    meta = {
        "arch": arch, "num_classes": ds.num_classes, "mean": list(ds.mean), "std": list(ds.std),
        "image_shape": list(ds.image_shape), "dataset": cfg.dataset, "dataset_fingerprint": ds.fingerprint(),
        "role": role, "strategy": strategy_name, "seed": seed, "attack": cfg.attack.model_dump(),
        "optim": optim.model_dump(), "summary": summary,
    }
    if dist.is_main:
        save_checkpoint(out, model, meta)
        if resume is not None and resume.exists():
            resume.unlink()
    return summary


def _digest(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in model.named_parameters():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _run_key(cfg: Config, role: str, fingerprint: str, world_size: int) -> str:
    import hashlib
    import json

    parts = {"role": role, "fingerprint": fingerprint, "world": world_size,
             "cfg": cfg.model_dump(exclude={"evaluate", "salience", "human_masks", "device"})}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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

