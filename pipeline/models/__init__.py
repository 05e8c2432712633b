"""Models: a registry of architectures, input normalisation inside the model, and checkpoints."""

from __future__ import annotations

import sys

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from pipeline.core.errors import CheckpointError
from pipeline.core.registry import Registry
from pipeline.core.utils import atomic_path


@dataclass(frozen=True)
class ModelSpec:
    factory: Callable[..., nn.Module]  # (num_classes, pretrained) -> nn.Module
    cam_layer: str  # attribute path of the last convolutional block (for Grad-CAM)
    description: str = ""


MODELS: Registry[ModelSpec] = Registry("model")


class Classifier(nn.Module):
    """`net(normalise(x))`: callers always pass images in [0, 1], as AutoAttack requires."""

    def __init__(self, net: nn.Module, mean, std, cam_layer: str, arch: str = ""):
        super().__init__()
        self.net = net
        self.arch = arch  # the registered name, for messages
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.cam_layer = cam_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def cam_module(self) -> nn.Module:
        mod: nn.Module = self.net
        for part in self.cam_layer.split("."):
            mod = getattr(mod, part)
        return mod


def build_model(arch: str, num_classes: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), *,
                pretrained: bool = False) -> Classifier:
    spec = MODELS.get(arch)
    net = spec.factory(num_classes=num_classes, pretrained=pretrained)
    return Classifier(net, mean, std, spec.cam_layer, arch)


FORMAT = "sipat-checkpoint-v1"


class ForeignCheckpoint(CheckpointError):
    """A readable file that is not this project's checkpoint (a plain state_dict, another format)."""
_META_KEYS = ("arch", "num_classes", "mean", "std")


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Weights plus what is needed to rebuild the model; loadable with `weights_only=True`."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path, kind="torch") as tmp:
        torch.save({"format": FORMAT, "meta": _interned(meta), "state_dict": state}, tmp)


def _interned(value: Any) -> Any:
    """`value` with every string interned. Pickle writes a string once per object, so equal metadata built from
    different objects (a resumed run's history read back from disk) would otherwise give different bytes."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {_interned(k): _interned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_interned(v) for v in value)
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """The model of a checkpoint written by `save_checkpoint`, in eval mode on `device`, and its meta.

    Anything else (a damaged file, a bare state_dict, weights that do not fit the recorded architecture) is a
    CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's container
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        if not zipped:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (unrecognised content)") from None
        if isinstance(err, pickle.UnpicklingError):  # torch's own text would suggest weights_only=False
            raise CheckpointError(f"{path}: holds objects other than tensors and plain data; not a checkpoint "
                                  f"written by this project") from None
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({_first_line(err)})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        what = ("a bare state_dict" if isinstance(blob, dict) and blob and
                all(isinstance(v, torch.Tensor) for v in blob.values()) else type(blob).__name__)
        raise ForeignCheckpoint(f"{path}: not a checkpoint written by this project ({what}, no {FORMAT!r} format "
                              f"tag); train it with the pipeline or wrap it with save_checkpoint")
    meta, state = blob.get("meta"), blob.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict) or any(k not in meta for k in _META_KEYS):
        raise CheckpointError(f"{path}: damaged checkpoint (meta needs {', '.join(_META_KEYS)} and a state_dict)")
    if meta["arch"] not in MODELS:
        raise CheckpointError(f"{path}: unknown architecture {meta['arch']!r}; known: {MODELS.names()}")
    try:
        model = build_model(meta["arch"], int(meta["num_classes"]), meta["mean"], meta["std"], pretrained=False)
    except (RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot build {meta['arch']!r} from its meta ({_first_line(err)})") from None
    misfit = _state_misfit(model.state_dict(), state)
    if misfit:
        raise CheckpointError(f"{path}: weights do not fit architecture {meta['arch']!r} with {meta['num_classes']} "
                              f"classes: {misfit}")
    model.load_state_dict(state)
    return model.to(device).eval(), meta


NORMALISATIONS = {"none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def load_state_dict_file(path: str | Path, arch: str, num_classes: int, mean, std) -> Classifier:
    """A registered architecture with the weights of a plain state_dict file (its own keys, as `arch`'s network
    names them; a "state_dict" or "model" wrapper and DataParallel's "module." prefix are unwrapped). The
    network is wrapped to normalise its [0, 1] input with `mean` and `std`. Keys that do not fit are a
    CheckpointError naming them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable PyTorch state_dict ({_first_line(err)})") from None
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise CheckpointError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in blob.items()}
    model = build_model(arch, num_classes, mean, std, pretrained=False)
    misfit = _state_misfit(model.net.state_dict(), state)
    if misfit:
        raise CheckpointError(f"{path}: a state_dict that does not fit architecture {arch!r} with {num_classes} "
                              f"classes: {misfit}; set teacher.model to the checkpoint's architecture")
    model.net.load_state_dict(state)
    return model.eval()


def _state_misfit(want: dict[str, torch.Tensor], have: dict[str, Any]) -> str:
    """Which tensors a state_dict lacks, has in excess or has in another shape; empty when it fits."""
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    shape = [k for k in want if k in have and (not isinstance(have[k], torch.Tensor) or have[k].shape != want[k].shape)]
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
             ((missing, "missing"), (extra, "unexpected"), (shape, "of another shape")) if keys]
    return ", ".join(parts)


def check_checkpoint_matches(meta: dict[str, Any], dataset, path: str | Path) -> None:
    """CheckpointError naming every difference between the data a checkpoint was trained on and `dataset`:
    dataset name, number of classes, image shape, and the sample-order fingerprint of the same split."""
    diffs = []
    for key, have, want in (("dataset", meta.get("dataset"), dataset.name),
                            ("classes", meta.get("num_classes"), int(dataset.num_classes)),
                            ("image shape", meta.get("image_shape"), list(dataset.image_shape))):
        if have is not None and have != want:
            diffs.append(f"{key}: checkpoint {have}, configured {want}")
    fingerprints = dict(meta.get("dataset_fingerprints") or {})
    if "train" not in fingerprints and meta.get("dataset_fingerprint") is not None:
        fingerprints["train"] = meta["dataset_fingerprint"]  # checkpoints record the training split's
    have = fingerprints.get(dataset.split)
    if have is not None and have != dataset.fingerprint():
        diffs.append(f"{dataset.split} split fingerprint (ids + labels): checkpoint {have}, configured "
                     f"{dataset.fingerprint()}")
    if diffs:
        raise CheckpointError(f"{path} was trained on other data than {dataset.name}/{dataset.split} at "
                              f"{dataset.image_size}px: " + "; ".join(diffs))


def _register_builtin() -> None:
    from pipeline.models import cifar_nets, small, torchvision_nets  # noqa: F401


_register_builtin()
