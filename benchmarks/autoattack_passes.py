"""AutoAttack's wall time against the time of the model passes it makes, on one chunk of the evaluation.

The model is wrapped so that every forward pass, and every backward pass through it, is counted and timed; the
chunk (`--chunk` of the evaluated points, `evaluate.chunk_size` of them, seeded as in the evaluate stage) is
attacked at each `--eps` by the evaluation's own code (`pipeline.evaluation.evaluate_chunk`) on one process with
`--threads` torch threads, as one worker of the evaluate stage. It prints, per attack and in total, the passes,
their seconds and the ratio wall / passes (1.0 = AutoAttack costs nothing beyond the model). Each `--variant` is
one preparation of the model for the attacks, run on the same chunk:

    plain     the model as loaded (eval mode, parameters requiring gradients): how the evaluation ran before
    frozen    parameters frozen (bit-identical results)
    fused     frozen, batch norm folded into the convolutions
    default   what the evaluation uses now (`pipeline.evaluation.attack_model`)

Robust flags of every variant are compared with the first one's and the speed-ups over it printed.

    python benchmarks/autoattack_passes.py --checkpoint data/student/model.pt --eps 8/255 --variant plain default
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.evaluation as E  # noqa: E402
from pipeline.core.config import format_budget, load_config, parse_budget  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.evaluation import chunk_bounds, select_examples, stack_examples  # noqa: E402
from pipeline.models import load_checkpoint  # noqa: E402


class PassClock:
    """Counts forward and backward passes through one model and times them, in wall seconds and in this thread's
    CPU seconds (with one torch thread the passes run on the calling thread, backward passes included, so the
    CPU figure holds on a loaded machine)."""

    def __init__(self) -> None:
        self.fwd = self.bwd = 0
        self.fwd_s = self.bwd_s = self.cpu_s = 0.0
        self._bwd_start = (0.0, 0.0)

    def snapshot(self) -> tuple[int, float, int, float, float]:
        return self.fwd, self.fwd_s, self.bwd, self.bwd_s, self.cpu_s


class _Mark(torch.autograd.Function):
    """Identity whose backward notes the time: at the output it starts a backward pass, at the input it ends it."""

    @staticmethod
    def forward(ctx, x, clock: PassClock, end: bool):
        ctx.clock, ctx.end = clock, end
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        clock = ctx.clock
        if ctx.end:
            clock.bwd += 1
            clock.bwd_s += time.perf_counter() - clock._bwd_start[0]
            clock.cpu_s += time.thread_time() - clock._bwd_start[1]
        else:
            clock._bwd_start = (time.perf_counter(), time.thread_time())
        return g, None, None


class Timed(nn.Module):
    def __init__(self, net: nn.Module, clock: PassClock):
        super().__init__()
        self.net, self.clock = net, clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = _Mark.apply(self.net(_Mark.apply(x, self.clock, True)), self.clock, False)
        self.clock.fwd += 1
        self.clock.fwd_s += time.perf_counter() - t0
        self.clock.cpu_s += time.thread_time() - c0
        return out


VARIANTS = {
    "plain": lambda m, d: copy.deepcopy(m).to(d).eval(),
    "frozen": lambda m, d: E.attack_model(m, d, fuse=False, channels_last=False),
    "fused": lambda m, d: E.attack_model(m, d, fuse=True, channels_last=False),
    "default": lambda m, d: E.attack_model(m, d),
}


def run_variant(name: str, model: nn.Module, x, y, eps: list[float], chunk: int, n_classes: int, seed: int,
                device: torch.device) -> dict[str, Any]:
    clock = PassClock()
    timed = Timed(VARIANTS[name](model, device), clock)
    marks: list[tuple[str, str, tuple]] = []
    prepare, E.attack_model = E.attack_model, lambda m, d, **_: m  # the variant is already prepared
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        res = E.evaluate_chunk(timed, x, y, eps, chunk=chunk, n_classes=n_classes, device=device,
                               batch_size=500, seed=seed, ladder=False,
                               on_attack=lambda c, k, a, *_: marks.append((k, a, clock.snapshot())))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        E.attack_model = prepare
    per_attack: dict[str, dict[str, float]] = {}
    prev = (0, 0.0, 0, 0.0, 0.0)
    for key, attack, snap in marks:
        row = per_attack.setdefault(attack, {"fwd": 0, "fwd_s": 0.0, "bwd": 0, "bwd_s": 0.0, "passes_cpu_s": 0.0,
                                             "wall_s": 0.0})
        for i, f in enumerate(("fwd", "fwd_s", "bwd", "bwd_s", "passes_cpu_s")):
            row[f] += snap[i] - prev[i]
        row["wall_s"] += res["eps"][key]["attack_seconds"][attack]
        prev = snap
    passes = clock.fwd_s + clock.bwd_s
    return {"variant": name, "wall_s": wall, "cpu_s": cpu, "fwd": clock.fwd, "fwd_s": clock.fwd_s,
            "bwd": clock.bwd, "bwd_s": clock.bwd_s, "passes_s": passes, "passes_cpu_s": clock.cpu_s,
            "ratio": wall / passes if passes else None,
            "cpu_ratio": cpu / clock.cpu_s if clock.cpu_s else None, "per_attack": per_attack,
            "flags": {k: v["robust_flags"] for k, v in res["eps"].items()}, "clean": res["clean_flags"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("data/student/model.pt"))
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--eps", nargs="+", default=["8/255"])
    p.add_argument("--chunk", type=int, default=0, help="index of the chunk of the evaluated points")
    p.add_argument("--n", type=int, default=None, help="evaluated points (default: evaluate.n_examples)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the evaluate stage: threads_per_worker)")
    p.add_argument("--variant", nargs="+", default=["plain", "default"], choices=sorted(VARIANTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.params)
    device = torch.device(args.device)
    model, meta = load_checkpoint(args.checkpoint, "cpu")
    ds = load_dataset(cfg.dataset, cfg.data.root, "test", cfg.data.image_size)
    n = args.n if args.n is not None else cfg.evaluate.n_examples
    idx = select_examples(ds, n, cfg.evaluate.seed)
    a, b = chunk_bounds(len(idx), cfg.evaluate.chunk_size)[args.chunk]
    x, y = stack_examples(ds, idx[a:b])
    eps = sorted(parse_budget(e) for e in args.eps)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"{args.checkpoint}  chunk {args.chunk} ({b - a} points)  eps {' '.join(format_budget(e) for e in eps)}  "
          f"{args.threads} thread(s)  {cpu}  torch {torch.__version__}  load {os.getloadavg()[0]:.2f}")
    runs = []
    for name in args.variant:
        r = run_variant(name, model, x, y, eps, args.chunk, meta["num_classes"], cfg.evaluate.seed, device)
        runs.append(r)
        print(f"\n[{name}] wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s; model passes: {r['fwd']} forward "
              f"({r['fwd_s']:.1f} s), {r['bwd']} backward ({r['bwd_s']:.1f} s), {r['passes_cpu_s']:.1f} CPU s; "
              f"AutoAttack / model passes = {r['ratio']:.2f}x wall, {r['cpu_ratio']:.2f}x CPU  "
              f"(load {os.getloadavg()[0]:.2f})")
        for attack, row in r["per_attack"].items():
            ps = row["fwd_s"] + row["bwd_s"]
            print(f"  {attack:8s} wall {row['wall_s']:7.1f} s  passes {ps:7.1f} s, {row['passes_cpu_s']:6.1f} CPU s "
                  f"({row['fwd']:6d} fwd, {row['bwd']:5d} bwd)  wall ratio {row['wall_s'] / ps if ps else 0:.2f}x")
    base = runs[0]
    if len(runs) > 1:
        print()
    for r in runs[1:]:
        same = r["flags"] == base["flags"] and r["clean"] == base["clean"]
        print(f"{r['variant']} vs {base['variant']}: wall {base['wall_s'] / r['wall_s']:.2f}x, "
              f"CPU {base['cpu_s'] / r['cpu_s']:.2f}x, model passes {base['passes_s'] / r['passes_s']:.2f}x; "
              f"robust flags {'identical' if same else 'DIFFER'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "chunk": args.chunk, "points": b - a,
                                         "eps": [format_budget(e) for e in eps], "threads": args.threads,
                                         "processor": cpu, "torch": torch.__version__,
                                         "runs": [{k: v for k, v in r.items() if k not in ("flags", "clean")}
                                                  for r in runs]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
