"""Every training technique the section teaches, exercised through the real engine on a tiny model (CPU):
precision choice, gradient checkpointing, accumulation, clipping, warmup + cosine, weight decay groups, fused and
8-bit AdamW, torch.compile, SDPA vs eager attention, and continuing from a locally saved model."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import read_log, tiny_args
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from gpt2_training.cli import main
from gpt2_training.config import ModelArguments
from gpt2_training.model import build_model
from gpt2_training.optim import param_groups


def run(tmp_path, name="run", *extra, **settings):
    settings.setdefault("save_steps", 0)
    return main(tiny_args(tmp_path / name, *extra, **settings))


def test_gradient_checkpointing_gives_the_same_losses(env, tmp_path):
    plain = run(tmp_path, "plain", max_steps=3)
    ckpt = run(tmp_path, "ckpt", "--gradient_checkpointing", "true", max_steps=3)
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)


def test_accumulation_equals_a_bigger_batch(env, tmp_path, capsys):
    big = run(tmp_path, "big", per_device_train_batch_size=8, max_steps=3)
    acc = run(tmp_path, "acc", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3)
    assert acc.losses == pytest.approx(big.losses, rel=1e-4)
    assert "effective batch 8 sequences = 256 tokens per step" in capsys.readouterr().out


def test_gradient_clipping_bounds_the_update(env, tmp_path):
    """With SGD at lr 1 and a constant schedule, one clipped step moves the weights by exactly max_grad_norm."""
    res = run(
        tmp_path,
        "clip",
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.01,
        max_steps=1,
    )
    before = build_model(ModelArguments(preset="tiny"), 1024, 0)  # same seed => same initial weights
    torch.manual_seed(1337)
    before = build_model(ModelArguments(preset="tiny"), 1024, 0)
    after = AutoModelForCausalLM.from_pretrained(res.final_model_dir)
    delta = torch.sqrt(
        sum(((a - b) ** 2).sum() for a, b in zip(after.parameters(), before.parameters(), strict=True))
    )
    assert read_log(tmp_path / "clip")[1]["grad_norm"] > 0.01
    assert delta.item() == pytest.approx(0.01, rel=1e-3)


def test_warmup_then_cosine_schedule(env, tmp_path):
    run(tmp_path, "sched", max_steps=10, warmup_steps=4, learning_rate=1e-3)
    lrs = [r["lr"] for r in read_log(tmp_path / "sched") if r["event"] == "train"]
    # lr logged after step s is the rate for step s+1: warmup climbs to the peak, cosine decays to 0
    want = [1e-3 * (s / 4 if s < 4 else 0.5 * (1 + math.cos(math.pi * (s - 4) / 6))) for s in range(1, 11)]
    assert lrs == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize(
    ("schedule", "rate"),
    [
        # lr after step s (of 6, warmup 2): linear decays to 0, constant holds the peak, inverse sqrt goes as 1/sqrt
        ("linear", lambda s: s / 2 if s < 2 else (6 - s) / 4),
        ("constant_with_warmup", lambda s: min(s / 2, 1.0)),
        ("inverse_sqrt", lambda s: s / 2 if s < 2 else (2 / s) ** 0.5),
    ],
)
def test_other_schedules_set_the_rates_they_name(env, tmp_path, schedule, rate):
    run(tmp_path, schedule, lr_scheduler_type=schedule, max_steps=6, warmup_steps=2, learning_rate=1e-3)
    lrs = [r["lr"] for r in read_log(tmp_path / schedule) if r["event"] == "train"]
    assert lrs == pytest.approx([1e-3 * rate(s) for s in range(1, 7)], abs=1e-9)


def test_weight_decay_applies_to_matrices_only():
    model = build_model(ModelArguments(preset="tiny"), 300, 299)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for p in decay["params"] + no_decay["params"])
    assert n == sum(p.numel() for p in model.parameters())  # tied embedding counted once


def test_fused_adamw_runs_on_cpu(env, tmp_path):
    res = run(tmp_path, optim="adamw_torch_fused", max_steps=3)
    assert res.losses[-1] < res.losses[0]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_8bit_adamw_runs_on_cpu_with_8bit_state(env, tmp_path):
    """The run ends with a checkpoint (save_steps=4), whose optimizer state must hold the 8-bit moments."""
    res = run(tmp_path, optim="adamw_bnb_8bit", max_steps=4, save_steps=4)
    assert all(math.isfinite(x) for x in res.losses) and res.losses[-1] < res.losses[0]
    opt_state = torch.load(Path(res.output_dir) / "checkpoint-4" / "optimizer.pt", weights_only=True)

    def dtypes(obj) -> set:
        # bitsandbytes nests its quantized moments one level down (__bnb_optimizer_quant_state__)
        if torch.is_tensor(obj):
            return {obj.dtype}
        return set().union(*map(dtypes, obj.values())) if isinstance(obj, dict) else set()

    found = dtypes(opt_state["state"])
    assert torch.uint8 in found, found


def test_torch_compile_trains(env, tmp_path):
    eager = run(tmp_path, "eager", max_steps=2)
    compiled = run(tmp_path, "compiled", "--torch_compile", "true", max_steps=2)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3)


def test_sdpa_and_eager_attention_agree(env, tmp_path):
    sdpa = run(tmp_path, "sdpa", max_steps=2)
    eager = run(tmp_path, "eager", attn_implementation="eager", max_steps=2)
    assert sdpa.losses == pytest.approx(eager.losses, rel=1e-4)


def test_continue_training_from_a_locally_saved_model(env, tmp_path):
    first = run(tmp_path, "first", max_steps=8)
    second = run(
        tmp_path,
        "second",
        init_from=first.final_model_dir,
        tokenizer=first.final_model_dir,
        max_steps=2,
        warmup_steps=0,
        learning_rate=1e-4,
    )
    scratch_loss = first.initial_eval["eval_loss"]
    assert second.initial_eval["eval_loss"] == pytest.approx(first.final_eval["eval_loss"], rel=1e-4)
    assert second.initial_eval["eval_loss"] < scratch_loss


def test_saved_model_loads_with_standard_transformers_apis(env, tmp_path):
    res = run(tmp_path, max_steps=2)
    tok = AutoTokenizer.from_pretrained(res.final_model_dir)
    model = AutoModelForCausalLM.from_pretrained(res.final_model_dir)
    assert model.config.model_type == "gpt2" and len(tok) <= model.config.vocab_size
    gen = pipeline("text-generation", model=res.final_model_dir, device="cpu")
    out = gen("The", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("The") and len(out) > 3
    assert res.samples and (Path(res.final_model_dir) / "README.md").exists()


def test_tensorboard_and_loss_plot(env, tmp_path):
    res = run(tmp_path, "tb", report_to="tensorboard", plot="true", max_steps=2)
    out = Path(res.output_dir)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss_curve.png").stat().st_size > 1000
