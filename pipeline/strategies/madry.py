"""`madry`: PGD adversarial training (Madry et al. 2018): minimise the loss at the PGD point."""

import torch.nn.functional as F

from pipeline.strategies import Batch, Strategy


class Madry(Strategy, name="madry"):
    def loss(self, model, batch: Batch):
        return F.cross_entropy(model(self.adversarial(model, batch)), batch.y)
