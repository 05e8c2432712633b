"""torchvision ResNet-18, ResNet-50 and DenseNet-121, optionally from ImageNet weights in the local torch cache.

torchvision is imported when one of them is built: its import costs about 2 s of CPU, which every stage process
would otherwise pay for the registry alone."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from pipeline.core.errors import SipatError
from pipeline.models import MODELS, ModelSpec

if TYPE_CHECKING:
    import torchvision.models as tvm


class PretrainedWeightsMissing(SipatError, FileNotFoundError):
    """ImageNet weights asked for but not in the local torch cache (nothing is downloaded)."""


def cached_weights(weights: tvm.WeightsEnum) -> dict:
    """Load ImageNet weights from the torch hub cache; never download (this may run offline)."""
    fname = os.path.basename(weights.url)
    path = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not path.is_file():
        raise PretrainedWeightsMissing(
            f"pretrained weights {fname} are not in the local torch cache ({path}). Nothing is downloaded "
            f"automatically: fetch {weights.url} on a machine with internet access and copy it to {path} "
            f"(or set TORCH_HOME), or set pretrained: false.")
    return torch.load(path, map_location="cpu", weights_only=True)


def _resnet18_tv(num_classes: int, pretrained: bool = False) -> nn.Module:
    import torchvision.models as tvm

    # torchvision's ImageNet network unchanged (7×7 stride-2 stem, max-pool): the SIP-AT authors' model code
    # (Temp_CVPR utils/model_loader.py) wraps torchvision's ImageNet networks only; at 32 px layer4 is 1×1
    net = tvm.resnet18(weights=None)
    if pretrained:
        net.load_state_dict(cached_weights(tvm.ResNet18_Weights.IMAGENET1K_V1))
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def _resnet50(num_classes: int, pretrained: bool = False) -> nn.Module:
    import torchvision.models as tvm

    net = tvm.resnet50(weights=None)
    if pretrained:
        net.load_state_dict(cached_weights(tvm.ResNet50_Weights.IMAGENET1K_V1))
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def _densenet121(num_classes: int, pretrained: bool = False) -> nn.Module:
    import torchvision.models as tvm

    net = tvm.densenet121(weights=None)
    if pretrained:
        state = cached_weights(tvm.DenseNet121_Weights.IMAGENET1K_V1)
        # The published file uses the pre-0.4 key names ("norm.1" instead of "norm1").
        old = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
        state = {old.sub(r"\1\2", k): v for k, v in state.items()}
        net.load_state_dict(state)
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    return net


MODELS.register("resnet18_tv")(ModelSpec(_resnet18_tv, "layer4", "torchvision ResNet-18 (ImageNet stem)"))
MODELS.register("resnet50")(ModelSpec(_resnet50, "layer4", "torchvision ResNet-50"))
MODELS.register("densenet121")(ModelSpec(_densenet121, "features", "torchvision DenseNet-121"))
