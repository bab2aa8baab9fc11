"""Optimizer and schedule from TrainingArguments: the peak, warmup as a ratio, cosine decay to a floor, and
optim_args / betas / epsilon / weight decay reaching the optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainingArguments

from gpt2_training.errors import ConfigError
from gpt2_training.optim import build_optimizer, build_scheduler


def _args(**kw) -> TrainingArguments:
    base = dict(output_dir="unused", use_cpu=True, learning_rate=1e-3, max_steps=10, warmup_steps=2)
    base.update(kw)
    return TrainingArguments(**base)


def _lrs(args) -> list[float]:
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, args)
    sched = build_scheduler(opt, args)
    lrs = []
    for _ in range(args.max_steps):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs


def test_schedule_peaks_at_learning_rate():
    lrs = _lrs(_args(lr_scheduler_type="cosine"))
    assert max(lrs) == pytest.approx(1e-3) and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_min_lr_ends_at_a_tenth():
    assert _lrs(_args(lr_scheduler_type="cosine_with_min_lr"))[-1] == pytest.approx(1e-4)
    custom = _args(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.25})
    assert _lrs(custom)[-1] == pytest.approx(2.5e-4)


def test_warmup_ratio():
    # 0.3 of 10 steps = 3 warmup steps: the peak is reached after the third step, not before
    lrs = _lrs(_args(warmup_steps=0.3, lr_scheduler_type="constant_with_warmup"))
    assert lrs[1] < 1e-3 and lrs[2] == pytest.approx(1e-3)


def test_optim_args_reach_the_optimizer():
    model = torch.nn.Linear(4, 4)
    args = _args(
        optim_args="amsgrad=True", adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6, weight_decay=0.2
    )
    opt = build_optimizer(model, args)
    decay, no_decay = opt.param_groups
    assert decay["amsgrad"] is True and decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="takes no bogus"):
        build_optimizer(model, _args(optim_args="bogus=1"))
    with pytest.raises(ConfigError, match="key=value"):
        build_optimizer(model, _args(optim_args="amsgrad"))


def test_schedule_kwargs_it_does_not_take_are_found_before_training_and_the_accepted_ones_work():
    from gpt2_training.optim import scheduler_problems

    def args(kind, **kwargs):
        return _args(lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs, warmup_steps=0, learning_rate=1.0)

    (problem,) = scheduler_problems(args("cosine", nonsense=1))
    assert problem == "--lr_scheduler_kwargs: the cosine schedule takes no nonsense; it accepts num_cycles"
    assert scheduler_problems(args("constant", num_cycles=1)) == [
        "--lr_scheduler_kwargs: the constant schedule takes no num_cycles; it accepts nothing"
    ]
    assert "must be in [0, 1]" in scheduler_problems(args("cosine_with_min_lr", min_lr_rate=2))[0]
    # what the message names as accepted builds a schedule: one full cosine cycle returns to the peak at the end,
    # where the default half cycle ends near zero
    good = args("cosine", num_cycles=1.0)
    assert scheduler_problems(good) == []
    lrs = _lrs(good)
    assert lrs[5] < 0.2 and lrs[-1] > 0.8


def test_a_schedule_the_loop_cannot_step_or_one_missing_a_setting_is_refused_before_training(tmp_path):
    from conftest import tiny_args

    from gpt2_training.cli import parse_config
    from gpt2_training.optim import scheduler_problems

    # a metric-driven schedule: refused by name, not through the fields transformers sets for it
    with pytest.raises(ConfigError, match="driven by an evaluation metric"):
        argv = [
            "--lr_scheduler_type",
            "reduce_lr_on_plateau",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
        ]
        parse_config(tiny_args(tmp_path, *argv))
    # warmup-stable-decay has a required setting: the message says how to pass it, and doing so builds it
    wsd = _args(lr_scheduler_type="warmup_stable_decay", warmup_steps=0, learning_rate=1.0)
    (problem,) = scheduler_problems(wsd)
    assert problem == (
        "--lr_scheduler_type warmup_stable_decay needs num_decay_steps: pass --lr_scheduler_kwargs "
        "'{\"num_decay_steps\": 100}'"
    )
    fixed = _args(
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"num_decay_steps": 5},
        warmup_steps=0,
        learning_rate=1.0,
    )
    assert scheduler_problems(fixed) == []
    lrs = _lrs(fixed)
    # stable at the peak, then decaying over the last 5 of the 10 steps
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] < 0.2


# -- Muon ---------------------------------------------------------------------------------------------------------
def _tiny_lm():
    from gpt2_training.config import ModelArguments
    from gpt2_training.model import CausalLMWithLoss, build_model

    torch.manual_seed(0)
    return CausalLMWithLoss(build_model(ModelArguments(preset="tiny"), 256, 0), "chunked")


def _muon_args(**kw):
    from gpt2_training.config import GPT2TrainingArguments

    base = dict(output_dir="unused", optim="muon", learning_rate=0.02, weight_decay=0.0, max_steps=10)
    return GPT2TrainingArguments(**{**base, **kw, "warmup_steps": kw.get("warmup_steps", 0)})


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = _tiny_lm()
    opt = build_optimizer(model, _muon_args())
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(w)] for w, _, _ in opt._matrices}
    in_adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert in_muon == {
        f"lm.transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    # embeddings (the head is tied to wte), LayerNorms and biases: every other parameter, once
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    # c_attn is three maps of n_embd x n_embd; every view is out x in
    assert [v.shape for v in opt._views[0]] == [torch.Size([64, 64])] * 3
    assert opt._views[2][0].shape == (256, 64)  # mlp.c_fc: 64 -> 256


def test_muon_orthogonalises_query_key_and_value_apart_at_the_stated_scale():
    from torch.optim._muon import _zeropower_via_newtonschulz

    model = _tiny_lm()
    args = _muon_args()
    opt = build_optimizer(model, args)
    model(torch.randint(0, 256, (2, 16))).backward()
    c_attn = model.lm.transformer.h[0].attn.c_attn.weight
    before, grad = c_attn.detach().clone(), c_attn.grad.clone()
    opt.step()
    step = (c_attn.detach() - before).T.chunk(3, dim=0)
    for block, g in zip(step, grad.T.chunk(3, dim=0), strict=True):
        # Muon's first step: Nesterov momentum from an empty buffer, orthogonalised; Moonshot's scaling makes it
        # lr * 0.2 * sqrt(max(rows, columns)) times that (each block alone: 64 x 64, not the fused 64 x 192)
        nesterov = g.lerp(torch.zeros_like(g).lerp(g, 0.05), 0.95)
        orthogonal = _zeropower_via_newtonschulz(nesterov, (3.4445, -4.775, 2.0315), 5, 1e-7)
        expected = -args.learning_rate * 0.2 * math.sqrt(64) * orthogonal
        torch.testing.assert_close(block, expected.float(), atol=2e-4, rtol=0.05)
        # the update's RMS is about 0.2 * lr, as AdamW's first steps are about lr: one learning rate serves both
        assert 0.1 < block.pow(2).mean().sqrt().item() / args.learning_rate < 0.3


def test_muon_is_one_optimizer_for_the_schedule_and_the_checkpoint():
    model, args = _tiny_lm(), _muon_args(max_steps=6, warmup_steps=2)
    opt = build_optimizer(model, args)
    sched = build_scheduler(opt, args)
    x = torch.randint(0, 256, (2, 16))
    for _ in range(2):
        model(x).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    last = sched.get_last_lr()[0]
    assert last > 0 and all(
        g["lr"] == pytest.approx(last) for g in opt.muon.param_groups + opt.adamw.param_groups
    )
    saved = opt.state_dict()
    again = build_optimizer(_tiny_lm(), args)
    again.load_state_dict(saved)
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in opt.param_groups]
    # after loading, the groups the schedule sets are the ones the inner optimizers step with
    assert again.param_groups[0] is again.muon.param_groups[0]
    buf = next(iter(again.muon.state.values()))["momentum_buffer"]
    assert buf.abs().sum() > 0


def test_muon_settings_go_through_optim_args_and_are_checked():
    opt = build_optimizer(_tiny_lm(), _muon_args(optim_args="momentum=0.9,ns_steps=3"))
    assert opt.muon.param_groups[0]["momentum"] == 0.9 and opt.muon.param_groups[0]["ns_steps"] == 3
    with pytest.raises(ConfigError, match="Muon takes no betas"):
        build_optimizer(_tiny_lm(), _muon_args(optim_args="betas=0.5"))


@pytest.mark.parametrize(
    "backend", [{"fsdp": "full_shard auto_wrap"}, {"deepspeed": {"zero_optimization": {"stage": 2}}}]
)
def test_muon_is_refused_on_sharded_backends(backend):
    from gpt2_training.backends import backend_problems

    problems = backend_problems(_muon_args(**backend))
    assert any("--optim muon with" in p and "use DDP" in p for p in problems)
    assert not any("muon" in p for p in backend_problems(_muon_args()))


def test_muon_is_refused_with_fp16_loss_scaling():
    from gpt2_training.backends import backend_problems

    assert any("use --precision bf16" in p for p in backend_problems(_muon_args(), "fp16"))
    assert not backend_problems(_muon_args(), "bf16")


def test_the_command_line_offers_this_project_s_optimizers(tmp_path):
    from gpt2_training.cli import parse_config
    from gpt2_training.options import validate

    assert parse_config(["--optim", "muon", "--output_dir", str(tmp_path / "a")]).train.optim == "muon"
    # a name transformers knows but this engine does not run: refused by the one list, with the choices
    with pytest.raises(ConfigError, match="optim='adafactor' is not supported here: use one of .*sgd, muon"):
        validate(
            parse_config(["--optim", "adafactor", "--output_dir", str(tmp_path / "b")]),
            cuda_available=False,
            bf16_ok=False,
        )
