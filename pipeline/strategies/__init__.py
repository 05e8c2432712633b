"""Training strategies: each one says how a batch becomes a loss; the training loop is shared.

A strategy is one module: a subclass of `Strategy` whose name is written once, in its class statement
(`class FAT(Madry, name="fat")` registers it), with its own parameters declared beside it as a pydantic
model (`Params`), read from `train.<name>` in params.yaml. The one PGD call lives here (`adversarial`);
strategies change what goes into it by overriding `budget`, `attack_mask` or `attack_options`.

Adding a strategy: its module, plus its import in `pipeline/strategies/builtin.py` (the one registration).
Importing this package imports no strategy module; `builtin` is imported when a name is missing or the names
are listed. So the teacher, which imports `madry` itself, depends on `madry.py` alone (an edit of `trades.py`
does not retrain it).

Validation of `train.<name>`: `pipeline.core.config` must not import this package (the evaluate stages load
the same params.yaml without any training code), so it only checks that each strategy section is a mapping.
`strategy_params` validates every section against its strategy's `Params` (errors name
`train.<name>.<key>`), rejects a section that names no strategy and checks each strategy's budgets against
`attack.eps`: the prepare stage runs it before anything is trained (`pipeline.validate`). `make_strategy`
validates the section of the strategy it builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.attacks import Budget, pgd
from pipeline.core.config import AttackConfig, StudentConfig
from pipeline.core.errors import ConfigError
from pipeline.core.registry import Registry


@dataclass
class Batch:
    x: torch.Tensor  # images in [0, 1], on the training device
    y: torch.Tensor
    index: torch.Tensor  # dataset index of each row (how masks are looked up)
    mask: Optional[torch.Tensor] = None  # bool, shaped like x; only for strategies with `mask_kind`


class StrategyParams(BaseModel):
    """Base of each strategy's `train.<name>` section (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check(self, attack: AttackConfig, epochs: int) -> list[tuple[str, str]]:
        """Cross-checks against the attack and the run length: (key, problem) pairs; none by default."""
        return []


# The class statement of each strategy registers it; pipeline/strategies/builtin.py imports them all.
STRATEGIES: Registry[type["Strategy"]] = Registry("strategy", loader="pipeline.strategies.builtin")


class Strategy:
    """Base class. `loss(model, batch)` returns the scalar to minimise for one batch."""

    name: ClassVar[str] = "strategy"
    mask_kind: ClassVar[Optional[str]] = None  # "synthetic" or "human" when the strategy reads a mask store
    Params: ClassVar[type[StrategyParams]] = StrategyParams

    def __init_subclass__(cls, name: Optional[str] = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            STRATEGIES.register(name)(cls)

    def __init__(self, attack: AttackConfig, params: Optional[StrategyParams] = None, total_epochs: int = 1):
        self.attack = attack
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise TypeError(f"{self.name}: expected {self.Params.__name__}, got {type(self.params).__name__}")
        self.total_epochs = total_epochs
        self.epoch = 0

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # The attack, written once. ---------------------------------------------------------------------------

    def budget(self, model: nn.Module, batch: Batch) -> Budget:
        """The L-inf budget of this batch's attack: a float, or a per-element tensor (never above attack.eps)."""
        return self.attack.eps

    def attack_mask(self, batch: Batch) -> Optional[torch.Tensor]:
        """Elements the attack may not touch (True = salient); none by default."""
        return None

    def attack_options(self) -> dict[str, Any]:
        """Further keyword arguments of `pgd` (start, loss, early stop, noise)."""
        return {"init": "uniform" if self.attack.random_start else "none"}

    def adversarial(self, model: nn.Module, batch: Batch, **overrides: Any) -> torch.Tensor:
        """The training attack's point for this batch: PGD with the strategy's budget, mask and options."""
        a = self.attack
        kwargs = {"eps": self.budget(model, batch), "step_size": a.step_size, "steps": a.steps,
                  "mask": self.attack_mask(batch), **self.attack_options(), **overrides}
        return pgd(model, batch.x, batch.y, **kwargs)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        """Per-epoch diagnostics to log (e.g. FAT's τ)."""
        return {}


def _format(err: ValidationError, section: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join([section, *(str(p) for p in e["loc"])])
        msg = "unknown key (check the spelling; see params.yaml)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def strategy_params(train: Optional[StudentConfig], attack: AttackConfig, epochs: Optional[int] = None,
                    names: Optional[list[str]] = None) -> dict[str, StrategyParams]:
    """The validated parameters of strategies `names` (default: every strategy, which also rejects a section
    that names no strategy) from the `train.<name>` sections (defaults where absent).

    Raises ConfigError naming each bad key: a section that names no strategy, a bad value, or a budget that
    exceeds `attack.eps`.
    """
    train = train or StudentConfig()
    epochs = epochs if epochs is not None else train.epochs
    sections: Mapping[str, Any] = train.strategy_sections()
    problems = [] if names is not None else [
        f"  train.{k}: unknown key (neither a training option nor a strategy; strategies: {STRATEGIES.names()})"
        for k in sections if k not in STRATEGIES]
    out: dict[str, StrategyParams] = {}
    for name in (names if names is not None else STRATEGIES):
        cls = STRATEGIES.get(name)
        try:
            p = cls.Params.model_validate(sections.get(name, {}))
        except ValidationError as err:
            problems.append(_format(err, f"train.{name}"))
            continue
        problems.extend(f"  train.{name}.{k}: {msg}" for k, msg in p.check(attack, epochs))
        out[name] = p
    if problems:
        raise ConfigError("invalid strategy parameters:\n" + "\n".join(problems))
    return out


def make_strategy(name: str, attack: AttackConfig, params: Optional[StudentConfig] = None,
                  total_epochs: int = 1) -> Strategy:
    """The strategy `name`, with its parameters from `params` (the `train` section), validated first."""
    cls = STRATEGIES.get(name, "strategy")
    return cls(attack, strategy_params(params, attack, total_epochs, names=[name])[name], total_epochs)
