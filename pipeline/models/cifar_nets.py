"""CIFAR-style ResNet-18 and WideResNet-34-10 (3×3 stem, no max-pool), as in the baselines' repositories.

torchvision's ImageNet ResNet-18 (7×7 stride-2 stem and max-pool), the network the SIP-AT authors' model code
wraps, is `resnet18_tv` (pipeline/models/torchvision_nets.py).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.errors import ConfigError
from pipeline.models import MODELS, ModelSpec


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, strides, layers, cin = (64, 128, 256, 512), (1, 2, 2, 2), [], 64
        for w, s in zip(widths, strides):
            layers.append(nn.Sequential(BasicBlock(cin, w, s), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.equal else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, num_classes: int, depth: int = 34, widen: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for i, stride in enumerate((1, 2, 2)):
            blocks.append(nn.Sequential(*[WideBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                                    stride if j == 0 else 1) for j in range(n)]))
        self.block1, self.block2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        # initialised as TRADES' definition (yaodongyu/TRADES models/wideresnet.py), which FAT and PART reuse:
        # convolutions N(0, 2 / (k·k·out_channels)), batch norms (1, 0), the classifier's bias 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ConfigError(f"model {name!r} is trained from scratch in the paper; set pretrained: false")


def _resnet18(num_classes: int, pretrained: bool = False) -> nn.Module:
    _no_pretrained("resnet18", pretrained)
    return ResNet18(num_classes)


def _wrn34_10(num_classes: int, pretrained: bool = False) -> nn.Module:
    _no_pretrained("wrn34_10", pretrained)
    return WideResNet(num_classes, 34, 10)


MODELS.register("resnet18")(ModelSpec(_resnet18, "layer4", "ResNet-18, CIFAR variant"))
MODELS.register("wrn34_10")(ModelSpec(_wrn34_10, "block3", "WideResNet-34-10"))
