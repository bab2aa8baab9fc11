"""Every setting of a run, as typed dataclasses with a default and a help line, and the tables of choices.

Training settings are Hugging Face's own `TrainingArguments` (same names, same meaning), with defaults that
suit GPT-2 pretraining; model and data settings use GPT-2's vocabulary (`n_layer`, `n_embd`, `block_size`).
This module is the foundation: it imports nothing of the project. `options.validate()` checks a `Config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames


def setting(default: Any, help: str) -> Any:
    """A dataclass field with its default and the help line the command line shows."""
    return field(default=default, metadata={"help": help})


# Published sizes: GPT-2 paper table 2 as counted by Hugging Face (tied embeddings, 50257-token vocabulary).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),  # tests: seconds on a CPU
    "mini": dict(n_layer=4, n_head=4, n_embd=256, n_positions=256),  # a laptop CPU: minutes
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),  # 124 M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),  # 355 M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, n_positions=1024),  # 774 M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, n_positions=1024),  # 1.56 B
}
# The choice tables: each set of choices is listed here once; options.validate checks against them and the
# modules that act on a choice (optim.py, model.py, precision.py) read them from here.
# --optim (Hugging Face's names) and the kind of state each keeps, which the memory planner counts
OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw_fused",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit",
    "sgd": "sgd",
    "muon": "muon",
}
SUPPORTED_OPTIMIZERS = tuple(OPTIMIZERS)
# --loss_impl: the fused chunked loss, or GPT2LMHeadModel's own
LOSS_IMPLS = ("chunked", "hf")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SAVE_DTYPES = ("fp32", "bf16", "fp16")
TXT_MODES = ("file", "paragraph")
# --lr_scheduler_type: transformers' schedules that optim.build_scheduler builds by name and the loop steps once per
# optimizer step (not the two that step on an evaluation metric)
SCHEDULES = tuple(s.value for s in SchedulerType if s.value not in ("reduce_lr_on_plateau", "greedy"))


@dataclass
class ModelArguments:
    """What network to train and where its first weights come from."""

    preset: str = setting("tiny", f"Model size: one of {', '.join(PRESETS)}.")
    n_layer: int | None = setting(None, "Override the preset's number of blocks.")
    n_head: int | None = setting(None, "Override the preset's attention heads.")
    n_embd: int | None = setting(None, "Override the preset's width (divisible by n_head).")
    n_positions: int | None = setting(None, "Override the longest sequence the model takes.")
    init_from: str = setting(
        "scratch", "'scratch' (GPT-2 initialisation), a Hub name such as 'gpt2', or a local model folder."
    )
    dropout: float = setting(0.0, "Dropout on embeddings, attention and residuals (0 for pretraining).")
    pad_vocab_to_multiple_of: int = setting(
        64, "Round the embedding table up (50257 -> 50304) for faster matmuls; 1 = off."
    )
    attn_implementation: str = setting("sdpa", "Attention kernel: 'sdpa', 'eager' or 'flash_attention_2'.")
    loss_impl: str = setting(
        "chunked", "'chunked' (fused, never builds fp32 logits) or 'hf' (GPT2LMHeadModel's own loss)."
    )


@dataclass
class DataArguments:
    """Where text comes from and how it becomes batches."""

    dataset: str = setting(
        "builtin",
        "Data source: 'builtin', a local file/folder/glob (.txt .jsonl .json .parquet), "
        "'hf:<repo>[:<config>]', 'openwebtext', 'deeplake:<path>', 'al://org/name', 'hub://org/name', "
        "'s3://bucket/path' (DeepLake on S3), or 'hf-parquet:' / 'hf-json:' with an s3:// or https:// URL.",
    )
    text_field: str = setting("text", "Field or column that holds the text.")
    dataset_split: str = setting("train", "Split to stream from a Hub dataset.")
    txt_mode: str = setting("file", ".txt files: 'file' (one document each) or 'paragraph'.")
    shards_dir: str | None = setting(
        None, "Folder of token shards written by `train.py prepare` (fastest input)."
    )
    tokenizer: str = setting(
        "auto", "'auto' (train a BPE on the built-in corpus, else GPT-2's), 'train', a Hub name or a folder."
    )
    tokenizer_vocab_size: int = setting(8192, "Vocabulary size when training a tokenizer.")
    block_size: int = setting(256, "Tokens per training sequence (<= n_positions).")
    validation_per_mille: int = setting(
        50, "Documents held out for evaluation, per thousand, chosen by a hash of the text."
    )
    shuffle_buffer: int = setting(512, "Packed sequences in the seeded shuffle buffer; 0 = off.")
    shuffle_shards: bool = setting(True, "Shuffle file/shard order each epoch (seeded).")
    eval_max_sequences: int = setting(256, "Held-out sequences used by each evaluation.")
    max_piece_chars: int = setting(1_000_000, "Longer documents are read in pieces.")
    network_retries: int = setting(
        8,
        "Remote sources (S3, HTTP): retries of a failed read, in a row, before the run saves its last "
        "completed step and stops; each retry is logged with the URL and reason.",
    )
    network_backoff: float = setting(1.0, "Seconds before the first retry; each next wait doubles.")
    network_backoff_max: float = setting(60.0, "Longest wait between two retries.")
    network_timeout: float = setting(
        60.0, "Seconds to connect, or to wait for data, before a read counts as failed (S3, HTTP)."
    )
    network_prefetch: int = setting(
        4,
        "Remote sources: shards (files, DeepLake row chunks) read ahead in background threads, to "
        "hide network latency; 0 = read on demand.",
    )


@dataclass
class RunArguments:
    """How this project runs a job, beyond what `TrainingArguments` covers."""

    precision: str = setting(
        "auto", "auto | bf16 | fp16 | fp32. auto: bf16 where supported, fp16 on older GPUs, else fp32."
    )
    resume: str = setting(
        "auto",
        "'auto' (the newest sound checkpoint in output_dir; an error if the folder holds a run with "
        "none), 'never', or a checkpoint path.",
    )
    overwrite_output_dir: bool = setting(
        False,
        "With --resume never: replace what an earlier run wrote in output_dir (only the tool's own "
        "files; a folder holding anything else is refused).",
    )
    allow_resume_changes: bool = setting(
        False, "Resume even if the batch size or accumulation differs from the checkpoint."
    )
    max_bad_steps: int = setting(
        5, "Stop after this many consecutive steps with a non-finite loss or gradient."
    )
    sample_prompts: list[str] = field(
        default_factory=lambda: ["The", "A function that"],
        metadata={"help": "Prompts for the samples generated at each evaluation and at the end."},
    )
    sample_max_new_tokens: int = setting(40, "Tokens generated per sample (0: no samples).")
    logging_dir: str | None = setting(None, "TensorBoard folder (default: output_dir/tensorboard).")
    plot: bool = setting(True, "Save loss_curve.png in output_dir at the end.")
    save_final_model: bool = setting(True, "Save model + tokenizer to output_dir/final.")
    save_dtype: str = setting(
        "fp32",
        "fp32 | bf16 | fp16: weights of the final model (half the size in 16 bits; its held-out "
        "figures are measured again); checkpoints stay fp32.",
    )
    license: str | None = setting(
        None, "License id for the model card, e.g. apache-2.0 or mit (none is stated if unset)."
    )
    write_heldout: str | None = setting(
        None, "Write the held-out sequences' text to this JSON-lines file (for lm-evaluation-harness)."
    )


@dataclass
class GPT2TrainingArguments(TrainingArguments):
    """Hugging Face `TrainingArguments` with defaults for GPT-2 pretraining (nanoGPT's recipe, scaled down)."""

    output_dir: str = setting("runs/gpt2", "Where checkpoints, logs and the model go.")
    per_device_train_batch_size: int = setting(16, "Sequences per device per micro-step.")
    per_device_eval_batch_size: int = setting(16, "Sequences per device per eval batch.")
    gradient_accumulation_steps: int = setting(1, "Micro-steps per optimizer step.")
    learning_rate: float = setting(6e-4, "Peak learning rate.")
    weight_decay: float = setting(0.1, "AdamW decay on matrices (not biases/norms).")
    adam_beta2: float = setting(0.95, "AdamW beta2.")
    max_grad_norm: float = setting(1.0, "Clip the global gradient norm; 0 = off.")
    max_steps: int = setting(
        -1, "Optimizer steps to train for; > 0 overrides --num_train_epochs (as in the Trainer)."
    )
    num_train_epochs: float = setting(
        3.0, "Passes over a corpus of known size (local files, prepared shards) when max_steps <= 0."
    )
    warmup_steps: float = setting(100, "Linear warmup steps (a float < 1 is a ratio).")
    lr_scheduler_type: SchedulerType | str = setting("cosine", f"One of {', '.join(SCHEDULES)}.")
    optim: OptimizerNames | str = setting("adamw_torch", f"One of {', '.join(SUPPORTED_OPTIMIZERS)}.")
    logging_steps: float = setting(10, "Log every N optimizer steps.")
    eval_strategy: str = setting("steps", "'steps' (every --eval_steps) or 'no'.")
    eval_steps: float | None = setting(200, "Evaluate (and sample) every N steps; 0 = --eval_strategy no.")
    eval_on_start: bool = setting(True, "Evaluate the untrained model before step 1.")
    save_steps: float = setting(200, "Write an atomic checkpoint every N steps; 0 = --save_strategy no.")
    hub_strategy: str = setting("end", "With --push_to_hub: 'end' uploads final/ when training ends.")
    save_total_limit: int | None = setting(2, "Keep this many newest checkpoints.")
    seed: int = setting(1337, "Seed for initialisation, dropout and data order.")
    report_to: None | str | list[str] = field(
        default="none",
        metadata={
            "help": "none, tensorboard, wandb (online when wandb finds a key, else offline), all; several: "
            "--report_to wandb tensorboard.",
            "nargs": "+",
        },  # without it the parser keeps only the first name
    )
    dataloader_num_workers: int = setting(
        0,
        "Background processes that read and tokenize a streamed source ahead of the training step "
        "(0: in the training process); sequences and resume positions are the same for every value.",
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
