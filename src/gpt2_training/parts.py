"""The parts of one run, built from a Config before the first step: the locked output folder, the backend and its
Accelerator, tokenizer, model, optimizer, schedule, data stream, held-out set, evaluator, checkpointer and log.
trainer.py's `Engine` runs the loop over them."""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from . import checkpoint as ckpt
from . import export, outdir, rundir
from .backends import make_backend
from .config import Config
from .data import RunData
from .errors import ConfigError, DataUnavailable
from .evaluation import Evaluator
from .hub import check_push_to_hub
from .model import CausalLMWithLoss, build_for_training
from .optim import build_optimizer, build_scheduler
from .options import changed_fields, report_to_list, validate
from .precision import bf16_supported, resolve_precision
from .reporting import Reporter, startup_line
from .run_length import resolve_max_steps
from .signals import SignalFlag


class RunParts:
    """Checks the settings and claims nothing at construction; `setup()` locks the output folder and builds every
    part (loading the checkpoint when the run resumes); `close()` stops the data workers and releases the folder."""

    def __init__(self, cfg: Config):
        self.started = time.perf_counter()  # the model card's wall time counts from here
        cuda = torch.cuda.is_available()
        validate(cfg, cuda_available=cuda, bf16_ok=bf16_supported())
        d = cfg.data
        named = {"dataset": d.dataset, "shards folder": d.shards_dir, "tokenizer": d.tokenizer}
        outdir.refuse_unsafe(
            cfg.train.output_dir, "--output_dir", named | {"initial weights": cfg.model.init_from}
        )
        # the engine's own copy of the training arguments: max_steps is set from the epochs in `setup`
        self.cfg = cfg = dataclasses.replace(cfg, train=copy.copy(cfg.train))
        t = cfg.train
        self.precision, self.precision_reason = resolve_precision(cfg.run.precision)
        # which options the user set (not defaults): num_train_epochs next to max_steps gets a note
        self.epochs_set = "num_train_epochs" in changed_fields(t)
        # before any work: a push that cannot happen fails now, not after the training
        self.hub_repo = check_push_to_hub(t.output_dir, t.hub_model_id) if t.push_to_hub else None
        if t.tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(t.tf32)
        # DDP, FSDP2 or DeepSpeed (--fsdp, --deepspeed or an `accelerate launch` config): see backends.
        # Accelerate only starts the processes' group (gloo on a CPU) and runs single-process and DDP training.
        self.backend = make_backend(t, self.precision)
        self.acc = Accelerator(
            mixed_precision=self.backend.accelerate_precision,
            cpu=not cuda,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        self.backend.bind(self.acc)
        self.is_main = self.acc.is_main_process
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.lock: outdir.RunLock | None = None
        # With ZeRO-3 or FSDP each process holds a shard of the weights: generating text on one process would wait
        # for the others forever, and the final save must gather the full state dict on every process first.
        self.sharded = self.backend.shards_weights
        self.out = Path(t.output_dir)
        self.signals = SignalFlag()  # installed around the loop and the final evaluation

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.lock, self.resume_path = rundir.prepare_output_dir(
            self.out, cfg.run, is_main=self.is_main, world=self.world
        )
        random.seed(t.seed)
        np.random.seed(t.seed % (1 << 32))
        torch.manual_seed(t.seed)
        data_seed = t.data_seed if t.data_seed is not None else t.seed
        # the one data object of the run: the source is opened once, when something first needs it
        self.data = RunData(cfg.data, data_seed, tokenizer_seed=t.seed)
        # one process builds the corpus/tokenizer caches, the others reuse them
        with self.acc.main_process_first():
            self.tokenizer = self.data.tokenizer
        # num_train_epochs becomes a step count here, before the schedule is built from it
        t.max_steps, self.steps_note = resolve_max_steps(cfg, self.data, self.world, self.epochs_set)
        self.lm = build_for_training(cfg.model, self.tokenizer, cfg.data.block_size, t).to(self.acc.device)
        self.n_params = sum(p.numel() for p in self.lm.parameters())
        # the backend replicates or shards the model, then builds the optimizer on what this process holds
        wrapped = CausalLMWithLoss(self.lm, cfg.model.loss_impl)
        self.model = self.backend.wrap(wrapped, lambda m: build_optimizer(m, t))
        self.optimizer = self.backend.optimizer
        if t.torch_compile:
            try:
                backend = t.torch_compile_backend or "inductor"
                self.model = torch.compile(self.model, mode=t.torch_compile_mode, backend=backend)
            except RuntimeError as exc:  # an unknown mode or backend, named by torch
                raise ConfigError(f"--torch_compile_mode / --torch_compile_backend: {exc}") from exc
        self.scheduler = build_scheduler(self.backend.schedule_optimizer, t)
        self.train_data = self.data.train_stream(self.rank, self.world, num_workers=t.dataloader_num_workers)
        self.val_seqs = self.data.validation_sequences()
        if self.is_main and cfg.run.write_heldout:
            texts = self.tokenizer.batch_decode(self.val_seqs, clean_up_tokenization_spaces=False)
            export.write_heldout(cfg.run.write_heldout, texts)
        self.evaluator = Evaluator(
            self.lm,
            self.tokenizer,
            self.val_seqs,
            acc=self.acc,
            autocast=self.backend.autocast,
            batch_size=t.per_device_eval_batch_size,
            show_progress=self.is_main and not t.disable_tqdm,
            stop_requested=lambda: self.signals.signum is not None,
        )
        fingerprint = ckpt.run_fingerprint(cfg, self.tokenizer, self.world)
        # saved data positions depend on the source's shards and on how text is held out
        fingerprint["data_stream"] = self.train_data.fingerprint()
        self.state = ckpt.TrainState(
            fingerprint, self.backend.name, cfg.to_dict(), allow_changes=cfg.run.allow_resume_changes
        )
        self.rng = ckpt.RNGState(self.rank)
        self.data_position = ckpt.DataPosition(self.train_data, self.rank)
        parts = {
            "train_state": self.state,
            "model": self.backend,  # weights and optimizer, replicated or sharded as the backend holds them
            "scheduler": self.scheduler,
            "scaler": self.acc.scaler,  # fp16's loss scale (None otherwise)
            "data": self.data_position,
            "rng": self.rng,
        }
        self.checkpoints = ckpt.Checkpointer(self.out, parts, self.lm, t.save_total_limit, self.acc)
        if self.resume_path is not None:
            self.checkpoints.load(self.resume_path)
        self.reporter = Reporter(
            self.out,
            report_to_list(t.report_to),
            cfg.to_dict(),
            enabled=self.is_main,
            run_name=t.run_name,
            project=t.project,
            logging_dir=cfg.run.logging_dir,
            resume_step=self.state.step,  # what the interrupted run logged after its checkpoint is set aside
            keep_records=self.state.log_records if self.resume_path is not None else 0,
        )
        self.data_error: DataUnavailable | None = None
        self.bad_in_a_row = 0

    def _print_start(self) -> None:
        if not self.is_main:
            return
        line = startup_line(
            self.cfg,
            self.lm.config,
            self.n_params,
            self.precision,
            self.precision_reason,
            self.world,
            self.backend.describe(),
        )
        if self.resume_path:
            line += f"; resuming from {self.resume_path} at step {self.state.step}"
        for text in (line, self.cfg.train.run_name and f"run: {self.cfg.train.run_name}", self.steps_note):
            if text:
                print(text, flush=True)

    def evaluate(self) -> dict[str, float] | None:
        """The held-out figures of the model in training (None if a signal interrupted them)."""
        return self.evaluator.evaluate(self.model)

    @property
    def samples_wanted(self) -> bool:
        """Prompts and tokens to generate, and a model that one process can run (not under ZeRO-3 or FSDP)."""
        r = self.cfg.run
        return bool(r.sample_prompts) and r.sample_max_new_tokens > 0 and not self.sharded

    def sample(self, seed: int = 0) -> list[str]:
        return self.evaluator.sample(self.cfg.run.sample_prompts, self.cfg.run.sample_max_new_tokens, seed)

    def _parts(self) -> dict:
        """Every stateful part of the run, under the name checkpoint.py files it by."""
        return self.checkpoints.parts

    def save(self, only_if_changed: bool = False) -> Path | None:
        """A checkpoint of every stateful part; a collective (every process writes its own part into it).
        `only_if_changed`: not when the newest checkpoint holds this very state (a signal right after a save)."""
        self.state.log_records = self.reporter.records if self.is_main else None
        return self.checkpoints.save_if_changed() if only_if_changed else self.checkpoints.save()

    def _read_step(self, n: int) -> tuple[list[np.ndarray], DataUnavailable | None]:
        """The step's `n` sequences, read before any is trained on: when the source fails part-way, the drawn
        ones go back to the data position, so a checkpoint written now resumes at this very step."""
        drawn: list[np.ndarray] = []
        try:
            while len(drawn) < n:
                drawn.append(self.data_position.next())
        except DataUnavailable as exc:
            self.data_position.give_back(drawn)
            return [], exc
        return drawn, None

    def _to_device(self, seqs: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(seqs).astype(np.int64))
        if self.acc.device.type == "cuda" and self.cfg.train.dataloader_pin_memory:
            batch = batch.pin_memory()  # page-locked host memory makes the copy below asynchronous
        return batch.to(self.acc.device, non_blocking=True)

    def close(self) -> None:
        """Stop the data workers, then let go of the output folder (also after an error)."""
        close_data = getattr(getattr(self, "train_data", None), "close", None)
        if close_data is not None:
            close_data()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
