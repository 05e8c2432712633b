"""`fat`: friendly adversarial training (Zhang et al. 2020): PGD stopped τ steps after misclassification.

Defaults follow the cross-entropy FAT of the reference code (zjfheart/Friendly-Adversarial-Training,
`FAT.py` and `earlystop.py`): τ = 0 up to epoch 50 of 120, 1 up to epoch 90, 2 after; ω = 0.001 Gaussian
noise added to each PGD step of the examples still moving. The milestones are fractions of the run, so they
land on the same relative epochs under every protocol.
"""

from __future__ import annotations

import bisect

from pydantic import Field, field_validator

from pipeline.core.config import Fraction
from pipeline.strategies import StrategyParams
from pipeline.strategies.madry import Madry


class FatParams(StrategyParams):
    tau: int = Field(0, ge=0)  # FAT.py: --tau 0 (τ before the first milestone)
    dynamic_tau: bool = True  # FAT.py: --dynamictau True
    # FAT.py adjust_tau: τ + 1 after epoch 50 and τ + 2 after epoch 90 of 120 (epochs counted from 1)
    tau_milestones: list[Fraction] = Field(default_factory=lambda: [50 / 120, 90 / 120])
    omega: float = Field(0.001, ge=0.0)  # FAT.py: --omega 0.001, the std of earlystop.py's per-step noise

    @field_validator("tau_milestones")
    @classmethod
    def _sorted(cls, v: list[float]) -> list[float]:
        if v != sorted(v):
            raise ValueError("milestones must be in increasing order")
        return v

    def milestone_epochs(self, epochs: int) -> list[int]:
        """0-based epoch indices from which τ grows by one each: round(fraction × epochs)."""
        return [int(round(f * epochs)) for f in self.tau_milestones]


class FAT(Madry, name="fat"):
    Params = FatParams

    def current_tau(self) -> int:
        """τ for this epoch: with `dynamic_tau`, τ grows by one at each milestone."""
        p = self.params
        if not p.dynamic_tau:
            return p.tau
        return p.tau + bisect.bisect_right(p.milestone_epochs(self.total_epochs), self.epoch)

    def attack_options(self):
        return {**super().attack_options(), "tau": self.current_tau(), "noise_std": self.params.omega}

    def stats(self):
        return {"tau": float(self.current_tau())}
