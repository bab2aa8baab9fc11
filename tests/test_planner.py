"""Memory planner: exact bytes of weights, gradients and optimizer states against real tensors (CPU), saved
activations against autograd's saved tensors, and the advice."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_training.cli import main as cli_main
from gpt2_training.config import PRESETS
from gpt2_training.model import CausalLMWithLoss, enable_activation_checkpointing
from gpt2_training.planner import (
    GIB,
    activation_bytes,
    advise,
    fits,
    layer_activation_bytes_per_token,
    measure_peak_memory,
    plan_memory,
)


def _config(preset: str, vocab: int) -> GPT2Config:
    cfg = GPT2Config(vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **PRESETS[preset])
    cfg._attn_implementation = "sdpa"
    return cfg


def _tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (tied weights and shared bnb quantisation maps count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t):
            seen[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def _measure(cfg: GPT2Config, optimizer: str) -> dict[str, int]:
    torch.manual_seed(0)
    model = CausalLMWithLoss(GPT2LMHeadModel(cfg))
    if optimizer == "adamw_8bit":
        bnb = pytest.importorskip("bitsandbytes")
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    model(x).backward()
    grads = _tensor_bytes(p.grad for p in model.parameters())
    opt.step()  # materialises the states
    return {
        "weights": _tensor_bytes(model.parameters()),
        "gradients": grads,
        "optimizer_states": _tensor_bytes(v for st in opt.state.values() for v in st.values()),
    }


@pytest.mark.parametrize("preset,vocab", [("tiny", 1024), ("mini", 8192)])
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_static_bytes_are_exact(preset, vocab, optimizer):
    cfg = _config(preset, vocab)
    measured = _measure(cfg, optimizer)
    plan = plan_memory(cfg, per_device_train_batch_size=2, block_size=16, precision="fp32", optim=optimizer)
    predicted = {
        "weights": plan.weights,
        "gradients": plan.gradients,
        "optimizer_states": plan.optimizer_states,
    }
    assert predicted == measured
    if optimizer == "adamw_8bit":  # far smaller than the 8 bytes/param of fp32 AdamW, but not a bare 2 bytes
        assert 2 * plan.n_params < plan.optimizer_states < 8 * plan.n_params


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh"])
def test_activations_match_saved_tensors(precision, checkpointing, activation):
    """What autograd saves during the forward equals the formula (within 1%); bf16 autocast also saves the
    bf16 casts of the block weights, which the plan counts separately as autocast_weight_copies."""
    cfg = _config("tiny", 512)
    cfg.activation_function = activation
    lm = GPT2LMHeadModel(cfg).train()
    if checkpointing:
        enable_activation_checkpointing(lm)
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    B, T = 4, 64
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            lm.transformer(input_ids=x, use_cache=False)
    plan = plan_memory(
        cfg,
        per_device_train_batch_size=B,
        block_size=T,
        precision=precision,
        gradient_checkpointing=checkpointing,
    )
    s = 2 if precision == "bf16" else 4
    predicted = activation_bytes(cfg, B, T, s, checkpointing)
    if checkpointing:  # the forward only stores block inputs; the one recomputed block appears in backward
        predicted -= int(B * T * layer_activation_bytes_per_token(cfg, T, s))
    elif precision == "bf16":
        predicted += plan.autocast_weight_copies
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.01)


def test_sharding_divides_the_right_parts():
    one = plan_memory("gpt2-medium", 4, 1024, "fp32")
    z1 = plan_memory("gpt2-medium", 4, 1024, "fp32", zero_stage=1, num_gpus=4)
    z2 = plan_memory("gpt2-medium", 4, 1024, "fp32", zero_stage=2, num_gpus=4)
    fsdp = plan_memory("gpt2-medium", 4, 1024, "fp32", fsdp=True, num_gpus=4)
    assert z1.optimizer_states == pytest.approx(one.optimizer_states / 4, abs=1)
    assert z1.gradients == one.gradients and z2.gradients == pytest.approx(one.gradients / 4, abs=1)
    assert fsdp.weights < one.weights and fsdp.activations == one.activations
    assert one.total > z1.total > z2.total


def test_gpt2_small_batch_64_needs_a_change_for_24_gib():
    plan = plan_memory("gpt2-small", per_device_train_batch_size=64, block_size=1024, precision="bf16")
    assert not fits(plan, 24)
    adv = advise(
        "gpt2-small", per_device_train_batch_size=64, block_size=1024, precision="bf16", gpu_memory_gib=24
    )
    assert not adv.fits_as_is and adv.found
    assert fits(plan_memory(**adv.settings), 24)
    # effective batch kept
    assert adv.settings["per_device_train_batch_size"] * adv.settings["gradient_accumulation_steps"] == 64
    assert "does NOT fit" in adv.text()


def test_advice_escalates_to_sharding_on_several_gpus():
    kw = dict(
        per_device_train_batch_size=1,
        block_size=1024,
        precision="bf16",
        gradient_checkpointing=True,
        optim="adamw_8bit",
    )
    assert not fits(plan_memory("gpt2-xl", **kw), 12)
    adv = advise("gpt2-xl", **kw, num_gpus=8, gpu_memory_gib=12)
    assert adv.found and (adv.settings["zero_stage"] or adv.settings["fsdp"])
    assert fits(plan_memory(**adv.settings), 12)
    assert not advise("gpt2-xl", **kw, num_gpus=1, gpu_memory_gib=4).found


def test_hf_loss_costs_more_than_chunked():
    chunked = plan_memory("gpt2-small", 32, 1024, "bf16", loss_impl="chunked")
    hf = plan_memory("gpt2-small", 32, 1024, "bf16", loss_impl="hf")
    assert hf.loss_head > 4 * chunked.loss_head


def test_plan_cli(capsys):
    out = cli_main(
        [
            "plan",
            "--preset",
            "gpt2-small",
            "--micro_batch",
            "16",
            "--seq_len",
            "1024",
            "--precision",
            "bf16",
            "--gpu_memory_gib",
            "24",
        ]
    )
    printed = capsys.readouterr().out
    assert "| activations |" in printed and "fits" in printed
    assert out["plan"]["total"] / GIB < 24 and out["advice"]["fits_as_is"]
    out = cli_main(
        [
            "plan",
            "--preset",
            "gpt2-large",
            "--micro_batch",
            "16",
            "--gpu_memory_gib",
            "24",
            "--zero_stage",
            "2",
            "--num_gpus",
            "4",
            "--optim",
            "adamw_8bit",
            "--gradient_checkpointing",
        ]
    )
    assert out["plan"]["zero_stage"] == 2 and "advice" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_measure_peak_memory_needs_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        measure_peak_memory("tiny", 2, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prediction_close_to_measured_on_gpu():
    measured = measure_peak_memory("mini", 8, 256, "bf16")["peak_allocated"]
    predicted = plan_memory("mini", 8, 256, "bf16").peak
    assert 0.6 < measured / predicted < 1.15


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--micro_batch", "0"], "per_device_train_batch_size must be >= 1"),
        (["--num_gpus", "0"], "num_gpus must be >= 1"),
        (["--zero_stage", "2", "--fsdp"], "choose ZeRO (DeepSpeed) or FSDP, not both"),
        (["--gpu_memory_gib", "0"], "gpu_memory_gib must be > 0"),
    ],
)
def test_plan_refuses_impossible_settings_with_one_line_and_status_2(argv, message, capsys):
    from gpt2_training.cli import run

    assert run(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.py plan: ") and message in err and "\n" not in err
