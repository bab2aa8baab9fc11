"""Optimizer and schedule from TrainingArguments: the peak, warmup as a ratio, cosine decay to a floor, and
optim_args / betas / epsilon / weight decay reaching the optimizer."""

from __future__ import annotations

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
