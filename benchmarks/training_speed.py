"""Training throughput: SIP-AT vs Madry epochs, and the GPU fast path vs a plain fp32 loop.

Every number is measured in this one run on the same synthetic batches (random images and masks, so no data
set is needed), with the project's own training loop (`pipeline.training.fit`):

- `madry` vs `sip_s` epoch time, plain and fast: the mask costs one indexed read and one `masked_fill` per PGD
  step (target: SIP-AT epoch <= 1.05x a Madry epoch);
- fast path (bf16 autocast + channels-last, optionally torch.compile) vs plain fp32 contiguous, as the
  reference repositories train (target >= 2x on a GPU; on a CPU bf16 is usually slower, and that is reported).

    python benchmarks/training_speed.py                                   # CPU, smallcnn 16x16
    python benchmarks/training_speed.py --device cuda --model resnet18 --image-size 32 --n 4096 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import AttackConfig, OptimConfig  # noqa: E402
from pipeline.data import BatchIterator, ImageDataset  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.strategies import make_strategy  # noqa: E402
from pipeline.training import TrainOptions, fit  # noqa: E402


class RandomImages(ImageDataset):
    name = "random"

    def __init__(self, n: int, size: int, classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.image_size = size
        self._cache = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g).numpy()
        self.ids = [str(i) for i in range(n)]
        self.class_names = [str(c) for c in range(classes)]


def mask_reader(n: int, size: int, device: torch.device, fraction: float = 0.11):
    """Masks kept on the device as the MaskStore keeps them (bit-packed, unpacked per batch)."""
    try:
        from pipeline.maskstore import pack_masks, unpack_masks
    except ImportError:  # zarr missing on a bare GPU machine: keep bool masks instead
        masks = (torch.rand(n, 3, size, size) < fraction).to(device)
        return lambda idx: masks[idx.to(device)]
    packed = pack_masks(torch.rand(n, 3, size, size) < fraction).to(device)
    return lambda idx: unpack_masks(packed[idx.to(device)], (3, size, size))


def run_epoch(strategy: str, fast: bool, compile_model: bool, args, device, ds, masks) -> float:
    torch.manual_seed(0)
    model = build_model(args.model, 10).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    attack = AttackConfig(eps=8 / 255, step_size=2 / 255, steps=args.steps)
    optim = OptimConfig(epochs=1, batch_size=args.batch_size, lr=0.01, select="last")
    strat = make_strategy(strategy, attack)
    opts = TrainOptions(device=device, amp_dtype=torch.bfloat16 if fast else None, channels_last=fast,
                        progress=False)
    batches = BatchIterator(ds, np.arange(len(ds)), args.batch_size, shuffle=True, pin_memory=device.type == "cuda")
    warm = BatchIterator(ds, np.arange(args.batch_size * 2), args.batch_size, shuffle=False)
    fit(net, strat, warm, None, optim, attack, opts, masks=masks)  # warm-up (cuDNN autotune, compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fit(net, strat, batches, None, optim, attack, opts, masks=masks)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="best of this many epochs per configuration")
    p.add_argument("--compile", action="store_true", help="also time the fast path with torch.compile")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ds = RandomImages(args.n, args.image_size, 10)
    masks = mask_reader(args.n, args.image_size, device)
    configs = [("madry", False, False), ("sip_s", False, False), ("madry", True, False), ("sip_s", True, False)]
    if args.compile:
        configs += [("madry", True, True), ("sip_s", True, True)]
    times = {}
    # Interleave the repeats so that drifting clocks or neighbours affect every configuration alike.
    for _ in range(args.repeats):
        for strategy, fast, comp in configs:
            key = f"{strategy}/{'fast' if fast else 'plain'}{'+compile' if comp else ''}"
            t = run_epoch(strategy, fast, comp, args, device, ds, masks)
            times[key] = min(times.get(key, float("inf")), t)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device {name}  model {args.model}  {args.image_size}x{args.image_size}  n {args.n}  "
          f"batch {args.batch_size}  PGD-{args.steps}")
    for k, t in times.items():
        print(f"  {k:<24} {t:8.3f} s/epoch  {args.n / t:10.1f} img/s")
    ratios = {
        "sip_over_madry_plain": times["sip_s/plain"] / times["madry/plain"],
        "sip_over_madry_fast": times["sip_s/fast"] / times["madry/fast"],
        "fast_speedup_madry": times["madry/plain"] / times["madry/fast"],
        "fast_speedup_sip": times["sip_s/plain"] / times["sip_s/fast"],
    }
    if args.compile:
        ratios["fast_compile_speedup_madry"] = times["madry/plain"] / times["madry/fast+compile"]
    for k, v in ratios.items():
        target = "<= 1.05" if k.startswith("sip_over") else ">= 2 (GPU)"
        print(f"  {k:<28} {v:6.3f}x   target {target}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "args": {k: str(v) for k, v in vars(args).items()},
                                         "seconds": times, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
