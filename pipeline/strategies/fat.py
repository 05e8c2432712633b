"""`fat`: friendly adversarial training (Zhang et al. 2020): PGD stopped τ steps after misclassification."""

import bisect

import torch.nn.functional as F

from pipeline.attacks import pgd
from pipeline.strategies import STRATEGIES, Batch, Strategy


@STRATEGIES.register("fat")
class FAT(Strategy):
    name = "fat"

    def current_tau(self) -> int:
        """τ for this epoch: with `dynamic_tau`, τ grows by one at each milestone (the authors' schedule)."""
        p = self.params.fat
        if not p.dynamic_tau:
            return p.tau
        return p.tau + bisect.bisect_right(sorted(p.tau_milestones), self.epoch)

    def loss(self, model, batch: Batch):
        a = self.attack
        x_adv = pgd(model, batch.x, batch.y, eps=a.eps, step_size=a.step_size, steps=a.steps,
                    init="uniform" if a.random_start else "none", tau=self.current_tau())
        return F.cross_entropy(model(x_adv), batch.y)

    def stats(self):
        return {"tau": float(self.current_tau())}
