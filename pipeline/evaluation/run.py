"""Evaluation of a checkpoint: clean accuracy and AutoAttack robust accuracy on the test split, as metrics JSON.

Stages call `evaluate_run`; nothing here knows about DVC. Under `torchrun` every rank runs its share of the
chunks and rank 0 alone reads and writes files.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pipeline import distributed as D
from pipeline.core.config import Config, format_budget
from pipeline.core.utils import cpu_budget, resolve_device, seed_everything, sha256_file, write_json
from pipeline.data import load_dataset
from pipeline.evaluation import (STANDARD_ATTACKS, attacks_for, evaluate_model, points_digest, select_examples,
                                 stack_examples)
from pipeline.models import check_checkpoint_matches, load_checkpoint

log = logging.getLogger(__name__)

PARTIAL_FORMAT = "sipat-eval-partial-v2"


def cpu_layout(workers: int, threads: Optional[int], budget: Optional[int]) -> tuple[int, Optional[int]]:
    """Worker processes and torch threads per worker within a CPU budget (a SLURM allocation, the share of a
    local grid run): never more processes than cores. Results do not depend on the layout."""
    if budget is None:
        return workers, threads
    workers = min(workers, budget)
    return workers, max(1, budget // workers)


def evaluate_run(cfg: Config, checkpoint: str | Path, out: str | Path, *, device: Optional[torch.device] = None,
                 partial_path: Optional[Path] = None, eps: Optional[list[float]] = None,
                 progress: bool = True, make_attack: Optional[Callable] = None) -> dict[str, Any]:
    """AutoAttack evaluation of a checkpoint on the test split; writes the metrics JSON to `out` (rank 0).

    `partial_path` keeps finished chunks so that an interrupted evaluation resumes where it stopped; `eps`
    overrides `cfg.evaluate.eps`; `make_attack` replaces AutoAttack (see `evaluate_model`). Returns the metrics
    on every rank.
    """
    info = D.init_from_env(device or resolve_device(cfg.device))
    try:
        return _evaluate(cfg, Path(checkpoint), Path(out), info, partial_path, eps, progress, make_attack)
    finally:
        D.shutdown(info)


def _evaluate(cfg: Config, checkpoint: Path, out: Path, info: D.DistInfo, partial_path: Optional[Path],
              eps: Optional[list[float]], progress: bool, make_attack: Optional[Callable]) -> dict[str, Any]:
    ev = cfg.evaluate
    device = info.device
    seed_everything(ev.seed)
    model, meta = load_checkpoint(checkpoint, device)
    ds = load_dataset(cfg.dataset, cfg.data.root, "test", cfg.data.image_size)
    check_checkpoint_matches(meta, ds, checkpoint)
    eps_list = sorted(eps or ev.eps)
    idx = select_examples(ds, ev.n_examples, ev.seed)
    x, y = stack_examples(ds, idx)
    ckpt_hash = sha256_file(checkpoint, 16)
    digest = points_digest(idx)
    attacks = attacks_for(meta["num_classes"], STANDARD_ATTACKS)
    key = {"format": PARTIAL_FORMAT, "checkpoint_sha256": ckpt_hash, "points_digest": digest,
           "eps": [float(e).hex() for e in eps_list], "seed": ev.seed, "chunk_size": ev.chunk_size,
           "ladder": ev.ladder, "attacks": list(attacks)}  # batch_size only sizes forward passes: not in the key

    done: dict[int, dict] = {}
    if info.is_main and partial_path is not None and Path(partial_path).is_file():
        try:
            saved = json.loads(Path(partial_path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("ignoring unreadable partial results %s: %s", partial_path, err)
            saved = {}
        if saved.get("key") == key:
            done = {int(c): r for c, r in saved.get("chunks", {}).items()}
            log.info("resuming from %s: %d finished chunk(s)", partial_path, len(done))
        elif saved:
            log.info("ignoring %s: it was made for another checkpoint, point set or setting", partial_path)
    done = D.broadcast_object(done)

    def keep(res: dict) -> None:
        if partial_path is not None:
            done[res["chunk"]] = res
            write_json(partial_path, {"key": key, "chunks": {str(c): r for c, r in sorted(done.items())}})

    workers, threads = cpu_layout(ev.workers, ev.threads_per_worker, cpu_budget())
    t0 = time.perf_counter()
    res = evaluate_model(model, x, y, eps_list, n_classes=meta["num_classes"], device=device,
                         batch_size=ev.batch_size, seed=ev.seed, ladder=ev.ladder, chunk_size=ev.chunk_size,
                         workers=workers, threads_per_worker=threads, attacks=attacks,
                         done=dict(done), on_chunk_done=keep, progress=progress, make_attack=make_attack)
    timing = res.pop("timing")
    shape = meta.get("image_shape") or []
    metrics = {
        "strategy": meta["strategy"], "seed": meta["seed"], "seed_scope": cfg.seed_scope, "role": meta["role"],
        "model": meta["arch"],
        "dataset": meta["dataset"], "train_eps": format_budget(meta["attack"]["eps"]),
        "checkpoint_sha256": ckpt_hash,
        "run": {"dataset": meta["dataset"], "model": meta["arch"],
                "image_size": int(shape[-1]) if len(shape) >= 2 and shape[-1] == shape[-2] else shape[-2:] or None,
                "attack": meta.get("attack"), "optim": meta.get("optim")},
        "points_digest": digest,
        "evaluation": {"version": "standard", "attacks": list(attacks), "seed": ev.seed, "ladder": ev.ladder,
                       "chunk_size": ev.chunk_size, "n_examples": ev.n_examples},
        "eps": [format_budget(e) for e in eps_list], **res,
        # Everything below depends on the machine and the worker layout, nothing above it does.
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "timing": timing,
    }
    if info.is_main:
        write_json(out, metrics)
        if partial_path is not None and Path(partial_path).exists():
            Path(partial_path).unlink()
    return metrics
