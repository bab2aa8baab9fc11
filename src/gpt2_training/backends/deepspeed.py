"""DeepSpeed ZeRO 1-3 through its engine (driven directly, with the project's optimizer and schedule), and the
run's DeepSpeed JSON: `deepspeed_config` fills its "auto" values from the training settings and refuses the rest."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .base import Backend, ensure_process_group, hf_names

# DeepSpeed's own name for its files inside the folder checkpoint.py hands it
DEEPSPEED_TAG = "state"
# Sections the project's own loop owns: the shipped ds_zero{1,2,3}.json have none, so the project's AdamW and
# learning-rate schedule run exactly as on one GPU (a section would bring DeepSpeed's own and silently diverge
# from TrainingArguments)
FORBIDDEN_DS_SECTIONS = ("optimizer", "scheduler")


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO 1-3 through its engine, with the project's torch optimizer and schedule.

    The engine wants `engine.step()` after every micro-batch (it counts micro-steps to find the accumulation
    boundary); this backend calls it itself inside `backward` except at the boundary, where the loop decides:
    `step()` applies the update, `skip()` lets ZeRO's own overflow path drop it (a non-finite gradient norm makes
    every ZeRO stage clear the gradients and leave weights and optimizer state untouched)."""

    name = "deepspeed"

    def __init__(self, settings):
        super().__init__(settings)
        cfg = dict(settings.deepspeed)
        # the engine owns precision: weights in bf16/fp16 with fp32 master copies in the optimizer
        for key in ("bf16", "fp16"):
            section = dict(cfg.get(key) or {})
            if section.get("enabled", "auto") == "auto":
                section["enabled"] = self.precision == key
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
        want = int(self.ds_config["train_micro_batch_size_per_gpu"]) * self.A * self.world
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
        ensure_process_group(self.acc.device)
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
        # deepspeed_config below); here the same global norm is read first, so the loop can judge the step
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
        return hf_names(sd)

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
    """DeepSpeed's state as checkpoint.py sees it (`state.OwnFiles`): the engine writes and reads the folder."""

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


# -- the run's DeepSpeed JSON ------------------------------------------------------------------------------------
def _deepspeed_source(train_args) -> Any:
    if getattr(train_args, "deepspeed", None):
        return train_args.deepspeed
    # the DeepSpeed JSON named by an `accelerate launch` config file
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        return None if path == "none" else path
    return None


def deepspeed_config(train_args) -> dict | None:
    """The DeepSpeed config of this run with the batch/accumulation/clipping "auto" values filled in.

    Source: `--deepspeed FILE|dict`, else the file of an `accelerate launch` DeepSpeed config; None when the run
    does not use DeepSpeed. Explicit values that disagree with the training settings are refused (one run, one
    meaning for each number), as is an optimizer or scheduler section.
    """
    src = _deepspeed_source(train_args)
    if not src:
        return None
    if isinstance(src, Mapping):
        cfg = copy.deepcopy(dict(src))
    else:
        path = Path(src)
        if not path.exists():
            raise ConfigError(f"DeepSpeed config {path} does not exist")
        cfg = json.loads(path.read_text())
    problems = [
        f"DeepSpeed config has a {s!r} section: remove it - this project builds AdamW and the learning-rate "
        f"schedule from the training settings (--optim, --learning_rate, --lr_scheduler_type ...)"
        for s in FORBIDDEN_DS_SECTIONS
        if s in cfg
    ]
    clip = (
        float(train_args.max_grad_norm) if train_args.max_grad_norm and train_args.max_grad_norm > 0 else 0.0
    )
    wanted = {
        "train_micro_batch_size_per_gpu": int(train_args.per_device_train_batch_size),
        "gradient_accumulation_steps": int(train_args.gradient_accumulation_steps),
        "gradient_clipping": clip,
    }
    for key, value in wanted.items():
        current = cfg.get(key, "auto")
        if current == "auto":
            cfg[key] = value
        elif float(current) != float(value):
            problems.append(
                f"DeepSpeed config sets {key}={current} but the training settings say {value}: "
                f'use "auto" in the JSON'
            )
    # train_batch_size "auto" needs the process count: DeepSpeedBackend.bind fills it
    if problems:
        raise ConfigError(problems)
    return cfg
