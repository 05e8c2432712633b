"""benchmarks/gpu_check.py in its CPU toy mode: the same code as on a GPU (stages, fp32 vs the fast path,
torchrun with several processes), at sizes that run in about a minute, with a JSON a reader can trust."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_help_documents_the_parts_and_the_json():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("--budget", "pipeline", "fp32_vs_fast", "torchrun", "compile", "cpu-toy", "JSON"):
        assert word in out


@pytest.mark.slow
def test_cpu_toy_mode_runs_every_part_it_can_and_says_so(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--budget", "400"],
                          capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mode cpu-toy" in proc.stdout and "toy sizes" in proc.stdout
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-toy" and report["elapsed_s"] < 400
    parts = report["parts"]
    pipe = parts["pipeline"]
    assert pipe["status"] == "ok"
    for stage in ("teacher_epoch", "mask_extraction", "sip_s_epoch", "madry_epoch", "autoattack"):
        assert pipe[stage]["seconds"] > 0 and pipe[stage]["peak_gpu_mib"] is None  # no GPU: no figure invented
    assert pipe["mask_extraction"]["items"] == report["sizes"]["n_train"]
    assert pipe["autoattack"]["items"] == report["sizes"]["eval_points"]
    fast = parts["fp32_vs_fast"]
    assert fast["status"] == "ok" and fast["mask_exactly_unperturbed"] == {"fp32": True, "fast": True}
    assert fast["speedup_fast_over_fp32"] > 0 and abs(fast["val_clean_acc_difference"]) <= 1.0
    ddp = parts["torchrun"]
    assert ddp["status"] == "ok" and ddp["nproc"] == 2 and ddp["backend"] == "gloo"
    assert ddp["store_byte_identical"] and ddp["evaluation_identical"]
    assert parts["compile"]["status"] == "skipped" and "CPU" in parts["compile"]["reason"]
