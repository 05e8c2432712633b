"""Clean accuracy and AutoAttack (standard, L-inf) robust accuracy at a list of budgets, sharded over processes.

AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T, Square) is driven one attack at a time on the points
still robust, and every adversarial point it returns is re-checked here (inside the ε-ball, inside [0, 1],
misclassified) before the point counts as broken. So the robust accuracy is the project's own worst case per
point, with a per-attack breakdown.

The evaluated points are cut into fixed chunks of `chunk_size` consecutive points. A chunk is the unit of work:
its clean predictions, then at every budget the cascade, each attack run as one AutoAttack batch (the chunk's
points still robust) with its own seed drawn from (evaluation seed, chunk index, ε, attack). Every AutoAttack
attack reseeds torch's generator at the start of its `perturb` and draws random starts and Square's windows
for the whole batch, so a point's result depends on its chunk and on nothing else: not on the worker that ran
the chunk, nor on how many workers there were. Workers are processes: the ranks of a `torchrun` job (one per
GPU, chunks dealt out round-robin and gathered after every round) or, without one, a local pool of `workers`
processes with `threads_per_worker` torch threads each. Finished chunks are handed to `on_chunk_done` as they
come, so an interrupted evaluation can resume at chunk granularity (`done`).

With `ladder=True`, budgets run in increasing order and a point broken at a smaller ε is counted broken at
every larger one (its adversarial example lies in every larger ball) without attacking it again; the ladder
runs inside each chunk, so it too is the same for any number of workers.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import queue as queue_mod
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.core.config import format_budget
from pipeline.data import ImageDataset

log = logging.getLogger(__name__)

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
# Keys of the metrics JSON that hold wall-clock measurements or the worker layout; everything else is
# determined by the checkpoint, the points and the evaluation settings (see `without_timings`).
TIMING_KEYS = ("eval_seconds", "timing")


def eps_key(eps: float) -> str:
    """Metric key for a budget: 8/255 -> 'eps_8_255' (safe in DVC metric paths)."""
    return "eps_" + format_budget(eps).replace("/", "_").replace(".", "p")


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics without their timing keys: equal for any number of workers."""
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def select_examples(dataset: ImageDataset, n_examples: Optional[int], seed: int) -> np.ndarray:
    """The evaluated test indices: all, or a seeded random subset of n (sorted)."""
    n = len(dataset)
    if n_examples is None or n_examples >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=n_examples, replace=False))


def points_digest(indices: Iterable[int]) -> str:
    """16 hex digits identifying a list of evaluated indices (order included)."""
    arr = np.ascontiguousarray(np.asarray(list(indices), dtype="<i8"))
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


def stack_examples(dataset: ImageDataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([dataset[int(i)][0] for i in indices])
    y = torch.as_tensor(np.asarray(dataset.labels)[indices], dtype=torch.long)
    return x, y


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, stop) of every chunk of `chunk_size` consecutive points (the last one may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]


def chunk_seed(seed: int, chunk: int, eps: float, attack: str) -> int:
    """The seed of one attack on one chunk at one budget (a 62-bit integer; torch accepts up to 2**64 - 1)."""
    text = f"{seed}|{chunk}|{float(eps).hex()}|{attack}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) >> 2


def attacks_for(n_classes: int, attacks: tuple[str, ...] = STANDARD_ATTACKS) -> tuple[str, ...]:
    """The cascade actually run: AutoAttack's targeted DLR loss needs at least four classes."""
    if n_classes < 4 and "apgd-t" in attacks:
        return tuple(a for a in attacks if a != "apgd-t")
    return tuple(attacks)


