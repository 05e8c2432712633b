"""Everything GPU-specific in one call, within a hard time budget, recorded in one JSON and a printed summary.

On whatever CUDA devices are present (one H100: under 8 minutes), from a fresh clone with its venv:

1. `pipeline`: a CIFAR-shaped stand-in (32×32, 10 classes, written on the fly in CIFAR-10's pickle layout, no
   download) through the library's own stages: a teacher epoch (Madry) → synthetic mask extraction (n ≥ 10,000)
   → a SIP-S and a Madry student epoch (ResNet-18, batch 512) → AutoAttack (standard, L∞) on ≥ 500 points;
   each stage's time, throughput and peak GPU memory.
2. `fp32_vs_fast`: the same student epoch on the same batches with `perf=fp32` and `perf=fast` (bf16 autocast,
   channels-last): the throughput ratio and the agreement (training loss and validation accuracy after the
   same steps), and PGD with a mask under both: exactly zero perturbation on every salient element.
3. `torchrun`: the stages under torchrun with the NCCL backend, one process per GPU (1 included): a DDP
   training epoch, a multi-rank extraction into one store (byte-identical to the one-process store of part 1)
   and a sharded evaluation (the same metrics as part 1's, timings aside).
4. `compile`: `perf.compile: true` for two student epochs: the first epoch's extra time (compilation) and the
   steady-state speed against part 1's uncompiled epoch.

Parts run in this order; a part whose minimum time no longer fits the budget is skipped with a line saying so.
On a machine without CUDA the same code runs at toy sizes (smallcnn, 16 px, a few hundred images, two gloo
processes, bf16 autocast forced on the CPU so that its code path runs) in about a minute, and says so;
`compile` is skipped there (compilation alone takes minutes on a CPU).

    python benchmarks/gpu_check.py                       # writes benchmarks/out/gpu_check.json
    python benchmarks/gpu_check.py --budget 480 --out docs/benchmark_results/gpu_check_h100.json
    make gpu-check

JSON: {"mode": "gpu" | "cpu-toy", "device", "torch", "budget_s", "elapsed_s", "sizes": {...},
"parts": {NAME: {"status": "ok" | "failed" | "skipped", "reason"?, "seconds", ...part's figures}}}; the README
("GPU check") lists each part's figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.config import config_from_dict  # noqa: E402

GPU_SIZES = {"model": "resnet18", "image_size": 32, "n_train": 10240, "n_test": 1000, "batch": 512,
             "eval_points": 512, "chunk": 128, "nproc": None}
CPU_SIZES = {"model": "smallcnn", "image_size": 16, "n_train": 256, "n_test": 64, "batch": 64,
             "eval_points": 32, "chunk": 16, "nproc": 2}
# Rough minimum seconds each part needs (skipped when less is left): GPU, CPU toy.
MIN_SECONDS = {"pipeline": (60, 10), "fp32_vs_fast": (30, 5), "torchrun": (90, 20), "compile": (120, 0)}


# --------------------------------------------------------------------------------------------- the stand-in

def write_standin(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """CIFAR-10's "python version" layout (data_batch_1..5, test_batch, batches.meta) with class-conditional
    images: a smooth random pattern per class plus noise, so that an epoch learns something."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    patterns = np.kron(rng.normal(size=(10, 3, 8, 8)), np.ones((1, 1, 4, 4)))  # 10×3×32×32, blocky

    def rows(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.integers(0, 10, size=n)
        img = 128 + 50 * patterns[labels] + 30 * rng.normal(size=(n, 3, 32, 32))
        return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()

    per = -(-n_train // 5)
    for i in range(5):
        data, labels = rows(min(per, n_train - i * per))
        with open(base / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": f"batch {i + 1}"}, f)
    data, labels = rows(n_test)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": labels, "batch_label": "test"}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


def base_params(root: Path, sizes: dict[str, Any], device: str) -> dict[str, Any]:
    """The cifar10_resnet18 protocol composed as `dvc exp run -S protocol=cifar10_resnet18` would, at the
    check's sizes: one epoch each, every seed fixed."""
    from dvc.utils.hydra import compose_and_dump
    import yaml

    with tempfile.TemporaryDirectory() as d:
        compose_and_dump(Path(d) / "params.yaml", str(ROOT / "conf"), None, "config", "",
                         ["protocol=cifar10_resnet18", "seed_scope=student"])
        p = yaml.safe_load((Path(d) / "params.yaml").read_text())
    p["device"] = device
    p["model"] = sizes["model"]
    p["data"].update(root=str(root), image_size=sizes["image_size"], num_workers=0)
    for section in ("teacher", "train"):
        p[section].update(epochs=1, batch_size=sizes["batch"], select="last")
    p["teacher"]["model"] = sizes["model"]
    p["evaluate"].update(n_examples=sizes["eval_points"], chunk_size=sizes["chunk"], eps=["8/255"],
                         teacher_eps=["8/255"], workers=1, threads_per_worker=None)
    p["salience"].update(batch_size=sizes["batch"], chunk_size=256)
    return p


# --------------------------------------------------------------------------------------------- measuring

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """fn's result, its wall time and the peak GPU memory it allocated (MiB; None on a CPU)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    seconds = time.perf_counter() - t0
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    return out, round(seconds, 3), peak


def _stage(seconds: float, items: int, unit: str, peak: float | None, **extra: Any) -> dict[str, Any]:
    return {"seconds": seconds, "items": items, f"{unit}_per_s": round(items / max(seconds, 1e-9), 1),
            "peak_gpu_mib": peak, **extra}


def run_pipeline(work: Path, params: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    from pipeline.data import load_dataset
    from pipeline.evaluation.run import evaluate_run
    from pipeline.strategies import builtin  # noqa: F401
    from pipeline.synthetic_masks import extract_synthetic
    from pipeline.training.run import train_run

    cfg = config_from_dict(params, "gpu check")
    n = sizes["n_train"]
    out: dict[str, Any] = {}
    _, s, peak = measured(lambda: train_run(cfg, "teacher", work / "teacher.pt", progress=False))
    out["teacher_epoch"] = _stage(s, n, "images", peak)
    ds = load_dataset(cfg.dataset, cfg.data.root, "train", cfg.data.image_size)
    attrs, s, peak = measured(lambda: extract_synthetic(
        work / "teacher.pt", ds, work / "masks.zarr", root=cfg.data.root, fraction=cfg.salience.fraction,
        batch_size=cfg.salience.batch_size, chunk_size=cfg.salience.chunk_size, device=cfg.device,
        progress=False, distributed=False))
    out["mask_extraction"] = _stage(s, int(attrs["n"]), "masks", peak,
                                    salient_fraction=round(float(attrs["coverage"]["mean"]), 4))
    for strategy in ("sip_s", "madry"):
        scfg = cfg.model_copy(update={"strategy": strategy})
        _, s, peak = measured(lambda: train_run(scfg, "student", work / f"{strategy}.pt",
                                                mask_stores={"synthetic": str(work / "masks.zarr")},
                                                progress=False))
        out[f"{strategy}_epoch"] = _stage(s, n, "images", peak)
    out["sip_s_over_madry_epoch"] = round(out["sip_s_epoch"]["seconds"] / out["madry_epoch"]["seconds"], 3)
    metrics, s, peak = measured(lambda: evaluate_run(cfg, work / "sip_s.pt", work / "metrics.json",
                                                     progress=False))
    out["autoattack"] = _stage(s, int(metrics["n_examples"]), "points", peak,
                               clean_acc=metrics["clean_acc"], robust_acc=metrics["robust_acc"])
    return out


def run_fp32_vs_fast(work: Path, params: dict[str, Any], sizes: dict[str, Any], cpu: bool) -> dict[str, Any]:
    from pipeline.attacks import pgd
    from pipeline.models import build_model
    from pipeline.training.run import train_run

    result: dict[str, Any] = {}
    runs = {}
    for name, amp in (("fp32", "off"), ("fast", "bf16" if cpu else "auto")):
        p = copy.deepcopy(params)
        p["strategy"] = "madry"
        p["perf"].update(amp=amp, channels_last="auto")
        cfg = config_from_dict(p, f"gpu check {name}")
        summary, s, peak = measured(lambda: train_run(cfg, "student", work / f"student_{name}.pt", progress=False))
        last = summary["history"][-1]
        runs[name] = {"seconds": s, "images_per_s": round(sizes["n_train"] / s, 1), "peak_gpu_mib": peak,
                      "train_loss": last.get("train_loss"), "val_clean_acc": last.get("val_clean_acc"),
                      "val_pgd_acc": last.get("val_pgd_acc")}
    result.update(runs)
    result["speedup_fast_over_fp32"] = round(runs["fp32"]["seconds"] / runs["fast"]["seconds"], 3)
    for key in ("train_loss", "val_clean_acc", "val_pgd_acc"):
        a, b = runs["fp32"][key], runs["fast"][key]
        result[f"{key}_difference"] = None if a is None or b is None else round(float(b) - float(a), 5)
    # the mask under both precisions: salient elements exactly unperturbed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(sizes["model"], 10).to(device).eval()
    x = torch.rand(16, 3, sizes["image_size"], sizes["image_size"], device=device)
    y = torch.randint(0, 10, (16,), device=device)
    mask = torch.rand(x.shape, device=device) < 0.3
    exact = {}
    for name, ctx in (("fp32", torch.autocast(device.type, enabled=False)),
                      ("fast", torch.autocast(device.type, dtype=torch.bfloat16))):
        with ctx:
            adv = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=5, mask=mask)
        exact[name] = bool(((adv - x)[mask] == 0).all())
    result["mask_exactly_unperturbed"] = exact
    if not all(exact.values()):
        raise AssertionError(f"salient elements were perturbed: {exact}")
    return result


def _torchrun(work: Path, nproc: int, module: str, *args: str, timeout: float) -> float:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", module, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return round(time.perf_counter() - t0, 3)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_torchrun(work: Path, params: dict[str, Any], nproc: int, timeout: float) -> dict[str, Any]:
    import yaml

    from pipeline.evaluation import without_timings

    (work / "params.yaml").write_text(yaml.safe_dump(dict(params, strategy="madry")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    out: dict[str, Any] = {"nproc": nproc, "backend": backend}
    out["ddp_train_epoch_seconds"] = _torchrun(work, nproc, "stages.train", "student", "--out", "ddp.pt",
                                               "--history", "ddp_history.json", timeout=timeout)
    out["extraction_seconds"] = _torchrun(work, nproc, "stages.masks_synthetic", "--teacher", "teacher.pt",
                                          "--out", "masks_ddp.zarr", timeout=timeout)
    one, many = _tree_bytes(work / "masks.zarr"), _tree_bytes(work / "masks_ddp.zarr")
    out["store_byte_identical"] = one == many
    out["evaluation_seconds"] = _torchrun(work, nproc, "stages.evaluate", "student", "--checkpoint", "sip_s.pt",
                                          "--out", "metrics_ddp.json", timeout=timeout)
    a = without_timings(json.loads((work / "metrics.json").read_text()))
    b = without_timings(json.loads((work / "metrics_ddp.json").read_text()))
    for m in (a, b):
        m.pop("evaluation", None)  # records the layout's chunking, the same in both; compared below
    out["evaluation_identical"] = a == b
    if not (out["store_byte_identical"] and out["evaluation_identical"]):
        raise AssertionError(f"torchrun results differ from one process: store identical "
                             f"{out['store_byte_identical']}, evaluation identical {out['evaluation_identical']}")
    return out


def run_compile(work: Path, params: dict[str, Any], sizes: dict[str, Any], uncompiled: float) -> dict[str, Any]:
    from pipeline.training.run import train_run

    p = copy.deepcopy(params)
    p["strategy"] = "madry"
    p["train"]["epochs"] = 2
    p["perf"]["compile"] = True
    cfg = config_from_dict(p, "gpu check compile")
    summary, s, peak = measured(lambda: train_run(cfg, "student", work / "compiled.pt", progress=False))
    first, second = (float(r["seconds"]) for r in summary["history"][:2])
    return {"first_epoch_seconds": first, "steady_epoch_seconds": second,
            "compile_seconds_estimate": round(first - second, 3),
            "steady_speedup_over_uncompiled": round(uncompiled / second, 3) if second else None,
            "peak_gpu_mib": peak, "total_seconds": s}


# --------------------------------------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--budget", type=float, default=480.0, help="hard wall-time budget in seconds "
                        "(default 480: 8 minutes); parts that no longer fit are skipped")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_check.json",
                        help="JSON to write")
    parser.add_argument("--cpu", action="store_true", help="the CPU toy mode even where CUDA is present")
    parser.add_argument("--keep", type=Path, help="keep the work folder here instead of a temporary one")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu
    mode = "gpu" if cuda else "cpu-toy"
    sizes = dict(GPU_SIZES if cuda else CPU_SIZES)
    if cuda:
        sizes["nproc"] = torch.cuda.device_count()
    device = "cuda" if cuda else "cpu"
    desc = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda
            else f"CPU ({platform.processor() or platform.machine()}): no CUDA device, toy sizes")
    print(f"gpu check, mode {mode}: {desc}; budget {args.budget:.0f} s", flush=True)
    report: dict[str, Any] = {"mode": mode, "device": desc, "torch": torch.__version__,
                              "cuda": torch.version.cuda, "budget_s": args.budget, "sizes": sizes, "parts": {}}
    args.out = args.out.resolve()
    folder = (args.keep or Path(tempfile.mkdtemp(prefix="sipat-gpu-check-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    start_dir = Path.cwd()
    # the stages record the paths they are given: relative ones, inside the work folder, as torchrun's see them
    os.chdir(folder)
    work = Path(".")
    try:
        root = write_standin(folder / "data", sizes["n_train"], sizes["n_test"])
        params = base_params(root, sizes, device)
        left = lambda: args.budget - (time.perf_counter() - t_start)  # noqa: E731
        parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("pipeline", lambda: run_pipeline(work, params, sizes)),
            ("fp32_vs_fast", lambda: run_fp32_vs_fast(work, params, sizes, not cuda)),
            ("torchrun", lambda: run_torchrun(work, params, sizes["nproc"], max(10.0, left()))),
            ("compile", lambda: run_compile(work, params, sizes,
                                            report["parts"]["pipeline"]["madry_epoch"]["seconds"])),
        ]
        for name, fn in parts:
            need = MIN_SECONDS[name][0 if cuda else 1]
            if name == "compile" and not cuda:
                report["parts"][name] = {"status": "skipped", "reason": "compilation alone takes minutes on a CPU"}
            elif name in ("torchrun", "compile") and report["parts"].get("pipeline", {}).get("status") != "ok":
                report["parts"][name] = {"status": "skipped", "reason": "needs the pipeline part's outputs"}
            elif left() < need:
                report["parts"][name] = {"status": "skipped",
                                         "reason": f"{left():.0f} s left of the budget, the part needs ~{need} s"}
            else:
                t0 = time.perf_counter()
                try:
                    res = fn()
                    report["parts"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2), **res}
                except Exception as err:  # noqa: BLE001 - recorded, the next part still runs
                    report["parts"][name] = {"status": "failed", "seconds": round(time.perf_counter() - t0, 2),
                                             "reason": f"{type(err).__name__}: {err}",
                                             "traceback": traceback.format_exc()[-3000:]}
            part = report["parts"][name]
            print(f"  {name}: {part['status']}" + (f" ({part.get('seconds')} s)" if "seconds" in part else "")
                  + (f" - {part['reason'].splitlines()[0]}" if "reason" in part else ""), flush=True)
    finally:
        os.chdir(start_dir)
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    report["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary_lines(report), flush=True)
    print(f"wrote {args.out} ({report['elapsed_s']} s)")
    return 0 if all(p["status"] != "failed" for p in report["parts"].values()) else 1


def summary_lines(report: dict[str, Any]) -> str:
    lines = [f"mode {report['mode']} on {report['device']}, {report['elapsed_s']} s of {report['budget_s']:.0f}"]
    p = report["parts"].get("pipeline", {})
    if p.get("status") == "ok":
        for key in ("teacher_epoch", "mask_extraction", "sip_s_epoch", "madry_epoch", "autoattack"):
            st = p[key]
            rate = next(v for k, v in st.items() if k.endswith("_per_s"))
            unit = next(k for k in st if k.endswith("_per_s")).replace("_per_s", "/s")
            lines.append(f"  {key:16s} {st['seconds']:8.2f} s  {rate:10.1f} {unit:9s} peak "
                         f"{st['peak_gpu_mib'] if st['peak_gpu_mib'] is not None else 'n/a'} MiB")
        lines.append(f"  SIP-S / Madry epoch time: {p['sip_s_over_madry_epoch']}")
    f = report["parts"].get("fp32_vs_fast", {})
    if f.get("status") == "ok":
        lines.append(f"  fast path: {f['speedup_fast_over_fp32']}x fp32; loss diff {f['train_loss_difference']}, "
                     f"val clean acc diff {f['val_clean_acc_difference']}; mask exact {f['mask_exactly_unperturbed']}")
    t = report["parts"].get("torchrun", {})
    if t.get("status") == "ok":
        lines.append(f"  torchrun x{t['nproc']} ({t['backend']}): store identical {t['store_byte_identical']}, "
                     f"evaluation identical {t['evaluation_identical']}")
    c = report["parts"].get("compile", {})
    if c.get("status") == "ok":
        lines.append(f"  compile: ~{c['compile_seconds_estimate']} s, steady {c['steady_speedup_over_uncompiled']}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
