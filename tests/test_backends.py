"""backends.py: which backend the settings choose, and the settings no backend can run, refused before any work
with a one-line fix. The backends' training behaviour is proved with real processes in tests/test_distributed.py."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_args

from gpt2_training.backends import Backend, DeepSpeedBackend, FSDP2Backend, backend_problems, make_backend
from gpt2_training.config import GPT2TrainingArguments
from gpt2_training.launch import REPO_ROOT

CONFIGS = REPO_ROOT / "01-Full-Fine-Tuning" / "configs"
ZERO = {"zero_optimization": {"stage": 2}}


def _args(**kw) -> GPT2TrainingArguments:
    return GPT2TrainingArguments(output_dir="unused", report_to="none", **kw)


def test_the_settings_choose_the_backend(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert type(make_backend(_args(), "fp32")) is Backend
    fsdp = make_backend(_args(fsdp="shard_grad_op auto_wrap"), "fp32")
    assert isinstance(fsdp, FSDP2Backend) and fsdp.reshard_after_forward is False and fsdp.shards_weights
    ds = make_backend(_args(deepspeed=str(CONFIGS / "ds_zero3.json")), "bf16")
    assert isinstance(ds, DeepSpeedBackend) and ds.stage == 3 and ds.shards_weights
    assert ds.ds_config["bf16"]["enabled"] is True and ds.ds_config["fp16"]["enabled"] is False
    assert not ds.resumes_on_other_world_size and fsdp.resumes_on_other_world_size


def test_an_accelerate_fsdp_config_file_chooses_fsdp2_and_is_consumed(monkeypatch):
    """`accelerate launch --config_file accelerate_fsdp.yaml` passes the file as FSDP_* variables; the backend
    reads them and removes ACCELERATE_USE_FSDP so the Accelerator built next stays plain (it would otherwise try
    its own FSDP on a GPU and ignore it on a CPU)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "GPT2Block")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    backend = make_backend(_args(), "fp32")
    assert isinstance(backend, FSDP2Backend) and backend.reshard_after_forward is False
    import os

    assert "ACCELERATE_USE_FSDP" not in os.environ


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(fsdp="full_shard", fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Layer"]}), "GPT2Block"),
        (dict(fsdp="full_shard offload"), "fsdp_config cpu_offload"),
        (dict(fsdp="full_shard", fsdp_config={"min_num_params": 1000}), "size-based wrapping"),
        (dict(fsdp="full_shard", deepspeed=str(CONFIGS / "ds_zero2.json")), "choose one"),
        (dict(fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Block"]}), "without --fsdp"),
        (
            dict(deepspeed={**ZERO, "bf16": {"enabled": True}, "fp16": {"enabled": True}}),
            "both fp16 and bf16",
        ),
        (dict(deepspeed={**ZERO, "train_micro_batch_size_per_gpu": 3}), "train_micro_batch_size_per_gpu=3"),
        (dict(deepspeed=str(CONFIGS / "ds_zero2.json"), torch_compile=True), "compile section"),
    ],
)
def test_settings_no_backend_can_run_are_refused_with_the_fix(monkeypatch, settings, message):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    problems = backend_problems(_args(**settings))
    assert any(message in p for p in problems), problems


def test_deepspeed_precision_must_agree_with_the_run():
    problems = backend_problems(_args(deepspeed={**ZERO, "fp16": {"enabled": True}}), "bf16")
    assert any("--precision fp16" in p for p in problems), problems
    problems = backend_problems(_args(deepspeed={**ZERO, "bf16": {"enabled": False}}), "bf16")
    assert any("disables bf16" in p for p in problems), problems
    assert backend_problems(_args(deepspeed=str(CONFIGS / "ds_zero3.json")), "bf16") == []


def test_bad_backend_settings_exit_2_before_any_work(tmp_path, env, capsys):
    """On the command line: a one-line error per problem, status 2, nothing written."""
    from gpt2_training.cli import run

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**ZERO, "bf16": {"enabled": True}, "fp16": {"enabled": True}}))
    fsdp = tmp_path / "fsdp.json"
    fsdp.write_text(json.dumps({"transformer_layer_cls_to_wrap": ["Block"]}))
    out = tmp_path / "run"
    assert run(tiny_args(out, "--deepspeed", str(ds))) == 2
    assert "both fp16 and bf16" in capsys.readouterr().err
    assert run(tiny_args(out, "--fsdp", "full_shard auto_wrap", "--fsdp_config", str(fsdp))) == 2
    err = capsys.readouterr().err
    assert "FSDP wrap class 'Block'" in err and "GPT2Block" in err
    assert not out.exists()