def attack_model(model: nn.Module, device: torch.device, *, fuse: bool = True,
                 channels_last: Optional[bool] = None) -> nn.Module:
    """An eval-mode copy of `model` on `device` for the attacks, with frozen parameters.

    Frozen parameters change no value and spare every backward pass the weight gradients (FAB calls
    `backward()`, which would compute and accumulate them). With `fuse`, each convolution absorbs the batch
    norm that follows it (exact in eval mode up to float rounding: about 1e-8 on the logits), which removes
    that layer's passes; models that torch.fx cannot trace are used unfused. `channels_last` (default: on the
    CPU) stores 4-d weights channels-last so that convolutions take oneDNN's path.
    """
    model = copy.deepcopy(model).to(device).eval()
    if fuse:
        from torch.fx.experimental.optimization import fuse as fx_fuse

        try:
            model = fx_fuse(model, inplace=True)
        except Exception as err:  # noqa: BLE001 - tracing fails in many ways on dynamic models
            log.debug("conv/batch-norm fusion skipped (%s: %s)", type(err).__name__, err)
    if channels_last if channels_last is not None else device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model.requires_grad_(False)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    out = [model(xb.to(device)).argmax(1).cpu() for xb in torch.split(x, batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _make_autoattack(model: nn.Module, eps: float, n_classes: int, device: torch.device, seed: int):
    from pyautoattack import AutoAttack

    # one "setting parameters" line per chunk and budget is noise; AutoAttack's warnings still show
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device, seed=seed)
    # Targeted attacks use up to 9 target classes; fewer exist on small label sets.
    aa.apgd_targeted.n_target_classes = max(1, min(9, n_classes - 1))
    aa.fab.n_target_classes = max(1, min(9, n_classes - 1))
    return aa


def autoattack_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, robust: torch.Tensor, eps: float, *,
                      n_classes: int, device: torch.device, batch_size: int, seed: int | Callable[[str], int],
                      attacks: tuple[str, ...] = STANDARD_ATTACKS,
                      on_attack: Optional[Callable[[str, int, int], None]] = None,
                      make_attack: Optional[Callable] = None) -> tuple[torch.Tensor, dict]:
    """Run the cascade on the points flagged `robust`; returns the updated flags and, per attack, the points it
    broke and its seconds.

    `seed` is one seed for every attack or a function of the attack's name; AutoAttack runs in batches of
    `batch_size` (one batch when it is at least the number of points).
    """
    robust = robust.clone()
    attacks = attacks_for(n_classes, attacks)
    aa = (make_attack or _make_autoattack)(model, eps, n_classes, device, seed if isinstance(seed, int) else 0)
    broken_by: dict[str, int] = {}
    seconds: dict[str, float] = {}
    rejected = 0
    for name in attacks:
        t0 = time.perf_counter()
        idx = robust.nonzero().flatten()
        if len(idx) == 0:
            broken_by[name] = 0
            seconds[name] = 0.0
            if on_attack is not None:
                on_attack(name, 0, 0)
            continue
        aa.attacks_to_run = [name]
        aa.seed = seed if isinstance(seed, int) else seed(name)
        xs, ys = x[idx], y[idx]
        x_adv, _ = aa.run_standard_evaluation(xs, ys, batch_size=batch_size)
        x_adv = x_adv.detach().cpu()
        pred = predict(model, x_adv, batch_size, device)
        linf = (x_adv - xs).flatten(1).abs().amax(1)
        valid = (linf <= eps + 1e-5) & (x_adv.flatten(1).amin(1) >= 0) & (x_adv.flatten(1).amax(1) <= 1)
        fooled = (pred != ys) & valid
        rejected += int(((pred != ys) & ~valid).sum())
        robust[idx[fooled]] = False
        broken_by[name] = int(fooled.sum())
        seconds[name] = round(time.perf_counter() - t0, 3)
        if on_attack is not None:
            on_attack(name, int(fooled.sum()), len(idx))
    return robust, {"broken_by": broken_by, "rejected": rejected, "seconds": seconds}


