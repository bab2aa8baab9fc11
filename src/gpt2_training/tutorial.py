"""Helpers for the `GPT-2-From-Scratch.ipynb` tutorial: run profiles, side-by-side measurements of the training
techniques, data previews with an offline fallback, tables and plots, so that every notebook cell stays short.

The notebook's settings cell calls `choose_profile()`; every size and setting a later cell uses comes from the
profile it returns, so no other cell needs to look at the hardware or the network.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import io
import json
import math
import os
import shlex
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE_ENV = "GPT2_TUTORIAL_PROFILE"  # names a profile explicitly (the tests set "tiny")
OUTPUT_ENV = "GPT2_TUTORIAL_OUTPUT_DIR"  # where the notebook's runs go (default: runs/tutorial-<profile>)
MIB = 1 << 20

# Settings that only make a measurement run quieter and cheaper; they change neither speed nor memory per step.
_QUICK_RUN = dict(
    save_steps=0,
    save_final_model=False,
    plot=False,
    resume="never",
    overwrite_output_dir=True,
    report_to="none",
    eval_steps=0,
)

# The technique variants of section 5. Each is a change to the profile's `techniques` base settings; the base is
# fp32 AdamW with clipping, warmup and cosine, so each row shows what one switch does on its own.
TECHNIQUES: dict[str, dict[str, Any]] = {
    "baseline: fp32, AdamW, clip 1.0, warmup + cosine": {},
    "mixed precision (bf16 autocast)": {"precision": "bf16"},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "accumulation: half micro-batch x 2": {
        "per_device_train_batch_size": 0.5,
        "gradient_accumulation_steps": 2,
    },
    "8-bit AdamW (bitsandbytes)": {"optim": "adamw_bnb_8bit"},
    "no gradient clipping": {"max_grad_norm": 0.0},
    "no warmup, constant learning rate": {"warmup_steps": 0, "lr_scheduler_type": "constant"},
}

# Section 8's slow run: tiny micro-batches made up by accumulation, the unfused attention and the loss that
# builds the whole [tokens, vocab] logits; then one cure at a time, and all of them together. The effective batch
# (micro-batch x accumulation) is the same in every row, so every row does the same work per optimizer step.
SLOW_RUN: dict[str, Any] = {
    "per_device_train_batch_size": 0.125,
    "gradient_accumulation_steps": 8,
    "attn_implementation": "eager",
    "loss_impl": "hf",
}
_FULL_BATCH = {"per_device_train_batch_size": 1.0, "gradient_accumulation_steps": 1}
SLOW_RUN_CURES: dict[str, dict[str, Any]] = {
    "slow: micro-batch 1/8 x 8 accumulation, eager attention, full-logits loss": SLOW_RUN,
    "cure 1: whole batch in one micro-batch": {**SLOW_RUN, **_FULL_BATCH},
    "cure 2: SDPA attention kernel": {**SLOW_RUN, "attn_implementation": "sdpa"},
    "cure 3: chunked fused loss": {**SLOW_RUN, "loss_impl": "chunked"},
    "cures 1-3 + fused AdamW": {**_FULL_BATCH, "optim": "adamw_torch_fused"},
}


def _common(vocab: int, block: int, batch: int, lr: float) -> dict[str, Any]:
    return dict(
        dataset="builtin",
        tokenizer="train",
        tokenizer_vocab_size=vocab,
        block_size=block,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        learning_rate=lr,
        weight_decay=0.1,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        seed=1337,
        report_to="none",
        sample_prompts=["The", "Return the"],
        precision="auto",
        plot=False,
    )


PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {
        "description": "the smallest preset (2 layers, 64 wide) for seconds per run: what the tests execute",
        "base": {
            **_common(1024, 64, 8, 3e-3),
            "preset": "tiny",
            "eval_max_sequences": 16,
            "sample_max_new_tokens": 16,
        },
        "main_run": {
            "max_steps": 40,
            "warmup_steps": 4,
            "logging_steps": 5,
            "eval_steps": 20,
            "save_steps": 20,
        },
        "techniques": {"max_steps": 6, "precision": "fp32", "warmup_steps": 2},
        "slow_run": {"max_steps": 4, "precision": "fp32", "warmup_steps": 1},
        "lr_sweep": {
            "learning_rates": [1e-5, 3e-3, 1.0],
            "max_steps": 24,
            "logging_steps": 1,
            "warmup_steps": 2,
            "eval_steps": 0,
            "precision": "fp32",
        },
        "launch": {
            "max_steps": 4,
            "logging_steps": 2,
            "eval_steps": 0,
            "warmup_steps": 1,
            "save_steps": 4,
            "precision": "fp32",
            "eval_max_sequences": 8,
            "sample_max_new_tokens": 8,
        },
        "memory_table": {"micro_batch": 8, "seq_len": 1024, "precision": "bf16"},
        "measurement_repeats": 1,
        "preview_documents": 2,
        "generate": {"prompt": "The", "max_new_tokens": 20},
        "device": "cpu",
    },
    "laptop": {
        "description": "a 4-layer, 128-wide GPT-2 trained on the built-in corpus in minutes on a laptop CPU",
        "base": {
            **_common(4096, 128, 16, 3e-3),
            "preset": "mini",
            "n_layer": 4,
            "n_head": 4,
            "n_embd": 128,
            "n_positions": 128,
            "eval_max_sequences": 64,
            "sample_max_new_tokens": 40,
        },
        "main_run": {
            "max_steps": 300,
            "warmup_steps": 30,
            "logging_steps": 10,
            "eval_steps": 100,
            "save_steps": 100,
        },
        "techniques": {"max_steps": 10, "precision": "fp32", "warmup_steps": 2},
        "slow_run": {"max_steps": 4, "precision": "fp32", "warmup_steps": 1},
        "lr_sweep": {
            "learning_rates": [1e-5, 3e-3, 1.0],
            "max_steps": 40,
            "per_device_train_batch_size": 8,
            "logging_steps": 2,
            "warmup_steps": 4,
            "eval_steps": 0,
            "precision": "fp32",
        },
        "launch": {
            "preset": "tiny",
            "n_layer": None,
            "n_head": None,
            "n_embd": None,
            "n_positions": None,
            "tokenizer_vocab_size": 1024,
            "block_size": 64,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 8,
            "max_steps": 8,
            "logging_steps": 4,
            "eval_steps": 0,
            "save_steps": 8,
            "precision": "fp32",
            "warmup_steps": 2,
            "eval_max_sequences": 16,
            "sample_max_new_tokens": 16,
        },
        "memory_table": {"micro_batch": 8, "seq_len": 1024, "precision": "bf16"},
        "measurement_repeats": 2,
        "preview_documents": 2,
        "generate": {"prompt": "The", "max_new_tokens": 40},
        "device": "cpu",
    },
    "gpu": {
        "description": "GPT-2 small (124 M) on OpenWebText with bf16 and torch.compile, on one GPU",
        "base": {
            **_common(8192, 1024, 16, 6e-4),
            "preset": "gpt2-small",
            "dataset": "openwebtext",
            "tokenizer": "gpt2",
            "eval_max_sequences": 256,
            "sample_max_new_tokens": 48,
            "optim": "adamw_torch_fused",
        },
        "main_run": {
            "max_steps": 2000,
            "gradient_accumulation_steps": 4,
            "warmup_steps": 200,
            "logging_steps": 25,
            "eval_steps": 250,
            "save_steps": 500,
            "torch_compile": True,
        },
        "techniques": {
            "max_steps": 20,
            "precision": "fp32",
            "warmup_steps": 5,
            "per_device_train_batch_size": 8,
            "optim": "adamw_torch",
            "eval_max_sequences": 32,
        },
        "slow_run": {
            "max_steps": 10,
            "precision": "bf16",
            "warmup_steps": 2,
            "per_device_train_batch_size": 8,
            "eval_max_sequences": 32,
        },
        "lr_sweep": {
            "learning_rates": [1e-6, 6e-4, 1e-1],
            "max_steps": 200,
            "logging_steps": 5,
            "warmup_steps": 20,
            "eval_steps": 0,
            "eval_max_sequences": 32,
        },
        "launch": {
            "preset": "tiny",
            "dataset": "builtin",
            "tokenizer": "train",
            "tokenizer_vocab_size": 1024,
            "block_size": 64,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 8,
            "max_steps": 10,
            "logging_steps": 5,
            "eval_steps": 0,
            "save_steps": 10,
            "precision": "fp32",
            "warmup_steps": 2,
            "eval_max_sequences": 16,
            "sample_max_new_tokens": 16,
            "optim": "adamw_torch",
        },
        "memory_table": {"micro_batch": 8, "seq_len": 1024, "precision": "bf16"},
        "measurement_repeats": 2,
        "preview_documents": 2,
        "generate": {"prompt": "The meaning of life is", "max_new_tokens": 48},
        "device": "cuda",
    },
}


# -- the profile ----------------------------------------------------------------------------------------------------
def describe_hardware() -> str:
    """One line naming the accelerator (or CPU) and its memory, for the committed outputs."""
    import platform

    import psutil
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / (1 << 30):.0f} GiB)"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"CPU only: {cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )


def _hub_reachable() -> bool:
    if any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return False
    import socket

    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True


def choose_profile(name: str | None = None, *, verbose: bool = True) -> dict[str, Any]:
    """The notebook's profile: `name`, else the one named by $GPT2_TUTORIAL_PROFILE, else one for this hardware
    (a GPU: `gpu`; a CPU: `laptop`). Prints what it chose and why; returns a deep copy the caller may edit."""
    import torch

    name = name or os.environ.get(PROFILE_ENV) or None
    if name:
        if name not in PROFILES:
            raise ConfigError(f"unknown tutorial profile {name!r}: choose one of {', '.join(PROFILES)}")
        why = (
            f"named explicitly ({PROFILE_ENV}={name})"
            if os.environ.get(PROFILE_ENV) == name
            else "named explicitly"
        )
    elif torch.cuda.is_available():
        name, why = "gpu", f"a CUDA GPU is present ({torch.cuda.get_device_name(0)})"
    else:
        name, why = "laptop", "no CUDA GPU, so a model small enough to train on this CPU in minutes"
    profile = copy.deepcopy(PROFILES[name])
    profile.update(name=name, why=why, hardware=describe_hardware())
    notes = []
    if profile["base"]["dataset"] == "openwebtext" and not _hub_reachable():
        # The same run on text that needs no network: the built-in corpus and a BPE trained on it.
        profile["base"].update(dataset="builtin", tokenizer="train")
        notes.append("the Hugging Face Hub is not reachable, so the built-in corpus replaces OpenWebText")
    from .cli import parse_config

    parse_config(
        [], **profile["base"]
    )  # a misspelt setting fails here, in the settings cell, not in section 6
    profile["output_root"] = str(Path(os.environ.get(OUTPUT_ENV) or REPO_ROOT / "runs" / f"tutorial-{name}"))
    profile["launch_env"] = {"CUDA_VISIBLE_DEVICES": ""}  # the 2-process demo always runs on the CPU (gloo)
    profile["notes"] = notes
    if verbose:
        print(f"profile: {name} - {profile['description']}\nwhy: {why}\nhardware: {profile['hardware']}")
        for n in notes:
            print(f"note: {n}")
        print(f"runs are written under {profile['output_root']}")
    return profile


def settings_for(
    profile: Mapping[str, Any], part: str | None, run_name: str, **overrides: Any
) -> dict[str, Any]:
    """train.py settings for one run of the notebook: the profile's base, then its `part` (e.g. "main_run"), then
    `overrides`; a None value removes a setting (back to train.py's default). Output goes to output_root/run_name."""
    extra = {k: v for k, v in profile[part].items() if k != "learning_rates"} if part else {}
    settings = {**profile["base"], **extra, **overrides}
    settings = {k: v for k, v in settings.items() if v is not None}
    settings["output_dir"] = str(Path(profile["output_root"]) / run_name)
    settings.setdefault("resume", "never")
    settings.setdefault("overwrite_output_dir", True)
    return settings


# -- tables ---------------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """Rows shown as a Markdown table in Jupyter and as aligned text elsewhere (and in nbval's comparison)."""

    rows: list[dict[str, Any]]
    columns: list[str] | None = None
    caption: str = ""

    def _cols(self) -> list[str]:
        if self.columns:
            return self.columns
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        return cols

    @staticmethod
    def _fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if not math.isfinite(v) or v == 0:
                return str(v)
            a = abs(v)
            return (
                f"{v:,.0f}"
                if a >= 100
                else f"{v:.1f}"
                if a >= 10
                else f"{v:.3f}".rstrip("0").rstrip(".")
                if a >= 0.01
                else f"{v:.3g}"
            )
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        cols = self._cols()
        return cols, [[self._fmt(r.get(c)) for c in cols] for r in self.rows]

    def _repr_markdown_(self) -> str:
        cols, cells = self._cells()
        lines = [f"**{self.caption}**", ""] if self.caption else []
        lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines)

    def __repr__(self) -> str:
        cols, cells = self._cells()
        widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(cols)]
        lines = [self.caption] if self.caption else []
        lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
        return "\n".join(lines)


