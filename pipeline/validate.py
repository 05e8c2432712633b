"""Every parameter of every stage checked at once, before anything is trained.

The prepare stage, which runs first at every `dvc repro` / `dvc exp run`, calls `check_config`: a misspelt
strategy, model or dataset, or a strategy section out of range, then costs seconds instead of a teacher's
training. (Loading the config already checks every typed section, `evaluate` and `survey` included.)
"""

from __future__ import annotations

from pipeline.core.config import Config
from pipeline.core.errors import ConfigError, SipatError
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
    if not problems:
        problems += _pretrained_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))


def _pretrained_problems(cfg: Config) -> list[str]:
    """ImageNet weights asked for (`train.pretrained`, `teacher.pretrained`) must be in the local torch cache
    and the model must have them: found out now, not when the teacher or student starts."""
    out = []
    for key, arch, wanted in (("train.pretrained", cfg.model, cfg.train.pretrained),
                              ("teacher.pretrained", cfg.teacher.model, cfg.teacher.pretrained)):
        if not wanted:
            continue
        try:
            MODELS.get(arch).factory(num_classes=2, pretrained=True)
        except TypeError:
            out.append(f"{key}: model {arch!r} has no pretrained weights; set {key}: false")
        except (SipatError, FileNotFoundError, ValueError, RuntimeError) as err:
            out.append(f"{key}: {err}")
    return out


def check_data(cfg: Config, train_split) -> None:
    """What the parameters ask of the data: a strategy that reads human masks needs segmentations."""
    strategy = STRATEGIES.get(cfg.strategy, "strategy")
    annotated = getattr(train_split, "has_segmentations", False) or cfg.human_masks.coco is not None
    if strategy.mask_kind == "human" and not annotated:
        raise ConfigError(f"strategy: {cfg.strategy!r} trains with human masks, but dataset {cfg.dataset!r} has no "
                          f"segmentations to make them from; choose another strategy (sip_s uses the teacher's "
                          f"synthetic masks)")