def evaluate_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: list[float], *, chunk: int,
                   n_classes: int, device: torch.device, batch_size: int, seed: int, ladder: bool,
                   attacks: tuple[str, ...] = STANDARD_ATTACKS, make_attack: Optional[Callable] = None,
                   on_attack: Optional[Callable[[int, str, str, int, int], None]] = None) -> dict[str, Any]:
    """One chunk at every budget: clean flags, and per ε the robust flags, per-attack counts and seconds.

    The whole chunk is one AutoAttack batch, seeded by `chunk_seed`; the result depends on the chunk's points
    and the arguments only. `on_attack(chunk, eps_key, attack, broken, attacked)` follows every attack.
    """
    t_chunk = time.perf_counter()
    model = attack_model(model, device)
    clean = predict(model, x, batch_size, device) == y
    still = clean
    per_eps: dict[str, Any] = {}
    for eps in sorted(eps_list):
        key = eps_key(eps)
        start = still if ladder else clean
        t0 = time.perf_counter()
        flags, info = autoattack_robust(
            model, x, y, start, eps, n_classes=n_classes, device=device, batch_size=max(1, len(y)),
            seed=lambda name, e=eps: chunk_seed(seed, chunk, e, name), attacks=attacks, make_attack=make_attack,
            on_attack=None if on_attack is None else (lambda a, k, m, key=key: on_attack(chunk, key, a, k, m)))
        per_eps[key] = {"robust_flags": flags.tolist(), "broken_by": info["broken_by"], "rejected": info["rejected"],
                        "attacked": int(start.sum()), "seconds": round(time.perf_counter() - t0, 3),
                        "attack_seconds": info["seconds"]}
        still = flags
    return {"chunk": chunk, "n": len(y), "clean_flags": clean.tolist(), "eps": per_eps,
            "seconds": round(time.perf_counter() - t_chunk, 3)}


# --------------------------------------------------------------------------------------- local process pool
# A spawned worker receives the model and the points once (pool initialiser), then runs chunks by index and
# reports every finished attack on a queue so that the parent's progress bar moves between chunks.

_WORKER: dict[str, Any] = {}


def _init_worker(state: dict[str, Any], events, threads: int) -> None:
    _exit_with_parent()
    torch.set_num_threads(threads)
    _WORKER.update(state, events=events)


