import pytest

from pipeline.core.config import ConfigError, config_from_dict, format_budget, load_config, parse_budget
from pipeline.data import load_dataset


def test_repository_params_are_valid():
    cfg = load_config("params.yaml")
    assert cfg.dataset == "digits"
    assert cfg.attack.eps == pytest.approx(32 / 255)
    assert cfg.evaluate.eps == sorted(cfg.evaluate.eps)


@pytest.mark.parametrize("raw, key", [
    ({"strategi": "madry"}, "strategi"),
    ({"attack": {"epsilon": 0.1}}, "attack.epsilon"),
    ({"train": {"epoch": 3}}, "train.epoch"),  # strategy sections (mappings) are checked by the strategies
])
def test_unknown_keys_are_rejected_by_name(raw, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert key in str(err.value)
    assert "unknown key" in str(err.value)


@pytest.mark.parametrize("raw, key", [
    ({"attack": {"steps": 0}}, "attack.steps"),
    ({"attack": {"eps": "8/0"}}, "attack.eps"),
    ({"attack": {"eps": "lots"}}, "attack.eps"),
    ({"train": {"select": "best"}}, "train.select"),
    ({"evaluate": {"eps": []}}, "evaluate.eps"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
])
def test_bad_values_are_rejected_by_name(raw, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert key in str(err.value)


def test_unknown_registry_names_list_the_choices(tmp_path):
    from pipeline.training.run import train_run

    with pytest.raises(ConfigError) as err:
        train_run(config_from_dict({"strategy": "sipp", "device": "cpu"}), "student", tmp_path / "m.pt")
    assert "strategy" in str(err.value) and "sip_h" in str(err.value)
    with pytest.raises(ConfigError, match="teacher.model"):
        train_run(config_from_dict({"teacher": {"model": "vgg"}, "device": "cpu"}), "teacher", tmp_path / "m.pt")
    with pytest.raises(ConfigError, match="dataset: unknown dataset 'mnist'"):
        load_dataset("mnist", None, "train", 16)
    assert not (tmp_path / "m.pt").exists()


def test_budgets_accept_fractions():
    assert parse_budget("8/255") == pytest.approx(8 / 255)
    assert parse_budget(0.5) == 0.5
    assert format_budget(8 / 255) == "8/255"
    cfg = config_from_dict({"evaluate": {"eps": [0.0039215686, "2/255", "8/255"]}})
    assert [format_budget(e) for e in cfg.evaluate.eps] == ["1/255", "2/255", "8/255"]


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)

