"""One small interface over the ways a model can be spread across processes: one process or DDP (through
Accelerate), FSDP2 (`torch.distributed.fsdp.fully_shard`, driven directly) and DeepSpeed ZeRO 1-3 (its engine,
driven directly).

The training loop calls only these methods, so it has no branch on the backend:

    model = backend.wrap(model, make_optimizer)       # shard/replicate, then build the optimizer on the result
    with backend.accumulate(last=micro == A - 1):      # gradients are synchronised on the last micro-batch only
        with backend.autocast():
            loss = model(x)
        backend.backward(loss)                         # the loss of one micro-batch; 1/A is applied here
    norm = backend.clip(max_norm)                      # the global gradient norm, before clipping
    applied = backend.step() if finite else backend.skip()

`state_dict()` / `load_state_dict(state)` give and take the weights and optimizer state in each backend's own
form: replicated (single process, DDP: the weights and the optimizer's state dict), `Sharded` (FSDP2: the
`get_state_dict` result, which torch.distributed.checkpoint saves on N processes and loads on M) or `OwnFiles`
(DeepSpeed, whose engine persists only through its own files); `full_state_dict()` gathers the whole model for
a Hugging Face save. Which files they go to is `checkpoint.py`'s business alone. Every form loads on another
number of processes than wrote it (DeepSpeed's through its universal checkpoint, see `DeepSpeedFiles.load`).

Why FSDP2 and DeepSpeed are not driven through Accelerate: Accelerate switches to either only when a GPU is
present (its `AcceleratorState` keeps a multi-CPU run as plain DDP), and its DeepSpeed wrapper steps the engine
inside `backward`, which leaves the NaN guard no step to skip. Accelerate still starts the process group (gloo on
a CPU, NCCL on GPUs), which both libraries then reuse.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError

# DeepSpeed's own name for its files inside the folder checkpoint.py hands it
DEEPSPEED_TAG = "state"

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


def _ensure_process_group(device: torch.device) -> None:
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


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of the wrapped `CausalLMWithLoss` -> keys of the Hugging Face model inside it."""
    return {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}


class Backend:
    """Single process or DDP through Accelerate; the base of the sharded backends."""

    name = "ddp"
    #: weights are partitioned across processes: generating text on one process alone is impossible
    shards_weights = False

    def __init__(self, train_args, precision: str):
        self.t, self.precision = train_args, precision
        self.A = int(train_args.gradient_accumulation_steps)

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
        return _strip(self.module.state_dict())

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


