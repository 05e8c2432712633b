"""A whole training run built from the library pieces: the teacher (Madry PGD-AT) or a student (any strategy).

Stages call `train_run`; nothing here knows about DVC.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.core.config import Config, ConfigError, format_budget
from pipeline.core.utils import check_output, resolve_device, seed_everything
from pipeline.data import BatchIterator, load_dataset, split_fingerprints, train_val_split
from pipeline.models import MODELS, build_model, save_checkpoint
from pipeline.strategies import make_strategy
from pipeline.training import TrainOptions, fit

log = logging.getLogger(__name__)

def train_run(cfg: Config, role: str, out: str | Path, *, mask_stores: Optional[dict[str, str | Path]] = None,
              device: Optional[torch.device] = None, progress: bool = True,
              stop_after_epoch: Optional[int] = None) -> dict[str, Any]:
    """Train the teacher (`role="teacher"`: Madry PGD-AT) or the student (strategy from `cfg.strategy`).

    `mask_stores` maps a mask kind ("synthetic", "human") to its store, for strategies that read masks.
    Writes a checkpoint to `out` and returns the training summary (the checkpoint stores it without timings,
    so that rerunning on unchanged inputs writes identical bytes). Under
    `torchrun` (WORLD_SIZE > 1) it trains with DistributedDataParallel: `batch_size` stays the global batch,
    split evenly over the processes, so the learning-rate schedule needs no change; rank 0 validates and writes.
    """
    from pipeline.distributed import init_from_env, shutdown

    out = Path(out)
    dist = init_from_env(device or resolve_device(cfg.device))
    try:
        return _train(cfg, role, out, dist, mask_stores=mask_stores or {}, progress=progress,
                      stop_after_epoch=stop_after_epoch)
    finally:
        shutdown(dist)


def _train(cfg: Config, role: str, out: Path, dist, *, mask_stores: dict[str, str | Path], progress: bool,
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

    MODELS.get(arch, "teacher.model" if role == "teacher" else "model")  # fail before loading any data
    strategy = make_strategy(strategy_name, cfg.attack, cfg.train, optim.epochs)
    ds = load_dataset(cfg.dataset, cfg.data.root, "train", cfg.data.image_size)
    masks = None
    if strategy.mask_kind is not None:
        # Opened before any training so that a wrong or missing store stops the run at once.
        from pipeline.maskstore import MaskStore

        if strategy.mask_kind not in mask_stores:
            raise ConfigError(f"strategy {strategy_name!r} needs a {strategy.mask_kind} mask store, but none was given")
        path = Path(mask_stores[strategy.mask_kind])
        masks = MaskStore.open(path, dataset=ds, device=device, kind=strategy.mask_kind).masks

    split_seed = cfg.teacher.split_seed if role == "teacher" else cfg.data.split_seed
    train_idx, val_idx = train_val_split(ds.labels, cfg.data.val_fraction, split_seed)
    pin = device.type == "cuda"
    train_batches = BatchIterator(ds, train_idx, optim.batch_size, shuffle=True, seed=seed,
                                  num_workers=cfg.data.num_workers, pin_memory=pin, rank=dist.rank,
                                  world_size=dist.world_size)
    val_batches = BatchIterator(ds, val_idx, max(optim.batch_size, 256), shuffle=False,
                                num_workers=cfg.data.num_workers, pin_memory=pin)
    model = build_model(arch, ds.num_classes, ds.mean, ds.std, pretrained=optim.pretrained).to(device)
    if dist.is_main:
        # checkpoint, resume state (weights, momentum, best weights) and their temporaries: before epoch 1
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        check_output(out, kind="torch", min_free=6 * weights + 2**20)
    perf = cfg.perf
    cuda = device.type == "cuda"
    channels_last = perf.use_channels_last(cuda)
    amp = getattr(torch, perf.autocast(cuda) or "", None)
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
        "dataset_fingerprints": split_fingerprints(ds, cfg.data.root),
        "role": role, "strategy": strategy_name, "seed": seed, "attack": cfg.attack.model_dump(),
        "optim": _recorded_optim(optim, strategy), "summary": _without_timings(summary),
    }
    if dist.is_main:
        save_checkpoint(out, model, meta)
        if resume is not None and resume.exists():
            resume.unlink()
    return summary


TIMING_KEYS = ("seconds", "train_seconds")


def _recorded_optim(optim, strategy) -> dict[str, Any]:
    """The optimiser settings and the run's own strategy section only: another strategy's parameters do not
    change this run, and must not change the checkpoint's bytes (which would rerun its evaluation)."""
    out = {k: v for k, v in optim.model_dump().items() if k in type(optim).model_fields}
    own = strategy.params.model_dump()
    if own:
        out[strategy.name] = own
    return out


def _without_timings(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as stored in the checkpoint: wall-clock times vary between identical runs."""
    out = {k: v for k, v in summary.items() if k not in TIMING_KEYS}
    if "history" in out:
        out["history"] = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in out["history"]]
    return out


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


def import_teacher(cfg: Config, out: str | Path) -> dict[str, Any]:
    """The teacher from the file `teacher.checkpoint` names, checked and written to `out` in this project's format
    with the same metadata as a trained teacher, plus where it came from (`imported_from`)."""
    from pipeline.core.errors import CheckpointError
    from pipeline.core.utils import sha256_file
    from pipeline.data import load_dataset
    from pipeline.models import (NORMALISATIONS, ForeignCheckpoint, check_checkpoint_matches, load_checkpoint,
                                 load_state_dict_file)

    path = Path(cfg.teacher.checkpoint)
    ds = load_dataset(cfg.dataset, cfg.data.root, "train", cfg.data.image_size)
    source = {"path": str(path), "sha256": sha256_file(path)}
    try:
        model, meta = load_checkpoint(path)
        check_checkpoint_matches(meta, ds, path)
        source.update(format="sipat", trained_as=meta.get("role"), strategy=meta.get("strategy"))
        meta = {**meta, "role": "teacher"}
    except ForeignCheckpoint:  # a plain state_dict of teacher.model
        mean, std = NORMALISATIONS.get(cfg.teacher.input_normalization, (ds.mean, ds.std))
        model = load_state_dict_file(path, cfg.teacher.model, ds.num_classes, mean, std)
        source.update(format="state_dict", input_normalization=cfg.teacher.input_normalization)
        meta = {"arch": cfg.teacher.model, "num_classes": ds.num_classes, "mean": list(mean), "std": list(std),
                "image_shape": list(ds.image_shape), "dataset": cfg.dataset, "role": "teacher",
                "strategy": "imported"}  # no data fingerprints: nothing says which data it was trained on
    if model.mean.shape[1] != ds.channels:
        raise CheckpointError(f"{path}: normalises {model.mean.shape[1]} channels, the dataset has {ds.channels}")
    meta["imported_from"] = source
    save_checkpoint(out, model, meta)
    return {"history": [], "imported_from": source}
