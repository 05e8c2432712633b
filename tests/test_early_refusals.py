"""Refused before the work, in one line: read-only folders, full disks, strategies the data cannot serve,
ImageNet weights that are not on disk; a disk that fills during the work ends in one line too."""

import errno
import subprocess
import sys
from collections import namedtuple

import pytest

from pipeline.core.config import config_from_dict
from pipeline.core.errors import ConfigError, expected_errors
from pipeline.core.utils import check_output
from pipeline.validate import check_config, check_data
from tests.test_protocols import compose


def test_a_folder_that_cannot_be_written_is_named_before_any_work(tmp_path, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as info:
        check_output(tmp_path / "out" / "model.pt", kind="torch")
    assert info.value.errno == errno.EROFS and str(tmp_path) in str(info.value)


def test_too_little_free_space_is_named_before_any_work(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(10, 9, 2**20))
    with pytest.raises(OSError, match=r"1\.0 MiB free in .*, about 4\.0 MiB needed") as info:
        check_output(tmp_path / "m.zarr", is_dir=True, min_free=4 * 2**20)
    assert info.value.errno == errno.ENOSPC


@pytest.mark.parametrize("err, text", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/m.zarr/c/0/0"), "no space left on the device writing"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/a.json"), "the file system is read-only writing /ro/a.json"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), "is the disk full?"),
])
def test_storage_failures_during_the_work_end_in_one_line(err, text):
    with pytest.raises(SystemExit) as info:
        with expected_errors():
            raise err
    msg = str(info.value.code)
    assert msg.startswith("error: ") and text in msg and "\n" not in msg


def test_other_errors_still_raise():
    with pytest.raises(OSError):
        with expected_errors():
            raise OSError(errno.EBADF, "bad file descriptor")


def test_sip_h_on_a_data_set_without_segmentations_is_refused_in_prepare():
    cfg = config_from_dict(dict(compose(("protocol=cifar10_resnet18",)), strategy="sip_h"), "params.yaml")
    no_segs = type("Split", (), {"has_segmentations": False})()
    with pytest.raises(ConfigError, match="strategy: 'sip_h' trains with human masks, but dataset 'cifar10' has no"):
        check_data(cfg, no_segs)
    check_data(cfg.model_copy(update={"strategy": "sip_s"}), no_segs)


def test_missing_imagenet_weights_are_refused_in_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    cfg = config_from_dict(compose(("protocol=cub_resnet50",)), "params.yaml")
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    text = str(info.value)
    assert "train.pretrained: pretrained weights resnet50-" in text and "teacher.pretrained:" in text
    small = config_from_dict(dict(compose(), train=dict(compose()["train"], pretrained=True)), "params.yaml")
    with pytest.raises(ConfigError, match="train.pretrained: model 'smallcnn' has no pretrained weights"):
        check_config(small)


def test_a_stage_on_a_read_only_folder_says_so_in_one_line(tmp_path):
    """The train stage as DVC runs it, with its checkpoint under a folder that is a file (cannot be created)."""
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where a folder is needed")
    proc = subprocess.run([sys.executable, "-m", "stages.train", "student", "--out", str(blocker / "m.pt"),
                           "--history", str(tmp_path / "h.json")], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1]),
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr


def test_a_training_batch_of_one_joins_the_batch_before_it():
    """resnet18_tv at 32 px with 449 images in batches of 64: the last batch of one would break batch norm."""
    import numpy as np
    import torch

    from pipeline.data import BatchIterator
    from pipeline.models import build_model

    class Tiny:
        labels = np.zeros(449, dtype=np.int64)
        _cache = torch.zeros(449, 3, 32, 32, dtype=torch.uint8)

    it = BatchIterator(Tiny(), np.arange(449), 64, shuffle=True)
    sizes = [len(idx) for _, _, idx in it]
    assert sizes == [64] * 6 + [65] and len(it) == 7 and sum(sizes) == 449
    model = build_model("resnet18_tv", 10).train()
    x, _, _ = list(it)[-1]
    model(x)  # 65 samples: batch norm is fine
    val = BatchIterator(Tiny(), np.arange(449), 64, shuffle=False)
    assert [len(i) for _, _, i in val][-1] == 1 and len(val) == 8  # evaluation batches are left as they are
