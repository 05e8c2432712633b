"""AutoAttack at several budgets: the ε ladder against independent runs, measured in one run.

The ladder attacks budgets in increasing order and, at each larger ε, only the points still robust at the
smaller one (an adversarial example inside a smaller ball lies inside every larger ball). Its robust accuracy
can only be lower or equal (a stronger worst case); the time saved grows with the fraction of points broken early.

    python benchmarks/eps_ladder.py --checkpoint data/teacher/model.pt --n 120
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import format_budget, load_config, parse_budget  # noqa: E402
from pipeline.core.utils import resolve_device  # noqa: E402
from pipeline.evaluation import evaluate_model, select_examples, stack_examples  # noqa: E402
from pipeline.models import load_checkpoint  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("data/teacher/model.pt"))
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--eps", nargs="+", default=None, help="budgets, e.g. 4/255 8/255 (default: params)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cfg = load_config(args.params)
    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, device)
    ds = load_dataset(cfg.dataset, cfg.data.root, "test", cfg.data.image_size)
    x, y = stack_examples(ds, select_examples(ds, args.n, cfg.evaluate.seed))
    eps = sorted(parse_budget(e) for e in args.eps) if args.eps else cfg.evaluate.eps
    res, secs = {}, {}
    for mode in ("independent", "ladder"):
        t0 = time.perf_counter()
        res[mode] = evaluate_model(model, x, y, eps, n_classes=meta["num_classes"], device=device,
                                   batch_size=cfg.evaluate.batch_size, seed=cfg.evaluate.seed,
                                   ladder=mode == "ladder")
        secs[mode] = time.perf_counter() - t0
    print(f"{args.checkpoint}  n={len(y)}  clean {res['ladder']['clean_acc']:.4f}  device {device}")
    print(f"  {'eps':>8} {'independent':>12} {'ladder':>8} {'attacked (ind/lad)':>20}")
    for e in eps:
        k = next(iter(k for k in res["ladder"]["robust_acc"] if k.endswith(format_budget(e).replace("/", "_"))))
        a_i = res["independent"]["attacks"][k]["attacked"]
        a_l = res["ladder"]["attacks"][k]["attacked"]
        print(f"  {format_budget(e):>8} {res['independent']['robust_acc'][k]:12.4f} {res['ladder']['robust_acc'][k]:8.4f}"
              f" {a_i:>10}/{a_l:<9}")
    ratio = secs["independent"] / secs["ladder"]
    print(f"  time: independent {secs['independent']:.1f} s, ladder {secs['ladder']:.1f} s, "
          f"speed-up {ratio:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seconds": secs, "speedup": ratio, "n": len(y), "results": res}, indent=2))


if __name__ == "__main__":
    main()
