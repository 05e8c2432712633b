"""Sharded evaluation: the same flags and metrics for any number of worker processes, and resumption by chunk.

The fake attack below behaves like AutoAttack's attacks where it matters here: it reseeds torch's generator
with its `seed` and draws one number per point of the batch it is given, so its outcome depends on the seed
and on the batch's make-up. Results that agree across worker counts therefore show that every chunk is
attacked as the same batch with the same seed wherever it runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pipeline.evaluation import (ChunkFailed, chunk_bounds, chunk_seed, eps_key, evaluate_model,
                                 without_timings)

CPU = torch.device("cpu")


class MeanThreshold(nn.Module):
    """Class 0 when the image mean exceeds 0.5, else class 1."""

    def forward(self, x):
        s = 20 * (x.flatten(1).mean(1) - 0.5)
        return torch.stack([s, -s], 1)


class SeededFlip:
    """Per attack call: seeds torch with `seed`, then lowers a random subset of the batch by ε (which fools
    MeanThreshold), each point with probability `p` from one draw over the batch."""

    def __init__(self, eps, seed, p, crash_on, log_dir):
        self.eps, self.seed, self.p, self.crash_on, self.log_dir = eps, seed, p, crash_on, log_dir
        self.attacks_to_run = []

    def run_standard_evaluation(self, x, y, batch_size):
        ids = [int(round(float(v) * 100)) for v in x[:, 0, 0, 0]]
        if self.crash_on is not None and self.crash_on[0] in ids:
            if self.crash_on[1] == "exit":
                os._exit(3)  # a worker killed mid-way: no exception, no cleanup
            raise RuntimeError(f"attack failed on point {self.crash_on[0]}")
        if self.log_dir is not None:
            with open(Path(self.log_dir) / f"{os.getpid()}.log", "a") as f:
                f.write(" ".join(map(str, ids)) + "\n")
        torch.manual_seed(self.seed)
        hit = torch.rand(len(x)) < self.p
        out = x.clone()
        out[hit, :, 1:, :] -= self.eps  # the id pixel stays
        return out.clamp(0, 1), None


class FlipFactory:
    """Picklable stand-in for `_make_autoattack` (a spawned worker cannot see a monkeypatch)."""

    def __init__(self, p=0.3, crash_on=None, log_dir=None):
        self.p, self.crash_on, self.log_dir = p, crash_on, log_dir

    def __call__(self, model, eps, n_classes, device, seed):
        return SeededFlip(eps, seed, self.p, self.crash_on, self.log_dir)


def _points(n):
    x = torch.full((n, 1, 4, 4), 0.56)
    for i in range(n):
        x[i, 0, 0, 0] = i / 100
    x[[3, 17], :, 1:, :] = 0.2  # misclassified before any attack
    return x, torch.zeros(n, dtype=torch.long)


EPS = [0.05, 0.1, 0.2]


def _run(x, y, **kw):
    kw.setdefault("make_attack", FlipFactory())
    return evaluate_model(MeanThreshold(), x, y, kw.pop("eps", EPS), n_classes=10, device=CPU, chunk_size=8,
                          progress=False, **kw)


@pytest.mark.parametrize("ladder,counts", [(False, (1, 2, 3)), (True, (1, 3))])
def test_flags_identical_for_1_2_and_3_workers(ladder, counts):
    x, y = _points(37)  # 5 chunks of 8, the last one short
    got = {w: _run(x, y, workers=w, threads_per_worker=1, ladder=ladder) for w in counts}
    ref = without_timings(got[1])
    assert got[max(counts)]["timing"]["workers"] == max(counts)
    for w, res in got.items():
        assert without_timings(res) == ref, f"{w} workers"
    # the fake does break points, more at larger ε under the ladder
    acc = [ref["robust_acc"][eps_key(e)] for e in EPS]
    assert max(acc) < 35 / 37 and len(set(acc)) > 1
    if ladder:
        assert acc == sorted(acc, reverse=True)
    # another evaluation seed draws other attacks: the agreement above is not vacuous
    other = _run(x, y, seed=1, ladder=ladder)
    assert without_timings(other)["robust_acc"] != ref["robust_acc"]


def test_chunk_seeds_differ_by_chunk_budget_and_attack():
    seeds = {chunk_seed(0, c, e, a) for c in range(4) for e in EPS for a in ("apgd-ce", "square")}
    assert len(seeds) == 4 * len(EPS) * 2 and all(0 <= s < 2**63 for s in seeds)
    assert chunk_seed(0, 1, 0.1, "square") == chunk_seed(0, 1, 0.1, "square")
    assert chunk_bounds(37, 8)[-1] == (32, 37) and chunk_bounds(0, 8) == []


def test_resume_after_a_failing_worker_in_process(tmp_path):
    x, y = _points(37)
    saved = {}
    with pytest.raises(RuntimeError, match="point 20"):
        _run(x, y, make_attack=FlipFactory(crash_on=(20, "raise")), on_chunk_done=lambda r: saved.update({r["chunk"]: r}))
    assert sorted(saved) == [0, 1]  # chunk 2 (points 16..23) failed; nothing after it ran
    (tmp_path / "log").mkdir()
    resumed = _run(x, y, done=saved, make_attack=FlipFactory(log_dir=tmp_path / "log"))
    attacked = {int(i) for f in (tmp_path / "log").iterdir() for line in f.read_text().split("\n") for i in line.split()}
    assert attacked and min(attacked) >= 16  # finished chunks were not attacked again
    assert resumed["timing"]["chunks_reused"] == 2
    assert without_timings(resumed) == without_timings(_run(x, y))


def test_resume_after_a_killed_worker_process(tmp_path):
    x, y = _points(37)
    saved = {}
    with pytest.raises(ChunkFailed):
        _run(x, y, workers=2, threads_per_worker=1, make_attack=FlipFactory(crash_on=(34, "exit")),
             on_chunk_done=lambda r: saved.update({r["chunk"]: r}))
    assert 4 not in saved  # the chunk whose worker died
    (tmp_path / "log").mkdir()
    resumed = _run(x, y, done=saved, workers=2, threads_per_worker=1, make_attack=FlipFactory(log_dir=tmp_path / "log"))
    attacked = {int(i) for f in (tmp_path / "log").iterdir() for line in f.read_text().split("\n") for i in line.split()}
    bounds = chunk_bounds(37, 8)
    assert all(not any(a <= i < b for i in attacked) for c, (a, b) in enumerate(bounds) if c in saved)
    assert without_timings(resumed) == without_timings(_run(x, y))


class ShortAutoAttack:
    """The real AutoAttack (same code, same random draws) with fewer FAB iterations and Square queries."""

    def __call__(self, model, eps, n_classes, device, seed):
        from pipeline.evaluation import _make_autoattack

        aa = _make_autoattack(model, eps, n_classes, device, seed)
        aa.fab.n_iter, aa.square.n_queries = 20, 300
        return aa


def test_real_autoattack_same_for_1_and_2_workers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(9, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 4  # one point misclassified from the start
    kw = dict(n_classes=4, device=CPU, chunk_size=4, threads_per_worker=1, progress=False,
              make_attack=ShortAutoAttack())
    one = evaluate_model(model, x, y, [2 / 255, 24 / 255], workers=1, **kw)
    two = evaluate_model(model, x, y, [2 / 255, 24 / 255], workers=2, **kw)
    assert without_timings(one) == without_timings(two)
    assert one["clean_acc"] == pytest.approx(8 / 9)
    assert one["robust_acc"][eps_key(24 / 255)] < one["robust_acc"][eps_key(2 / 255)]
    assert one["attacks"][eps_key(2 / 255)]["attacked"] == 8


def _config(root, **evaluate):
    from pipeline.core.config import Config

    return Config(dataset="digits", data={"root": str(root), "image_size": 8},
                  evaluate={"eps": ["16/255", "32/255"], "n_examples": 30, "chunk_size": 7, **evaluate})


def _checkpoint(path: Path) -> Path:
    from pipeline.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("smallcnn", 10)
    save_checkpoint(path, model, {
        "arch": "smallcnn", "num_classes": 10, "mean": [0.0] * 3, "std": [1.0] * 3, "image_shape": [3, 8, 8],
        "dataset": "digits", "role": "student", "strategy": "madry", "seed": 0,
        "attack": {"eps": 32 / 255, "step_size": 8 / 255, "steps": 10, "random_start": True},
        "optim": {"epochs": 1, "lr": 0.05}})
    return path


def test_metrics_json_byte_identical_for_1_and_2_workers(tmp_path, digits_root):
    from pipeline.evaluation.run import evaluate_run

    ckpt = _checkpoint(tmp_path / "model.pt")
    texts = {}
    for w in (1, 2):
        out = tmp_path / f"w{w}.json"
        evaluate_run(_config(digits_root, workers=w, threads_per_worker=1), ckpt, out, device=CPU,
                     partial_path=tmp_path / f".w{w}.partial.json", make_attack=FlipFactory(p=0.5), progress=False)
        m = json.loads(out.read_text())
        assert m["timing"]["workers"] == w and not (tmp_path / f".w{w}.partial.json").exists()
        texts[w] = json.dumps(without_timings(m), indent=2)
    assert texts[1] == texts[2]
    m = json.loads(texts[1])
    assert len(m["checkpoint_sha256"]) == 16 and len(m["points_digest"]) == 16 and m["n_examples"] == 30
    assert m["run"] == {"dataset": "digits", "model": "smallcnn", "image_size": 8,
                        "attack": {"eps": 32 / 255, "step_size": 8 / 255, "steps": 10, "random_start": True},
                        "optim": {"epochs": 1, "lr": 0.05}}
    assert set(m["robust_acc"]) == {"eps_16_255", "eps_32_255"} and m["evaluation"]["chunk_size"] == 7


class FailingAfter(FlipFactory):
    """Raises on its n-th use (one use per chunk and budget); in-process only (the count lives in the parent)."""

    def __init__(self, n):
        super().__init__(p=0.5)
        self.n = n

    def __call__(self, *args):
        self.n -= 1
        if self.n == 0:
            raise RuntimeError("attack failed")
        return super().__call__(*args)


def test_partial_results_resume_in_evaluate_run(tmp_path, digits_root):
    from pipeline.evaluation.run import evaluate_run

    ckpt = _checkpoint(tmp_path / "model.pt")
    partial = tmp_path / ".m.partial.json"
    cfg = _config(digits_root, workers=1)
    with pytest.raises(RuntimeError, match="attack failed"):
        # two budgets per chunk: the fifth use is chunk 2's first budget
        evaluate_run(cfg, ckpt, tmp_path / "m.json", device=CPU, partial_path=partial, progress=False,
                     make_attack=FailingAfter(5))
    assert sorted(json.loads(partial.read_text())["chunks"]) == ["0", "1"] and not (tmp_path / "m.json").exists()
    # another chunk size is another evaluation: its partial file is not reused
    other = evaluate_run(_config(digits_root, workers=1, chunk_size=10), ckpt, tmp_path / "o.json", device=CPU,
                         progress=False, make_attack=FlipFactory(p=0.5))
    assert other["timing"]["chunks_reused"] == 0
    # another forward batch size is the same evaluation: the finished chunks are kept
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"batch_size": 7})})
    resumed = evaluate_run(cfg, ckpt, tmp_path / "m.json", device=CPU, partial_path=partial, progress=False,
                           make_attack=FlipFactory(p=0.5))
    assert resumed["timing"]["chunks_reused"] == 2 and not partial.exists()
    fresh = evaluate_run(cfg, ckpt, tmp_path / "f.json", device=CPU, progress=False, make_attack=FlipFactory(p=0.5))
    assert without_timings(resumed) == without_timings(fresh)


def test_evaluate_defaults_are_the_params_file_and_bad_layouts_are_rejected_by_name():
    from pipeline.core.config import ConfigError, config_from_dict, load_config

    repo = Path(__file__).resolve().parents[1]
    assert config_from_dict({}).evaluate == load_config(repo / "params.yaml").evaluate
    for key, value in (("workers", 0), ("chunk_size", 0), ("threads_per_worker", 0), ("chunks", 3)):
        with pytest.raises(ConfigError, match=f"evaluate.{key}"):
            config_from_dict({"evaluate": {key: value}})
