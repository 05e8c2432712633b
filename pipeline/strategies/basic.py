"""`basic`: standard training on clean images (no adversary)."""

import torch.nn.functional as F

from pipeline.strategies import STRATEGIES, Batch, Strategy


@STRATEGIES.register("basic")
class Basic(Strategy):
    name = "basic"

    def loss(self, model, batch: Batch):
        return F.cross_entropy(model(batch.x), batch.y)
