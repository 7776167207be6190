"""Flat YAML configs (common/config.py): defaults, file, command line, and the errors."""
import pytest
import yaml

from common.config import (
    SAMPLE_SCHEMA, TRAIN_SCHEMA, ConfigError, batch_layout, check_train_config, parse_cli, save_resolved,
    spec_overrides,
)
from common.data import DigitsSource
from common.training import model_spec


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_then_command_line_override(tmp_path):
    path = write(tmp_path, "dataset: digits\nlr: 1e-4\nmax_steps: 10\ndepth: 2\n")
    config, used = parse_cli(["-c", str(path), "--lr", "2e-4", "--max_steps=20", "--precision", "bf16"], TRAIN_SCHEMA, "t")
    assert used == str(path)
    assert config["lr"] == 2e-4 and isinstance(config["lr"], float)  # '1e-4' / '2e-4' read as floats
    assert config["max_steps"] == 20 and config["precision"] == "bf16" and config["depth"] == 2
    assert config["model"] == "DiR-Tiny/2"  # default kept
    assert spec_overrides(config) == {"depth": 2}


def test_repo_configs_are_valid(repo_root):
    for path in sorted((repo_root / "configs" / "train").glob("*.yaml")):
        config, _ = parse_cli(["-c", str(path)], TRAIN_SCHEMA, "t")
        if config["dataset"] == "digits":
            check_train_config(config, str(path))
    for path in sorted((repo_root / "configs" / "sample").glob("*.yaml")):
        parse_cli(["-c", str(path)], SAMPLE_SCHEMA, "s")
    train, _ = parse_cli(["-c", str(repo_root / "configs/train/digits.yaml")], TRAIN_SCHEMA, "t")
    sample, _ = parse_cli(["-c", str(repo_root / "configs/sample/digits.yaml")], SAMPLE_SCHEMA, "s")
    assert sample["ckpt"] == train["run_dir"]  # the sample config reads what the train config writes


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "lr: 1.0e-4\nlearning_rat: 3\n")
    with pytest.raises(ConfigError) as err:
        parse_cli(["-c", str(path)], TRAIN_SCHEMA, "t")
    message = str(err.value)
    assert str(path) in message and "'learning_rat'" in message
    path = write(tmp_path, "max_step: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'max_step' \(did you mean 'max_steps'\?\)"):
        parse_cli(["-c", str(path)], TRAIN_SCHEMA, "t")


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError, match=r"command line: unknown key '--lrr' \(did you mean 'lr'\?\)"):
        parse_cli(["--lrr", "1"], TRAIN_SCHEMA, "t")


def test_wrong_type_names_key_value_and_expected(tmp_path):
    path = write(tmp_path, "max_steps: ten\n")
    with pytest.raises(ConfigError, match=r"run.yaml: key 'max_steps' = 'ten' has type str, expected int"):
        parse_cli(["-c", str(path)], TRAIN_SCHEMA, "t")
    with pytest.raises(ConfigError, match=r"command line: key 'lr' = 'fast' has type str, expected float"):
        parse_cli(["--lr", "fast"], TRAIN_SCHEMA, "t")
    with pytest.raises(ConfigError, match=r"key 'learn_sigma' = 1 has type int, expected bool"):
        parse_cli(["--learn_sigma", "1"], TRAIN_SCHEMA, "t")
    with pytest.raises(ConfigError, match=r"key 'precision' = 'fp16' is not allowed .*allowed: fp32, bf16"):
        parse_cli(["--precision", "fp16"], TRAIN_SCHEMA, "t")
    with pytest.raises(ConfigError, match=r"key 'seed' is null, expected int"):
        parse_cli(["--seed", "null"], TRAIN_SCHEMA, "t")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' not found"):
        parse_cli(["-c", str(tmp_path / "nope.yaml")], TRAIN_SCHEMA, "t")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        parse_cli(["-c", str(write(tmp_path, "lr: [1, 2\n", "bad.yaml"))], TRAIN_SCHEMA, "t")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a flat mapping"):
        parse_cli(["-c", str(write(tmp_path, "- 1\n- 2\n", "list.yaml"))], TRAIN_SCHEMA, "t")
    with pytest.raises(ConfigError, match=r"nested.yaml: key 'optim' holds a nested mapping"):
        parse_cli(["-c", str(write(tmp_path, "optim:\n  lr: 1\n", "nested.yaml"))], TRAIN_SCHEMA, "t")
    with pytest.raises(ConfigError, match=r"key '--lr' needs a value"):
        parse_cli(["--lr"], TRAIN_SCHEMA, "t")


def test_sample_classes_list_forms():
    config, _ = parse_cli(["--classes", "1,3,seven"], SAMPLE_SCHEMA, "s")
    assert config["classes"] == ["1", "3", "seven"]
    config, _ = parse_cli(["--classes", "[1, 3]"], SAMPLE_SCHEMA, "s")
    assert config["classes"] == [1, 3]
    config, _ = parse_cli([], SAMPLE_SCHEMA, "s")
    assert config["classes"] == "all"


def test_cross_key_rules_and_batch_layout():
    config, _ = parse_cli(["--dataset", "imagefolder"], TRAIN_SCHEMA, "t")
    with pytest.raises(ConfigError, match="needs key 'data_path'"):
        check_train_config(config, "t.yaml")
    assert batch_layout(64, 2, 4) == 8
    with pytest.raises(ConfigError, match=r"'global_batch_size' = 30 must be divisible by world_size \(2\) x grad_accum_steps \(4\)"):
        batch_layout(30, 2, 4)


def test_model_spec_from_preset_and_data():
    config, _ = parse_cli(["--depth", "2", "--hidden_size", "64"], TRAIN_SCHEMA, "t")
    spec = model_spec(config, DigitsSource(16))
    assert (spec.depth, spec.hidden_size, spec.head_size, spec.input_size, spec.in_channels, spec.num_classes) == (2, 64, 32, 16, 1, 10)
    config, _ = parse_cli(["--hidden_size", "100"], TRAIN_SCHEMA, "t")
    with pytest.raises(ConfigError, match="hidden_size"):
        model_spec(config, DigitsSource(16), "t.yaml")


def test_resolved_config_round_trips(tmp_path):
    config, _ = parse_cli(["--lr", "3e-4"], TRAIN_SCHEMA, "t")
    save_resolved(config, tmp_path / "run" / "config.yaml")
    again, _ = parse_cli(["-c", str(tmp_path / "run" / "config.yaml")], TRAIN_SCHEMA, "t")
    assert again == config
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 3e-4
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
