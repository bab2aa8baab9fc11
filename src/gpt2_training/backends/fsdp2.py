"""FSDP2 (`torch.distributed.fsdp.fully_shard`, driven directly): one shard unit per GPT2Block, then the root; and
the reading of its settings from `--fsdp` / `--fsdp_config` or an `accelerate launch` FSDP config file."""

from __future__ import annotations

import contextlib
import os

import torch

from ..state import Sharded
from .base import Backend, ensure_process_group, hf_names

# fsdp_config keys (as TrainingArguments normalises them, "fsdp_" prefix removed) that this backend does not run
FSDP_REFUSED = {
    "cpu_offload": "CPU offload is not wired here: use DeepSpeed with offload_optimizer in its JSON",
    "activation_checkpointing": "use --gradient_checkpointing (the same non-reentrant checkpointing)",
    "xla": "XLA FSDP needs a TPU",
    "xla_fsdp_v2": "XLA FSDP needs a TPU",
    "xla_fsdp_grad_ckpt": "XLA FSDP needs a TPU",
    "cpu_ram_efficient_loading": "every process builds the (small) model itself here; leave it false",
    "min_num_params": "size-based wrapping is not wired here: one unit per GPT2Block is",
}
FSDP_WRAP_CLASSES = ("GPT2Block",)


def _fsdp_config(train_args) -> dict | None:
    """The run's fsdp_config, or None without FSDP. Sources: TrainingArguments' --fsdp / --fsdp_config (which it
    normalises: --fsdp "full_shard auto_wrap" becomes fsdp=True with reshard_after_forward=True), else an
    `accelerate launch` FSDP config file, which Accelerate passes through FSDP_* environment variables."""
    if getattr(train_args, "fsdp", None):
        return dict(getattr(train_args, "fsdp_config", None) or {})
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    conf = {
        "version": env.get("FSDP_VERSION", "2"),
        "reshard_after_forward": env.get("FSDP_RESHARD_AFTER_FORWARD", "true"),
        "cpu_offload": env.get("FSDP_OFFLOAD_PARAMS", "false"),
        "activation_checkpointing": env.get("FSDP_ACTIVATION_CHECKPOINTING", "false"),
        "auto_wrap_policy": env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP"),
    }
    if env.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        conf["transformer_layer_cls_to_wrap"] = env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")
    return conf


def _on(value) -> bool:
    # FSDP1-style strategy names arrive here from older Accelerate configs
    return str(value).lower() in ("true", "1", "yes", "full_shard")


def read_fsdp_settings(train_args) -> tuple[bool, list[str]] | None:
    """(reshard_after_forward, problems) of the run's FSDP settings, or None when the run does not ask for FSDP."""
    conf = _fsdp_config(train_args)
    if conf is None:
        return None
    problems = [
        f"fsdp_config {key}: {why}"
        for key, why in FSDP_REFUSED.items()
        if key in conf and (_on(conf[key]) or (key == "min_num_params" and int(conf[key] or 0) > 0))
    ]
    if str(conf.get("version", 2)) != "2":
        problems.append("fsdp_config version: this project runs FSDP2 only; set version 2 (the default)")
    if str(conf.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")) != "TRANSFORMER_BASED_WRAP":
        problems.append(
            "fsdp_config auto_wrap_policy: only TRANSFORMER_BASED_WRAP (one unit per GPT2Block) runs here"
        )
    wrap = conf.get("transformer_layer_cls_to_wrap") or list(FSDP_WRAP_CLASSES)
    for name in [wrap] if isinstance(wrap, str) else wrap:
        if name not in FSDP_WRAP_CLASSES:
            problems.append(
                f"FSDP wrap class {name!r} is not a block of this GPT-2: use transformer_layer_cls_to_wrap "
                f"{FSDP_WRAP_CLASSES[0]}"
            )
    return _on(conf.get("reshard_after_forward", True)), problems


class FSDP2Backend(Backend):
    """FSDP2: one `fully_shard` unit per GPT2Block, then the root (embeddings, final norm and the tied head)."""

    name = "fsdp"
    shards_weights = True

    def __init__(self, settings):
        super().__init__(settings)
        self.reshard_after_forward = settings.reshard_after_forward

    def describe(self) -> str:
        # the words of --fsdp: full_shard gathers the weights again for the backward, shard_grad_op keeps them
        sharding = "full_shard" if self.reshard_after_forward else "shard_grad_op"
        return f"FSDP2 ({sharding}: weights, gradients and optimizer state sharded over {self._processes()})"

    def wrap(self, model, make_optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.module = model
        ensure_process_group(self.acc.device)
        mesh = init_device_mesh(self.acc.device.type, (self.world,))
        for block in model.lm.transformer.h:
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        self.model = model
        # built after sharding, so it holds (and steps) only this process's shard of every parameter
        self.optimizer = self.torch_optimizer = make_optimizer(model)
        return model

    @property
    def loss_scaling(self) -> bool:
        return False

    def accumulate(self, last: bool):
        # FSDP2 reduce-scatters gradients in backward unless told not to: only the last micro-batch does
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss):
        (loss / self.A).backward()

    def clip(self, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # a DTensor: the norm over every process's shard
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def skip(self):
        self.optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return hf_names(sd)

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return Sharded(model=model_sd, optim=optim_sd)

    def load_state_dict(self, state):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
