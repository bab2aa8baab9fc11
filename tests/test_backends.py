"""backends/: which backend the settings choose, and the settings no backend can run, refused before any work
with a one-line fix. The backends' training behaviour is proved with real processes in tests/test_distributed.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


ROUND_TRIP = """
import json, sys
import torch
from conftest import state_tensors
from gpt2_training import checkpoint as ckpt
from gpt2_training.cli import parse_config
from gpt2_training.trainer import Engine

engine = Engine(parse_config(sys.argv[1:]))
engine.setup()
backend = engine.backend


def train_step():
    with backend.accumulate(last=True):
        backend.backward(engine.model(engine._to_device(engine._read_step(4)[0])))
    backend.clip(1.0)
    backend.step()


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


train_step()
saved = state_tensors(backend.state_dict())
path = ckpt.save(engine.out, 1, engine._parts(), engine.lm, None)
train_step()
moved = state_tensors(backend.state_dict())
ckpt.load(path, engine._parts())
print(json.dumps({
    "kind": type(backend.state_dict()).__name__,
    "tensors": len(saved),
    "moved": not same(saved, moved),
    "restored": same(saved, state_tensors(backend.state_dict())),
}))
"""


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_state_dict_round_trip_through_a_checkpoint_restores_every_tensor(tmp_path, env, backend):
    """Weights and optimizer state after one step, saved; a second step moves them; loading the checkpoint brings
    back every tensor bit for bit (single process; FSDP2 in a one-process group, so in its own process)."""
    import subprocess
    import sys

    extra = ["--fsdp", "full_shard auto_wrap"] if backend == "fsdp" else []
    cmd = [sys.executable, "-c", ROUND_TRIP, *tiny_args(tmp_path / "run", *extra, save_steps=0)]
    env = {**env, "PYTHONPATH": os.pathsep.join([env["PYTHONPATH"], str(Path(__file__).parent)])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kind"] == {"ddp": "dict", "fsdp": "Sharded"}[backend]
    assert result["tensors"] > 20 and result["moved"] and result["restored"], result


LEAVE = """
import glob
import json
import sys
import torch.distributed as dist
from gpt2_training.cli import run

status = run(sys.argv[1:])
threads = []
for comm in glob.glob("/proc/self/task/*/comm"):
    with open(comm) as f:
        threads.append(f.read().strip())
print(json.dumps({"status": status, "group": dist.is_initialized(), "threads": sorted(threads)}))
"""


def test_a_finished_run_leaves_its_process_group(tmp_path, env):
    """A run that needed a process group (FSDP2 in a one-process gloo group here; torchrun's group is the same
    object) destroys it before returning: left to interpreter shutdown, gloo's threads can abort the process with
    "terminate called without an active exception" after a successful run, which a launcher reports as a failure.
    (That DDP's group is joined then, threads and all, is test_distributed's `test_ddp_joins_gloo_threads...`;
    under FSDP2, torch's DTensor caches keep the mesh and its group until the interpreter exits.)"""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-c",
        LEAVE,
        *tiny_args(tmp_path / "run", "--fsdp", "full_shard auto_wrap", max_steps=1),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    left = json.loads(proc.stdout.strip().splitlines()[-1])
    assert left["status"] == 0 and left["group"] is False, left
    # --fsdp on one process runs FSDP2, and the start-up line says so
    assert (
        "; FSDP2 (full_shard: weights, gradients and optimizer state sharded over 1 process)" in proc.stdout
    )
    assert "terminate called" not in proc.stderr


def test_one_reading_of_the_settings_serves_the_check_and_the_construction(monkeypatch):
    """`backend_settings` reads --fsdp / --deepspeed once: the object it returns holds what `backend_problems`
    reports, refuses to build with exactly those problems, and builds the backend when there are none."""
    from gpt2_training.backends import BackendSettings, backend_settings
    from gpt2_training.errors import ConfigError

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    bad = _args(fsdp="shard_grad_op", fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Layer"]})
    settings = backend_settings(bad, "fp32")
    assert settings.kind == "fsdp" and settings.reshard_after_forward is False
    assert list(settings.problems) == backend_problems(bad, "fp32") and "GPT2Layer" in settings.problems[0]
    with pytest.raises(ConfigError) as refused:
        settings.build()
    assert refused.value.problems == list(settings.problems)

    good = _args(deepspeed=str(CONFIGS / "ds_zero3.json"), gradient_accumulation_steps=2)
    settings = backend_settings(good, "bf16")
    assert settings.problems == () and backend_problems(good, "bf16") == []
    assert settings.deepspeed["gradient_accumulation_steps"] == 2
    backend = settings.build()
    assert isinstance(backend, DeepSpeedBackend) and backend.settings is settings and backend.A == 2
    assert backend.stage == 3 and backend.ds_config["bf16"]["enabled"] is True
    # read for the check before the precision is resolved ("auto"), the settings build nothing
    with pytest.raises(ValueError, match="resolved precision"):
        BackendSettings(precision=None).build()


def test_building_consumes_the_accelerate_launch_variables(monkeypatch):
    """An `accelerate launch` FSDP config reaches the reading through the environment; building the backend
    removes the variable, so the Accelerator built next stays plain and a second reading sees no FSDP."""
    from gpt2_training.backends import backend_settings

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    settings = backend_settings(_args(), "fp32")
    assert settings.kind == "fsdp" and any("cpu_offload" in p for p in settings.problems)
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    settings = backend_settings(_args(), "fp32")
    assert settings.problems == () and isinstance(settings.build(), FSDP2Backend)
    assert backend_settings(_args(), "fp32").kind == "ddp"
