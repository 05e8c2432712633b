"""Every parameter of every stage checked at once, before anything is trained.

The prepare stage, which runs first at every `dvc repro` / `dvc exp run`, calls `check_config`: a misspelt
strategy, model or dataset, or a strategy section out of range, then costs seconds instead of a teacher's
training. (Loading the config already checks every typed section, `evaluate` and `survey` included.)
"""

from __future__ import annotations

from pipeline.core.config import Config
from pipeline.core.errors import ConfigError
from pipeline.data import DATASETS
from pipeline.models import MODELS
from pipeline.strategies import STRATEGIES, builtin, strategy_params  # noqa: F401  (builtin: every strategy)


def check_config(cfg: Config) -> None:
    """Raise one ConfigError naming every bad registry name and strategy parameter of `cfg`."""
    problems = []
    checks = [(DATASETS, cfg.dataset, "dataset"), (MODELS, cfg.model, "model"),
              (MODELS, cfg.teacher.model, "teacher.model"), (STRATEGIES, cfg.strategy, "strategy")]
    for registry, name, key in checks:
        try:
            registry.get(name, key)
        except ConfigError as err:
            problems.append(str(err))
    try:
        strategy_params(cfg.train, cfg.attack, cfg.train.epochs)
    except ConfigError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError("\n".join(problems))
