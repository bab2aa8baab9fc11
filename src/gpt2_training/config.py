"""Every setting of a run, as typed dataclasses with a default and a help line, validated before any work.

Training settings are Hugging Face's own `TrainingArguments` (same names, same meaning), with defaults that
suit GPT-2 pretraining; model and data settings use GPT-2's vocabulary (`n_layer`, `n_embd`, `block_size`).
`validate()` reports every problem at once, before any download or model build.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from .errors import ConfigError
from .optim import OPTIMIZERS

# Published sizes: GPT-2 paper table 2 as counted by Hugging Face (tied embeddings, 50257-token vocabulary).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),  # tests: seconds on a CPU
    "mini": dict(n_layer=4, n_head=4, n_embd=256, n_positions=256),  # a laptop CPU: minutes
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),  # 124 M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),  # 355 M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, n_positions=1024),  # 774 M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, n_positions=1024),  # 1.56 B
}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SAVE_DTYPES = ("fp32", "bf16", "fp16")
# --optim's choices, from optim.py's table (the one list)
SUPPORTED_OPTIMIZERS = tuple(OPTIMIZERS)


@dataclass
class ModelArguments:
    """What network to train and where its first weights come from."""

    preset: str = field(default="tiny", metadata={"help": f"Model size: one of {', '.join(PRESETS)}."})
    n_layer: int | None = field(default=None, metadata={"help": "Override the preset's number of blocks."})
    n_head: int | None = field(default=None, metadata={"help": "Override the preset's attention heads."})
    n_embd: int | None = field(
        default=None, metadata={"help": "Override the preset's width (divisible by n_head)."}
    )
    n_positions: int | None = field(
        default=None, metadata={"help": "Override the longest sequence the model takes."}
    )
    init_from: str = field(
        default="scratch",
        metadata={
            "help": "'scratch' (GPT-2 initialisation), a Hub name such as 'gpt2', or a local model folder."
        },
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on embeddings, attention and residuals (0 for pretraining)."}
    )
    pad_vocab_to_multiple_of: int = field(
        default=64,
        metadata={"help": "Round the embedding table up (50257 -> 50304) for faster matmuls; 1 = off."},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel: 'sdpa', 'eager' or 'flash_attention_2'."}
    )
    loss_impl: str = field(
        default="chunked",
        metadata={
            "help": "'chunked' (fused, never builds fp32 logits) or 'hf' (GPT2LMHeadModel's own loss)."
        },
    )


@dataclass
class DataArguments:
    """Where text comes from and how it becomes batches."""

    dataset: str = field(
        default="builtin",
        metadata={
            "help": "Data source: 'builtin', a local file/folder/glob (.txt .jsonl .json .parquet), "
            "'hf:<repo>[:<config>]', 'openwebtext', 'deeplake:<path>', 'al://org/name', 'hub://org/name', "
            "'s3://bucket/path' (DeepLake on S3), or 'hf-parquet:' / 'hf-json:' with an s3:// or https:// URL."
        },
    )
    text_field: str = field(default="text", metadata={"help": "Field or column that holds the text."})
    dataset_split: str = field(default="train", metadata={"help": "Split to stream from a Hub dataset."})
    txt_mode: str = field(
        default="file", metadata={"help": ".txt files: 'file' (one document each) or 'paragraph'."}
    )
    shards_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of token shards written by `train.py prepare` (fastest input)."},
    )
    tokenizer: str = field(
        default="auto",
        metadata={
            "help": "'auto' (train a BPE on the built-in corpus, else GPT-2's), 'train', a Hub name or a folder."
        },
    )
    tokenizer_vocab_size: int = field(
        default=8192, metadata={"help": "Vocabulary size when training a tokenizer."}
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence (<= n_positions)."})
    validation_per_mille: int = field(
        default=50,
        metadata={"help": "Documents held out for evaluation, per thousand, chosen by a hash of the text."},
    )
    shuffle_buffer: int = field(
        default=512, metadata={"help": "Packed sequences in the seeded shuffle buffer; 0 = off."}
    )
    shuffle_shards: bool = field(
        default=True, metadata={"help": "Shuffle file/shard order each epoch (seeded)."}
    )
    eval_max_sequences: int = field(
        default=256, metadata={"help": "Held-out sequences used by each evaluation."}
    )
    max_piece_chars: int = field(default=1_000_000, metadata={"help": "Longer documents are read in pieces."})
    network_retries: int = field(
        default=8,
        metadata={
            "help": "Remote sources (S3, HTTP): retries of a failed read, in a row, before the run saves its last "
            "completed step and stops; each retry is logged with the URL and reason."
        },
    )
    network_backoff: float = field(
        default=1.0, metadata={"help": "Seconds before the first retry; each next wait doubles."}
    )
    network_backoff_max: float = field(default=60.0, metadata={"help": "Longest wait between two retries."})
    network_timeout: float = field(
        default=60.0,
        metadata={
            "help": "Seconds to connect, or to wait for data, before a read counts as failed (S3, HTTP)."
        },
    )
    network_prefetch: int = field(
        default=4,
        metadata={
            "help": "Remote sources: shards (files, DeepLake row chunks) read ahead in background threads, to "
            "hide network latency; 0 = read on demand."
        },
    )


@dataclass
class RunArguments:
    """How this project runs a job, beyond what `TrainingArguments` covers."""

    precision: str = field(
        default="auto",
        metadata={
            "help": "auto | bf16 | fp16 | fp32. auto: bf16 where supported, fp16 on older GPUs, else fp32."
        },
    )
    resume: str = field(
        default="auto",
        metadata={
            "help": "'auto' (the newest sound checkpoint in output_dir; an error if the folder holds a run with "
            "none), 'never', or a checkpoint path."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "With --resume never: replace what an earlier run wrote in output_dir (only the tool's own "
            "files; a folder holding anything else is refused)."
        },
    )
    allow_resume_changes: bool = field(
        default=False,
        metadata={"help": "Resume even if the batch size or accumulation differs from the checkpoint."},
    )
    max_bad_steps: int = field(
        default=5,
        metadata={"help": "Stop after this many consecutive steps with a non-finite loss or gradient."},
    )
    sample_prompts: list[str] = field(
        default_factory=lambda: ["The", "A function that"],
        metadata={"help": "Prompts for the samples generated at each evaluation and at the end."},
    )
    sample_max_new_tokens: int = field(
        default=40, metadata={"help": "Tokens generated per sample (0: no samples)."}
    )
    logging_dir: str | None = field(
        default=None, metadata={"help": "TensorBoard folder (default: output_dir/tensorboard)."}
    )
    plot: bool = field(default=True, metadata={"help": "Save loss_curve.png in output_dir at the end."})
    save_final_model: bool = field(
        default=True, metadata={"help": "Save model + tokenizer to output_dir/final."}
    )
    save_dtype: str = field(
        default="fp32",
        metadata={
            "help": "fp32 | bf16 | fp16: weights of the final model (half the size in 16 bits; its held-out "
            "figures are measured again); checkpoints stay fp32."
        },
    )
    license: str | None = field(
        default=None,
        metadata={"help": "License id for the model card, e.g. apache-2.0 or mit (none is stated if unset)."},
    )
    write_heldout: str | None = field(
        default=None,
        metadata={
            "help": "Write the held-out sequences' text to this JSON-lines file (for lm-evaluation-harness)."
        },
    )


@dataclass
class GPT2TrainingArguments(TrainingArguments):
    """Hugging Face `TrainingArguments` with defaults for GPT-2 pretraining (nanoGPT's recipe, scaled down)."""

    output_dir: str = field(
        default="runs/gpt2", metadata={"help": "Where checkpoints, logs and the model go."}
    )
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Sequences per device per micro-step."}
    )
    per_device_eval_batch_size: int = field(
        default=16, metadata={"help": "Sequences per device per eval batch."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    learning_rate: float = field(default=6e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices (not biases/norms)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm; 0 = off."})
    max_steps: int = field(
        default=-1,
        metadata={
            "help": "Optimizer steps to train for; > 0 overrides --num_train_epochs (as in the Trainer)."
        },
    )
    num_train_epochs: float = field(
        default=3.0,
        metadata={
            "help": "Passes over a corpus of known size (local files, prepared shards) when max_steps <= 0."
        },
    )
    warmup_steps: float = field(
        default=100, metadata={"help": "Linear warmup steps (a float < 1 is a ratio)."}
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="cosine", metadata={"help": "cosine, linear, constant_with_warmup..."}
    )
    optim: OptimizerNames | str = field(
        default="adamw_torch", metadata={"help": f"One of {', '.join(SUPPORTED_OPTIMIZERS)}."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "'steps' (every --eval_steps) or 'no'."})
    eval_steps: float | None = field(
        default=200, metadata={"help": "Evaluate (and sample) every N steps; 0 = --eval_strategy no."}
    )
    eval_on_start: bool = field(
        default=True, metadata={"help": "Evaluate the untrained model before step 1."}
    )
    save_steps: float = field(
        default=200, metadata={"help": "Write an atomic checkpoint every N steps; 0 = --save_strategy no."}
    )
    hub_strategy: str = field(
        default="end", metadata={"help": "With --push_to_hub: 'end' uploads final/ when training ends."}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep this many newest checkpoints."})
    seed: int = field(default=1337, metadata={"help": "Seed for initialisation, dropout and data order."})
    report_to: None | str | list[str] = field(
        default="none",
        metadata={
            "help": "none, tensorboard, wandb (online when wandb finds a key, else offline), all; several: "
            "--report_to wandb tensorboard.",
            "nargs": "+",
        },  # without it the parser keeps only the first name
    )
    dataloader_num_workers: int = field(
        default=0,
        metadata={
            "help": "Background processes that read and tokenize a streamed source ahead of the training step "
            "(0: in the training process); sequences and resume positions are the same for every value."
        },
    )

    def __post_init__(self):
        # This project's shorthand, kept from its first version: --eval_steps 0 / --save_steps 0 switch the event
        # off (the Trainer would fall back to logging_steps or refuse).
        if self.eval_steps == 0:
            self.eval_strategy = "no"
        if self.save_steps == 0:
            self.save_strategy = "no"
        self._translate_fsdp_words()
        # transformers checks `optim` against its own names, which lack this project's "muon" (optim.py)
        muon = str(getattr(self.optim, "value", self.optim)) == "muon"
        if muon:
            self.optim = "adamw_torch"
        super().__post_init__()
        if muon:
            self.optim = "muon"

    # TrainingArguments' FSDP words -> FSDP2's fsdp_config entries (the translation transformers 5 does itself,
    # with a deprecation warning for the string form that this project documents as `--fsdp "full_shard auto_wrap"`)
    _FSDP_WORDS = {
        "full_shard": ("reshard_after_forward", True),
        "shard_grad_op": ("reshard_after_forward", False),
    }
    _FSDP_WORDS |= {"offload": ("cpu_offload", True), "auto_wrap": None}

    def _translate_fsdp_words(self) -> None:
        words = self.fsdp.split() if isinstance(self.fsdp, str) else self.fsdp
        if not words or not isinstance(words, list) or any(w not in self._FSDP_WORDS for w in words):
            return  # True/False/empty, or a word transformers itself should judge (and refuse)
        conf = self.fsdp_config
        if isinstance(conf, str):
            import json

            with open(conf, encoding="utf-8") as f:
                conf = json.load(f)
        conf = dict(conf or {})
        for word in words:
            if self._FSDP_WORDS[word]:
                key, value = self._FSDP_WORDS[word]
                conf.setdefault(key, value)
        self.fsdp, self.fsdp_config = True, conf


ARG_CLASSES = (ModelArguments, DataArguments, RunArguments, GPT2TrainingArguments)


def training_config(
    train: TrainingArguments,
    model: ModelArguments | None = None,
    data: DataArguments | None = None,
    run: RunArguments | None = None,
) -> Config:
    """A Config from a `TrainingArguments` built in Python (as the seed README builds it) and this project's
    model/data/run settings, checked against the options contract like the command line."""
    from .options import apply_training_arguments

    cfg = Config(
        model=model or ModelArguments(), data=data or DataArguments(), run=run or RunArguments(), train=train
    )
    apply_training_arguments(cfg)
    return cfg


@dataclass
class Config:
    """One run's settings, grouped as the help text groups them."""

    model: ModelArguments
    data: DataArguments
    run: RunArguments
    train: GPT2TrainingArguments

    def to_dict(self) -> dict[str, Any]:
        """Plain settings for logs and checkpoints; token fields are dropped so they never reach a file."""
        out: dict[str, Any] = {}
        for part in (self.model, self.data, self.run):
            out.update(dataclasses.asdict(part))
        for f in dataclasses.fields(TrainingArguments):
            if f.name in ("hub_token",):
                continue
            value = getattr(self.train, f.name, None)
            out[f.name] = value if isinstance(value, int | float | str | bool | type(None)) else str(value)
        return out


def model_shape(model: ModelArguments) -> dict[str, int]:
    """The preset's shape with the explicit overrides applied."""
    shape = dict(PRESETS.get(model.preset, PRESETS["tiny"]))
    for key in ("n_layer", "n_head", "n_embd", "n_positions"):
        if getattr(model, key) is not None:
            shape[key] = getattr(model, key)
    return shape


def validate(cfg: Config, *, cuda_available: bool, bf16_ok: bool) -> None:
    """Raise ConfigError listing every problem found, so one run shows them all."""
    problems: list[str] = []
    m, d, r, t = cfg.model, cfg.data, cfg.run, cfg.train
    if m.preset not in PRESETS:
        problems.append(f"unknown preset {m.preset!r}: choose one of {', '.join(PRESETS)}")
    shape = model_shape(m)
    too_small = [f"{k}={shape[k]}" for k in ("n_layer", "n_head", "n_embd", "n_positions") if shape[k] < 1]
    if too_small:
        problems.append(f"{', '.join(too_small)}: n_layer, n_head, n_embd and n_positions must each be >= 1")
    elif shape["n_embd"] % shape["n_head"]:
        problems.append(
            f"n_embd={shape['n_embd']} is not divisible by n_head={shape['n_head']}: each head gets "
            f"n_embd/n_head dimensions, so pick e.g. n_head={_divisor_near(shape['n_embd'], shape['n_head'])}"
        )
    if d.block_size > shape["n_positions"]:
        problems.append(
            f"block_size={d.block_size} exceeds n_positions={shape['n_positions']}: lower --block_size "
            f"or raise --n_positions"
        )
    if d.block_size < 2:
        problems.append("block_size must be at least 2 (one input and one target token)")
    if not 0.0 <= m.dropout < 1.0:
        problems.append(f"dropout={m.dropout} must be in [0, 1)")
    if m.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
        problems.append(
            f"attn_implementation={m.attn_implementation!r}: use sdpa, eager or flash_attention_2"
        )
    if m.loss_impl not in ("chunked", "hf"):
        problems.append(f"loss_impl={m.loss_impl!r}: use 'chunked' or 'hf'")
    if m.pad_vocab_to_multiple_of < 1:
        problems.append("pad_vocab_to_multiple_of must be >= 1")
    if d.txt_mode not in ("file", "paragraph"):
        problems.append(f"txt_mode={d.txt_mode!r}: use 'file' or 'paragraph'")
    if not 0 <= d.validation_per_mille < 1000:
        problems.append("validation_per_mille must be in [0, 1000)")
    if d.tokenizer_vocab_size < 257:
        problems.append("tokenizer_vocab_size must be at least 257 (256 bytes + end-of-text)")
    if d.shards_dir is not None and not (Path(d.shards_dir) / "meta.json").exists():
        problems.append(
            f"shards_dir {d.shards_dir!r} has no meta.json: create it with `train.py prepare --out {d.shards_dir}`"
        )
    if Path(t.output_dir).exists() and not Path(t.output_dir).is_dir():
        problems.append(f"output_dir {t.output_dir} is a file, not a folder: choose another --output_dir")
    # settings with a lower bound, and what the bound means where it is not obvious
    steps_note = "below 1: a fraction of the run; 0: never"
    seed_note = "numpy's generators take no negative seed"
    bounds = [
        (t, "gradient_accumulation_steps", 1, ""),
        (t, "per_device_train_batch_size", 1, ""),
        (t, "per_device_eval_batch_size", 1, ""),
        (d, "eval_max_sequences", 1, "to skip evaluation: --eval_strategy no"),
        (t, "seed", 0, seed_note),
        (t, "data_seed", 0, seed_note),
        (t, "weight_decay", 0, "0: none"),
        (t, "adam_epsilon", 0, ""),
        (t, "logging_steps", 0, steps_note),
        (t, "eval_steps", 0, steps_note),
        (t, "save_steps", 0, steps_note),
        (d, "shuffle_buffer", 0, "0: no shuffling"),
        (d, "network_retries", 0, "0: stop at the first failed read"),
        (d, "network_backoff", 0, ""),
        (d, "network_prefetch", 0, "0: read on demand"),
        (r, "max_bad_steps", 1, ""),
        (r, "sample_max_new_tokens", 0, "0: no samples"),
    ]
    for section, name, minimum, note in bounds:
        value = getattr(section, name)
        if value is not None and value < minimum:
            problems.append(f"{name} must be >= {minimum}" + (f" ({note})" if note else ""))
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:
            problems.append(f"{name}={getattr(t, name)} must be in [0, 1)")
    if d.network_backoff_max < d.network_backoff:
        problems.append(
            f"network_backoff_max={d.network_backoff_max} is below network_backoff={d.network_backoff}: "
            "raise --network_backoff_max"
        )
    if not d.network_timeout > 0:
        problems.append("network_timeout must be > 0 (seconds)")
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        problems.append("set --max_steps N (> 0), or --num_train_epochs E (> 0) for a corpus of known size")
    if t.learning_rate <= 0:
        problems.append("learning_rate must be > 0")
    optim = str(getattr(t.optim, "value", t.optim))
    if optim not in SUPPORTED_OPTIMIZERS:
        problems.append(
            f"optim={optim!r} is not supported here: use one of {', '.join(SUPPORTED_OPTIMIZERS)}"
        )
    if r.precision not in PRECISIONS:
        problems.append(f"precision={r.precision!r}: use one of {', '.join(PRECISIONS)}")
    elif r.precision == "fp16" and not cuda_available:
        problems.append("precision=fp16 needs a CUDA GPU (loss scaling); on a CPU use bf16 or fp32")
    elif r.precision == "bf16" and not bf16_ok:
        problems.append("precision=bf16 is not supported on this hardware: use fp16 (older GPUs) or fp32")
    if r.save_dtype not in SAVE_DTYPES:
        problems.append(f"save_dtype={r.save_dtype!r}: use one of {', '.join(SAVE_DTYPES)}")
    if r.license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", r.license):
        problems.append(
            f"license={r.license!r}: give a license identifier as the Hub lists them, e.g. apache-2.0, mit, "
            "cc-by-4.0 or other"
        )
    if r.write_heldout is not None:
        heldout = Path(r.write_heldout)
        if heldout.is_dir() or not heldout.parent.is_dir():
            problems.append(
                f"write_heldout {r.write_heldout}: give a file name in an existing folder, e.g. heldout.jsonl"
            )
    if r.resume not in ("auto", "never") and not Path(r.resume).exists():
        problems.append(f"resume={r.resume!r}: no such checkpoint; use 'auto', 'never' or an existing path")
    if r.overwrite_output_dir and r.resume != "never":
        problems.append(
            "overwrite_output_dir needs --resume never (otherwise the run would resume, not restart)"
        )
    from .data.sources import parse_source

    source = parse_source(d.dataset)
    if source.kind == "files" and not _glob_matches(source.local_path):
        problems.append(f"dataset path {d.dataset!r} does not exist: check the path or glob")
    # lr_scheduler_kwargs the schedule would only refuse once training is set up
    from .optim import scheduler_problems

    problems += scheduler_problems(t)
    # --deepspeed / --fsdp: a JSON contradicting the settings, an unknown wrap class, two backends at once
    from .backends import backend_problems

    problems += backend_problems(t, None if r.precision == "auto" else r.precision)
    if problems:
        raise ConfigError(problems)


def _divisor_near(n: int, target: int) -> int:
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: (abs(k - target), k))


def _glob_matches(path: str) -> bool:
    import glob

    if os.path.exists(path) or not glob.has_magic(path):
        return os.path.exists(path)
    # only the folder a pattern starts from: glob's own `**` follows link loops without end (two loops hung
    # start-up); the source's search, which enters each folder once, names a pattern that matches no file
    parts = Path(path).parts
    fixed = parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]
    return Path(*fixed).is_dir() if fixed else True