# -- section 2: model configuration -----------------------------------------------------------------------------------
def parameter_table(presets: Sequence[str] = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")) -> Table:
    """Shape and parameter count of each preset with GPT-2's vocabulary (50257 tokens, padded to 50304)."""
    from .model import count_parameters
    from .planner import resolve_config

    rows = []
    for name in presets:
        c = resolve_config(name)
        rows.append(
            {
                "preset": name,
                "n_layer": c.n_layer,
                "n_head": c.n_head,
                "n_embd": c.n_embd,
                "head dim": c.n_embd // c.n_head,
                "n_positions": c.n_positions,
                "vocab_size": c.vocab_size,
                "parameters": f"{count_parameters(c) / 1e6:.1f} M",
            }
        )
    return Table(rows, caption="GPT-2 presets (tied input/output embeddings)")


def memory_table(
    presets: Sequence[str] = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"),
    *,
    micro_batch: int = 8,
    seq_len: int = 1024,
    precision: str = "bf16",
    optimizer: str = "adamw",
) -> Table:
    """What one GPU holds while training each preset, from `planner.plan_memory` (GiB)."""
    from .planner import GIB, plan_memory

    rows = []
    for name in presets:
        p = plan_memory(
            name, micro_batch=micro_batch, seq_len=seq_len, precision=precision, optimizer=optimizer
        )
        rows.append(
            {
                "preset": name,
                "weights": p.weights / GIB,
                "gradients": p.gradients / GIB,
                "optimizer states": p.optimizer_states / GIB,
                "activations": (p.activations + p.autocast_weight_copies) / GIB,
                "loss head": p.loss_head / GIB,
                "total per GPU": p.total / GIB,
            }
        )
    return Table(
        rows,
        caption=f"GiB per GPU: micro-batch {micro_batch} x {seq_len} tokens, {precision} autocast, "
        f"{optimizer}, no checkpointing (gpt2_training.planner)",
    )


def config_problems(**settings: Any) -> list[str]:
    """The problems `config.validate` reports for these settings (empty when they are valid)."""
    from .cli import parse_config
    from .config import validate

    try:
        validate(parse_config([], **settings), cuda_available=False, bf16_ok=False)
    except ConfigError as exc:
        return exc.problems
    return []


# -- section 3: tokenizers ------------------------------------------------------------------------------------------
def try_gpt2_tokenizer(name: str = "gpt2"):
    """GPT-2's own BPE from the Hub (or the local cache), or None with a plain explanation when it is unavailable."""
    from .data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(name)
    except ConfigError as exc:
        print(
            f"GPT-2's tokenizer ({name!r}) is not available here: {exc}\n"
            "-> falling back to a BPE trained on the built-in corpus (next cell); with network access this "
            "cell loads GPT-2's 50,257-token vocabulary instead."
        )
        return None
    print(f"loaded {name!r}: {len(tok):,} tokens, end-of-text id {tok.eos_token_id}")
    return tok


def profile_tokenizer(profile: Mapping[str, Any]):
    """The tokenizer the profile's runs use (trained on the built-in corpus and cached, or GPT-2's)."""
    from .cli import parse_config
    from .data import resolve_tokenizer

    cfg = parse_config([], **profile["base"])
    return resolve_tokenizer(cfg.data, seed=cfg.train.seed)


def show_tokens(tokenizer, text: str) -> list[str]:
    """The pieces `text` is cut into (byte-level BPE marks a leading space as 'Ġ')."""
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)