def _exit_with_parent() -> None:
    """End this worker as soon as the process that spawned it is gone (killed with SIGKILL, say), instead of
    blocking on a queue nobody reads while it holds a GPU. The parent's sentinel is a pipe that closes with it."""
    import multiprocessing as mp
    import threading
    from multiprocessing.connection import wait as wait_ready

    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait_ready([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker_chunk(chunk: int, start: int, stop: int) -> dict[str, Any]:
    w = _WORKER
    events = w["events"]
    return evaluate_chunk(w["model"], w["x"][start:stop], w["y"][start:stop], w["eps_list"], chunk=chunk,
                          n_classes=w["n_classes"], device=w["device"], batch_size=w["batch_size"], seed=w["seed"],
                          ladder=w["ladder"], attacks=w["attacks"], make_attack=w["make_attack"],
                          on_attack=lambda *ev: events.put(ev))


class ChunkFailed(RuntimeError):
    """A worker failed (raised or died) on a chunk; finished chunks were handed to `on_chunk_done` first."""


def _run_pool(jobs: list[tuple[int, int, int]], state: dict[str, Any], workers: int, threads: int,
              on_result: Callable[[dict], None], on_event: Callable[[tuple], None]) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork is unsafe once torch's thread pools (or CUDA) are up
    events = ctx.Queue()

    def drain() -> None:
        while True:
            try:
                on_event(events.get_nowait())
            except queue_mod.Empty:
                return

    failure: Optional[tuple[int, BaseException]] = None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(state, events, threads)) as pool:
        futures = {pool.submit(_worker_chunk, *job): job[0] for job in jobs}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            drain()
            for fut in sorted(finished, key=futures.get):
                if fut.cancelled():
                    continue
                err = fut.exception()
                if err is not None:
                    if failure is None:
                        failure = (futures[fut], err)
                        for other in pending:  # chunks not started yet; running ones finish and are kept
                            other.cancel()
                    continue
                on_result(fut.result())
        drain()
    events.close()
    if failure is not None:
        chunk, err = failure
        raise ChunkFailed(f"evaluation worker failed on chunk {chunk}: {type(err).__name__}: {err}") from err


# ------------------------------------------------------------------------------------------------ driver

def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: list[float], *, n_classes: int,
                   device: torch.device, batch_size: int = 500, seed: int = 0, ladder: bool = False,
                   chunk_size: int = 90, workers: int = 1, threads_per_worker: Optional[int] = None,
                   attacks: tuple[str, ...] = STANDARD_ATTACKS, done: Optional[dict[int, dict]] = None,
                   on_chunk_done: Optional[Callable[[dict], None]] = None, make_attack: Optional[Callable] = None,
                   progress: bool = True) -> dict[str, Any]:
    """Clean and robust accuracy at every ε over chunks of `chunk_size` points; the same for any `workers`.

    `done` maps chunk index -> result of an interrupted run to reuse; `on_chunk_done` receives each new chunk
    result (on rank 0 under torchrun). `workers` > 1 starts a local pool of spawned processes (ignored inside a
    torchrun job, whose ranks are the workers); `threads_per_worker` sets their torch threads (default: this
    process's count divided among the workers). `make_attack` replaces AutoAttack's construction (it must be
    picklable for a pool). The result's "timing" entry is the only part that depends on the run's layout.
    """
    from pipeline import distributed as D

    eps_list = sorted(eps_list)
    n = len(y)
    if n_classes < 4 and "apgd-t" in attacks:
        log.warning("%d classes: skipping apgd-t (needs >= 4 classes)", n_classes)
    attacks = attacks_for(n_classes, attacks)
    bounds = chunk_bounds(n, chunk_size)
    results: dict[int, dict] = {int(k): v for k, v in (done or {}).items() if int(k) < len(bounds)}
    if results and D.is_main():
        log.info("reusing %d of %d finished chunks", len(results), len(bounds))
    jobs = [(c, a, b) for c, (a, b) in enumerate(bounds) if c not in results]
    world, rank = D.world_size(), D.rank()
    main = rank == 0
    threads = threads_per_worker or max(1, torch.get_num_threads() // max(1, workers))

    total = n * len(attacks) * len(eps_list)
    bar = tqdm(total=total, initial=sum(r["n"] for r in results.values()) * len(attacks) * len(eps_list),
               desc=f"AutoAttack {len(eps_list)} eps x {len(attacks)} attacks", unit="pt",
               disable=not (progress and main), mininterval=1.0, smoothing=0.1)
    per_line: dict[tuple[int, str], list[str]] = {}

    def on_event(ev: tuple) -> None:
        chunk, key, name, broken, attacked = ev
        a, b = bounds[chunk]
        bar.update(b - a)
        line = per_line.setdefault((chunk, key), [])
        line.append(f"{name} {broken}/{attacked}")
        if len(line) == len(attacks):
            log.info("chunk %d/%d %s: %s", chunk + 1, len(bounds), key, ", ".join(per_line.pop((chunk, key))))

    def on_remote(res: dict) -> None:  # a chunk another rank ran: the bar moves by all of it at once
        bar.update(res["n"] * len(attacks) * len(eps_list))
        for key, e in res["eps"].items():
            log.info("chunk %d/%d %s: %s", res["chunk"] + 1, len(bounds), key,
                     ", ".join(f"{a} {k}" for a, k in e["broken_by"].items()))

    def on_result(res: dict) -> None:
        results[res["chunk"]] = res
        if on_chunk_done is not None and main:
            on_chunk_done(res)

    common = dict(n_classes=n_classes, batch_size=batch_size, seed=seed, ladder=ladder, attacks=attacks,
                  make_attack=make_attack)
    t0 = time.perf_counter()
    if main:
        log.info("AutoAttack on %d points in %d chunks of %d, %d budget(s), %s", n, len(bounds), chunk_size,
                 len(eps_list), f"{world} ranks" if world > 1 else f"{workers} worker(s) x {threads} thread(s)")
    pool = world == 1 and workers > 1 and len(jobs) > 1
    prev_threads = torch.get_num_threads()
    if threads_per_worker and not pool:
        torch.set_num_threads(threads_per_worker)
    # log lines go above the bar instead of through it
    redirect = contextlib.nullcontext() if bar.disable else logging_redirect_tqdm()
    try:
        with redirect:
            if world > 1:
                _run_ranks(jobs, model, x, y, eps_list, device, common, rank, world, on_result, on_event, on_remote)
            elif pool:
                # workers get a CPU copy (pickled once each) and move it to `device` themselves
                state = dict(model=model if device.type == "cpu" else copy.deepcopy(model).cpu(), x=x, y=y,
                             eps_list=eps_list, device=device, **common)
                _run_pool(jobs, state, min(workers, len(jobs)), threads, on_result, on_event)
            else:
                for c, a, b in jobs:
                    on_result(evaluate_chunk(model, x[a:b], y[a:b], eps_list, chunk=c, device=device,
                                             on_attack=lambda *ev: on_event(ev), **common))
    finally:
        torch.set_num_threads(prev_threads)
        bar.close()
    wall = time.perf_counter() - t0
    return _assemble([results[c] for c in range(len(bounds))], eps_list, attacks, n, wall=wall, verbose=main,
                     layout={"workers": world if world > 1 else min(workers, max(1, len(jobs))),
                             "threads_per_worker": threads, "ranks": world, "chunks": len(bounds),
                             "chunks_reused": len(bounds) - len(jobs)})


def _run_ranks(jobs, model, x, y, eps_list, device, common, rank, world, on_result, on_event, on_remote) -> None:
    """torchrun: chunks dealt out round-robin; after each round every rank holds every finished chunk."""
    from pipeline import distributed as D

    mine = jobs[rank::world]
    rounds = -(-len(jobs) // world)
    for r in range(rounds):
        res = None
        if r < len(mine):
            c, a, b = mine[r]
            res = evaluate_chunk(model, x[a:b], y[a:b], eps_list, chunk=c, device=device,
                                 on_attack=(lambda *ev: on_event(ev)) if rank == 0 else None, **common)
        for src, got in enumerate(D.all_gather_objects(res)):
            if got is None:
                continue
            if src != rank:
                on_remote(got)
            on_result(got)


def _assemble(chunks: list[dict], eps_list: list[float], attacks: tuple[str, ...], n: int, *, wall: float,
              layout: dict[str, Any], verbose: bool = True) -> dict[str, Any]:
    clean = torch.tensor([f for r in chunks for f in r["clean_flags"]], dtype=torch.bool)
    result: dict[str, Any] = {"n_examples": n, "clean_acc": float(clean.float().mean()) if n else 0.0,
                              "robust_acc": {}, "attacks": {}}
    seconds: dict[str, dict[str, float]] = {}
    for eps in eps_list:
        key = eps_key(eps)
        flags = torch.tensor([f for r in chunks for f in r["eps"][key]["robust_flags"]], dtype=torch.bool)
        robust = float(flags.float().mean()) if n else 0.0
        broken_by = {a: sum(r["eps"][key]["broken_by"][a] for r in chunks) for a in attacks}
        rejected = sum(r["eps"][key]["rejected"] for r in chunks)
        attacked = sum(r["eps"][key]["attacked"] for r in chunks)
        result["robust_acc"][key] = robust
        result["attacks"][key] = {"eps": eps, "broken_by": broken_by, "rejected": rejected, "attacked": attacked}
        seconds[key] = {"total": round(sum(r["eps"][key]["seconds"] for r in chunks), 2),
                        **{a: round(sum(r["eps"][key].get("attack_seconds", {}).get(a, 0.0) for r in chunks), 2)
                           for a in attacks}}
        if not verbose:
            continue
        if rejected:
            log.warning("eps=%s: %d adversarial points outside the threat model were ignored",
                        format_budget(eps), rejected)
        log.info("eps=%s robust accuracy %.4f (%d of %d attacked points broken: %s)", format_budget(eps), robust,
                 sum(broken_by.values()), attacked, ", ".join(f"{a} {k}" for a, k in broken_by.items()))
    # worker seconds summed over chunks (with several workers they add up to more than the wall time)
    result["timing"] = {"wall_seconds": round(wall, 2), "attack_seconds": seconds, **layout}
    return result
