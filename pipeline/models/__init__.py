"""Models: a registry of architectures, input normalisation inside the model, and checkpoints."""

from __future__ import annotations

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

    def __init__(self, net: nn.Module, mean, std, cam_layer: str):
        super().__init__()
        self.net = net
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
    return Classifier(net, mean, std, spec.cam_layer)


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Weights plus what is needed to rebuild the model; loadable with `weights_only=True`."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": "sipat-checkpoint-v1", "meta": meta, "state_dict": state}, tmp)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "sipat-checkpoint-v1":
        raise CheckpointError(f"{path}: not a checkpoint written by this project")
    meta = blob["meta"]
    model = build_model(meta["arch"], meta["num_classes"], meta["mean"], meta["std"], pretrained=False)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), meta


def _register_builtin() -> None:
    from pipeline.models import cifar_nets, small, torchvision_nets  # noqa: F401


_register_builtin()