def round_trip(tokenizer, texts: Sequence[str]) -> None:
    """Prints whether decode(encode(text)) gives back every text exactly; a byte-level BPE must, for any text."""
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        back = tokenizer.decode(ids)
        print(f"{'exact' if back == text else 'CHANGED'}: {text!r}")


# -- section 4: data ------------------------------------------------------------------------------------------------
@dataclass
class Preview:
    requested: str
    used: str
    description: str
    documents: list[str] = field(default_factory=list)
    fallback_reason: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.fallback_reason is not None


def _first_documents(source, n: int, chars: int) -> list[str]:
    docs, current = [], ""
    for piece in source.pieces(0, None):
        current += piece.text if len(current) < chars else ""
        if piece.last:
            docs.append(current)
            current = ""
            if len(docs) >= n:
                break
    return docs


def preview_source(
    spec: str, n: int = 2, *, chars: int = 300, fallback: str = "builtin", verbose: bool = True
) -> Preview:
    """Open `spec` with the package's `open_source` and show its first `n` documents. When it cannot be read
    (offline, no credentials, deeplake not installed) say so plainly and preview `fallback` instead."""
    from .data import open_source

    reason = None
    try:
        source, used = open_source(spec, shuffle=False), spec
    except (DataError, ImportError) as exc:
        reason = (
            str(exc) if isinstance(exc, DataError) else f"{exc} (install it: make install-full-finetuning)"
        )
        source, used = open_source(fallback, shuffle=False), fallback
    docs = _first_documents(source, n, chars)
    preview = Preview(spec, used, source.description, docs, reason)
    if verbose:
        if reason:
            print(
                f"{spec}: NOT AVAILABLE HERE - {reason}\n-> falling back to {fallback!r}, which needs no download."
            )
        print(f"reading {source.description}")
        for i, d in enumerate(docs):
            text = d[:chars].replace("\n", " ")
            print(f"[{i}] {text}{'...' if len(d) > chars else ''}")
    return preview