class FSDP2Backend(Backend):
    """FSDP2: one `fully_shard` unit per GPT2Block, then the root (embeddings, final norm and the tied head)."""

    name = "fsdp"
    shards_weights = True

    def __init__(self, train_args, precision: str, reshard_after_forward: bool):
        super().__init__(train_args, precision)
        self.reshard_after_forward = reshard_after_forward

    def describe(self) -> str:
        # the words of --fsdp: full_shard gathers the weights again for the backward, shard_grad_op keeps them
        sharding = "full_shard" if self.reshard_after_forward else "shard_grad_op"
        return f"FSDP2 ({sharding}: weights, gradients and optimizer state sharded over {self._processes()})"

    def wrap(self, model, make_optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.module = model
        _ensure_process_group(self.acc.device)
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
        return _strip(sd)

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from .checkpoint import Sharded

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return Sharded(model=model_sd, optim=optim_sd)

    def load_state_dict(self, state):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO 1-3 through its engine, with the project's torch optimizer and schedule.

    The engine wants `engine.step()` after every micro-batch (it counts micro-steps to find the accumulation
    boundary); this backend calls it itself inside `backward` except at the boundary, where the loop decides:
    `step()` applies the update, `skip()` lets ZeRO's own overflow path drop it (a non-finite gradient norm makes
    every ZeRO stage clear the gradients and leave weights and optimizer state untouched)."""

    name = "deepspeed"

    def __init__(self, train_args, precision: str, ds_config: dict):
        super().__init__(train_args, precision)
        cfg = dict(ds_config)
        # the engine owns precision: weights in bf16/fp16 with fp32 master copies in the optimizer
        for key in ("bf16", "fp16"):
            section = dict(cfg.get(key) or {})
            if section.get("enabled", "auto") == "auto":
                section["enabled"] = precision == key
            cfg[key] = section
        self.ds_config = cfg
        self.stage = int((cfg.get("zero_optimization") or {}).get("stage", 0))
        self.shards_weights = self.stage == 3
        # ZeRO stages partition the optimizer (and at 3 the weights) differently: a checkpoint names its stage
        self.name = f"deepspeed ZeRO-{self.stage}"

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.stage} over {self._processes()}"

    @property
    def accelerate_precision(self) -> str:
        return "no"

    def bind(self, acc) -> None:
        super().bind(acc)
        # the global batch needs the process count, known only now
        want = int(self.t.per_device_train_batch_size) * self.A * self.world
        have = self.ds_config.get("train_batch_size", "auto")
        if have != "auto" and int(have) != want:
            raise ConfigError(
                f"DeepSpeed config sets train_batch_size={have} but per_device_train_batch_size x "
                f'gradient_accumulation_steps x {self.world} processes = {want}: use "auto" in the JSON'
            )
        self.ds_config["train_batch_size"] = want

    @property
    def loss_scaling(self) -> bool:
        return bool(self.ds_config["fp16"]["enabled"])

    def autocast(self):
        return contextlib.nullcontext()

    def accumulate(self, last):
        return contextlib.nullcontext()

    def wrap(self, model, make_optimizer):
        ds = import_deepspeed()
        self.module = model
        _ensure_process_group(self.acc.device)
        if self.stage == 3:
            # the chunked loss reads lm_head.weight (tied to wte) in the wrapper's own forward: ZeRO-3 must
            # gather it for that forward, not only for the embedding's
            ds.zero.register_external_parameter(model, model.lm.lm_head.weight)
        self.torch_optimizer = make_optimizer(model)
        self.model, self.optimizer, _, _ = ds.initialize(
            model=model, optimizer=self.torch_optimizer, config=self.ds_config, dist_init_required=False
        )
        return self.model

    def backward(self, loss):
        # the engine scales by 1/A itself
        self.model.backward(loss)
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()

    def clip(self, max_norm):
        # the engine clips inside step() with the JSON's gradient_clipping (= --max_grad_norm, see
        # launch.deepspeed_config); here the same global norm is read first, so the loop can judge the step
        opt = self.model.optimizer
        if self.stage == 3:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            norm = float(combine_grad_norm_groups(opt._get_norm_groups()))
        else:
            norm = float(opt.scaled_global_norm())
        # ZeRO reports a non-finite norm as -1
        norm = math.nan if norm < 0 else norm
        return norm / float(getattr(opt, "loss_scale", 1.0) or 1.0)

    def step(self):
        self.model.step()
        return self.model.was_step_applied()

    def skip(self):
        self.model.step()
        if self.model.was_step_applied():
            raise RuntimeError(
                "DeepSpeed applied a step whose loss was non-finite while its gradients were finite: the guard "
                "cannot skip it. Lower --learning_rate or check the data"
            )

    def full_state_dict(self):
        ds = import_deepspeed()
        params = list(self.module.parameters())
        # gathers ZeRO-3's partitions for the copy; a no-op for stages 1 and 2, whose weights are replicated
        with ds.zero.GatheredParameters(params, modifier_rank=None):
            sd = {k: v.detach().clone().cpu() for k, v in self.module.state_dict().items()}
        return _strip(sd)

    def state_dict(self):
        # DeepSpeed's engine persists only through its own save_checkpoint(dir) / load_checkpoint(dir): its files
        # (one ZeRO partition per process, named and pickled its own way) are read back by the engine alone, so
        # its state cannot be a dict that another writer saves. Its state is a handle instead, to which
        # checkpoint.py hands the folder it names.
        return DeepSpeedFiles(self)

    def load_state_dict(self, state):
        """Nothing left to do: `state.load(folder)` has restored the engine from its files."""
        if not isinstance(state, DeepSpeedFiles) or state.backend is not self:
            raise TypeError("a DeepSpeed backend loads only the DeepSpeedFiles its state_dict() returned")


class DeepSpeedFiles:
    """DeepSpeed's state as checkpoint.py sees it (`checkpoint.OwnFiles`): the engine writes and reads the folder."""

    def __init__(self, backend: DeepSpeedBackend):
        self.backend = backend

    @property
    def engine(self):
        return self.backend.model

    def save(self, folder: Path) -> None:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        # the marker DeepSpeed's universal conversion needs to accept a ZeRO-1/2 checkpoint (see `load`)
        info = {
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        }
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, client_state=info, save_latest=False)

    def load(self, folder: Path) -> None:
        b = self.backend
        state = folder / DEEPSPEED_TAG
        if not state.is_dir():
            raise CheckpointError(f"{folder} holds no DeepSpeed checkpoint ({DEEPSPEED_TAG}/ is missing)")
        _check_deepspeed_files(state)
        saved_world = len(list(state.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
        if saved_world == b.world:
            self._load_engine(folder)
            return
        # ZeRO's optimizer partitions belong to the process count that wrote them; DeepSpeed's universal format
        # (one file per parameter and state) loads on any count, so the checkpoint is converted first, into a
        # folder next to it that is removed after loading (the checkpoint itself is never modified)
        import shutil
        import subprocess
        import sys

        checkpoint = folder.parent
        universal = checkpoint.with_name(f".universal-{checkpoint.name}")
        if b.is_main:
            shutil.rmtree(universal, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(state)]
            cmd += ["--output_folder", str(universal / DEEPSPEED_TAG), "--num_extract_workers", "1"]
            cmd += ["--num_merge_workers", "1"]
            done = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": _ds_accelerator()}
            )
            if done.returncode != 0:
                raise CheckpointError(
                    f"could not convert {state} to DeepSpeed's universal format for {b.world} processes "
                    f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}); "
                    f"resume with the {saved_world} processes that wrote it"
                )
        b.acc.wait_for_everyone()
        self.engine._config.load_universal_checkpoint = True
        try:
            self._load_engine(universal, universal=True)
        finally:
            self.engine._config.load_universal_checkpoint = False
            b.acc.wait_for_everyone()
            if b.is_main:
                shutil.rmtree(universal, ignore_errors=True)

    def _load_engine(self, load_dir: Path, universal: bool = False) -> None:
        torch_optimizer = self.backend.torch_optimizer
        settings = [{k: v for k, v in g.items() if k != "params"} for g in torch_optimizer.param_groups]
        path, _ = self.engine.load_checkpoint(
            str(load_dir), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {load_dir}")
        if universal and self.backend.stage == 3:
            _repair_zero3_universal_load(self.engine.optimizer, settings)


def _repair_zero3_universal_load(zero, settings: list[dict]) -> None:
    """Put right two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (`load_hp_checkpoint_state_from_checkpoint_
    dir_stage3`), found resuming 2 -> 1 here (the losses left the uninterrupted run's from the second resumed
    step on): it gives every parameter group the first group's hyperparameters, so biases and norms got weight
    decay, and it gives all sub-groups one `step` tensor, which Adam then advances once per sub-group (a wrong
    bias correction). The settings that differ between our groups are taken back from before the load (`settings`:
    each group's, without its parameters), and each sub-group gets its own step."""
    groups = zero.optimizer.param_groups
    differ = {k for k in settings[0] if len({repr(s.get(k)) for s in settings}) > 1}
    for group, before in zip(groups, settings, strict=True):
        group.update({k: before[k] for k in differ})
    for flat in zero.fp32_partitioned_groups_flat:
        state = zero.optimizer.state[flat]
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _ds_accelerator() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_deepspeed_files(folder: Path) -> None:
    """DeepSpeed unpickles its files with `weights_only=False`; refuse any that holds an object other than
    tensors, plain data and DeepSpeed's own small state classes, before DeepSpeed reads it."""
    import deepspeed.runtime.fp16.loss_scaler as ls
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ls.LossScaler, ls.DynamicLossScaler, ZeroStageEnum, fragment_address]
    for f in sorted(folder.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"refusing to load {f}: it contains objects other than tensors and plain data "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); use a checkpoint written by this tool"
            ) from exc


