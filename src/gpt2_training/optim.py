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
        return torch.optim.SGD(groups, lr=args.learning_rate)
    raise ConfigError(f"optim={name!r} is not supported here")


def build_scheduler(optimizer: torch.optim.Optimizer, args) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = args.warmup_steps
    warmup_steps = int(warmup * args.max_steps) if 0 < warmup < 1 else int(warmup)
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=args.max_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
