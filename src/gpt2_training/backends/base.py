"""The backend interface the training loop calls, and its default implementation: one process, or DDP through
Accelerate. FSDP2 and DeepSpeed (fsdp2.py, deepspeed.py) override the methods whose work differs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CheckpointError


def ensure_process_group(device: torch.device) -> None:
    """FSDP and DeepSpeed need a process group even for one process (`python train.py --fsdp ...`, a notebook),
    which Accelerate creates only under a launcher: a one-process group on a free local port then."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import socket

    # DeepSpeed reads these even when the group exists
    for var, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(var, value)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of the wrapped `CausalLMWithLoss` -> keys of the Hugging Face model inside it."""
    return {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}


class Backend:
    """Single process or DDP through Accelerate; the base of the sharded backends.

    The training loop calls only these methods, so it has no branch on the backend:

        model = backend.wrap(model, make_optimizer)       # shard/replicate, then build the optimizer on it
        with backend.accumulate(last=micro == A - 1):      # gradients are synchronised on the last micro-batch
            with backend.autocast():
                loss = model(x)
            backend.backward(loss)                         # the loss of one micro-batch; 1/A is applied here
        norm = backend.clip(max_norm)                      # the global gradient norm, before clipping
        applied = backend.step() if finite else backend.skip()

    `state_dict()` / `load_state_dict(state)` give and take the weights and optimizer state in each backend's own
    form: replicated (single process, DDP: the weights and the optimizer's state dict), `state.Sharded` (FSDP2:
    the `get_state_dict` result, which torch.distributed.checkpoint saves on N processes and loads on M) or
    `state.OwnFiles` (DeepSpeed, whose engine persists only through its own files); `full_state_dict()` gathers
    the whole model for a Hugging Face save. Which files they go to is checkpoint.py's business alone. Every form
    loads on another number of processes than wrote it (DeepSpeed's through its universal checkpoint).

    Why FSDP2 and DeepSpeed are not driven through Accelerate: Accelerate switches to either only when a GPU is
    present (its `AcceleratorState` keeps a multi-CPU run as plain DDP), and its DeepSpeed wrapper steps the
    engine inside `backward`, which leaves the NaN guard no step to skip. Accelerate still starts the process
    group (gloo on a CPU, NCCL on GPUs), which both libraries then reuse.
    """

    name = "ddp"
    #: weights are partitioned across processes: generating text on one process alone is impossible
    shards_weights = False

    def __init__(self, settings: Any):
        """`settings`: the run's `BackendSettings` (settings.py, which builds the backends and so imports this
        module: hence no type import here)."""
        if settings.precision is None:
            raise ValueError("a backend is built for a resolved precision (bf16, fp16 or fp32), not 'auto'")
        self.settings, self.precision = settings, settings.precision
        self.A = settings.gradient_accumulation_steps

    # Accelerate's mixed-precision setting for this backend: the engine's autocast and fp16 scaler
    @property
    def accelerate_precision(self) -> str:
        return {"fp32": "no"}.get(self.precision, self.precision)

    def bind(self, acc) -> None:
        self.acc = acc
        self.world, self.rank = acc.num_processes, acc.process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _processes(self) -> str:
        return f"{self.world} process" + ("es" if self.world > 1 else "")

    def describe(self) -> str:
        """What runs, for the start-up line, the log and the model card, e.g. 'DDP over 4 processes'."""
        return "single process (no data parallelism)" if self.world == 1 else f"DDP over {self._processes()}"

    def wrap(
        self, model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], Any]
    ) -> torch.nn.Module:
        self.module = model
        self.model, self.optimizer = self.acc.prepare(model, make_optimizer(model))
        # Accelerate's optimizer wrapper is needed for fp16 loss scaling; otherwise it only adds per-step Python
        # overhead (measured in bench/bench_training.py), so the torch optimizer is stepped directly.
        self.torch_optimizer = self.optimizer.optimizer if self.acc.scaler is None else self.optimizer
        self.params = list(self.model.parameters())
        return self.model

    @property
    def schedule_optimizer(self):
        """The optimizer whose param_groups the learning-rate schedule sets."""
        return self.torch_optimizer

    @property
    def loss_scaling(self) -> bool:
        """fp16 with a dynamic loss scale: an inf gradient with a finite loss is the scaler's business."""
        return self.acc.scaler is not None

    @property
    def loss_scale(self) -> float | None:
        """fp16's current loss scale, for the log (None without a loss scaler)."""
        return self.acc.scaler.get_scale() if self.acc.scaler is not None else None

    def autocast(self):
        return self.acc.autocast()

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last else self.acc.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss / self.A)

    def clip(self, max_norm: float) -> float:
        # the fp16 scaler's unscale, then torch's clip over the list made in `wrap`: Accelerate's
        # clip_grad_norm_ walks the module tree and every gradient each step looking for DTensors, which DDP
        # never has (measured: about 5% of a small model's step in bench/bench_training.py)
        self.acc.unscale_gradients()
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    def step(self) -> bool:
        """Apply the update; False when the fp16 scaler found an overflow and skipped it itself."""
        self.torch_optimizer.step()
        self.torch_optimizer.zero_grad(set_to_none=True)
        return not self.acc.optimizer_step_was_skipped

    def skip(self) -> None:
        """Drop this step's gradients: weights and optimizer state stay as they were."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.acc.scaler is not None:
            # keep the scaler's bookkeeping consistent after the unscale_ inside clip
            self.acc.scaler.update(self.acc.scaler.get_scale() / 2)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model under Hugging Face names; a collective (every process calls it)."""
        # the module itself, not Accelerate's get_state_dict: unwrapping imports DeepSpeed whenever it is installed
        return hf_names(self.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """Replicated (the same on every process): the weights under Hugging Face names and the optimizer state."""
        return {"model": self.full_state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lm = self.module.lm
        missing, unexpected = lm.load_state_dict(state["model"], strict=False)
        # lm_head is tied to wte, so a Hugging Face save leaves it out
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise CheckpointError(
                f"the checkpoint's weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        lm.tie_weights()
        self.optimizer.load_state_dict(state["optimizer"])