def import_deepspeed():
    """DeepSpeed, set up for this machine: its CPU accelerator when there is no GPU, and no C++ op built at
    start-up (the shared-memory all-reduce kernel would be JIT-compiled, about a minute; gloo is used instead)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            "--deepspeed needs DeepSpeed: `make install-deepspeed` (or `DS_BUILD_OPS=0 pip install -r "
            "requirements/deepspeed.txt`)"
        ) from exc
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


# -- choosing a backend from the settings --------------------------------------------------------------------------
def _fsdp_settings(train_args) -> dict | None:
    """{"reshard_after_forward": bool, "problems": [...]}, or None without FSDP.

    Sources: TrainingArguments' --fsdp / --fsdp_config (which it normalises: --fsdp "full_shard auto_wrap" becomes
    fsdp=True with reshard_after_forward=True), else an `accelerate launch` FSDP config file, which Accelerate
    passes through FSDP_* environment variables."""
    if getattr(train_args, "fsdp", None):
        conf = dict(getattr(train_args, "fsdp_config", None) or {})
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        env = os.environ
        conf = {
            "version": env.get("FSDP_VERSION", "2"),
            "reshard_after_forward": env.get("FSDP_RESHARD_AFTER_FORWARD", "true"),
            "cpu_offload": env.get("FSDP_OFFLOAD_PARAMS", "false"),
            "activation_checkpointing": env.get("FSDP_ACTIVATION_CHECKPOINTING", "false"),
            "auto_wrap_policy": env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP"),
        }
        if env.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
            conf["transformer_layer_cls_to_wrap"] = env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")
    else:
        return None

    def on(value) -> bool:
        # FSDP1-style strategy names arrive here from older Accelerate configs
        return str(value).lower() in ("true", "1", "yes", "full_shard")

    problems = [
        f"fsdp_config {key}: {why}"
        for key, why in FSDP_REFUSED.items()
        if key in conf and (on(conf[key]) or (key == "min_num_params" and int(conf[key] or 0) > 0))
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
    return {"reshard_after_forward": on(conf.get("reshard_after_forward", True)), "problems": problems}


def backend_problems(train_args, precision: str | None = None) -> list[str]:
    """Settings no backend can run, each with its fix (options.validate reports them before any work)."""
    from .launch import deepspeed_config
    from .precision import resolve_precision

    problems: list[str] = []
    fsdp = _fsdp_settings(train_args)
    try:
        ds = deepspeed_config(train_args)
    except ConfigError as exc:
        problems += exc.problems if hasattr(exc, "problems") else [str(exc)]
        ds = None
    if fsdp is not None:
        problems += fsdp["problems"]
    elif getattr(train_args, "fsdp_config", None):
        problems.append('--fsdp_config without --fsdp does nothing: add --fsdp "full_shard auto_wrap"')
    if fsdp is not None and ds is not None:
        problems.append("both --deepspeed and --fsdp are set: choose one")
    if ds is not None:
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
    return problems


def make_backend(train_args, precision: str) -> Backend:
    """The backend the settings ask for. Consumes Accelerate's FSDP/DeepSpeed launch variables, so that the
    Accelerator built next is plain DDP (these backends drive FSDP2 and DeepSpeed themselves)."""
    from .launch import deepspeed_config

    problems = backend_problems(train_args, precision)
    if problems:
        raise ConfigError(problems)
    fsdp = _fsdp_settings(train_args)
    ds = deepspeed_config(train_args)
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        os.environ.pop(var, None)
    if ds is not None:
        return DeepSpeedBackend(train_args, precision, ds)
    if fsdp is not None:
        return FSDP2Backend(train_args, precision, fsdp["reshard_after_forward"])
    return Backend(train_args, precision)
