"""params.yaml and the typed config are one source of truth: same keys, same defaults."""

from pathlib import Path

import yaml

from pipeline.core.config import Config, load_config

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


def test_params_yaml_spells_out_every_key_of_the_config():
    raw = _leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    expected = _leaves(Config().model_dump())
    missing = sorted(set(expected) - set(raw))
    assert not missing, f"params.yaml lacks {missing}"


def test_config_defaults_equal_params_yaml():
    loaded = _leaves(load_config(ROOT / "params.yaml").model_dump())
    defaults = _leaves(Config().model_dump())
    differ = {k: (defaults.get(k), loaded.get(k)) for k in set(loaded) | set(defaults)
              if defaults.get(k) != loaded.get(k)}
    assert not differ, f"config default != params.yaml value: {differ}"
