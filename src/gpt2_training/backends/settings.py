"""What a run asks of its backend, read once from the training arguments (`--fsdp`, `--fsdp_config`,
`--deepspeed`) and Accelerate's launch variables into one `BackendSettings`, which serves both the check before
any work (`backend_problems`) and the construction (`make_backend`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError
from ..precision import resolve_precision
from .base import Backend
from .deepspeed import DeepSpeedBackend, deepspeed_config
from .fsdp2 import FSDP2Backend, read_fsdp_settings

# what `accelerate launch` sets for an FSDP or DeepSpeed config file; consumed by `BackendSettings.build`
ACCELERATE_BACKEND_VARIABLES = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


@dataclass(frozen=True)
class BackendSettings:
    """The backend a run asks for, and every reason it cannot have it."""

    #: "ddp" (one process or DDP), "fsdp" or "deepspeed"
    kind: str = "ddp"
    #: bf16, fp16 or fp32; None while the run's precision is still "auto" (validation only)
    precision: str | None = None
    gradient_accumulation_steps: int = 1
    #: FSDP2: gather the weights again for the backward (--fsdp full_shard) or keep them (shard_grad_op)
    reshard_after_forward: bool = True
    #: DeepSpeed: its JSON with the batch, accumulation and clipping "auto" values filled in
    deepspeed: dict | None = None
    #: settings no backend can run, each with its fix
    problems: tuple[str, ...] = ()

    def build(self) -> Backend:
        """The backend these settings describe. Consumes Accelerate's FSDP/DeepSpeed launch variables, so that the
        Accelerator built next is plain DDP (these backends drive FSDP2 and DeepSpeed themselves)."""
        if self.problems:
            raise ConfigError(list(self.problems))
        for var in ACCELERATE_BACKEND_VARIABLES:
            os.environ.pop(var, None)
        kinds = {"ddp": Backend, "fsdp": FSDP2Backend, "deepspeed": DeepSpeedBackend}
        return kinds[self.kind](self)


def backend_settings(train_args, precision: str | None = None) -> BackendSettings:
    """Read the backend settings of `train_args` (a TrainingArguments) once; `precision` None means not resolved
    yet ("auto"), which skips the checks that need it."""
    problems: list[str] = []
    fsdp = read_fsdp_settings(train_args)
    try:
        ds = deepspeed_config(train_args)
    except ConfigError as exc:
        problems += exc.problems
        ds = None
    if fsdp is not None:
        problems += fsdp[1]
    elif getattr(train_args, "fsdp_config", None):
        problems.append('--fsdp_config without --fsdp does nothing: add --fsdp "full_shard auto_wrap"')
    if fsdp is not None and ds is not None:
        problems.append("both --deepspeed and --fsdp are set: choose one")
    if ds is not None:
        problems += _deepspeed_precision_problems(ds, precision)
        if getattr(train_args, "torch_compile", False):
            problems.append(
                "--torch_compile with --deepspeed: use DeepSpeed's own compile section in its JSON"
            )
    muon = str(getattr(train_args.optim, "value", train_args.optim)) == "muon"
    if muon and (precision or resolve_precision("auto")[0]) == "fp16":
        # the loss scaler unscales the gradients of the optimizer's parameters, and Muon's are views that
        # receive their gradients only inside its step
        problems.append(
            "--optim muon with fp16 loss scaling is not wired here: use --precision bf16 (or fp32)"
        )
    if muon and (fsdp or ds) is not None:
        # DeepSpeed builds its optimizer over flattened partitions and FSDP2 holds each matrix as row shards:
        # neither hands Muon whole matrices, and orthogonalising a shard is not orthogonalising the matrix
        problems.append(
            f"--optim muon with --{'fsdp' if fsdp is not None else 'deepspeed'}: Muon orthogonalises whole "
            "matrices, which a sharded backend does not hold; use DDP (torchrun without --fsdp/--deepspeed) "
            "or --optim adamw_torch"
        )
    if fsdp is not None and precision == "fp16":
        problems.append(
            "fp16 under FSDP needs a sharded gradient scaler, not wired here: use --precision bf16"
        )
    return BackendSettings(
        kind="deepspeed" if ds is not None else "fsdp" if fsdp is not None else "ddp",
        precision=precision,
        gradient_accumulation_steps=int(train_args.gradient_accumulation_steps),
        reshard_after_forward=fsdp[0] if fsdp is not None else True,
        deepspeed=ds,
        problems=tuple(problems),
    )


def _deepspeed_precision_problems(ds: dict, precision: str | None) -> list[str]:
    problems = []
    fp16 = (ds.get("fp16") or {}).get("enabled", "auto")
    bf16 = (ds.get("bf16") or {}).get("enabled", "auto")
    if fp16 is True and bf16 is True:
        problems.append('DeepSpeed config enables both fp16 and bf16: set one to "auto" or false')
    for key, on in (("fp16", fp16), ("bf16", bf16)):
        if on is True and precision not in (None, key):
            problems.append(
                f'DeepSpeed config enables {key} but the run\'s precision is {precision}: set "{key}": '
                f'{{"enabled": "auto"}} in the JSON, or pass --precision {key}'
            )
        if on is False and precision == key:
            problems.append(
                f'DeepSpeed config disables {key} but the run\'s precision is {key}: set "{key}": '
                f'{{"enabled": "auto"}} in the JSON, or pass another --precision'
            )
    return problems


def backend_problems(train_args, precision: str | None = None) -> list[str]:
    """Settings no backend can run, each with its fix (the run's validation reports them before any work)."""
    return list(backend_settings(train_args, precision).problems)


def make_backend(train_args, precision: str) -> Backend:
    """The backend the settings ask for (see `BackendSettings.build`); ConfigError listing every problem."""
    return backend_settings(train_args, precision).build()