def token_counts(profile: Mapping[str, Any]) -> Table:
    """One full pass over the profile's data: documents, tokens and packed sequences per split (TokenStream.stats).

    Reads the whole source, so use it on the built-in corpus or a local sample, not on all of OpenWebText."""
    from .cli import parse_config
    from .data import resolve_tokenizer, source_from_args
    from .data.pipeline import TokenStream

    cfg = parse_config([], **profile["base"])
    d = cfg.data
    tok = resolve_tokenizer(d, seed=cfg.train.seed)
    rows = []
    for split in ("train", "validation"):
        stream = TokenStream(
            source_from_args(d, cfg.train.seed),
            tok,
            d.block_size,
            split=split,
            validation_per_mille=d.validation_per_mille,
            loop=False,
        )
        n_seq = sum(1 for _ in stream)
        s = stream.stats
        rows.append(
            {
                "split": split,
                "documents": s["documents"],
                "tokens (EOS included)": s["tokens"],
                f"sequences of {d.block_size}": n_seq,
                "tokens packed": s["tokens_packed"],
                "tokens left over": s["tokens_waiting"],
            }
        )
    return Table(
        rows,
        caption=f"{d.dataset}: {d.validation_per_mille / 10:g}% of documents held out by a hash "
        f"of their text; tokenizer with {len(tok):,} tokens",
    )


