"""Presentation for `GPT-2-From-Scratch.ipynb`: the run profiles (how big each step is on this hardware), tables
and plots. The lesson itself (config, streaming, packing, the training loop) is written out in the notebook."""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import hardware
from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE_ENV = "GPT2_TUTORIAL_PROFILE"  # names a profile explicitly (the notebook test sets "tiny")
OUTPUT_ENV = "GPT2_TUTORIAL_OUTPUT_DIR"  # where the notebook's files go (default: runs/tutorial-<profile>)
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

# Sizes only: every setting that teaches something is written in the notebook's cells. `main_dataset` is the
# data of the longer run (section 10): "builtin", or the parquet shards of section 5 read by `datasets`
# ("parquet"), or OpenWebText streamed from the Hub, chosen by `choose_profile` when the Hub is reachable.
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {
        "description": "a 2-layer, 64-wide GPT-2 and a few steps per run: what the tests execute",
        "model": dict(preset="tiny"),
        "tokenizer_vocab_size": 1024,
        "block_size": 32,
        "micro_batch": 4,
        "accumulation": 2,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "hand_steps": 4,
        "main_dataset": "builtin",
        "main_steps": 12,
        "eval_steps": 6,
        "logging_steps": 2,
        "trainer_steps": 2,
        "eval_max_sequences": 8,
        "packing_documents": 20,
        "sample_max_new_tokens": 16,
    },
    "laptop": {
        "description": "make train's 4-layer, 192-wide GPT-2 trained on the built-in corpus in minutes on a CPU",
        "model": dict(preset="mini", n_embd=192, n_positions=128),
        "tokenizer_vocab_size": 4096,
        "block_size": 128,
        "micro_batch": 8,
        "accumulation": 2,
        "learning_rate": 2e-3,
        "warmup_steps": 4,
        "hand_steps": 30,
        "main_dataset": "builtin",
        "main_steps": 400,
        "eval_steps": 100,
        "logging_steps": 20,
        "trainer_steps": 10,
        "eval_max_sequences": 128,
        "packing_documents": 200,
        "sample_max_new_tokens": 48,
    },
    "gpu": {
        "description": "GPT-2 small (124 M) with 1024-token sequences on one GPU",
        "model": dict(preset="gpt2-small"),
        "tokenizer_vocab_size": 8192,
        "block_size": 1024,
        "micro_batch": 16,
        "accumulation": 4,
        "learning_rate": 6e-4,
        "warmup_steps": 20,
        "hand_steps": 30,
        "main_dataset": "openwebtext",
        # 4,500 steps x 65,536 tokens = 295 M tokens: about 25 minutes at 200 K tokens/s (an estimate; the
        # notebook's section 10 says where it comes from)
        "main_steps": 4500,
        "eval_steps": 500,
        "logging_steps": 50,
        "trainer_steps": 20,
        "eval_max_sequences": 256,
        "packing_documents": 200,
        "sample_max_new_tokens": 48,
    },
}
MAIN_DATA_TEXT = {
    "builtin": "the built-in corpus",
    "parquet": "the parquet shards of section 5 (OpenWebText needs the Hugging Face Hub)",
    "openwebtext": "OpenWebText, streamed from the Hugging Face Hub",
}


