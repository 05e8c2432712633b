"""`basic`: standard training on clean images (no adversary)."""

import torch.nn.functional as F

from pipeline.strategies import Batch, Strategy


class Basic(Strategy, name="basic"):
    def budget(self, model, batch: Batch):
        return 0.0  # no attack

    def adversarial(self, model, batch: Batch, **overrides):
        return batch.x

    def loss(self, model, batch: Batch):
        return F.cross_entropy(model(batch.x), batch.y)
