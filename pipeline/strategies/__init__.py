"""Training strategies: each one says how a batch becomes a loss; the training loop is shared.

A strategy is a small class registered by name. Adding one means one module that subclasses `Strategy`
and decorates it with `@STRATEGIES.register("name")`, plus its import in `_register_builtin` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn

from pipeline.core.config import AttackConfig, StudentConfig
from pipeline.core.registry import Registry


@dataclass
class Batch:
    x: torch.Tensor  # images in [0, 1], on the training device
    y: torch.Tensor
    index: torch.Tensor  # dataset index of each row (how masks are looked up)
    mask: Optional[torch.Tensor] = None  # bool, shaped like x; only for strategies with `mask_kind`


class Strategy:
    """Base class. `loss(model, batch)` returns the scalar to minimise for one batch."""

    name: ClassVar[str] = "strategy"
    mask_kind: ClassVar[Optional[str]] = None  # "synthetic" or "human" when the strategy reads a mask store

    def __init__(self, attack: AttackConfig, params: StudentConfig | None = None, total_epochs: int = 1):
        self.attack = attack
        self.params = params or StudentConfig()
        self.total_epochs = total_epochs
        self.epoch = 0

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        """Per-epoch diagnostics to log (e.g. FAT's mean attack steps)."""
        return {}


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def make_strategy(name: str, attack: AttackConfig, params: StudentConfig | None = None,
                  total_epochs: int = 1) -> Strategy:
    return STRATEGIES.get(name, "strategy")(attack, params, total_epochs)


def _register_builtin() -> None:
    from pipeline.strategies import basic, fat, madry, part, sip, trades  # noqa: F401


_register_builtin()
