"""The training engine: a lean loop on Hugging Face Accelerate, configured with `TrainingArguments`.

Why not `transformers.Trainer`? The goals are speed, exact resume and atomic checkpoints, and the Trainer
misses the last two by design: it writes checkpoints in place (a half-written one can be picked for resume),
resumes a stream by replaying every consumed batch, loses a `datasets` shuffle buffer on resume and masks NaN
losses in its logs. Speed is measured, not assumed: `bench/bench_training.py` times this loop against a raw
PyTorch loop with the same model (its overhead ratio is in `bench/results/`). This loop keeps the Trainer's
vocabulary (every setting is a `TrainingArguments` field) and its launchers (torchrun, `accelerate launch`,
`deepspeed`), runs DDP, FSDP2 and DeepSpeed ZeRO behind one interface (`backends`), and adds atomic checkpoints
with the exact data position (bit-exact resume), a NaN/inf guard that skips a bad step before it can damage the
weights, and a checkpoint on SIGTERM/SIGINT. `train()` below reads top to bottom; each step is `train_step`;
evaluation and samples are in evaluation.py, the output folder's start-up in rundir.py, logs in reporting.py and
the final model folder in export.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from transformers.utils import logging as hf_logging

from . import checkpoint as ckpt
from . import export, outdir, progress, rundir
from .backends import make_backend
from .config import Config
from .data import resolve_tokenizer, train_stream, validation_sequences
from .errors import ConfigError, DataUnavailable, TrainingStopped
from .evaluation import Evaluator
from .hardware import describe as describe_hardware
from .hub import check_push_to_hub, push_folder
from .metrics import flops_per_token, unigram_byte_entropy
from .model import CausalLMWithLoss, build_for_training
from .optim import build_optimizer, build_scheduler
from .options import changed_fields, report_to_list, validate
from .precision import bf16_supported, resolve_precision
from .reporting import (
    Reporter,
    StepWindow,
    TrainResult,
    console_line,
    interval,
    plot_loss_curve,
    startup_line,
)
from .run_length import resolve_max_steps
from .signals import EXIT_CODES, SignalFlag
from .threads import apply_thread_policy

hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars drown the training log

__all__ = ["Engine", "TrainResult", "train"]


class Engine:
    """Builds everything from a Config and runs the loop. One instance per run."""

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
        # one process builds the corpus/tokenizer caches, the others reuse them
        with self.acc.main_process_first():
            self.tokenizer = resolve_tokenizer(cfg.data, seed=t.seed)
        # num_train_epochs becomes a step count here, before the schedule is built from it
        t.max_steps, self.steps_note = resolve_max_steps(cfg, self.tokenizer, self.world, self.epochs_set)
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
        self.train_data = train_stream(
            cfg.data, self.tokenizer, data_seed, self.rank, self.world, num_workers=t.dataloader_num_workers
        )
        self.val_seqs = validation_sequences(cfg.data, self.tokenizer, data_seed)
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

    def _parts(self) -> dict:
        """Every stateful part of the run, under the name checkpoint.py files it by."""
        return self.checkpoints.parts

    def save(self, only_if_changed: bool = False) -> Path | None:
        """A checkpoint of every stateful part; a collective (every process writes its own part into it).
        `only_if_changed`: not when the newest checkpoint holds this very state (a signal right after a save)."""
        self.state.log_records = self.reporter.records if self.is_main else None
        return self.checkpoints.save_if_changed() if only_if_changed else self.checkpoints.save()

    # -- one step -----------------------------------------------------------------------------------------------
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

    def _stop_requested(self, data_failed: bool = False) -> tuple[bool, bool]:
        """(a SIGTERM/SIGINT has arrived, a data source has failed), on any process: all must stop at the same
        step to save together (one all-reduce per step; the loop synchronises on the loss anyway)."""
        pending = torch.tensor(
            [float(self.signals.signum is not None), float(data_failed)], device=self.acc.device
        )
        if self.world > 1:
            pending = self.acc.reduce(pending, reduction="sum")
        signalled, failed = pending.tolist()
        return signalled > 0, failed > 0

    def train_step(self, seqs: list[np.ndarray], max_norm: float) -> tuple[str, float, float]:
        """Forward and backward over the step's micro-batches, clip, then step or skip: ('step' | 'nonfinite' |
        'fp16_overflow', the loss averaged over processes, the gradient norm before clipping)."""
        B, A = self.cfg.train.per_device_train_batch_size, self.backend.A
        loss_sum = torch.zeros((), device=self.acc.device)
        for micro in range(A):
            x = self._to_device(seqs[micro * B : (micro + 1) * B])
            # gradients are synchronised across processes on the last micro-batch only
            with self.backend.accumulate(last=micro == A - 1):
                with self.backend.autocast():
                    loss = self.model(x)
                self.backend.backward(loss)
            loss_sum += loss.detach().float()
        loss_val = loss_sum / A
        if self.world > 1:
            loss_val = self.acc.reduce(loss_val, reduction="mean")
        loss_f, norm_f = float(loss_val), self.backend.clip(max_norm)
        # an inf gradient with a finite loss under fp16 is the loss scaler's business, not a bad step
        scaler_overflow = self.backend.loss_scaling and math.isfinite(loss_f)
        if not (math.isfinite(loss_f) and math.isfinite(norm_f)) and not scaler_overflow:
            self.backend.skip()  # gradients dropped; weights and optimizer state untouched
            return "nonfinite", loss_f, norm_f
        if not self.backend.step():  # fp16 overflow: the loss scaler lowered its scale and skipped the update
            return "fp16_overflow", loss_f, norm_f
        self.scheduler.step()
        return "step", loss_f, norm_f

    # -- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        self.setup()
        res = TrainResult(output_dir=str(self.out), precision=self.precision)
        res.resumed_from = None if self.resume_path is None else str(self.resume_path)
        self._print_start()
        if self.resume_path is None and t.eval_on_start:
            res.initial_eval = self.evaluate()
            res.unigram_bpb = unigram_byte_entropy(
                self.tokenizer.batch_decode(self.val_seqs, skip_special_tokens=True)
            )
            self._log(
                {"event": "eval", "step": 0, **res.initial_eval, "unigram_byte_entropy": res.unigram_bpb}
            )
        n_seqs = t.per_device_train_batch_size * self.backend.A
        tokens_per_step = n_seqs * cfg.data.block_size * self.world
        max_norm = t.max_grad_norm if t.max_grad_norm and t.max_grad_norm > 0 else float("inf")
        log_every = interval(t.logging_strategy, t.logging_steps, t.max_steps)
        eval_every = interval(t.eval_strategy, t.eval_steps or t.logging_steps, t.max_steps)
        save_every = interval(t.save_strategy, t.save_steps, t.max_steps)
        flops = flops_per_token(
            self.n_params, self.lm.config.n_layer, self.lm.config.n_embd, cfg.data.block_size
        )
        window = StepWindow(flops, self.precision)
        self.model.train()
        stopped = False
        self.bar = progress.training_bar(t, self.state.step, enabled=self.is_main)
        with self.signals, self.bar or contextlib.nullcontext():
            while self.state.step < t.max_steps:
                t0 = time.perf_counter()
                seqs, data_error = self._read_step(n_seqs)
                # a SIGTERM/SIGINT, or a source that stopped answering: stop here, between two steps
                stopped, data_failed = self._stop_requested(data_error is not None)
                if data_failed:
                    self.data_position.give_back(seqs)
                    self.data_error = data_error or DataUnavailable(
                        "another process could not read its data: its message names the source"
                    )
                if stopped or data_failed:
                    break
                outcome, loss, norm = self.train_step(seqs, max_norm)
                self.state.tokens_seen += tokens_per_step
                if outcome != "step":
                    self._count_skipped(outcome, loss, norm)
                    continue
                self.state.step += 1
                self.bad_in_a_row = 0
                res.losses.append(loss)
                if self.acc.device.type == "cuda":
                    torch.cuda.synchronize()
                window.add(loss, tokens_per_step, time.perf_counter() - t0)
                res.tokens_per_s = window.run_rate
                if self.bar is not None:
                    self.bar.update(1)
                    self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{window.run_rate:,.0f}", refresh=False)
                step = self.state.step
                first = t.logging_first_step and step == 1 and t.logging_strategy != "no"
                if first or log_every and (step % log_every == 0 or step == t.max_steps):
                    lr = self.scheduler.get_last_lr()[0]
                    self._log(window.record(step, norm, lr, self.state.tokens_seen))
                if eval_every and step % eval_every == 0 and step < t.max_steps:
                    self._evaluate_during_training(res)
                if save_every and step % save_every == 0:
                    self.save()
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            return self._finish(res, stopped)

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

    def _log(self, record: dict) -> None:
        self.reporter.log(record)
        if self.is_main:
            if getattr(self, "bar", None) is not None:
                self.bar.write(console_line(record))  # above the bar, which keeps its place at the bottom
            else:
                print(console_line(record), flush=True)

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

    def _evaluate_during_training(self, res: TrainResult) -> None:
        ev = self.evaluate()
        if ev is None:  # interrupted by a signal, which the loop condition handles
            return
        res.evals.append({"step": self.state.step, **ev})
        self._log({"event": "eval", "step": self.state.step, **ev})
        if self.is_main and self.samples_wanted:
            self._log({"event": "sample", "step": self.state.step, "text": self.sample(self.state.step)[0]})

    def _count_skipped(self, outcome: str, loss: float, norm: float) -> None:
        """A step whose update was not applied: fp16's overflow (the scaler's business), or a non-finite loss or
        gradient, which stops the run after --max_bad_steps in a row."""
        self.state.skipped_steps += 1
        if outcome == "fp16_overflow":
            self._log({"event": "fp16_overflow", "step": self.state.step, "scale": self.backend.loss_scale})
            return
        self.bad_in_a_row += 1
        self._log(
            {
                "event": "nonfinite",
                "step": self.state.step,
                "loss": loss,
                "grad_norm": norm,
                "skipped_total": self.state.skipped_steps,
                "in_a_row": self.bad_in_a_row,
            }
        )
        if self.bad_in_a_row >= self.cfg.run.max_bad_steps:
            self.reporter.close()
            raise TrainingStopped(
                f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient norm (last: loss={loss}, "
                f"grad_norm={norm}); the weights were never updated with them and the last checkpoint in "
                f"{self.out} is intact. Lower --learning_rate, raise --warmup_steps, check the data, or use bf16"
            )

    # -- the end ------------------------------------------------------------------------------------------------
    def _finish(self, res: TrainResult, stopped: bool) -> TrainResult:
        """Final checkpoint, evaluation, samples and model; on a signal (`stopped`, or one arriving during the
        final evaluation) only the checkpoint, then the exit status 128 + signal number."""
        res.step, res.tokens_seen = self.state.step, self.state.tokens_seen
        res.skipped_steps, res.data_stats = self.state.skipped_steps, dict(self.train_data.stats)
        if self.data_error is not None:
            # a collective, like every save: each process hands back the step it could not train
            path = self.save(only_if_changed=True)
            self.reporter.close()
            raise DataUnavailable(
                f"{self.data_error} (checkpoint {path} holds step {self.state.step}: run the same command to resume "
                "once the data is readable again)"
            )
        run, t = self.cfg.run, self.cfg.train
        if not stopped and t.save_strategy != "no" and t.save_steps:
            # the final step is always resumable (and extendable with a larger --max_steps)
            self.save(only_if_changed=True)
        res.final_eval = None if stopped else self.evaluate()
        if res.final_eval is None:
            # a signal always leaves a checkpoint, whatever --save_steps says
            path = self.save(only_if_changed=True)
            signum = self.signals.signum or signal.SIGTERM  # None on a process that only heard of another's
            res.stopped_by_signal, res.exit_code = signum, EXIT_CODES[signum]
            if self.is_main:
                print(f"received signal {signum}: saved {path}; run the same command to resume", flush=True)
            self.reporter.close()
            return res
        self._log({"event": "eval", "step": self.state.step, **res.final_eval})
        # gathering a sharded model is a collective: every process takes part
        full_weights = self.backend.full_state_dict() if run.save_final_model and self.sharded else None
        if self.is_main:
            if run.save_final_model:
                res.final_model_dir = str(self._save_final(res, full_weights))
                if self.hub_repo:
                    url = push_folder(res.final_model_dir, self.hub_repo, t.hub_private_repo)
                    print(f"pushed {res.final_model_dir} to {url}", flush=True)
            # after the model is saved: nothing that goes wrong while generating can cost it
            res.samples = self.sample(seed=t.seed) if self.samples_wanted else []
            for s in res.samples:  # into the log only: the end-of-run summary prints each sample once
                self.reporter.log({"event": "sample", "step": self.state.step, "text": s})
            self._log({"event": "data", "step": self.state.step, **res.data_stats})
            if run.plot:
                title = f"{self.cfg.model.preset} on {self.cfg.data.dataset}"
                plot_loss_curve(self.reporter.history, self.out / "loss_curve.png", title=title)
        self.reporter.close()
        self.acc.wait_for_everyone()
        return res

    def _save_final(self, res: TrainResult, state_dict: dict | None) -> Path:
        """Model + tokenizer in Hugging Face format with its model card (export.py); `state_dict` is the gathered
        full state when the weights are sharded across processes."""
        self.lm.config.use_cache = True
        facts = export.RunFacts(
            step=res.step,
            tokens_seen=res.tokens_seen,
            n_params=self.n_params,
            wall_time_s=time.perf_counter() - self.started,
            hardware=describe_hardware(),
            backend=self.backend.describe(),
            precision=self.precision,
        )

        def measure(copy: torch.nn.Module) -> dict[str, float] | None:
            # a 16-bit copy's figures, measured on this process alone
            return self.evaluator.evaluate(
                CausalLMWithLoss(copy.to(self.acc.device), self.cfg.model.loss_impl), True
            )

        return export.save_final(
            self.out,
            self.lm,
            self.tokenizer,
            self.cfg,
            facts,
            res.final_eval or {},
            state_dict=state_dict,
            evaluate=measure,
            last_checkpoint=self.checkpoints.path,
        )

    def close(self) -> None:
        """Stop the data workers, then let go of the output folder (also after an error)."""
        close_data = getattr(getattr(self, "train_data", None), "close", None)
        if close_data is not None:
            close_data()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def train(cfg: Config) -> TrainResult:
    """Run one training job described by `cfg`."""
    engine = None
    previous_threads = torch.get_num_threads()
    # as many threads as the cores free now (threads.py); the user's or a launcher's OMP_NUM_THREADS wins
    threads = apply_thread_policy()
    if os.environ.get("RANK", "0") == "0":
        print(threads, flush=True)
    try:
        engine = Engine(cfg)
        return engine.train()
    finally:
        if engine is not None:
            engine.close()
        # a notebook's later cells get the count they had
        torch.set_num_threads(previous_threads)
        # Accelerate keeps its settings (precision, DeepSpeed) in process-wide singletons and refuses a second run
        # with other settings in the same process (a notebook); forget them, but keep the process group.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
