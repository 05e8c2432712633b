"""Benchmark: synthetic-mask extraction (`extract_synthetic`, store included) in N processes vs one.

Measured in one run on the same random in-memory images and the same random teacher:
  1 process   `extract_synthetic` in this process, with torch's default CPU threads, and again with
              cpu_count // N threads (on a busy CPU the fewer threads are often faster);
  N processes the same call in N processes started with torch.multiprocessing (a torch.distributed group,
              NCCL on CUDA with one GPU per process, else Gloo), each with cpu_count // N threads.
The speedup is the N-process time against the better of the one-process times.
Each mode is warmed up on a small store first, then timed `--repeats` times (the best is reported); a timed
call is the whole extraction (teacher load, gradients, packing, Zarr write, gather, rename), not process
start-up or group initialisation. The two stores
are then compared byte for byte (all but the creation time).

On a CPU the processes share the same cores, so expect about 1x or less: the split only pays with one GPU per
process, or with many more cores than one process's intra-op threads use well. E.g.:
    python benchmarks/extraction_processes.py --n 4096 --nproc 2 --device cpu
    python benchmarks/extraction_processes.py --n 50000 --nproc 4 --device cuda --model resnet18 --image-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salience_extraction import RandomImages, print_and_save  # noqa: E402

from pipeline import distributed as D  # noqa: E402
from pipeline.core.utils import resolve_device  # noqa: E402
from pipeline.models import build_model, save_checkpoint  # noqa: E402
from pipeline.synthetic_masks import extract_synthetic  # noqa: E402


def _extract(args: argparse.Namespace, ckpt: Path, out: Path, n: int, device) -> float:
    ds = RandomImages(n, args.image_size, args.num_classes)
    D.barrier()
    t0 = time.perf_counter()
    extract_synthetic(ckpt, ds, out, batch_size=args.batch_size, chunk_size=args.chunk_size, device=device,
                      progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    D.barrier()  # the slowest rank decides
    return time.perf_counter() - t0


def _rank_main(rank: int, args: argparse.Namespace, port: int, tmp: Path, threads: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    info = D.init_from_env(args.device)
    try:
        _extract(args, tmp / "teacher.pt", tmp / "warm_n.zarr", min(args.n, 4 * args.batch_size), args.device)
        seconds = min(_extract(args, tmp / "teacher.pt", tmp / "n.zarr", args.n, args.device)
                      for _ in range(args.repeats))
        if info.is_main:
            (tmp / "n.json").write_text(json.dumps({"seconds": seconds, "device": str(info.device),
                                                    "backend": torch.distributed.get_backend()}))
    finally:
        D.shutdown(info)


def _same_store(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="images to extract")
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--image-size", type=int, default=16, help="16: digits-shaped; 32: CIFAR-shaped")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=2, help="processes of the split run")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (then one GPU per process)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per mode (the best is reported)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.nproc < 2:
        ap.error("--nproc must be at least 2")
    device = resolve_device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < args.nproc:
        ap.error(f"--nproc {args.nproc} needs as many GPUs; {torch.cuda.device_count()} visible")
    cores = os.cpu_count() or 1
    threads_1, threads_n = torch.get_num_threads(), max(1, cores // args.nproc)

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        torch.manual_seed(0)
        model = build_model(args.model, args.num_classes)
        save_checkpoint(tmp / "teacher.pt", model, {"arch": args.model, "num_classes": args.num_classes,
                                                     "mean": [0.0] * 3, "std": [1.0] * 3})
        _extract(args, tmp / "teacher.pt", tmp / "warm_1.zarr", min(args.n, 4 * args.batch_size), device)
        t1 = min(_extract(args, tmp / "teacher.pt", tmp / "1.zarr", args.n, device) for _ in range(args.repeats))
        t1_few = t1
        if threads_n != threads_1:
            torch.set_num_threads(threads_n)
            t1_few = min(_extract(args, tmp / "teacher.pt", tmp / "1.zarr", args.n, device)
                         for _ in range(args.repeats))
            torch.set_num_threads(threads_1)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t_start = time.perf_counter()
        torch.multiprocessing.spawn(_rank_main, args=(args, port, tmp, threads_n), nprocs=args.nproc, join=True)
        t_total = time.perf_counter() - t_start
        multi = json.loads((tmp / "n.json").read_text())
        identical = _same_store(tmp / "1.zarr", tmp / "n.zarr")

    tn = multi["seconds"]
    res = {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "backend": multi["backend"], "cpu_cores": cores, "model": args.model,
        "image_shape": [3, args.image_size, args.image_size], "n": args.n, "batch_size": args.batch_size,
        "chunk_size": args.chunk_size, "repeats": args.repeats, "nproc": args.nproc, "threads_1": threads_1,
        "threads_per_process": threads_n,
        "one_s": t1, "one_few_threads_s": t1_few, "multi_s": tn, "multi_with_startup_s": t_total,
        "one_img_s": args.n / min(t1, t1_few), "multi_img_s": args.n / tn, "speedup": min(t1, t1_few) / tn,
        "identical": identical,
    }
    print(f"device {res['device']}  backend {res['backend']}  {cores} CPU cores  model {args.model}  images "
          f"3×{args.image_size}×{args.image_size}  n {args.n}  batch {args.batch_size}  chunk {args.chunk_size}  "
          f"best of {args.repeats}")
    rows = [
        (f"1 process ({threads_1} thread(s))", f"{t1:8.2f} s  {args.n / t1:9.1f} img/s"),
        *([(f"1 process ({threads_n} thread(s))", f"{t1_few:8.2f} s  {args.n / t1_few:9.1f} img/s")]
          if threads_n != threads_1 else []),
        (f"{args.nproc} processes ({threads_n} thread(s) each)", f"{tn:8.2f} s  {res['multi_img_s']:9.1f} img/s"),
        (f"{args.nproc} processes, whole spawn (start-up, warm-up, repeats)", f"{t_total:8.2f} s"),
        (f"speedup, {args.nproc} processes vs best 1", f"{res['speedup']:8.2f} x"),
        ("stores identical (but creation time)", "yes" if identical else "NO"),
    ]
    print_and_save(rows, res, args.json)
    if not identical:
        sys.exit("error: the split run wrote a different store")


if __name__ == "__main__":
    main()
