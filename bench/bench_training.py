#!/usr/bin/env python
"""Training throughput, MFU and peak memory of four ways to train the same GPT-2, in ONE run:

  seed       the settings this project started from: Hugging Face GPT2LMHeadModel, eager attention, fp16 with a
             GradScaler on a GPU (fp32 on a CPU), gradient checkpointing, dropout 0.1, the unpadded 50257-token
             vocabulary, HF's own loss (full fp32 logits), plain (non-fused) torch AdamW;
  recipe     the project's training step: `CausalLMWithLoss` (chunked fused cross-entropy), SDPA, the precision
             `resolve_precision('auto')` picks (bf16 on a recent GPU), torch.compile on a GPU, fused AdamW
             (`optim.build_optimizer` with adamw_torch_fused), vocabulary padded to 50304, dropout 0;
  reference  a compact nanoGPT-style model written for this benchmark (bench/reference_gpt.py) with the same
             shapes, SDPA, padded vocabulary, fused AdamW, bf16 autocast and compile on a GPU;
  engine/raw the project's whole `Engine` loop (`gpt2_training.trainer.train(cfg)`, built-in corpus, its own
             data pipeline, clipping, schedule, NaN guard, logging) against a raw PyTorch loop with the same
             model, optimizer, schedule, clipping and (pre-tokenized) data; run interleaved `--repeats` times,
             the ratio of medians is the engine's overhead.

All rows clip gradients to norm 1.0. Throughput is timed over `--steps` steps after `--warmup` steps (compile
happens in the warm-up). Peak memory: on a GPU `torch.cuda.max_memory_allocated()` (reset before each row); on a
CPU the rise of the process's peak resident set size during the row (VmHWM from /proc/self/status, reset through
/proc/self/clear_refs before each row; falls back to the getrusage maxrss delta where that is unavailable).

    python bench/bench_training.py                       # CPU: tiny preset, ~1-2 minutes
    python bench/bench_training.py --device cuda --preset gpt2-small --seq_len 1024 --micro_batch 16
    python bench/bench_training.py --device cuda --memory_grid   # planner prediction vs measured peak
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

GPT2_VOCAB, GPT2_EOS = 50257, 50256
ROWS = ("seed", "recipe", "reference", "engine")


# -- measuring ------------------------------------------------------------------------------------------------------
from gpt2_training.hardware import PeakMemory, machine  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds for `steps` steps after `warmup` steps, seconds of the warm-up)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - t1, t1 - t0


def _row(
    name, what, tokens, seconds, n_params, cfg_shape, seq_len, precision, mem: PeakMemory, **extra
) -> dict:
    from gpt2_training.metrics import describe_mfu, flops_per_token

    tps = tokens / seconds
    mfu, mfu_text = describe_mfu(
        tps, flops_per_token(n_params, cfg_shape["n_layer"], cfg_shape["n_embd"], seq_len), precision
    )
    return {
        "name": name,
        "what": what,
        "tokens_per_s": tps,
        "step_time_s": seconds / max(extra.get("steps", 1), 1),
        "n_params": n_params,
        "precision": precision,
        "mfu": mfu,
        "mfu_text": mfu_text,
        "peak_memory_bytes": mem.bytes,
        "peak_memory_method": mem.method,
        **extra,
    }


def _reset_compile() -> None:
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def _amp_step(forward, params, opt, precision: str, device: torch.device, max_norm: float = 1.0):
    """One optimizer step as every row takes it: autocast forward in `precision`, backward through a GradScaler
    (active for fp16 only), clipping to `max_norm`, step; returns `step(x)`."""
    params = list(params)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def step(x):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = forward(x)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def _time_step(a, device, forward, params, opt, precision: str) -> tuple[float, float]:
    """`_timed` over `_amp_step` on one random micro-batch of GPT-2 token ids."""
    step = _amp_step(forward, params, opt, precision, device)
    x = torch.randint(0, GPT2_VOCAB, (a.micro_batch, a.seq_len), device=device)
    return _timed(lambda: step(x), device, a.warmup, a.steps)


def _step_row(name: str, what: str, a, shape, precision, mem, n_params, timing, compiled) -> dict:
    """The result row of a model-step measurement: `timing` is `_timed`'s (seconds, warm-up seconds)."""
    secs, warm = timing
    return _row(
        name,
        what,
        a.micro_batch * a.seq_len * a.steps,
        secs,
        n_params,
        shape,
        a.seq_len,
        precision,
        mem,
        steps=a.steps,
        warmup_s=warm,
        compiled=compiled,
    )


