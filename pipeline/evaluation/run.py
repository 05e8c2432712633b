"""Evaluation of a checkpoint: clean accuracy and AutoAttack robust accuracy on the test split, as metrics JSON.

Stages call `evaluate_run`; nothing here knows about DVC.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.core.config import Config, format_budget
from pipeline.core.utils import resolve_device, seed_everything, write_json
from pipeline.data import load_dataset
from pipeline.evaluation import evaluate_model, select_examples, stack_examples
from pipeline.models import check_checkpoint_matches, load_checkpoint

log = logging.getLogger(__name__)


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
    ds = load_dataset(cfg.dataset, cfg.data.root, "test", cfg.data.image_size)
    check_checkpoint_matches(meta, ds, checkpoint)
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
               "eval_seconds": round(time.perf_counter() - t0, 2)}
    write_json(out, metrics)
    if partial_path is not None and Path(partial_path).exists():
        Path(partial_path).unlink()
    return metrics


def _partial_key(checkpoint: str | Path, idx, cfg: Config) -> str:
    from pipeline.core.utils import sha256_file

    return f"{sha256_file(checkpoint, 16)}|{len(idx)}|{int(sum(idx))}|{cfg.evaluate.seed}|{cfg.evaluate.ladder}"

