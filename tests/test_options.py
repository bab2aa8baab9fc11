"""The options contract (options.py): every TrainingArguments field is classified, refused ones stop the run with
their name, honoured ones name a test that exists, and --help offers exactly the honoured ones."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import ROOT, run_train, tiny_args
from transformers import TrainingArguments

from gpt2_training.cli import parse_config, parser
from gpt2_training.config import DataArguments, ModelArguments, RunArguments
from gpt2_training.errors import ConfigError
from gpt2_training.options import (
    HONOURED,
    NOT_APPLICABLE,
    REFUSED,
    TRAINING_ARGUMENTS,
    changed_fields,
    project_settings,
    table_markdown,
    training_config,
)

REFUSED_FIELDS = sorted(n for n, o in TRAINING_ARGUMENTS.items() if o.status == REFUSED)


def test_every_training_arguments_field_is_in_the_table():
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert fields - set(TRAINING_ARGUMENTS) == set(), "new TrainingArguments fields must be classified"
    assert set(TRAINING_ARGUMENTS) - fields == set(), "the table names fields that no longer exist"
    assert {o.status for o in TRAINING_ARGUMENTS.values()} == {HONOURED, REFUSED, NOT_APPLICABLE}
    assert all(o.note for o in TRAINING_ARGUMENTS.values())


@pytest.mark.parametrize("name", sorted(n for n, o in TRAINING_ARGUMENTS.items() if o.status == HONOURED))
def test_every_honoured_field_names_a_test_that_exists(name):
    ref = TRAINING_ARGUMENTS[name].test
    path, _, test = ref.partition("::")
    assert (ROOT / path).exists(), f"{name}: {path} does not exist"
    if test:
        assert re.search(rf"^def {re.escape(test)}\(", (ROOT / path).read_text(), re.M), (
            f"{name}: {ref} missing"
        )


@pytest.mark.parametrize("name", REFUSED_FIELDS)
def test_a_refused_field_on_the_command_line_is_an_error_naming_it(name, tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_args(tmp_path, f"--{name}", TRAINING_ARGUMENTS[name].example))
    assert f"--{name}" in str(err.value.problems)


def test_help_offers_honoured_options_only():
    text = parser().format_help()
    offered = set(re.findall(r"--([a-z0-9_]+)", text))
    for name, opt in TRAINING_ARGUMENTS.items():
        assert (name in offered) == (opt.status == HONOURED), name


def test_the_issue_probe_exits_2_before_any_work(tmp_path, env):
    out = tmp_path / "run"
    proc = run_train(
        tiny_args(out, "--num_train_epochs", "7", "--eval_strategy", "steps")
        + [
            "--resume_from_checkpoint",
            "/nonexistent",
            "--label_smoothing_factor",
            "0.1",
            "--ddp_backend",
            "gloo",
        ],
        env,
    )
    assert proc.returncode == 2, proc.stdout
    assert "--label_smoothing_factor" in proc.stdout and "--ddp_backend" in proc.stdout
    assert not out.exists(), "nothing may be written before the options are accepted"


def test_python_api_takes_a_plain_training_arguments(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, gradient_checkpointing=True, max_steps=5)
    cfg = training_config(args, model=ModelArguments(preset="tiny"), data=DataArguments(), run=RunArguments())
    assert cfg.train is args and set(changed_fields(args)) >= {"gradient_checkpointing", "max_steps"}
    with pytest.raises(ConfigError, match="--label_smoothing_factor"):
        training_config(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, label_smoothing_factor=0.1))
    with pytest.raises(ConfigError, match="--hub_strategy every_save"):
        training_config(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, push_to_hub=True))


def test_precision_flags(tmp_path):
    assert parse_config(tiny_args(tmp_path, "--bf16", "true", precision="auto")).run.precision == "bf16"
    with pytest.raises(ConfigError, match="fp16 and bf16|both set"):
        parse_config(tiny_args(tmp_path, "--bf16", "true", "--fp16", "true", precision="auto"))
    with pytest.raises(ConfigError, match="contradicts --precision"):
        parse_config(tiny_args(tmp_path, "--fp16", "true", precision="bf16"))
    # TrainingArguments itself refuses TF32 without an Ampere GPU; the message names the flag
    with pytest.raises(ConfigError, match="tf32"):
        parse_config(tiny_args(tmp_path, "--tf32", "true"))
    assert parse_config(tiny_args(tmp_path, "--use_cpu", "true")).train.use_cpu is True


def test_max_steps_overrides_epochs_with_a_note(tmp_path, env):
    proc = run_train(tiny_args(tmp_path / "r", "--num_train_epochs", "7", max_steps=2, save_steps=0), env)
    assert proc.returncode == 0, proc.stdout
    assert "max_steps=2 overrides num_train_epochs=7" in proc.stdout


def test_project_settings_have_help_and_do_not_shadow_training_arguments():
    own = project_settings()
    assert own and all(o.note for o in own.values())
    assert not set(own) & set(TRAINING_ARGUMENTS)


def test_setup_md_holds_the_table():
    assert table_markdown() in (ROOT / "SETUP.md").read_text()


def test_plain_training_arguments_without_a_precision_flag_is_fp32(tmp_path):
    plain = training_config(TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    assert plain.run.precision == "fp32"
    bf16 = training_config(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True))
    assert bf16.run.precision == "bf16"
    assert parse_config(tiny_args(tmp_path, precision="auto")).run.precision == "auto"