# -- rows -----------------------------------------------------------------------------------------------------------
def run_seed(a, device, shape) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_training.model import enable_activation_checkpointing

    torch.manual_seed(0)
    precision = "fp16" if device.type == "cuda" else "fp32"
    with PeakMemory(device) as mem:
        cfg = GPT2Config(
            vocab_size=GPT2_VOCAB,
            resid_pdrop=0.1,
            embd_pdrop=0.1,
            attn_pdrop=0.1,
            attn_implementation="eager",
            **shape,
        )
        lm = GPT2LMHeadModel(cfg).to(device)
        enable_activation_checkpointing(lm)
        lm.config.use_cache = False
        lm.train()
        opt = torch.optim.AdamW(lm.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
        timing = _time_step(
            a,
            device,
            lambda x: lm(input_ids=x, labels=x, use_cache=False).loss,
            lm.parameters(),
            opt,
            precision,
        )
    n = sum(p.numel() for p in lm.parameters())
    what = f"HF GPT2LMHeadModel, eager attn, checkpointing, dropout 0.1, vocab 50257, HF loss, AdamW, {precision}"
    return _step_row("seed", what, a, shape, precision, mem, n, timing, compiled=False)


def run_recipe(a, device, shape) -> dict:
    from gpt2_training.config import ModelArguments
    from gpt2_training.model import CausalLMWithLoss, build_model
    from gpt2_training.optim import build_optimizer
    from gpt2_training.precision import resolve_precision

    torch.manual_seed(0)
    precision, _ = resolve_precision("auto")
    compile_ = device.type == "cuda" and not a.no_compile
    with PeakMemory(device) as mem:
        margs = ModelArguments(preset=a.preset, n_positions=max(shape["n_positions"], a.seq_len))
        lm = build_model(margs, GPT2_VOCAB, GPT2_EOS).to(device)
        lm.config.use_cache = False
        model = CausalLMWithLoss(lm, "chunked").train()
        opt = build_optimizer(
            model,
            SimpleNamespace(
                optim="adamw_torch_fused",
                weight_decay=0.1,
                learning_rate=6e-4,
                adam_beta1=0.9,
                adam_beta2=0.95,
                adam_epsilon=1e-8,
            ),
        )
        fwd = torch.compile(model) if compile_ else model
        timing = _time_step(a, device, fwd, model.parameters(), opt, precision)
    n, vocab = sum(p.numel() for p in lm.parameters()), lm.config.vocab_size
    _reset_compile()
    what = (
        f"gpt2_training step: CausalLMWithLoss (chunked loss), SDPA, {precision}, "
        f"{'compiled, ' if compile_ else ''}fused AdamW, vocab {vocab}, dropout 0"
    )
    return _step_row("recipe", what, a, shape, precision, mem, n, timing, compiled=compile_)


def run_reference(a, device, shape) -> dict:
    from reference_gpt import ReferenceGPT

    from gpt2_training.precision import resolve_precision

    torch.manual_seed(0)
    precision, _ = resolve_precision("auto")
    compile_ = device.type == "cuda" and not a.no_compile
    with PeakMemory(device) as mem:
        model = ReferenceGPT(vocab_size=GPT2_VOCAB, **shape).to(device).train()
        opt = model.optimizer(fused=True)
        fwd = torch.compile(model) if compile_ else model
        timing = _time_step(a, device, fwd, model.parameters(), opt, precision)
    n = sum(p.numel() for p in model.parameters())
    _reset_compile()
    what = (
        f"compact nanoGPT-style model (bench/reference_gpt.py), SDPA, {precision}, "
        f"{'compiled, ' if compile_ else ''}fused AdamW, padded vocab"
    )
    return _step_row("reference", what, a, shape, precision, mem, n, timing, compiled=compile_)


def _engine_config(a, device, out_dir: str, total_steps: int):
    from gpt2_training.cli import parse_config

    return parse_config(
        [],
        preset=a.preset,
        n_positions=max(a.shape["n_positions"], a.seq_len),
        block_size=a.seq_len,
        per_device_train_batch_size=a.micro_batch,
        max_steps=total_steps,
        warmup_steps=1,
        logging_steps=total_steps,
        eval_steps=None,
        save_steps=0,
        tokenizer_vocab_size=a.engine_vocab,
        eval_max_sequences=a.micro_batch,
        sample_prompts=[],
        plot=False,
        save_final_model=False,
        output_dir=out_dir,
        resume="never",
        overwrite_output_dir=True,
        optim="adamw_torch_fused",
        torch_compile=device.type == "cuda" and not a.no_compile,
        report_to="none",
        precision="auto",
    )


def run_engine_once(a, device) -> dict:
    """One `trainer.train(cfg)` run; step timestamps come from wrapping Engine._read_step (one call per step)."""
    from gpt2_training import trainer

    total = a.warmup + a.engine_steps + 1
    stamps: list[float] = []
    original = trainer.Engine._read_step

    def stamped(self, n):
        if device.type == "cuda" and len(stamps) in (a.warmup, a.warmup + a.engine_steps):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return original(self, n)

    with (
        tempfile.TemporaryDirectory() as tmp,
        PeakMemory(device) as mem,
        contextlib.redirect_stdout(sys.stderr),
    ):
        cfg = _engine_config(a, device, tmp, total)
        trainer.Engine._read_step = stamped
        try:
            res = trainer.train(cfg)
        finally:
            trainer.Engine._read_step = original
    secs = stamps[a.warmup + a.engine_steps] - stamps[a.warmup]
    _reset_compile()
    return {
        "seconds": secs,
        "tokens": a.micro_batch * a.seq_len * a.engine_steps,
        "precision": res.precision,
        "memory": mem,
        "steps": res.step,
        "step_s": _step_times(stamps, a),
    }


def run_raw_once(a, device) -> dict:
    """The same model, optimizer, schedule, clipping and data, in a bare loop."""
    import numpy as np

    from gpt2_training.data import resolve_tokenizer, train_stream
    from gpt2_training.model import CausalLMWithLoss, build_model
    from gpt2_training.optim import build_optimizer, build_scheduler
    from gpt2_training.precision import resolve_precision

    total = a.warmup + a.engine_steps + 1
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(device) as mem:
        cfg = _engine_config(a, device, tmp, total)
        t = cfg.train
        torch.manual_seed(t.seed)
        tok = resolve_tokenizer(cfg.data, seed=t.seed)
        stream = train_stream(cfg.data, tok, t.seed)
        data = torch.from_numpy(
            np.stack([next(stream) for _ in range(total * a.micro_batch)]).astype(np.int64)
        )
        data = data.view(total, a.micro_batch, a.seq_len).to(device)
        torch.manual_seed(t.seed)
        lm = build_model(cfg.model, len(tok), tok.eos_token_id).to(device)
        lm.config.use_cache = False
        model = CausalLMWithLoss(lm, cfg.model.loss_impl).train()
        opt = build_optimizer(model, t)
        sched = build_scheduler(opt, t)
        fwd = torch.compile(model) if t.torch_compile else model
        precision, _ = resolve_precision(cfg.run.precision)
        step = _amp_step(fwd, model.parameters(), opt, precision, device, t.max_grad_norm)
        stamps = []
        for i in range(total):
            if i in (a.warmup, a.warmup + a.engine_steps):
                _sync(device)
            stamps.append(time.perf_counter())
            step(data[i])
            sched.step()
        _sync(device)
    secs = stamps[a.warmup + a.engine_steps] - stamps[a.warmup]
    n_params = sum(p.numel() for p in lm.parameters())
    _reset_compile()
    return {
        "seconds": secs,
        "tokens": a.micro_batch * a.seq_len * a.engine_steps,
        "precision": precision,
        "memory": mem,
        "n_params": n_params,
        "step_s": _step_times(stamps, a),
    }


def run_hf_trainer_once(a, device) -> dict:
    """`transformers.Trainer` with the same model (and loss), optimizer, schedule, clipping and pre-tokenized data:
    the alternative this project's loop was measured against."""
    import numpy as np
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gpt2_training.data import resolve_tokenizer, train_stream
    from gpt2_training.model import CausalLMWithLoss, build_model
    from gpt2_training.precision import resolve_precision

    class WithLossDict(torch.nn.Module):
        """Trainer expects a dict with a 'loss'; the model and its loss are the project's own."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return {"loss": self.inner(input_ids)}

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device.type == "cuda" and len(stamps) in (a.warmup, a.warmup + a.engine_steps):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    total = a.warmup + a.engine_steps + 1
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(device) as mem:
        cfg = _engine_config(a, device, tmp, total)
        t = cfg.train
        torch.manual_seed(t.seed)
        tok = resolve_tokenizer(cfg.data, seed=t.seed)
        stream = train_stream(cfg.data, tok, t.seed)
        rows = [torch.from_numpy(next(stream).astype(np.int64)) for _ in range(total * a.micro_batch)]
        torch.manual_seed(t.seed)
        lm = build_model(cfg.model, len(tok), tok.eos_token_id)
        lm.config.use_cache = False
        model = WithLossDict(CausalLMWithLoss(lm, cfg.model.loss_impl))
        precision, _ = resolve_precision(cfg.run.precision)
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=a.micro_batch,
            max_steps=total,
            learning_rate=t.learning_rate,
            weight_decay=t.weight_decay,
            adam_beta2=t.adam_beta2,
            max_grad_norm=t.max_grad_norm,
            warmup_steps=1,
            lr_scheduler_type="cosine",
            optim="adamw_torch_fused",
            logging_steps=10**9,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            torch_compile=t.torch_compile,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            seed=t.seed,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=[{"input_ids": r} for r in rows], callbacks=[Stamp()]
        )
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        _sync(device)
    secs = stamps[a.warmup + a.engine_steps] - stamps[a.warmup]
    _reset_compile()
    return {
        "seconds": secs,
        "tokens": a.micro_batch * a.seq_len * a.engine_steps,
        "precision": precision,
        "memory": mem,
        "step_s": _step_times(stamps, a),
    }


def _step_times(stamps: list[float], a) -> list[float]:
    timed = stamps[a.warmup : a.warmup + a.engine_steps + 1]
    return [b - x for x, b in zip(timed, timed[1:], strict=False)]


def run_engine_vs_raw(a, device, shape) -> list[dict]:
    engine, raw, hf = [], [], []
    for r in range(a.repeats):  # interleaved, alternating which goes first, to spread machine noise over both
        order = (run_engine_once, run_raw_once) if r % 2 == 0 else (run_raw_once, run_engine_once)
        for fn in order:
            (engine if fn is run_engine_once else raw).append(fn(a, device))
        if not a.no_hf_trainer:
            hf.append(run_hf_trainer_once(a, device))
    n = raw[0]["n_params"]
    rows = []
    what = {
        "engine": "gpt2_training.trainer.train(cfg): Engine loop with its data pipeline",
        "raw": "raw PyTorch loop, same model/optimizer/schedule/clipping, pre-tokenized data",
        "hf_trainer": "transformers.Trainer, same model/loss/optimizer/schedule/clipping, pre-tokenized data",
    }
    for name, runs in (("engine", engine), ("raw", raw), ("hf_trainer", hf)):
        if not runs:
            continue
        tps = [x["tokens"] / x["seconds"] for x in runs]
        best = runs[tps.index(statistics.median(tps))] if len(tps) % 2 else runs[0]
        row = _row(
            name,
            what[name],
            1,
            1 / statistics.median(tps),
            n,
            shape,
            a.seq_len,
            runs[0]["precision"],
            best["memory"],
            steps=a.engine_steps,
            repeats=a.repeats,
            tokens_per_s_runs=tps,
            vocab=f"built-in BPE {a.engine_vocab} (padded)",
        )
        row["step_time_s"] = a.micro_batch * a.seq_len / row["tokens_per_s"]
        rows.append(row)
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    pairs = [
        r["tokens"] / r["seconds"] / (e["tokens"] / e["seconds"]) for e, r in zip(engine, raw, strict=True)
    ]
    rows[0]["overhead_ratio"] = ratio  # raw tokens/s / engine tokens/s (1.0 = no overhead)
    rows[0]["overhead_ratio_pairs"] = pairs
    # robust to a few disturbed steps: the typical (median) step of each loop over all its runs
    med = {
        k: statistics.median([d for x in runs for d in x["step_s"]])
        for k, runs in (("e", engine), ("r", raw))
    }
    rows[0]["overhead_ratio_median_step"] = med["e"] / med["r"]
    rows[0]["median_step_s"], rows[1]["median_step_s"] = med["e"], med["r"]
    if hf:
        hf_step = statistics.median([d for x in hf for d in x["step_s"]])
        rows[2]["median_step_s"] = hf_step
        rows[2]["overhead_ratio_median_step"] = hf_step / med["r"]  # the Trainer's step vs the raw loop's
    return rows


# -- the memory grid ------------------------------------------------------------------------------------------------
# GPT-2 small, 1024-token sequences, bf16, unless a row says otherwise
_GRID_BASE = dict(config="gpt2-small", block_size=1024, precision="bf16")
GRID = [
    dict(_GRID_BASE, per_device_train_batch_size=8),
    dict(_GRID_BASE, per_device_train_batch_size=16),
    dict(_GRID_BASE, per_device_train_batch_size=8, loss_impl="hf"),
    dict(_GRID_BASE, per_device_train_batch_size=16, gradient_checkpointing=True),
    dict(_GRID_BASE, per_device_train_batch_size=8, precision="fp32"),
    dict(_GRID_BASE, per_device_train_batch_size=8, optim="adamw_8bit"),
    dict(_GRID_BASE, config="gpt2-medium", per_device_train_batch_size=8),
    dict(_GRID_BASE, config="gpt2-medium", per_device_train_batch_size=8, gradient_checkpointing=True),
]


def memory_grid(device: torch.device) -> list[dict]:
    from gpt2_training.planner import GIB, measure_peak_memory, plan_memory

    rows = []
    for g in GRID:
        plan = plan_memory(**g)
        row = {**g, "predicted_peak_gib": plan.peak / GIB, "measured_peak_gib": None, "ratio": None}
        if device.type == "cuda":
            if g.get("optim") == "adamw_8bit":
                try:
                    import bitsandbytes  # noqa: F401
                except ImportError:
                    row["note"] = "bitsandbytes not installed"
                    rows.append(row)
                    continue
            try:
                m = measure_peak_memory(**g, steps=3)
                row["measured_peak_gib"] = m["peak_allocated_gib"]
                row["ratio"] = row["measured_peak_gib"] / row["predicted_peak_gib"]
            except torch.cuda.OutOfMemoryError:
                row["note"] = "OOM"
                torch.cuda.empty_cache()
        else:
            row["note"] = "measured: needs a CUDA GPU"
        rows.append(row)
        print(f"[grid] {row}", file=sys.stderr, flush=True)
    return rows


# -- reporting ------------------------------------------------------------------------------------------------------
def _fmt_bytes(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def markdown(result: dict) -> str:
    a = result["settings"]
    lines = [
        f"## Training throughput ({result['device']}, {a['preset']}, micro-batch {a['micro_batch']} x seq "
        f"{a['seq_len']})",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['usable_cpus']} usable CPUs"
        + (f", GPU {result['machine']['gpu']}" if result["machine"]["gpu"] else "")
        + f", torch {result['machine']['torch']} ({result['machine']['torch_threads']} intra-op threads). "
        f"Peak memory: {result['rows'][0]['peak_memory_method']}.",
        "",
        "| row | what | tokens/s | ms/step | MFU | peak memory |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else r["mfu_text"]
        lines.append(
            f"| {r['name']} | {r['what']} | {r['tokens_per_s']:,.0f} | {1000 * r['step_time_s']:.1f} | "
            f"{mfu} | {_fmt_bytes(r['peak_memory_bytes'])} |"
        )
    eng = next((r for r in result["rows"] if "overhead_ratio" in r), None)
    if eng:
        raw_step = next(r for r in result["rows"] if r["name"] == "raw")["median_step_s"]
        lines += [
            "",
            f"Engine overhead (raw tokens/s / engine tokens/s, median of {eng['repeats']} interleaved "
            f"runs): **{eng['overhead_ratio']:.3f}x** (per pair: "
            + ", ".join(f"{x:.3f}" for x in eng["overhead_ratio_pairs"])
            + "; goal <= 1.1x); median step "
            f"{1000 * eng['median_step_s']:.2f} ms vs {1000 * raw_step:.2f} ms raw "
            f"= **{eng['overhead_ratio_median_step']:.3f}x**",
        ]
    hf_row = next((r for r in result["rows"] if r["name"] == "hf_trainer"), None)
    if hf_row:
        lines.append(
            f"transformers.Trainer, same model and data: median step {1000 * hf_row['median_step_s']:.2f} ms "
            f"= **{hf_row['overhead_ratio_median_step']:.3f}x** the raw loop's"
        )
    if result.get("memory_grid"):
        lines += [
            "",
            "### Memory planner vs measured peak (torch.cuda.max_memory_allocated)",
            "",
            "| config | predicted GiB | measured GiB | measured / predicted |",
            "|---|---:|---:|---:|",
        ]
        for g in result["memory_grid"]:
            desc = ", ".join(
                f"{k}={v}"
                for k, v in g.items()
                if k not in ("predicted_peak_gib", "measured_peak_gib", "ratio", "note")
            )
            meas = (
                f"{g['measured_peak_gib']:.2f}"
                if g["measured_peak_gib"] is not None
                else g.get("note", "n/a")
            )
            ratio = f"{g['ratio']:.2f}" if g["ratio"] is not None else "n/a"
            lines.append(f"| {desc} | {g['predicted_peak_gib']:.2f} | {meas} | {ratio} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--preset", default=None, help="default: tiny on a CPU, gpt2-small on a GPU")
    p.add_argument("--seq_len", type=int, default=None, help="default: 64 on a CPU, 1024 on a GPU")
    p.add_argument("--micro_batch", type=int, default=None, help="default: 8 on a CPU, 16 on a GPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 4 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 5 GPU)")
    p.add_argument(
        "--engine_steps", type=int, default=None, help="timed steps per engine/raw run (20 CPU, 30 GPU)"
    )
    p.add_argument("--repeats", type=int, default=None, help="interleaved engine/raw pairs (3 CPU, 1 GPU)")
    p.add_argument("--engine_vocab", type=int, default=1024, help="built-in BPE size for the engine/raw rows")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--no_compile", action="store_true", help="never torch.compile (GPU)")
    p.add_argument("--no_hf_trainer", action="store_true", help="skip the transformers.Trainer row")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice); on a shared CPU, 1 avoids OpenMP threads "
        "waiting for a descheduled sibling, which makes small steps 10-30x slower at random",
    )
    p.add_argument("--memory_grid", action="store_true", help="also planner-predicted vs measured peak (GPU)")
    p.add_argument(
        "--out",
        default=None,
        help="JSON path (default bench/results/training-<device>.json); the Markdown table goes next to it",
    )
    a = p.parse_args(argv)
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU visible")
    a.device = "cuda" if cuda else "cpu"
    a.preset = a.preset or ("gpt2-small" if cuda else "tiny")
    a.seq_len = a.seq_len or (1024 if cuda else 64)
    a.micro_batch = a.micro_batch or (16 if cuda else 8)
    a.steps = a.steps or (20 if cuda else 4)
    a.warmup = a.warmup if a.warmup is not None else (5 if cuda else 1)
    a.engine_steps = a.engine_steps or (30 if cuda else 20)
    a.repeats = a.repeats or (1 if cuda else 3)
    return a


def main(argv=None) -> dict:
    from gpt2_training.config import PRESETS

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    shape = dict(PRESETS[a.preset])
    shape["n_positions"] = max(shape["n_positions"], a.seq_len)
    a.shape = shape
    wanted = [r.strip() for r in a.rows.split(",") if r.strip()]
    t0 = time.perf_counter()
    rows = []
    runners = {"seed": run_seed, "recipe": run_recipe, "reference": run_reference}
    for name in wanted:
        t = time.perf_counter()
        if name == "engine":
            rows += run_engine_vs_raw(a, device, shape)
        elif name in runners:
            rows.append(runners[name](a, device, shape))
        else:
            raise SystemExit(f"unknown row {name!r}: choose from {', '.join(ROWS)}")
        print(f"[bench] {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    recipe = next((r for r in rows if r["name"] == "recipe"), None)
    for r in rows:
        if recipe and r["name"] in ("seed", "reference"):
            r["vs_recipe"] = r["tokens_per_s"] / recipe["tokens_per_s"]
    result = {
        "benchmark": "training",
        "device": a.device,
        "machine": machine(),
        "settings": {k: v for k, v in vars(a).items() if k != "shape"},
        "rows": rows,
    }
    if a.memory_grid:
        result["memory_grid"] = memory_grid(device)
    result["wall_s"] = time.perf_counter() - t0
    out = Path(a.out or ROOT / "bench" / "results" / f"training-{a.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
