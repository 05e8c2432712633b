"""A small CNN for the embedded default (3×16×16 digits): trains in seconds on a CPU."""

from __future__ import annotations

import torch.nn as nn

from pipeline.core.errors import ConfigError
from pipeline.models import MODELS, ModelSpec


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.stem = _block(3, width, 1)
        self.layer1 = _block(width, 2 * width, 2)
        self.features = _block(2 * width, 4 * width, 2)  # last conv block: Grad-CAM target
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(self.layer1(self.stem(x))))


def _small(num_classes: int, pretrained: bool = False) -> nn.Module:
    if pretrained:
        raise ConfigError("model 'smallcnn' has no pretrained weights; set pretrained: false")
    return SmallCNN(num_classes)


MODELS.register("smallcnn")(ModelSpec(_small, "features", "3-block CNN for small images"))
