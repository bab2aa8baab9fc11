"""The training engine: a lean loop on Hugging Face Accelerate, configured with `TrainingArguments`.

Why not `transformers.Trainer`? The goals are speed, exact resume and atomic checkpoints, and the Trainer
misses the last two by design: it writes checkpoints in place (a half-written one can be picked for resume),
resumes a stream by replaying every consumed batch, loses a `datasets` shuffle buffer on resume and masks NaN
losses in its logs. Speed is measured, not assumed: `bench/bench_training.py` times this loop against a raw
PyTorch loop with the same model (its overhead ratio is in `bench/results/`). This loop keeps the Trainer's
vocabulary (every setting is a `TrainingArguments` field) and its launchers (torchrun, `accelerate launch`,
`deepspeed`), runs DDP, FSDP2 and DeepSpeed ZeRO behind one interface (`backends`), and adds atomic checkpoints
with the exact data position (bit-exact resume), a NaN/inf guard that skips a bad step before it can damage the
weights, and a checkpoint on SIGTERM/SIGINT. `Engine.train()` below reads top to bottom; each step is `train_step`.
The run's parts are built in parts.py, evaluation and samples are in evaluation.py, the output folder's start-up in
rundir.py, logs in reporting.py and the final model folder in export.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from . import export, progress
from .config import Config
from .errors import DataUnavailable, TrainingStopped
from .hardware import describe as describe_hardware
from .hub import push_folder
from .metrics import flops_per_token, unigram_byte_entropy
from .model import CausalLMWithLoss
from .parts import RunParts
from .reporting import StepWindow, TrainResult, console_line, interval, plot_loss_curve
from .signals import EXIT_CODES
from .threads import apply_thread_policy

hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars drown the training log

__all__ = ["Engine", "TrainResult", "train"]


class Engine(RunParts):
    """Runs the loop over the parts of a run (parts.py). One instance per run."""

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

    def _log(self, record: dict) -> None:
        self.reporter.log(record)
        if self.is_main:
            if getattr(self, "bar", None) is not None:
                self.bar.write(console_line(record))  # above the bar, which keeps its place at the bottom
            else:
                print(console_line(record), flush=True)

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
