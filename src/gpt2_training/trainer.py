"""The training engine: a lean loop on Hugging Face Accelerate, configured with `TrainingArguments`.

Why not `transformers.Trainer`? The goals are speed, exact resume and atomic checkpoints, and the Trainer
misses the last two by design: it writes checkpoints in place (a half-written one can be picked for resume),
resumes a stream by replaying every consumed batch, loses a `datasets` shuffle buffer on resume and masks NaN
losses in its logs. Speed is measured, not assumed: `bench/bench_training.py` times this loop against a raw
PyTorch loop with the same model (its overhead ratio is in `bench/results/`). This loop keeps the
Trainer's vocabulary (every setting is a `TrainingArguments` field) and its launchers (torchrun, `accelerate
launch`, `deepspeed`), runs DDP, FSDP2 and DeepSpeed ZeRO behind one interface (backends.py), and adds what it
lacks:

* atomic checkpoints that include the exact data position, RNG states and scaler, so resume is bit-exact;
* a NaN/inf guard that skips the optimizer step before it can damage the weights;
* SIGTERM/SIGINT handling that saves a complete checkpoint and exits with the conventional status.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from transformers.utils import logging as hf_logging

from . import checkpoint as ckpt
from . import export, outdir, progress
from .backends import make_backend
from .config import Config, model_shape, validate
from .data import RunData
from .errors import ConfigError, DataUnavailable, GPT2TrainingError, TrainingStopped
from .hardware import describe as describe_hardware
from .hub import check_push_to_hub, push_folder
from .metrics import bits_per_byte, describe_mfu, flops_per_token, token_byte_lengths, unigram_byte_entropy
from .model import CausalLMWithLoss, build_model, enable_activation_checkpointing
from .optim import build_optimizer, build_scheduler
from .options import changed_fields, report_to_list
from .precision import bf16_supported, resolve_precision
from .reporting import Reporter, plot_loss_curve
from .run_length import resolve_max_steps
from .threads import apply_thread_policy

hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars drown the training log

EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


@dataclass
class TrainResult:
    """What a run produced; `main()` returns it so tests and notebooks can assert on it."""

    output_dir: str
    final_model_dir: str | None = None
    step: int = 0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)  # training loss of every optimizer step of this process
    evals: list[dict] = field(default_factory=list)
    initial_eval: dict | None = None
    final_eval: dict | None = None
    unigram_bpb: float | None = None
    samples: list[str] = field(default_factory=list)
    skipped_steps: int = 0
    resumed_from: str | None = None
    stopped_by_signal: int | None = None
    tokens_per_s: float | None = None
    precision: str = "fp32"
    data_stats: dict = field(default_factory=dict)
    exit_code: int = 0


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step, so the save happens at a clean point."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for s in EXIT_CODES:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook launchers): signals stay default
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _fingerprint(cfg: Config, tokenizer, world_size: int) -> dict[str, Any]:
    """Settings that must not change across a resume (model shape, tokenizer, sequence length, batch)."""
    vocab = tokenizer.get_vocab()
    return {
        "model_shape": model_shape(cfg.model),
        "tokenizer_vocab": len(tokenizer),
        "tokenizer_hash": hash_vocab(vocab),
        "block_size": cfg.data.block_size,
        "world_size": world_size,
        "per_device_train_batch_size": cfg.train.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "data": cfg.data.shards_dir or cfg.data.dataset,
    }


def hash_vocab(vocab: dict[str, int]) -> str:
    import hashlib

    items = sorted(vocab.items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


class Engine:
    """Builds everything from a Config and runs the loop. One instance per run."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # the model card's wall time counts from here
        self.started = time.perf_counter()
        cuda = torch.cuda.is_available()
        validate(cfg, cuda_available=cuda, bf16_ok=bf16_supported())
        d = cfg.data
        outdir.refuse_unsafe(
            cfg.train.output_dir,
            "--output_dir",
            {
                "dataset": d.dataset,
                "shards folder": d.shards_dir,
                "tokenizer": d.tokenizer,
                "initial weights": cfg.model.init_from,
            },
        )
        self.precision, self.precision_reason = resolve_precision(cfg.run.precision)
        t = cfg.train
        # Which options the user set (not defaults): num_train_epochs next to max_steps gets a note.
        self.epochs_set = "num_train_epochs" in changed_fields(t)
        # Before any work: a push that cannot happen fails now, not after the training.
        self.hub_repo = check_push_to_hub(t.output_dir, t.hub_model_id) if t.push_to_hub else None
        if t.tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = bool(t.tf32)
            torch.backends.cudnn.allow_tf32 = bool(t.tf32)
        # DDP, FSDP2 or DeepSpeed (--fsdp, --deepspeed or an `accelerate launch` config): see backends.py.
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
        self.signals = _SignalFlag()  # installed around the loop and the final evaluation

    # -- set-up -------------------------------------------------------------------------------------------------
    def _prepare_output_dir(self) -> Path | None:
        """Lock the output folder, then apply --resume / --overwrite_output_dir; returns the checkpoint to resume
        from, if any. Process 0 decides (it alone touches the folder) and tells the others, so every process
        fails with the same message rather than waiting for one that has stopped."""
        decision: list[Any] = [None, None]
        if self.is_main:
            try:
                decision[0] = self._claim_output_dir()
            except GPT2TrainingError as exc:
                decision[1] = getattr(exc, "problems", [str(exc)])
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(decision, from_process=0)
        if decision[1] is not None:
            raise ConfigError(decision[1])
        return None if decision[0] is None else Path(decision[0])

    def _claim_output_dir(self) -> str | None:
        r, out = self.cfg.run, self.out
        names = [p.name for p in out.iterdir()] if out.is_dir() else []
        foreign = outdir.foreign_entries(out)
        if names and not (out / outdir.MARKER).exists():
            if foreign and not any(outdir.own_entry(n) for n in names):
                # a folder of the user's: a run never settles into it
                raise ConfigError(outdir.describe_foreign(out, foreign, "train into"))
            if r.overwrite_output_dir and "train_log.jsonl" not in names:
                # names alone do not make a folder the tool's: a final/ copied there may be the user's only copy
                raise ConfigError(
                    f"{out} holds no record of a run by this tool (no {outdir.MARKER} or train_log.jsonl), so "
                    "--overwrite_output_dir will not clear it: move its contents elsewhere, or choose a new --output_dir"
                )
        made = outdir.claim(out)
        self.lock = outdir.RunLock(out)
        self.lock.acquire()
        try:
            return self._resume_point()
        except GPT2TrainingError:
            # a refusal leaves the folder as it found it
            self.lock.release(remove=outdir.LOCK in made)
            self.lock = None
            outdir.unclaim(out, made)
            raise

    def _resume_point(self) -> str | None:
        """What --resume / --overwrite_output_dir make of the locked output folder (see `_prepare_output_dir`)."""
        r, out = self.cfg.run, self.out
        ckpt.cleanup_partial(out)
        if r.resume not in ("auto", "never"):
            return r.resume
        if r.resume == "never":
            has_run = any(p.name not in (outdir.MARKER, outdir.LOCK) for p in out.iterdir())
            if has_run and not r.overwrite_output_dir:
                raise ConfigError(
                    f"output_dir {out} already holds a run: use --resume auto to continue it, "
                    "--resume never --overwrite_output_dir to replace it, or another --output_dir"
                )
            if has_run:
                removed = outdir.clear_own(out)
                print(
                    f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)} from {out}",
                    flush=True,
                )
            return None
        path, unusable = ckpt.find_resumable(out)
        if path is None and (unusable or (out / "final").exists()):
            found = [f"{p.name}: {why}" for p, why in unusable] or [
                "no checkpoint, only a finished model in final/"
            ]
            # the finished model's weights are offered only where there is a finished model
            weights = (
                f" (add --init_from {out / 'final'} to start from the finished model's weights)"
                if (out / "final").is_dir()
                else ""
            )
            raise ConfigError(
                [f"cannot resume {out}, which holds a run but no usable checkpoint", *found]
                + [
                    "nothing was changed. To start over here: --resume never --overwrite_output_dir (replaces this "
                    f"run's files); to keep them: another --output_dir{weights}"
                ]
            )
        for bad, why in unusable:
            moved = ckpt.set_aside(bad)
            print(
                f"warning: skipping damaged checkpoint {bad}: {why}; moved aside to {moved.name}", flush=True
            )
        if path is None and (out / "train_log.jsonl").exists():
            print(
                f"{out} holds a run that never wrote a checkpoint: starting it again from step 0", flush=True
            )
        return None if path is None else str(path)

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.resume_path = self._prepare_output_dir()
        self._seed(t.seed)
        data_seed = t.data_seed if t.data_seed is not None else t.seed
        # the one data object of the run: the source is opened once, when something first needs it
        self.data = RunData(cfg.data, data_seed, tokenizer_seed=t.seed)
        with (
            self.acc.main_process_first()
        ):  # one process builds the corpus/tokenizer caches, the others reuse
            self.tokenizer = self.data.tokenizer
        vocab = len(self.tokenizer)
        # num_train_epochs becomes a step count here, before the schedule is built from it.
        t.max_steps, self.steps_note = resolve_max_steps(
            cfg, self.data, self.acc.num_processes, self.epochs_set
        )
        self.lm = build_model(cfg.model, vocab, self.tokenizer.eos_token_id)
        if self.lm.config.vocab_size < vocab:
            raise ConfigError(f"tokenizer has {vocab} tokens but the model only {self.lm.config.vocab_size}")
        if self.lm.config.n_positions < cfg.data.block_size:
            raise ConfigError(
                f"block_size={cfg.data.block_size} exceeds the loaded model's n_positions={self.lm.config.n_positions}"
            )
        # activation_checkpointing(_kwargs): TrainingArguments fields added after transformers 5.17
        if getattr(t, "activation_checkpointing", False) or t.gradient_checkpointing:
            enable_activation_checkpointing(
                self.lm,
                getattr(t, "activation_checkpointing_kwargs", None) or t.gradient_checkpointing_kwargs,
            )
        self.lm.config.use_cache = False
        self.lm.to(self.acc.device)
        self.n_params = sum(p.numel() for p in self.lm.parameters())
        wrapped = CausalLMWithLoss(self.lm, cfg.model.loss_impl)
        # the backend replicates or shards the model, then builds the optimizer on what this process holds
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
        self.token_bytes = token_byte_lengths(self.tokenizer)
        fingerprint = _fingerprint(cfg, self.tokenizer, self.world)
        # saved data positions depend on the source's shards and on how text is held out
        fingerprint["data_stream"] = self.train_data.fingerprint()
        self.state = ckpt.TrainState(
            fingerprint, self.backend.name, cfg.to_dict(), allow_changes=cfg.run.allow_resume_changes
        )
        self.rng = ckpt.RNGState(self.rank)
        self.data_position = ckpt.DataPosition(self.train_data, self.rank)
        self.data_error: DataUnavailable | None = None
        self.bad_in_a_row = 0
        self.saved_state: tuple[int, int] | None = None  # (step, tokens_seen) of the newest checkpoint
        self.saved_path: Path | None = None

    def _start_reporter(self) -> None:
        """The log, continued from the resumed checkpoint (what the interrupted run logged after it is set aside)."""
        t = self.cfg.train
        self.reporter = Reporter(
            self.out,
            report_to_list(t.report_to),
            self.cfg.to_dict(),
            enabled=self.is_main,
            run_name=t.run_name,
            project=t.project,
            logging_dir=self.cfg.run.logging_dir,
            resume_step=self.state.step,
            keep_records=self.state.log_records if self.resume_path is not None else 0,
        )

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _parts(self) -> dict[str, Any]:
        """Every stateful part of the run, under the name checkpoint.py files it by."""
        return {
            "train_state": self.state,
            # weights and optimizer, replicated or sharded as the backend holds them
            "model": self.backend,
            "scheduler": self.scheduler,
            # fp16's loss scale (None otherwise)
            "scaler": self.acc.scaler,
            "data": self.data_position,
            "rng": self.rng,
        }

    def save(self) -> Path:
        """A checkpoint of every stateful part; a collective (every process writes its own part into it)."""
        several = self.world > 1
        self.state.log_records = self.reporter.records if self.is_main else None
        path = ckpt.save(
            self.out,
            self.state.step,
            self._parts(),
            self.lm,
            self.cfg.train.save_total_limit,
            is_main=self.is_main,
            barrier=self.acc.wait_for_everyone if several else None,
            gather=(lambda obj: gather_object([obj])) if several else None,
        )
        self.saved_state, self.saved_path = (self.state.step, self.state.tokens_seen), path
        return path

    def save_if_changed(self) -> Path | None:
        """Save unless the newest checkpoint already holds this exact state (same step and data position),
        e.g. on a signal right after a periodic save: rewriting it would only cost time."""
        if self.saved_state != (self.state.step, self.state.tokens_seen):
            self.save()
        return self.saved_path

    def load(self, path: Path) -> None:
        """Every stateful part from checkpoint `path`, on this run's number of processes."""
        ckpt.load(path, self._parts())
        self.saved_state, self.saved_path = (self.state.step, self.state.tokens_seen), path

    # -- evaluation and samples ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float] | None:
        """Held-out loss, perplexity and bits per byte; each process takes its share, sums are reduced.
        None when a SIGTERM/SIGINT arrives meanwhile: the run must save and exit within seconds, not finish a
        long evaluation first (single process only: with several, ranks hold different numbers of batches and
        could not agree on where to stop, so they finish the evaluation and stop at the next step).
        `model`: a loss-computing copy (a 16-bit export's) measured by this process alone on every sequence, in
        its own dtype."""
        alone = model is not None
        world, rank = (1, 0) if alone else (self.world, self.rank)
        model = model if alone else self.model
        self.lm.eval()
        seqs = torch.from_numpy(self.val_seqs[rank::world])
        sums = torch.zeros(3, dtype=torch.float64, device=self.acc.device)  # nats, tokens, bytes
        bs = self.cfg.train.per_device_eval_batch_size
        # Through the wrapped model, because under FSDP and ZeRO-3 a forward gathers the sharded weights, and
        # every process runs as many forwards as the one with the most sequences (an empty share repeats a
        # sequence and does not count it), since each forward is then a collective.
        longest = -(-len(self.val_seqs) // world)
        # shown only when an evaluation lasts more than two seconds
        bar = progress_bar(self.cfg.train, 0, self.is_main, total=-(-longest // bs), desc="eval", delay=2.0)
        for i in range(0, longest, bs):
            if bar is not None:
                bar.update(1)
            if world == 1 and self.signals.signum is not None:
                self.lm.train()
                return None
            x = seqs[i : i + bs].to(self.acc.device)
            with contextlib.nullcontext() if alone else self.backend.autocast():
                mean = model(x if len(x) else torch.from_numpy(self.val_seqs[:1]).to(self.acc.device))
            if not len(x):
                continue
            targets = x[:, 1:].reshape(-1)
            sums += torch.tensor(
                [mean.item() * len(targets), len(targets), self.token_bytes[targets.cpu()].sum().item()],
                dtype=torch.float64,
                device=self.acc.device,
            )
        if bar is not None:
            bar.close()
        if world > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        self.lm.train()
        nats, tokens, n_bytes = sums.tolist()
        loss = nats / max(tokens, 1)
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 50)),
            "eval_bpb": bits_per_byte(nats, n_bytes),
        }

    @property
    def samples_wanted(self) -> bool:
        """Prompts and tokens to generate, and a model that one process can run (not under ZeRO-3 or FSDP)."""
        r = self.cfg.run
        return bool(r.sample_prompts) and r.sample_max_new_tokens > 0 and not self.sharded

    @torch.no_grad()
    def sample(self, seed: int = 0) -> list[str]:
        """Text from the configured prompts; the RNG is forked so sampling never changes the training run."""
        r = self.cfg.run
        out = []
        self.lm.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for prompt in r.sample_prompts:
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.acc.device)
                if ids.shape[1] == 0:
                    ids = torch.tensor([[self.tokenizer.eos_token_id]], device=self.acc.device)
                gen = self.lm.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=r.sample_max_new_tokens,
                    do_sample=True,
                    top_k=50,
                    temperature=0.8,
                    pad_token_id=self.tokenizer.eos_token_id,
                    use_cache=True,
                )
                out.append(self.tokenizer.decode(gen[0], skip_special_tokens=True))
        self.lm.train()
        return out

    # -- the loop -----------------------------------------------------------------------------------------------
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
            # page-locked host memory makes the copy below asynchronous
            batch = batch.pin_memory()
        return batch.to(self.acc.device, non_blocking=True)

    def _log(self, record: dict) -> None:
        self.reporter.log(record)
        if self.is_main:
            fields = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in record.items()
                if k != "event"
            )
            line = f"[{record.get('event')}] {fields}"
            if getattr(self, "bar", None) is not None:
                # above the bar, which keeps its place at the bottom
                self.bar.write(line)
            else:
                print(line, flush=True)

    def train(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        self.setup()
        res = TrainResult(output_dir=str(self.out), precision=self.precision)
        if self.resume_path is not None:
            self.load(self.resume_path)
            res.resumed_from = str(self.resume_path)
        self._start_reporter()
        B, A, T = t.per_device_train_batch_size, t.gradient_accumulation_steps, cfg.data.block_size
        tokens_per_step = B * A * T * self.world
        flops_tok = flops_per_token(self.n_params, self.lm.config.n_layer, self.lm.config.n_embd, T)
        if self.is_main:
            print(
                f"model: {self.n_params / 1e6:.2f} M parameters ({_shape_text(cfg, self.lm.config)}), precision {self.precision} "
                f"({self.precision_reason}); effective batch {B * A * self.world} sequences = {tokens_per_step} "
                f"tokens per step ({B} per device x {A} accumulation x {self.world} processes); "
                f"{self.backend.describe()}"
                + (
                    f"; resuming from {self.resume_path} at step {self.state.step}"
                    if self.resume_path
                    else ""
                ),
                flush=True,
            )
            if t.run_name:
                print(f"run: {t.run_name}", flush=True)
            if self.steps_note:
                print(self.steps_note, flush=True)
        if self.resume_path is None and t.eval_on_start:
            res.initial_eval = self.evaluate()
            res.unigram_bpb = unigram_byte_entropy(
                [self.tokenizer.decode(s, skip_special_tokens=True) for s in self.val_seqs]
            )
            self._log(
                {"event": "eval", "step": 0, **res.initial_eval, "unigram_byte_entropy": res.unigram_bpb}
            )
        max_norm = t.max_grad_norm if t.max_grad_norm and t.max_grad_norm > 0 else float("inf")
        log_every = _interval(t.logging_strategy, t.logging_steps, t.max_steps)
        eval_every = _interval(t.eval_strategy, t.eval_steps or t.logging_steps, t.max_steps)
        save_every = _interval(t.save_strategy, t.save_steps, t.max_steps)
        # the logged loss is the mean over the logging window (the Trainer's `loss`): one step's loss jumps
        window_tokens, window_time, window_losses = 0, 0.0, []
        run_tokens, run_time = 0, 0.0
        self.model.train()
        stopped = False
        self.bar = progress_bar(t, self.state.step, enabled=self.is_main)
        with self.signals, self.bar or contextlib.nullcontext():
            while self.state.step < t.max_steps:
                t0 = time.perf_counter()
                seqs, data_error = self._read_step(A * B)
                # a SIGTERM/SIGINT, or a source that stopped answering: stop here, between two steps
                stopped, data_failed = self._stop_requested(data_error is not None)
                if data_failed:
                    self.data_position.give_back(seqs)
                    self.data_error = data_error or DataUnavailable(
                        "another process could not read its data: its message names the source"
                    )
                if stopped or data_failed:
                    break
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
                self.state.tokens_seen += tokens_per_step
                if not (math.isfinite(loss_f) and math.isfinite(norm_f)) and not self._fp16_overflow(loss_f):
                    self._skip_step(loss_f, norm_f, res)
                    continue
                if not self.backend.step():  # fp16 overflow: the loss scaler lowered its scale
                    self.state.skipped_steps += 1
                    scale = self.acc.scaler.get_scale() if self.acc.scaler is not None else None
                    self._log({"event": "fp16_overflow", "step": self.state.step, "scale": scale})
                    continue
                self.scheduler.step()
                self.state.step += 1
                self.bad_in_a_row = 0
                res.losses.append(loss_f)
                window_losses.append(loss_f)
                if self.acc.device.type == "cuda":
                    torch.cuda.synchronize()
                window_time += time.perf_counter() - t0
                window_tokens += tokens_per_step
                run_time, run_tokens = run_time + time.perf_counter() - t0, run_tokens + tokens_per_step
                res.tokens_per_s = run_tokens / max(run_time, 1e-9)
                if self.bar is not None:
                    self.bar.update(1)
                    self.bar.set_postfix(
                        loss=f"{loss_f:.3f}", tok_s=f"{res.tokens_per_s:,.0f}", refresh=False
                    )
                first = t.logging_first_step and self.state.step == 1 and t.logging_strategy != "no"
                if (
                    first
                    or log_every
                    and (self.state.step % log_every == 0 or self.state.step == t.max_steps)
                ):
                    tps = window_tokens / max(window_time, 1e-9)
                    mfu, _ = describe_mfu(tps, flops_tok, self.precision)
                    rec = {
                        "event": "train",
                        "step": self.state.step,
                        "loss": sum(window_losses) / len(window_losses),
                        "grad_norm": norm_f,
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_seen": self.state.tokens_seen,
                        "tokens_per_s": tps,
                    }
                    if mfu is not None:
                        rec["mfu"] = mfu
                    self._log(rec)
                    window_tokens, window_time, window_losses = 0, 0.0, []
                if eval_every and self.state.step % eval_every == 0 and self.state.step < t.max_steps:
                    ev = self.evaluate()
                    if ev is not None:  # None: interrupted by a signal, which the loop condition handles
                        res.evals.append({"step": self.state.step, **ev})
                        self._log({"event": "eval", "step": self.state.step, **ev})
                        if self.is_main and self.samples_wanted:
                            self._log(
                                {
                                    "event": "sample",
                                    "step": self.state.step,
                                    "text": self.sample(self.state.step)[0],
                                }
                            )
                if save_every and self.state.step % save_every == 0:
                    self.save()
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            return self._finish(res, stopped)

    def close(self) -> None:
        """Stop the data workers, then let go of the output folder (also after an error)."""
        close_data = getattr(getattr(self, "train_data", None), "close", None)
        if close_data is not None:
            close_data()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _fp16_overflow(self, loss_f: float) -> bool:
        """An inf gradient with a finite loss under fp16 is the scaler's business, not a bad step."""
        return self.backend.loss_scaling and math.isfinite(loss_f)

    def _skip_step(self, loss_f: float, norm_f: float, res: TrainResult) -> None:
        # gradients dropped, weights and optimizer untouched (under DeepSpeed by the engine's own skip)
        self.backend.skip()
        self.state.skipped_steps += 1
        self.bad_in_a_row += 1
        res.skipped_steps = self.state.skipped_steps
        self._log(
            {
                "event": "nonfinite",
                "step": self.state.step,
                "loss": loss_f,
                "grad_norm": norm_f,
                "skipped_total": self.state.skipped_steps,
                "in_a_row": self.bad_in_a_row,
            }
        )
        if self.bad_in_a_row >= self.cfg.run.max_bad_steps:
            self.reporter.close()
            raise TrainingStopped(
                f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient norm (last: loss={loss_f}, "
                f"grad_norm={norm_f}); the weights were never updated with them and the last checkpoint in "
                f"{self.out} is intact. Lower --learning_rate, raise --warmup_steps, check the data, or use bf16"
            )

    def _finish(self, res: TrainResult, stopped: bool) -> TrainResult:
        """Final checkpoint, evaluation, samples and model; on a signal (`stopped`, or one arriving during the
        final evaluation) only the checkpoint, then the exit status 128 + signal number."""
        res.step, res.tokens_seen, res.skipped_steps = (
            self.state.step,
            self.state.tokens_seen,
            self.state.skipped_steps,
        )
        res.data_stats = dict(self.train_data.stats)
        if self.data_error is not None:
            # a collective, like every save: each process hands back the step it could not train
            path = self.save_if_changed()
            self.reporter.close()
            raise DataUnavailable(
                f"{self.data_error} (checkpoint {path} holds step {self.state.step}: run the same command to resume "
                "once the data is readable again)"
            )
        if not stopped and self.cfg.train.save_strategy != "no" and self.cfg.train.save_steps:
            self.save_if_changed()  # the final step is always resumable (and extendable with a larger --max_steps)
        res.final_eval = None if stopped else self.evaluate()
        if res.final_eval is None:
            path = self.save_if_changed()  # a signal always leaves a checkpoint, whatever --save_steps says
            signum = self.signals.signum or signal.SIGTERM  # None on a process that only heard of another's
            res.stopped_by_signal, res.exit_code = signum, EXIT_CODES[signum]
            if self.is_main:
                print(f"received signal {signum}: saved {path}; run the same command to resume", flush=True)
            self.reporter.close()
            return res
        self._log({"event": "eval", "step": self.state.step, **res.final_eval})
        full_weights = None
        if self.cfg.run.save_final_model and self.sharded:  # a collective: every process takes part
            full_weights = self.backend.full_state_dict()
        if self.is_main:
            if self.cfg.run.save_final_model:
                res.final_model_dir = str(self._save_final(res, full_weights))
                if self.hub_repo:
                    url = push_folder(res.final_model_dir, self.hub_repo, self.cfg.train.hub_private_repo)
                    print(f"pushed {res.final_model_dir} to {url}", flush=True)
            # after the model is saved: nothing that goes wrong while generating can cost it
            if self.samples_wanted:
                res.samples = self.sample(seed=self.cfg.train.seed)
            for s in res.samples:
                # into the log only: the end-of-run summary prints each sample once
                self.reporter.log({"event": "sample", "step": self.state.step, "text": s})
            self._log({"event": "data", "step": self.state.step, **res.data_stats})
            if self.cfg.run.plot:
                plot_loss_curve(
                    self.reporter.history,
                    self.out / "loss_curve.png",
                    title=f"{self.cfg.model.preset} on {self.cfg.data.dataset}",
                )
        self.reporter.close()
        self.acc.wait_for_everyone()
        return res

    def _save_final(self, res: TrainResult, state_dict: dict | None = None) -> Path:
        """model + tokenizer in Hugging Face format (export.py), written to a temporary folder and renamed when
        complete; `state_dict` is the gathered full state when the weights are sharded across processes."""
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

        def evaluate(copy: torch.nn.Module) -> dict[str, float] | None:
            return self.evaluate(CausalLMWithLoss(copy.to(self.acc.device), self.cfg.model.loss_impl))

        return export.save_final(
            self.out,
            self.lm,
            self.tokenizer,
            self.cfg,
            facts,
            res.final_eval or {},
            state_dict=state_dict,
            evaluate=evaluate,
            last_checkpoint=self.saved_path,
        )


def _shape_text(cfg: Config, config: Any) -> str:
    """The shape of the model built, which overrides or loaded weights can make differ from the preset's."""
    shape = " ".join(f"{k}={getattr(config, k)}" for k in ("n_layer", "n_head", "n_embd"))
    origin = (
        f"preset {cfg.model.preset}" if cfg.model.init_from == "scratch" else f"from {cfg.model.init_from}"
    )
    return f"{shape}; {origin}"


def _interval(strategy: Any, steps: float | None, max_steps: int) -> int:
    """Steps between two events (0 = never); like the Trainer, a value below 1 is a ratio of the run."""
    if str(getattr(strategy, "value", strategy)) == "no" or not steps:
        return 0
    return max(math.ceil(steps * max_steps), 1) if steps < 1 else int(steps)


def progress_bar(
    args: Any,
    initial: int,
    enabled: bool,
    *,
    total: int | None = None,
    desc: str = "train",
    delay: float = 0.0,
) -> Any:
    """The training bar (step / max_steps, ETA, loss, tokens/s), or an evaluation's; see progress.py."""
    return progress.bar(
        args.max_steps if total is None else total,
        desc,
        enabled=enabled and not args.disable_tqdm,
        initial=initial,
        unit="step" if desc == "train" else "batch",
        delay=delay,
        leave=desc == "train",
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