def packed_example(profile: Mapping[str, Any], max_chars: int = 400) -> str:
    """The first packed training sequence that spans a document boundary, decoded (EOS shown)."""
    from .cli import parse_config
    from .data import resolve_tokenizer, source_from_args
    from .data.pipeline import TokenStream

    cfg = parse_config([], **profile["base"])
    tok = resolve_tokenizer(cfg.data, seed=cfg.train.seed)
    stream = TokenStream(
        source_from_args(cfg.data, 0),
        tok,
        cfg.data.block_size,
        split="train",
        validation_per_mille=cfg.data.validation_per_mille,
        loop=False,
    )
    seq = next(s for s in stream if tok.eos_token_id in s.tolist())
    text = tok.decode(seq.tolist())
    i = text.index(tok.eos_token)
    lo = max(0, i - max_chars // 2)
    return ("..." if lo else "") + text[lo : lo + max_chars] + "..."


# -- section 5: measuring techniques --------------------------------------------------------------------------------
def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages; hand them back to the OS


class PeakMemory:
    """Peak memory of a block of code: on a GPU `torch.cuda.max_memory_allocated` (reset on entry, minus what was
    allocated before); on a CPU the largest increase of the process's resident set size, sampled by a thread."""

    def __init__(self, interval_s: float = 0.005):
        import torch

        self.interval_s = interval_s
        self.cuda = torch.cuda.is_available()
        self.kind = (
            "GPU: torch.cuda.max_memory_allocated"
            if self.cuda
            else f"CPU: peak RSS increase (psutil, sampled every {interval_s * 1000:g} ms)"
        )
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        import torch

        _release_freed_memory()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import psutil

        proc = psutil.Process()
        self._base = self._peak = proc.memory_info().rss
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, proc.memory_info().rss)
                time.sleep(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = self._peak - self._base

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB


def _quiet_main(settings: Mapping[str, Any], quiet: bool):
    from .cli import main

    if not quiet:
        return main([], **settings)
    with contextlib.redirect_stdout(io.StringIO()):
        return main([], **settings)


def compare_techniques(
    base_settings: Mapping[str, Any],
    variants: Mapping[str, Mapping[str, Any]],
    *,
    repeats: int = 1,
    quiet: bool = True,
    warmup_run: bool = True,
) -> Table:
    """Short real trainings, one per variant (`base_settings` updated with the variant), side by side: tokens/s
    (the median over steps 2..N of the run's per-step throughput, which a burst of load from other programs moves
    less than a mean; with `repeats` > 1 the variants run again in turn and the best round counts), peak memory
    (see `PeakMemory`) and the losses. A variant this hardware refuses (e.g. bf16 on a CPU without native bf16)
    gets a row saying why. Variant i writes to `<output_dir>/variant-<i>`."""
    base = {**_QUICK_RUN, **base_settings, "logging_steps": 1}
    root = Path(base["output_dir"])
    if (
        warmup_run
    ):  # one untimed run, so the first row does not pay for first-time set-up (caches, lazy imports)
        _quiet_main({**base, "max_steps": 2, "output_dir": str(root / "warmup")}, True)
    resolved = list(resolve_variants(variants, base).items())
    rows = [{"variant": name, "tokens/s": None, "peak memory MiB": None} for name, _ in resolved]
    for _ in range(max(repeats, 1)):
        for i, (row, (_, change)) in enumerate(zip(rows, resolved, strict=True)):
            if row.get("note"):
                continue  # refused in an earlier round
            settings = {**base, **change, "output_dir": str(root / f"variant-{i}")}
            meter = PeakMemory()
            try:
                with meter:
                    res = _quiet_main(settings, quiet)
            except ConfigError as exc:  # refused before any work, e.g. bf16 on a CPU without native bf16
                row["note"] = "not run here: " + "; ".join(exc.problems)
                continue
            per_step = [
                r["tokens_per_s"] for r in read_log(settings["output_dir"]) if r.get("event") == "train"
            ]
            tps = statistics.median(per_step[1:]) if len(per_step) > 1 else res.tokens_per_s
            row.update(
                {
                    "tokens/s": max(tps, row["tokens/s"] or 0.0),
                    "peak memory MiB": max(meter.peak_mib, row["peak memory MiB"] or 0.0),
                    "final train loss": res.losses[-1] if res.losses else None,
                    "held-out loss": (res.final_eval or {}).get("eval_loss"),
                    "note": "",
                }
            )
    ref = next((r["tokens/s"] for r in rows if r.get("tokens/s")), None)
    for r in rows:
        r["speed vs first"] = f"{r['tokens/s'] / ref:.2f}x" if ref and r.get("tokens/s") else None
    columns = [
        "variant",
        "tokens/s",
        "speed vs first",
        "peak memory MiB",
        "final train loss",
        "held-out loss",
        "note",
    ]
    best = f"best of {repeats} rounds of " if repeats > 1 else ""
    caption = (
        f"{base.get('max_steps')} steps each on {describe_hardware()}; tokens/s: {best}the median of steps 2..N; "
        f"memory: {PeakMemory().kind}"
    )
    return Table(rows, columns, caption=caption)


def resolve_variants(variants: Mapping[str, Mapping[str, Any]], base_settings: Mapping[str, Any]) -> dict:
    """Variants whose micro-batch is a fraction of the base's (0.5 = half, 1.0 = all of it) made whole numbers."""
    full = base_settings["per_device_train_batch_size"]
    out = {}
    for name, change in variants.items():
        change = dict(change)
        mb = change.get("per_device_train_batch_size")
        if isinstance(mb, float):
            change["per_device_train_batch_size"] = max(1, int(full * mb))
        out[name] = change
    return out


def _shown_path(p: Path) -> str:
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


def gpu_benchmark(results_dir: str | Path = REPO_ROOT / "bench" / "results") -> Any:
    """The committed GPU benchmark, or a 'GPU run pending' note. `bench/run_all.py` writes `gpu-<machine>.md` and
    `.json` (whose `machine.gpu` names the GPU) on a GPU machine; nothing is typed in."""
    from IPython.display import Markdown

    folder = Path(results_dir)
    found: list[Path] = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            if json.loads(p.read_text(encoding="utf-8")).get("machine", {}).get("gpu"):
                found.append(p.with_suffix(".md") if p.with_suffix(".md").exists() else p)
    found += [p for p in sorted(folder.glob("gpu-*.md")) if p not in found] if folder.is_dir() else []
    if not found:
        return Markdown(
            f"**GPU run pending**: no GPU record in `{_shown_path(folder)}` yet. `make bench` on a GPU "
            "machine writes it; this cell then shows it."
        )
    parts = []
    for p in found:
        text = p.read_text(encoding="utf-8")
        parts.append(
            f"*from `{_shown_path(p)}`*\n\n" + (text if p.suffix == ".md" else f"```json\n{text}\n```")
        )
    return Markdown("\n\n".join(parts))


def training_arguments(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The Hugging Face `TrainingArguments` fields a run uses for the techniques of section 5."""
    from .cli import parse_config

    t = parse_config([], **settings).train
    names = [
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "warmup_steps",
        "lr_scheduler_type",
        "max_grad_norm",
        "weight_decay",
        "optim",
        "gradient_checkpointing",
        "torch_compile",
        "max_steps",
    ]
    return {
        "class": type(t).__mro__[1].__module__ + "." + type(t).__mro__[1].__name__,
        **{n: str(getattr(getattr(t, n), "value", getattr(t, n))) for n in names},
    }


# -- section 6: watching a run ---------------------------------------------------------------------------------------
def read_log(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_run(result, title: str = ""):
    """Training loss of every step and held-out loss at each evaluation (left); tokens/s per logging window
    (right). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    log = read_log(result.output_dir)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax.plot(range(1, len(result.losses) + 1), result.losses, lw=1, label="train loss (every step)")
    evals = [(r["step"], r["eval_loss"]) for r in log if r.get("event") == "eval"]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats / token)", title=title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    tps = [(r["step"], r["tokens_per_s"]) for r in log if r.get("event") == "train"]
    if tps:
        ax2.plot(*zip(*tps, strict=True), ".-")
    ax2.set(
        xlabel="optimizer step", ylabel="tokens / s", title="throughput per logging window", ylim=(0, None)
    )
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def throughput(result, settings: Mapping[str, Any]) -> str:
    """Tokens/s of the run and its model FLOPs utilisation, or why MFU cannot be given (CPU, unknown GPU)."""
    from transformers import AutoConfig

    from .metrics import describe_mfu, flops_per_token
    from .model import count_parameters

    c = AutoConfig.from_pretrained(result.final_model_dir)
    n = count_parameters(c)
    fpt = flops_per_token(n, c.n_layer, c.n_embd, settings["block_size"])
    _, mfu = describe_mfu(result.tokens_per_s, fpt, result.precision)
    return (
        f"{result.tokens_per_s:,.0f} tokens/s (last logging window) x {fpt / 1e6:.1f} MFLOPs per token "
        f"= {result.tokens_per_s * fpt / 1e12:.3f} TFLOP/s achieved; {mfu}"
    )


def samples_during_training(result) -> list[tuple[int, str]]:
    """(step, text) of every sample the run wrote to its log: at each evaluation, and at the end."""
    return [(r["step"], r["text"]) for r in read_log(result.output_dir) if r.get("event") == "sample"]


# -- section 7: evaluation ------------------------------------------------------------------------------------------
def evaluation_table(result) -> Table:
    """Held-out numbers of the trained and the untrained model, next to the unigram byte entropy."""
    rows = [
        {"model": "untrained (step 0)", **_eval_row(result.initial_eval)},
        {
            "model": f"trained ({result.step} steps, {result.tokens_seen:,} tokens)",
            **_eval_row(result.final_eval),
        },
        {
            "model": "byte frequencies only (unigram entropy)",
            "loss (nats/token)": None,
            "perplexity": None,
            "bits per byte": result.unigram_bpb,
        },
    ]
    return Table(rows, caption="held-out text, never trained on")


def _eval_row(ev: Mapping[str, float] | None) -> dict[str, Any]:
    ev = ev or {}
    return {
        "loss (nats/token)": ev.get("eval_loss"),
        "perplexity": ev.get("eval_perplexity"),
        "bits per byte": ev.get("eval_bpb"),
    }


def push_to_hub(model_dir: str | Path, repo_id: str, *, private: bool = True) -> str | None:
    """Upload a saved model folder to the Hugging Face Hub; skipped, with the reason, offline or without HF_TOKEN."""
    if any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        print("skipped: HF_HUB_OFFLINE is set, so nothing is uploaded")
        return None
    if not os.environ.get("HF_TOKEN"):
        print(
            "skipped: no HF_TOKEN in the environment (create a write token at huggingface.co/settings/tokens "
            "and export HF_TOKEN=... before starting Jupyter; tokens are never typed into notebooks)"
        )
        return None
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(model_dir), repo_id=url.repo_id)
    print(f"uploaded {model_dir} to {url}")
    return str(url)


