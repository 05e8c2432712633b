"""Synthetic extraction split over processes (torch.distributed, Gloo on the CPU) writes the one-process store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_cub_tree  # noqa: E402
from test_salience import save_tiny_checkpoint  # noqa: E402

from pipeline import distributed as D  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.maskstore import MaskStoreError  # noqa: E402
from pipeline.maskstore.writer import chunk_ranges, write_mask_store_distributed  # noqa: E402
from pipeline.synthetic_masks import extract_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# 4 classes × 10 training images; chunks of 12 give 4 chunks (the last one partial), and batches of 7 straddle
# the boundary between the two ranks' rows (0..23 and 24..39).
CLASSES, PER_CLASS, SIZE, CHUNK, BATCH, FRACTION = 4, 11, 12, 12, 7, 0.3


# ------------------------------------------------------------------------------------------- ranges

@pytest.mark.parametrize("n,chunk,world", [
    (40, 12, 2), (40, 8, 2), (40, 8, 3), (41, 8, 4), (7, 3, 5), (5, 8, 3), (0, 8, 2), (1, 1, 1), (100, 7, 16),
    (256, 256, 4), (1000, 256, 3),
])
def test_chunk_ranges_are_disjoint_aligned_and_cover(n, chunk, world):
    ranges = chunk_ranges(n, chunk, world)
    assert len(ranges) == world
    eff = max(1, min(chunk, n))  # the store's chunk size
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (a, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c, "consecutive, so disjoint and gap-free"
    for a, b in ranges:
        assert 0 <= a <= b <= n
        assert a % eff == 0 or a == n, "each range starts on a chunk boundary"
        assert b % eff == 0 or b == n, "and ends on one (or at n)"
    sizes = [-(-(b - a) // eff) for a, b in ranges]  # chunks per rank
    assert max(sizes) - min(sizes) <= 1, "chunks are dealt out evenly"
    with pytest.raises(ValueError):
        chunk_ranges(n, chunk, 0)


def test_rows_follow_the_global_batch_grid(tmp_path):
    """A rank's rows are computed in the batches of the whole run, then cut: pieces add up to the whole."""
    from pipeline.models import build_model
    from pipeline.synthetic_masks import synthetic_masks

    ds = load_dataset("cub", str(make_cub_tree(tmp_path / "cub", n_classes=2, per_class=9, size=SIZE)),
                      "train", SIZE)
    torch.manual_seed(0)
    model = build_model("smallcnn", 2)
    whole = torch.cat([m for _, m in synthetic_masks(model, ds, batch_size=5, progress=False)])
    for cuts in ([0, 16], [0, 3, 11, 16], [0, 7, 7, 16], [0, 16, 16]):
        parts, zero = [], 0
        for lo, hi in zip(cuts, cuts[1:]):
            it = synthetic_masks(model, ds, batch_size=5, progress=False, rows=(lo, hi))
            batches = list(it)
            starts = sorted({lo, *range(lo - lo % 5 + 5, hi, 5)}) if hi > lo else []
            assert [s for s, _ in batches] == starts
            parts += [m for _, m in batches]
            zero += it.stats["zero_gradient"]
        assert torch.equal(torch.cat(parts), whole) and zero == 0
    with pytest.raises(ValueError, match="rows"):
        synthetic_masks(model, ds, rows=(3, 17))


def test_single_process_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_from_env("cpu")
    assert info == D.DistInfo(0, 1, 0, torch.device("cpu"), False) and info.is_main and not info.distributed
    assert not torch.distributed.is_initialized() and D.is_main() and D.world_size() == 1
    assert D.all_ok(False) is False and D.broadcast_object(3) == 3 and D.gather_objects(4) == [4]
    D.barrier()
    D.shutdown(info)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not D.init_from_env("cpu").distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init_from_env("cpu")


# ------------------------------------------------------------------------------------------- helpers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(tmp: Path) -> dict:
    root = make_cub_tree(tmp / "CUB_200_2011", n_classes=CLASSES, per_class=PER_CLASS, size=SIZE)
    ckpt = save_tiny_checkpoint(tmp / "teacher.pt", num_classes=CLASSES)
    return {"root": str(root), "ckpt": str(ckpt), "tmp": str(tmp)}


