"""cli.py: a YAML/JSON settings file under command-line flags, unknown settings and tokens refused, and the exit
status of each kind of failure."""

from __future__ import annotations

import pytest
from conftest import run_train, tiny_args

from gpt2_training.cli import parse_config, run
from gpt2_training.errors import ConfigError


def test_config_file_then_flags_override(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\nblock_size: 32\nmax_steps: 7\nlearning_rate: 0.01\n")
    cfg = parse_config(["--config", str(f), "--max_steps", "9"])
    assert (cfg.data.block_size, cfg.train.max_steps, cfg.train.learning_rate) == (32, 9, 0.01)
    assert cfg.train.lr_scheduler_type == "cosine"  # our default, under Hugging Face's name


def test_unknown_setting_in_file_is_refused(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("n_layers: 3\n")
    with pytest.raises(ConfigError, match="unknown setting.*n_layers"):
        parse_config(["--config", str(f)])


def test_tokens_are_refused_but_tokenizer_flags_are_not():
    with pytest.raises(ConfigError, match="environment"):
        parse_config(["--hub_token", "abc"])
    assert parse_config(["--tokenizer_vocab_size", "512"]).data.tokenizer_vocab_size == 512


def test_a_settings_error_exits_2_with_one_line_per_problem(tmp_path, capsys):
    assert run(tiny_args(tmp_path / "run", preset="huge", block_size=1)) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'huge'" in err and "block_size must be at least 2" in err
    assert not (tmp_path / "run").exists()


def test_the_command_prints_help_and_exits_0(env):
    proc = run_train(["--help"], env, timeout=120)
    assert proc.returncode == 0 and "--per_device_train_batch_size" in proc.stdout
    assert "--hub_token" not in proc.stdout  # refused fields are not offered
