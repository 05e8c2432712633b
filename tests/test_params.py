"""params.yaml and the typed config are one source of truth: same keys, same defaults."""

from pathlib import Path

import yaml

from pipeline.core.config import Config, load_config
from pipeline.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_leaves(v, key + "."))
        else:
            out[key] = v
    return out


def _defaults() -> dict:
    """Every default: the typed config's, and each registered strategy's own `train.<name>` section."""
    d = Config().model_dump()
    for name in STRATEGIES.names():
        params = STRATEGIES.get(name).Params().model_dump()
        if params:
            d["train"][name] = params
    return d


def _loaded() -> dict:
    cfg = load_config(ROOT / "params.yaml")
    d = cfg.model_dump()
    for name in STRATEGIES.names():
        section = getattr(cfg.train, "model_extra", None) or {}
        if name in section:
            d["train"][name] = STRATEGIES.get(name).Params.model_validate(section[name]).model_dump()
    return d


def test_params_yaml_spells_out_every_key_of_the_config():
    raw = _leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    expected = _leaves(_defaults())
    missing = sorted(set(expected) - set(raw))
    assert not missing, f"params.yaml lacks {missing}"


def test_config_defaults_equal_params_yaml():
    loaded = _leaves(_loaded())
    defaults = _leaves(_defaults())
    differ = {k: (defaults.get(k), loaded.get(k)) for k in set(loaded) | set(defaults)
              if defaults.get(k) != loaded.get(k)}
    assert not differ, f"config default != params.yaml value: {differ}"
