"""Optimizer and learning-rate schedule from `TrainingArguments`: AdamW (plain, fused or 8-bit), SGD, or Muon for
the hidden matrices beside AdamW for the rest; decay applied to matrices only; the schedule from transformers'
`get_scheduler` (cosine by default)."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from .config import SCHEDULES
from .errors import ConfigError

# Moonshot's scaling ("Muon is Scalable for LLM Training"): each matrix's orthogonalised update is scaled by
# 0.2 * sqrt(max(rows, columns)), so its RMS matches AdamW's (about 0.2) and one --learning_rate, warm-up and
# schedule serve both the Muon and the AdamW parameters.
MUON_LR_SCALING = "match_rms_adamw"


def param_groups(model: torch.nn.Module | list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay 2-D weights (matmuls, embeddings); never biases or LayerNorm gains, as in GPT-2 and nanoGPT."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters() if isinstance(model, torch.nn.Module) else model:
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
    if name == "muon":
        return MuonWithAdamW(model, args, extra)
    raise ConfigError(f"optim={name!r} is not supported here")


def _muon_matrices(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, bool, int]]:
    """The hidden matrices Muon orthogonalises as (weight, transposed, blocks): each is seen as a linear map
    (out x in), so a GPT-2 Conv1D's weight is transposed, and the fused attention projection (c_attn) is three
    blocks (query, key, value), each its own map. Embeddings, the output head, LayerNorms and biases are not here."""
    from transformers.pytorch_utils import Conv1D

    lm = getattr(model, "lm", model)
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    if hasattr(lm, "get_output_embeddings") and lm.get_output_embeddings() is not None:
        skip.add(id(lm.get_output_embeddings().weight))
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (Conv1D, torch.nn.Linear)) and id(module.weight) not in skip:
            if module.weight.requires_grad:
                out.append((module.weight, isinstance(module, Conv1D), 3 if name.endswith("c_attn") else 1))
    return out


def _as_maps(tensor: torch.Tensor, transposed: bool, blocks: int) -> tuple[torch.Tensor, ...]:
    """Views of a weight (or its gradient) as `blocks` linear maps, out x in."""
    return (tensor.T if transposed else tensor).chunk(blocks, dim=0)


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer object over two: `torch.optim.Muon` on the hidden matrices (views of the weights, so the
    query, key and value blocks of c_attn are orthogonalised apart) and AdamW on everything else. Its
    `param_groups` are the two optimizers' own group dicts, so the schedule sets both learning rates; its state
    dict holds both states, so checkpoints and exact resume work as for AdamW."""

    def __init__(self, model: torch.nn.Module, args, muon_kwargs: dict | None = None):
        self._matrices = _muon_matrices(model)
        in_muon = {id(w) for w, _, _ in self._matrices}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_muon]
        # Muon steps views of the weights (which update them in place); each gets its slice of the gradient
        self._views = [_as_maps(w.detach(), t, n) for w, t, n in self._matrices]
        muon_kw = {"adjust_lr_fn": MUON_LR_SCALING, **(muon_kwargs or {})}
        self.muon = torch.optim.Muon(
            [v for views in self._views for v in views],
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            **muon_kw,
        )
        self.adamw = torch.optim.AdamW(
            param_groups(rest, args.weight_decay),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        super().__init__([w for w, _, _ in self._matrices] + rest, {"lr": args.learning_rate})
        self._bind_groups()

    def _bind_groups(self) -> None:
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for (w, transposed, blocks), views in zip(self._matrices, self._views, strict=True):
            grads = (None,) * blocks if w.grad is None else _as_maps(w.grad, transposed, blocks)
            for view, grad in zip(views, grads, strict=True):
                view.grad = grad
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for (w, _, _), views in zip(self._matrices, self._views, strict=True):
            for view in views:
                view.grad = None
            w.grad = None if set_to_none or w.grad is None else w.grad.zero_()
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # loading replaces the inner optimizers' group dicts: the schedule must set the new ones
        self._bind_groups()


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
    elif name == "muon":
        # the AdamW part takes its settings from --adam_beta1, --adam_beta2 and --adam_epsilon
        cls = torch.optim.Muon
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
    """What the schedule would refuse only once training is set up: a schedule this loop cannot step (one driven
    by an evaluation metric), `lr_scheduler_kwargs` that its function does not take or lacks (transformers passes
    them on as they are), and a `min_lr_rate` that is no fraction of the peak."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    kwargs = dict(args.lr_scheduler_kwargs or {})
    name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if name not in SCHEDULES:
        # the loop steps the schedule once per optimizer step, with no metric to pass
        return [
            f"--lr_scheduler_type {name} is driven by an evaluation metric, which this loop does not pass to "
            f"its schedule: use one of {', '.join(SCHEDULES)}"
        ]
    function = TYPE_TO_SCHEDULER_FUNCTION.get(SchedulerType(name))
    if function is None:
        return []
    set_here = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    parameters = inspect.signature(function).parameters
    accepted = sorted(set(parameters) - set_here)
    problems = []
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        problems.append(
            f"--lr_scheduler_kwargs: the {name} schedule takes no {', '.join(unknown)}; it accepts "
            f"{', '.join(accepted) or 'nothing'}"
        )
    required = [k for k in accepted if parameters[k].default is inspect.Parameter.empty and k not in kwargs]
    if required:
        example = ", ".join(f'"{k}": 100' for k in required)
        problems.append(
            f"--lr_scheduler_type {name} needs {', '.join(required)}: pass --lr_scheduler_kwargs '{{{example}}}'"
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