# -- section 8: troubleshooting ------------------------------------------------------------------------------------
def lr_sweep(profile: Mapping[str, Any], *, quiet: bool = True) -> dict[float, Any]:
    """Short real runs at the profile's too-low, good and too-high learning rates: {learning_rate: TrainResult}."""
    results = {}
    for i, lr in enumerate(profile["lr_sweep"]["learning_rates"]):
        settings = settings_for(profile, "lr_sweep", f"lr-sweep/{i}", **{**_QUICK_RUN, "learning_rate": lr})
        results[lr] = _quiet_main(settings, quiet)
    return results


def plot_lr_sweep(results: Mapping[float, Any]):
    """Training loss per step for each learning rate of `lr_sweep`, on one axis. The y-axis stops at 1.5x the
    starting loss, so a diverging run leaves the plot instead of flattening the others."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for lr, res in results.items():
        ax.plot(
            range(1, len(res.losses) + 1),
            res.losses,
            lw=1.2,
            label=f"lr {lr:g}: held-out loss {res.final_eval['eval_loss']:.2f}",
        )
    finite = [x for res in results.values() for x in res.losses if math.isfinite(x)]
    start = max(res.losses[0] for res in results.values())
    ax.set_ylim(min(finite) - 0.3, 1.5 * start)
    ax.set(
        xlabel="optimizer step",
        ylabel="training loss (nats / token)",
        title="same run, three learning rates (off the top: higher still)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


# -- section 9: scaling out ----------------------------------------------------------------------------------------
def launch_two_processes(profile: Mapping[str, Any], nproc: int = 2):
    """The profile's tiny run on `nproc` CPU processes (torchrun + gloo) through `gpt2_training.launch`; prints
    the command, the rank-0 log, and returns (completed process, its train_log records)."""
    from .launch import launch_multiprocess, torchrun_command

    settings = settings_for(profile, "launch", "two-processes", plot=False, report_to="none")
    settings["output_dir"] = str(Path(settings["output_dir"]).resolve())
    argv = []
    for k, v in settings.items():
        argv += [f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    cmd = torchrun_command(argv, nproc, master_port=29500)
    cmd = ["torchrun", *cmd[cmd.index("torch.distributed.run") + 1 :]]
    print("$ " + shlex.join(cmd).replace(str(REPO_ROOT) + "/", ""))
    proc = launch_multiprocess(argv, nproc=nproc, env=profile["launch_env"], stream=False)
    for line in proc.stdout.splitlines():
        if line.startswith(("model:", "[train]", "held-out", "trained")):
            print(line)
    return proc, read_log(settings["output_dir"])


def show_file(path: str | Path) -> None:
    """Print a config file of the repository (relative to its root)."""
    p = REPO_ROOT / path
    print(f"# {path}\n{p.read_text(encoding='utf-8')}")
