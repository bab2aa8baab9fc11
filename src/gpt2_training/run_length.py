"""How many optimizer steps a run takes: `max_steps`, or `num_train_epochs` over a corpus of known size.

The precedence is the Trainer's: `max_steps > 0` wins over `num_train_epochs`. An epoch here is the corpus's
training sequences divided by the global batch (sequences per step over all processes), rounded up; each
process's stream wraps around on its own, so an epoch is a count of sequences, not a barrier.
"""

from __future__ import annotations

import math
import time

from .errors import ConfigError

# Sources whose size is not known without reading a remote corpus end to end.
REMOTE_PREFIXES = ("hf:", "hub://", "al://", "s3://", "gcs://", "gs://", "azure://")


def count_train_sequences(data_args, tokenizer, seed: int) -> int:
    """Training sequences of one pass over the corpus (one process, no shuffle): exact, by reading it once."""
    from .data.shards import ShardStream

    if data_args.shards_dir:
        stream = ShardStream(data_args.shards_dir, "train", data_args.block_size, shuffle=False, loop=False)
        windows = getattr(stream, "windows_per_shard", None)
        if windows is not None:
            return int(windows.sum())
        return sum(1 for _ in stream)
    spec = data_args.dataset
    if spec == "openwebtext" or spec.startswith(REMOTE_PREFIXES):
        raise ConfigError(
            f"--num_train_epochs needs a corpus of known size, and {spec} is streamed: set --max_steps, or "
            "tokenize it once with `train.py prepare --dataset ... --out DIR` and train with --shards_dir DIR"
        )
    from .data import source_from_args
    from .data.pipeline import TokenStream

    one_pass = TokenStream(
        source_from_args(data_args, seed, shuffle=False),
        tokenizer,
        data_args.block_size,
        split="train",
        validation_per_mille=data_args.validation_per_mille,
        loop=False,
    )
    return sum(1 for _ in one_pass)


def resolve_max_steps(cfg, tokenizer, world_size: int, epochs_set: bool) -> tuple[int, str | None]:
    """(steps, note): the run's optimizer steps and, when epochs decided them or were overridden, why."""
    t = cfg.train
    if t.max_steps > 0:
        note = None
        if epochs_set:
            note = (
                f"max_steps={t.max_steps} overrides num_train_epochs={t.num_train_epochs:g} (the Trainer's "
                "precedence); drop --max_steps to train by epochs"
            )
        return t.max_steps, note
    t0 = time.perf_counter()
    sequences = count_train_sequences(cfg.data, tokenizer, t.data_seed if t.data_seed is not None else t.seed)
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    if sequences < per_step:
        raise ConfigError(
            f"the corpus has {sequences} training sequences of {cfg.data.block_size} tokens, fewer than one step "
            f"takes ({per_step}): lower --per_device_train_batch_size or --block_size, or add data"
        )
    steps = math.ceil(t.num_train_epochs * sequences / per_step)
    note = (
        f"num_train_epochs={t.num_train_epochs:g}: {sequences:,} training sequences / {per_step} per step = "
        f"{steps} steps (counted in {time.perf_counter() - t0:.1f} s)"
    )
    return steps, note
