"""AutoAttack evaluation on one process against several: same checkpoint, points and chunks, same flags.

Runs the sharded evaluation twice on the same points: `--base` workers x threads (default 1 x 2, one process
using both cores) and `--workers` workers x threads (default 2 x 1, one process per core). Every point's robust
flag at every budget must agree (asserted); the wall-time ratio is printed.

    python benchmarks/eval_workers.py --checkpoint data/student/model.pt --n 150 --eps 8/255 32/255
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import format_budget, load_config, parse_budget  # noqa: E402
from pipeline.core.utils import resolve_device  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.evaluation import evaluate_model, select_examples, stack_examples, without_timings  # noqa: E402
from pipeline.models import load_checkpoint  # noqa: E402


def _layout(text: str) -> tuple[int, int]:
    w, t = text.lower().split("x")
    return int(w), int(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("data/student/model.pt"))
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--n", type=int, default=150, help="test points (seeded subset)")
    p.add_argument("--eps", nargs="+", default=["8/255", "32/255"])
    p.add_argument("--chunk-size", type=int, default=None, help="default: evaluate.chunk_size of the params")
    p.add_argument("--base", type=_layout, default=(1, 2), help="baseline WORKERSxTHREADS (default 1x2)")
    p.add_argument("--workers", type=_layout, default=(2, 1), help="compared WORKERSxTHREADS (default 2x1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cfg = load_config(args.params)
    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, device)
    ds = load_dataset(cfg.dataset, cfg.data.root, "test", cfg.data.image_size)
    x, y = stack_examples(ds, select_examples(ds, args.n, cfg.evaluate.seed))
    eps = sorted(parse_budget(e) for e in args.eps)
    chunk = args.chunk_size or cfg.evaluate.chunk_size
    print(f"{args.checkpoint}  n={len(y)}  eps {' '.join(format_budget(e) for e in eps)}  chunk {chunk}  "
          f"device {device}  load {os.getloadavg()[0]:.2f} at start")

    runs = {}
    for name, (w, t) in (("base", args.base), ("workers", args.workers)):
        chunks: dict[int, dict] = {}
        t0 = time.perf_counter()
        res = evaluate_model(model, x, y, eps, n_classes=meta["num_classes"], device=device,
                             batch_size=cfg.evaluate.batch_size, seed=cfg.evaluate.seed, ladder=cfg.evaluate.ladder,
                             chunk_size=chunk, workers=w, threads_per_worker=t, progress=False,
                             on_chunk_done=lambda r, c=chunks: c.update({r["chunk"]: r}))
        secs = time.perf_counter() - t0
        flags = {k: [f for c in sorted(chunks) for f in chunks[c]["eps"][k]["robust_flags"]]
                 for k in res["robust_acc"]}
        runs[name] = {"layout": f"{w}x{t}", "seconds": secs, "result": res, "flags": flags}
        print(f"  {w} worker(s) x {t} thread(s): {secs:7.1f} s  robust "
              + "  ".join(f"{k} {v:.4f}" for k, v in res["robust_acc"].items())
              + f"  (load {os.getloadavg()[0]:.2f})")
    a, b = runs["base"], runs["workers"]
    assert a["flags"] == b["flags"], "robust flags differ between the two layouts"
    assert without_timings(a["result"]) == without_timings(b["result"]), "metrics differ between the two layouts"
    ratio = a["seconds"] / b["seconds"]
    print(f"  flags identical at every budget; speed-up {b['layout']} over {a['layout']}: {ratio:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "n": len(y), "eps": [format_budget(e) for e in eps], "chunk_size": chunk, "speedup": ratio,
            "runs": {k: {"layout": v["layout"], "seconds": v["seconds"], "robust_acc": v["result"]["robust_acc"],
                         "attacks": v["result"]["attacks"]} for k, v in runs.items()},
            "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
