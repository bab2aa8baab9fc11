"""Optimizer and learning-rate schedule from `TrainingArguments`: AdamW (plain, fused or 8-bit), decay applied
to matrices only, and the schedule from transformers' `get_scheduler` (cosine by default)."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from .errors import ConfigError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (matmuls, embeddings); never biases or LayerNorm gains, as in GPT-2 and nanoGPT."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied embeddings appear twice
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """`args` is a TrainingArguments; `optim` names follow Hugging Face's."""
    name = str(getattr(args.optim, "value", args.optim))
    groups = param_groups(model, args.weight_decay)
    kw = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    extra = parse_optim_args(getattr(args, "optim_args", None))
    if extra:
        # unknown names fail here, before training, with the optimizer's own message
        _check_optimizer_kwargs(name, extra)
        kw.update(extra)
    if name in ("adamw_torch", "adamw_torch_fused"):
        device = next(model.parameters()).device
        fused = name == "adamw_torch_fused" and device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, fused=fused or None, **kw)
    if name in ("adamw_bnb_8bit", "adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ConfigError(
                "optim=adamw_bnb_8bit needs bitsandbytes: run `make install-full-finetuning`"
            ) from exc
        return bnb.optim.AdamW8bit(groups, **kw)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate, **extra)
    raise ConfigError(f"optim={name!r} is not supported here")


def parse_optim_args(text: str | None) -> dict:
    """TrainingArguments' `optim_args` ("amsgrad=True,foreach=False") as keyword arguments."""
    import ast

    out = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise ConfigError(f"--optim_args {text!r}: write key=value pairs separated by commas")
        key, value = (x.strip() for x in item.split("=", 1))
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _check_optimizer_kwargs(name: str, extra: dict) -> None:
    import inspect

    if name in ("adamw_torch", "adamw_torch_fused"):
        cls = torch.optim.AdamW
    elif name == "sgd":
        cls = torch.optim.SGD
    else:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr", "betas", "eps"}
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise ConfigError(
            f"--optim_args: {cls.__name__} takes no {', '.join(unknown)}; it accepts {', '.join(sorted(accepted))} "
            "(lr, betas and eps come from --learning_rate, --adam_beta1, --adam_beta2 and --adam_epsilon)"
        )


def scheduler_problems(args) -> list[str]:
    """What the schedule would refuse only once training is set up: `lr_scheduler_kwargs` that its function does
    not take (transformers passes them on as they are), and a `min_lr_rate` that is no fraction of the peak."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    kwargs = dict(args.lr_scheduler_kwargs or {})
    name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    function = TYPE_TO_SCHEDULER_FUNCTION.get(SchedulerType(name))
    if not kwargs or function is None:
        return []
    set_here = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    accepted = sorted(set(inspect.signature(function).parameters) - set_here)
    problems = []
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        problems.append(
            f"--lr_scheduler_kwargs: the {name} schedule takes no {', '.join(unknown)}; it accepts "
            f"{', '.join(accepted) or 'nothing'}"
        )
    rate = kwargs.get("min_lr_rate")
    if rate is not None and not 0 <= rate <= 1:
        problems.append(f"--lr_scheduler_kwargs min_lr_rate={rate} must be in [0, 1]: a fraction of the peak")
    return problems


def warmup_steps(args) -> int:
    """--warmup_steps; a value below 1 is a ratio of the run, as in transformers."""
    warmup = args.warmup_steps
    return int(warmup * args.max_steps) if 0 < warmup < 1 else int(warmup)


def build_scheduler(optimizer: torch.optim.Optimizer, args) -> torch.optim.lr_scheduler.LRScheduler:
    kwargs = dict(args.lr_scheduler_kwargs or {})
    name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if name == "cosine_with_min_lr" and not {"min_lr", "min_lr_rate"} & set(kwargs):
        # nanoGPT's recipe: decay to a tenth of the peak
        kwargs["min_lr_rate"] = 0.1
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(args),
        num_training_steps=args.max_steps,
        scheduler_specific_kwargs=kwargs,
    )