def reachable(host: str, timeout_s: float = 3.0) -> bool:
    """A TCP connection to host:443 opens within the timeout (DNS alone says nothing behind a firewall)."""
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def choose_profile(name: str | None = None, *, verbose: bool = True) -> dict[str, Any]:
    """The notebook's settings: `name`, else $GPT2_TUTORIAL_PROFILE, else the hardware (a CUDA GPU: `gpu`,
    otherwise `laptop`); plus what this machine can do (mixed precision, network). Prints what it found."""
    import torch
    from huggingface_hub import try_to_load_from_cache

    from .precision import bf16_supported

    cuda = torch.cuda.is_available()
    chosen = name or os.environ.get(PROFILE_ENV) or ("gpu" if cuda else "laptop")
    if chosen not in PROFILES:
        raise ConfigError(f"unknown tutorial profile {chosen!r}: choose one of {', '.join(PROFILES)}")
    if name or os.environ.get(PROFILE_ENV):
        why = f"named explicitly ({PROFILE_ENV}={chosen})" if not name else "named explicitly"
    else:
        why = "a CUDA GPU is present" if cuda else "no CUDA GPU, so a model small enough to train on this CPU"
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_ENV)
    hub = not offline and reachable("huggingface.co")
    profile = {
        **json.loads(json.dumps(PROFILES[chosen])),
        "name": chosen,
        "why": why,
        "hardware": hardware.describe(),
        "device": "cuda" if cuda else "cpu",
        # bf16 where the hardware has it natively; fp16 (with loss scaling) on older GPUs; else fp32
        "mixed_precision": "bf16" if bf16_supported() else "fp16" if cuda else None,
        "hub_reachable": hub,
        "activeloop_reachable": reachable("app.activeloop.ai"),
        "gpt2_tokenizer": hub or isinstance(try_to_load_from_cache("gpt2", "tokenizer.json"), str),
        "output_root": str(Path(os.environ.get(OUTPUT_ENV) or REPO_ROOT / "runs" / f"tutorial-{chosen}")),
    }
    if profile["main_dataset"] == "openwebtext" and not hub:
        # the same datasets streaming code, on the local parquet shards that section 5 writes
        profile["main_dataset"] = "parquet"
    if not cuda:
        # DeepSpeed (imported by transformers.Trainer when installed) otherwise logs its accelerator guess
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if verbose:
        yes_no = {True: "yes", False: "no"}
        print(
            f"profile: {chosen} - {profile['description']}\nwhy: {why}\nhardware: {profile['hardware']}\n"
            f"mixed precision: {profile['mixed_precision'] or 'none (fp32)'}\n"
            f"Hugging Face Hub reachable: {yes_no[hub]}; Activeloop reachable: "
            f"{yes_no[profile['activeloop_reachable']]}; GPT-2 tokenizer available: "
            f"{yes_no[profile['gpt2_tokenizer']]}\nthe longer run (section 10) trains on: "
            f"{MAIN_DATA_TEXT[profile['main_dataset']]}\nfiles go to {_shown(Path(profile['output_root']))}"
        )
    return profile


def _shown(p: Path) -> str:
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


# -- tables ---------------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """Rows shown as a Markdown table in Jupyter and as aligned text elsewhere."""

    rows: list[dict[str, Any]]
    caption: str = ""

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        return cols, [[_fmt(r.get(c)) for c in cols] for r in self.rows]

    def _repr_markdown_(self) -> str:
        cols, cells = self._cells()
        lines = [f"**{self.caption}**", ""] if self.caption else []
        lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines)

    def __repr__(self) -> str:
        cols, cells = self._cells()
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
        lines = [self.caption] if self.caption else []
        for row in [cols, *cells]:
            lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v) or v == 0:
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 0.01 else f"{v:.3g}"


def memory_table(
    presets: Iterable[str] = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"), **plan: Any
) -> Table:
    """GiB that one GPU holds while training each preset (`planner.plan_memory`). The columns add up to the
    total: the peak of the forward/backward pass plus the CUDA context."""
    from .planner import GIB, plan_memory

    rows = []
    for name in presets:
        p = plan_memory(name, **plan)
        if p.optimizer_step_peak > p.forward_backward_peak:
            raise ValueError(f"{name}: the optimizer step is the peak here; these columns would not add up")
        parts = {
            "weights": p.weights + p.master_weights,
            "gradients": p.gradients,
            "AdamW states": p.optimizer_states,
            "activations": p.activations + p.autocast_weight_copies,
            "loss head": p.loss_head,
            "workspace": p.workspace,
            "CUDA context": p.cuda_context,
        }
        rows.append({"preset": name, **{k: v / GIB for k, v in parts.items()}, "total": p.total / GIB})
    settings = ", ".join(f"{k}={v}" for k, v in plan.items())
    return Table(rows, caption=f"GiB per GPU ({settings}; gpt2_training.planner)")


