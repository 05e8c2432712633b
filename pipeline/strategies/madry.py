"""`madry`: PGD adversarial training (Madry et al. 2018): minimise the loss at the PGD point."""

from typing import Optional

import torch
import torch.nn.functional as F

from pipeline.attacks import pgd
from pipeline.strategies import STRATEGIES, Batch, Strategy


@STRATEGIES.register("madry")
class Madry(Strategy):
    name = "madry"

    def attack_mask(self, batch: Batch) -> Optional[torch.Tensor]:
        """Elements the attack may not touch; none for plain PGD-AT."""
        return None

    def loss(self, model, batch: Batch):
        a = self.attack
        x_adv = pgd(model, batch.x, batch.y, eps=a.eps, step_size=a.step_size, steps=a.steps,
                    init="uniform" if a.random_start else "none", mask=self.attack_mask(batch))
        return F.cross_entropy(model(x_adv), batch.y)
