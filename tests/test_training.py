import contextlib
import copy

import pytest
import torch

from pipeline.attacks import pgd
from pipeline.core.config import config_from_dict
from pipeline.data import BatchIterator
from pipeline.models import build_model, load_checkpoint
from pipeline.strategies import Batch, Strategy, make_strategy
from pipeline.training import TrainingDiverged, TrainOptions, fit
from pipeline.training.run import train_run


def _cfg(digits_root, **over):
    raw = {"dataset": "digits", "strategy": "madry", "device": "cpu", "data": {"root": str(digits_root)},
           "attack": {"steps": 2}, "train": {"epochs": 3, "batch_size": 128, "lr": 0.05,
                                             "schedule": {"kind": "multistep", "milestones": [2]}},
           "perf": {"amp": "off", "channels_last": "off"}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(raw)


def test_resume_after_interruption_gives_identical_weights(digits_root, tmp_path):
    cfg = _cfg(digits_root, data={"augment": True})
    train_run(cfg, "student", tmp_path / "full.pt", progress=False)
    out = tmp_path / "resumed.pt"
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, "student", out, progress=False, stop_after_epoch=2)
    assert not out.exists() and (tmp_path / ".resumed.resume.pt").exists()
    summary = train_run(cfg, "student", out, progress=False)
    assert [r["epoch"] for r in summary["history"]] == [1, 2, 3]
    assert not (tmp_path / ".resumed.resume.pt").exists()  # cleaned up once the checkpoint is written
    a, _ = load_checkpoint(tmp_path / "full.pt")
    b, _ = load_checkpoint(out)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_a_state_from_another_configuration_is_not_resumed(digits_root, tmp_path):
    out = tmp_path / "m.pt"
    with pytest.raises(KeyboardInterrupt):
        train_run(_cfg(digits_root), "student", out, progress=False, stop_after_epoch=1)
    summary = train_run(_cfg(digits_root, seed=5), "student", out, progress=False)
    assert [r["epoch"] for r in summary["history"]] == [1, 2, 3]  # started over


def test_fast_path_loss_and_gradients_match_fp32():
    """bf16 autocast + channels-last (the CUDA defaults) against fp32 on one fixed batch.

    Compared on one step, not after epochs of training: a few epochs magnify any kernel difference between
    processors, and CPU bf16 kernels differ between them. Attacks are left out here: their sign steps turn
    rounding differences into different (equally valid) perturbations; the test below checks what must hold
    for them exactly. bf16 keeps 8 mantissa bits (relative rounding about 4e-3); through a small network the
    loss stays within 3 % and the weight gradient points the same way (cosine > 0.98).
    """
    strategy = "basic"
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, (0.5,) * 3, (0.25,) * 3)
    x = torch.rand(32, 3, 16, 16)
    y = torch.randint(0, 10, (32,))
    mask = torch.rand(32, 3, 16, 16) < 0.3
    cfg = config_from_dict({"attack": {"steps": 3}})
    results = {}
    for name, fast in (("plain", False), ("fast", True)):
        net = copy.deepcopy(model)
        xb = x.contiguous(memory_format=torch.channels_last) if fast else x
        if fast:
            net = net.to(memory_format=torch.channels_last)
        strat = make_strategy(strategy, cfg.attack, cfg.train, 1)
        torch.manual_seed(1)  # same random start for the attack in both runs
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if fast else contextlib.nullcontext()
        with ctx:
            loss = strat.loss(net, Batch(xb, y, torch.arange(32), mask))
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in net.parameters()])
        results[name] = (loss.item(), grad)
    (lp, gp), (lf, gf) = results["plain"], results["fast"]
    assert abs(lf - lp) <= 0.03 * abs(lp), (lp, lf)
    assert torch.nn.functional.cosine_similarity(gp, gf, dim=0) > 0.98