def benchmark_table(results_dir: Path = REPO_ROOT / "bench" / "results") -> Table:
    """The engine, a raw PyTorch loop and transformers.Trainer side by side, from the committed benchmark: the
    median step of each (the figure its report compares) and its ratio to the raw loop's."""
    path = sorted(results_dir.glob("cpu-*.json"))[0]
    record = json.loads(path.read_text())
    train = {r["name"]: r for r in record["training"]["rows"]}
    raw_ms = 1000 * train["raw"]["median_step_s"]
    rows = [
        {
            "loop": name,
            "what": train[name]["what"],
            "median step (ms)": 1000 * train[name]["median_step_s"],
            "vs raw loop": 1000 * train[name]["median_step_s"] / raw_ms,
        }
        for name in ("raw", "engine", "hf_trainer")
    ]
    m, s = record["machine"], record["training"]["settings"]
    return Table(
        rows,
        caption=f"{_shown(path)}: {m['cpu']}, {m['usable_cpus']} cores, {s['threads']} torch thread, torch "
        f"{m['torch']}; {s['preset']} preset ({train['engine']['n_params']:,} parameters), micro-batch "
        f"{s['micro_batch']} x {s['seq_len']} tokens, median of {s['repeats']} runs",
    )


# -- plots ----------------------------------------------------------------------------------------------------------
def read_log(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected (TensorBoard's smoothing) so the start is not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_run(result, args, title: str):
    """Three panels: training loss (raw and smoothed) with the held-out points; the learning rate the
    schedule gives each step, with the values the run logged; tokens/s per logging window."""
    import matplotlib.pyplot as plt
    import torch

    from .optim import build_scheduler

    log = read_log(result.output_dir)
    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(1, 3, figsize=(15, 3.8))
    steps = range(1, len(result.losses) + 1)
    ax_loss.plot(steps, result.losses, lw=0.8, alpha=0.4, label="train loss (every step)")
    ax_loss.plot(steps, smooth(result.losses), lw=1.6, label="train loss (smoothed)")
    evals = [(r["step"], r["eval_loss"]) for r in log if r.get("event") == "eval"]
    ax_loss.plot(*zip(*evals, strict=True), "o", label="held-out loss")
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy (nats / token)", title="loss")
    # The schedule itself, stepped on a throw-away optimizer: warmup, then cosine decay to 0 at max_steps.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    sched = build_scheduler(optimizer, args)
    lrs, kind = [], getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    for _ in range(args.max_steps):
        lrs.append(sched.get_last_lr()[0])
        optimizer.step()
        sched.step()
    ax_lr.plot(range(1, args.max_steps + 1), lrs, label=f"{kind}, warmup {args.warmup_steps}")
    logged = [(r["step"], r["lr"]) for r in log if r.get("event") == "train"]
    ax_lr.plot(*zip(*logged, strict=True), ".", label="logged by the run")
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning-rate schedule")
    tps = [(r["step"], r["tokens_per_s"]) for r in log if r.get("event") == "train"]
    ax_tps.plot(*zip(*tps, strict=True), ".-")
    ax_tps.set(
        xlabel="optimizer step", ylabel="tokens / s", title="throughput per logging window", ylim=(0, None)
    )
    for ax in (ax_loss, ax_lr, ax_tps):
        ax.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_lr_sweep(results: Mapping[float, Any], title: str):
    """Training loss per step for each learning rate; the y-axis stops at 1.5x the starting loss, so a
    diverging run leaves the plot instead of flattening the others."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for lr, res in results.items():
        label = f"lr {lr:g}: held-out loss {res.final_eval['eval_loss']:.2f}"
        ax.plot(range(1, len(res.losses) + 1), res.losses, lw=1.2, label=label)
    finite = [x for res in results.values() for x in res.losses if math.isfinite(x)]
    ax.set_ylim(min(finite) - 0.3, 1.5 * max(res.losses[0] for res in results.values()))
    ax.set(xlabel="optimizer step", ylabel="training loss (nats / token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