def _extract(cfg: dict, out: Path) -> dict:
    ds = load_dataset("cub", cfg["root"], "train", SIZE)
    return extract_synthetic(cfg["ckpt"], ds, out, root=cfg["root"], fraction=FRACTION, batch_size=BATCH,
                             chunk_size=CHUNK, device="cpu", progress=False)


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    """Same chunk files byte for byte, same array, same attributes but for the creation time."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:  # chunks and metadata alike: stores record no creation time
        assert fa[name] == fb[name], name
    assert np.array_equal(zarr.open_array(str(a), mode="r")[:], zarr.open_array(str(b), mode="r")[:])


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if name in p.name)


# ------------------------------------------------------------------------------------------- spawned ranks

class _FailingBatches:
    """Rank `bad`'s batches raise after its first batch; the other ranks' are fine."""

    def __init__(self, rank: int, bad: int, rows: tuple[int, int], shape):
        self.rank, self.bad, self.rows, self.shape, self.stats = rank, bad, rows, shape, {"zero_gradient": 0}

    def __iter__(self):
        lo, hi = self.rows
        for s in range(lo, hi, 4):
            yield s, torch.ones((min(4, hi - s), *self.shape), dtype=torch.bool)
            if self.rank == self.bad:
                raise ValueError(f"injected failure on rank {self.rank}")


def _rank_main(rank: int, world: int, port: int, cfg: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tmp = Path(cfg["tmp"])
    result: dict = {}
    try:
        info = D.init_from_env("cpu")
        result["info"] = [info.rank, info.world_size, info.local_rank, str(info.device), info.initialised_here]
        # A caller's group is reused and left initialised.
        attrs = _extract(cfg, tmp / "dist.zarr")
        result["n"] = attrs["n"]
        result["group_kept"] = torch.distributed.is_initialized()
        # A failure on one rank: every rank raises, and nothing appears at the final path.
        for bad in (1, 0):
            shape = (3, SIZE, SIZE)
            rows = chunk_ranges(40, CHUNK, world)[rank]
            try:
                write_mask_store_distributed(tmp / f"fail{bad}.zarr", _FailingBatches(rank, bad, rows, shape),
                                             n=40, shape=shape, attrs={}, chunk_size=CHUNK)
                result[f"fail{bad}"] = "no error"
            except (ValueError, MaskStoreError) as err:
                result[f"fail{bad}"] = f"{type(err).__name__}: {err}"
        result["all_ok"] = [D.all_ok(True), D.all_ok(rank == 1)]
        D.shutdown(info)
        result["shut"] = not torch.distributed.is_initialized()
    except Exception:  # noqa: BLE001 - reported to the test
        result["error"] = traceback.format_exc()
    (tmp / f"rank{rank}.json").write_text(json.dumps(result))


def test_two_spawned_processes_write_the_one_process_store(tmp_path):
    cfg = _setup(tmp_path)
    one = _extract(cfg, tmp_path / "one.zarr")
    assert one["n"] == 40 and one["counts"] == {"zero_gradient": 0}
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), cfg), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert "error" not in res, res["error"]
        assert res["info"] == [r, 2, r, "cpu", True]
        assert res["n"] == 40 and res["group_kept"] and res["shut"]
        assert res["all_ok"] == [True, False]
    assert_same_store(tmp_path / "one.zarr", tmp_path / "dist.zarr")
    # The failing rank re-raises its own error; the other one names it.
    assert results[1]["fail1"] == "ValueError: injected failure on rank 1"
    assert results[0]["fail1"].startswith("MaskStoreError") and "rank 1: ValueError: injected" in results[0]["fail1"]
    assert results[0]["fail0"] == "ValueError: injected failure on rank 0"
    assert "rank 0: ValueError: injected" in results[1]["fail0"]
    for bad in (0, 1):
        assert _leftovers(tmp_path, f"fail{bad}.zarr") == [], "no store and no temporary directory left"


# ------------------------------------------------------------------------------------------- torchrun stage

def test_stage_under_torchrun_writes_the_one_process_store(tmp_path):
    """`torchrun --nproc-per-node 2 -m stages.masks_synthetic` in a scratch working directory."""
    cfg = _setup(tmp_path)
    work = tmp_path / "work"
    (work / "data" / "teacher").mkdir(parents=True)
    os.link(cfg["ckpt"], work / "data" / "teacher" / "model.pt")
    params = {"dataset": "cub", "device": "cpu", "data": {"root": cfg["root"], "image_size": SIZE},
              "salience": {"fraction": FRACTION, "target": "label", "batch_size": BATCH, "chunk_size": CHUNK}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                           "-m", "stages.masks_synthetic", "--teacher", "data/teacher/model.pt",
                           "--out", "data/masks/synthetic.zarr"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("40 masks, salient fraction") == 1, "one summary, from rank 0"
    # The reference uses the same relative checkpoint path, so the recorded provenance matches too.
    cwd = os.getcwd()
    os.chdir(work)
    try:
        _extract({**cfg, "ckpt": "data/teacher/model.pt"}, work / "one.zarr")
    finally:
        os.chdir(cwd)
    assert_same_store(work / "one.zarr", work / "data" / "masks" / "synthetic.zarr")
    assert _leftovers(work / "data" / "masks", "synthetic.zarr") == ["synthetic.zarr"]