def test_salient_elements_stay_exactly_unperturbed_under_autocast():
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, (0.5,) * 3, (0.25,) * 3).to(memory_format=torch.channels_last)
    x = torch.rand(16, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    mask = torch.rand(16, 3, 16, 16) < 0.4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(model, x, y, eps=32 / 255, step_size=8 / 255, steps=5, mask=mask)
    assert x_adv.dtype == torch.float32
    assert torch.equal(x_adv[mask], x[mask])
    assert (x_adv - x)[~mask].abs().max() > 0  # the rest was attacked
    assert (x_adv - x).abs().max() <= 32 / 255 + 1e-6


class _Exploding(Strategy):
    name = "exploding"

    def loss(self, model, batch):
        out = model(batch.x).mean()
        return out * float("nan") if self.epoch == 1 else out


def test_nan_loss_names_epoch_and_batch(digits_root):
    from pipeline.data import load_dataset

    ds = load_dataset("digits", str(digits_root), "train", 16)
    cfg = _cfg(digits_root)
    model = build_model("smallcnn", 10)
    it = BatchIterator(ds, range(64), 32, shuffle=False)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, batch 0"):
        fit(model, _Exploding(cfg.attack), it, None, cfg.train, cfg.attack, TrainOptions(progress=False))


def test_sip_h_without_human_masks_stops_before_training(digits_root, tmp_path):
    from pipeline.maskstore import MaskStoreError
    from pipeline.maskstore.writer import write_unavailable_store

    store = tmp_path / "human.zarr"
    write_unavailable_store(store, shape=(3, 16, 16), reason="cifar10 has no human segmentations", attrs={})
    cfg = _cfg(digits_root, strategy="sip_h")
    with pytest.raises(MaskStoreError, match="no human segmentations"):
        train_run(cfg, "student", tmp_path / "m.pt", mask_stores={"human": store}, progress=False)
    with pytest.raises(MaskStoreError, match="nowhere"):
        train_run(cfg, "student", tmp_path / "m.pt", mask_stores={"human": tmp_path / "nowhere.zarr"}, progress=False)
    assert not (tmp_path / "m.pt").exists()


def test_distributed_batches_partition_each_epoch():
    class D:
        labels = torch.zeros(10, dtype=torch.long)
        _cache = torch.zeros(10, 1, 1, 1, dtype=torch.uint8)

    seen = []
    for rank in range(2):
        it = BatchIterator(D(), list(range(10)), 4, shuffle=True, seed=3, rank=rank, world_size=2)
        assert it.local_batch_size == 2
        seen.append([i for _, _, b in it for i in b.tolist()])
    assert len(seen[0]) == len(seen[1]) == 5
    assert sorted(seen[0] + seen[1]) == list(range(10))
    with pytest.raises(ValueError, match="divisible"):
        BatchIterator(D(), list(range(10)), 5, shuffle=False, world_size=2)


# Each rank writes its summary to its own file: two processes printing to one pipe can interleave their lines.
DDP_SCRIPT = """
import json, os, sys
from pathlib import Path
from pipeline.core.config import config_from_dict
from pipeline.training.run import train_run
raw = json.loads(sys.argv[1])
summary = train_run(config_from_dict(raw), "student", sys.argv[2], progress=False)
Path(sys.argv[3], f"summary_rank{os.environ['RANK']}.json").write_text(
    json.dumps({"processes": summary["processes"], "digest": summary.get("replica_digest"),
                "history": summary["history"]}))
"""


@pytest.mark.slow
def test_ddp_training_with_two_gloo_processes(digits_root, tmp_path):
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = {"dataset": "digits", "strategy": "sip_h", "device": "cpu", "data": {"root": str(digits_root)},
           "attack": {"steps": 2}, "train": {"epochs": 1, "batch_size": 64}, "perf": {"resume": False}}
    # human masks for the digits, so that the distributed run also reads masks by index
    from pipeline.data import load_dataset
    from pipeline.human_masks import extract_human

    store = tmp_path / "human.zarr"
    ds = load_dataset("digits", str(digits_root), "train", 16)
    extract_human(ds, store, root=str(digits_root), threshold=0.5, missing="error", chunk_size=256,
                  batch_size=256, progress=False)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.replace('sys.argv[2], progress=False',
                                         f'sys.argv[2], progress=False, mask_stores={{"human": {str(store)!r}}}'))
    out = tmp_path / "ddp.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), json.dumps(raw),
                           str(out), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads((tmp_path / f"summary_rank{r}.json").read_text()) for r in range(2)]
    assert len(summaries) == 2 and all(s["processes"] == 2 for s in summaries)
    assert summaries[0]["digest"] == summaries[1]["digest"] is not None  # replicas in sync
    hist = [s["history"] for s in summaries]
    assert "val_clean_acc" in hist[0][0]  # rank 0 validates
    from pipeline.models import load_checkpoint

    model, meta = load_checkpoint(out)
    assert meta["summary"]["processes"] == 2 and meta["strategy"] == "sip_h"
    assert not list(tmp_path.glob(".ddp*"))  # no leftovers beside the checkpoint


def test_training_curves_are_written_as_a_png_and_nothing_else_is_replaced(tmp_path):
    from pipeline.core.errors import OutputConflict
    from pipeline.training.curves import plot_history

    history = [{"epoch": e, "lr": 0.05, "train_loss": 2.0 / e, "val_clean_acc": 0.5 + 0.1 * e,
                "val_pgd_acc": 0.2 + 0.05 * e, "seconds": 1.0} for e in (1, 2, 3)]
    out = tmp_path / "curves" / "history.png"
    plot_history(history, out, title="teacher: madry, smallcnn on digits", selected_epoch=2, select="robust")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_history(history[:2], out, title="again")  # its own earlier picture is replaced
    assert sorted(p.name for p in out.parent.iterdir()) == ["history.png"]  # no temporary left
    foreign = tmp_path / "notes.png"
    foreign.write_text("not a picture")
    with pytest.raises(OutputConflict, match="notes.png"):
        plot_history(history, foreign, title="x")
    assert foreign.read_text() == "not a picture"
