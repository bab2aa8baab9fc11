"""The data flow, one file per step: sources -> tokenizer -> pipeline (split, pack, shuffle) -> shards, with
background workers (workers.py) and the mapping of data positions onto another number of processes (restore.py).

This module wires them together from a run's settings. Importing it loads neither torch, transformers,
datasets nor deeplake: each is imported when a source or tokenizer that needs it is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .pipeline import HeldOut, TokenStream, is_validation, split_texts
from .restore import restore_stream
from .shards import ShardStream
from .sources import open_source
from .tokenizer import cached_bpe_tokenizer, load_tokenizer

if TYPE_CHECKING:
    from ..config import DataArguments

__all__ = [
    "HeldOut",
    "ShardStream",
    "TokenStream",
    "cached_bpe_tokenizer",
    "is_validation",
    "load_tokenizer",
    "open_source",
    "resolve_tokenizer",
    "restore_stream",
    "source_from_args",
    "source_options",
    "train_stream",
    "validation_sequences",
]

TRAIN_TOKENIZER_MAX_CHARS = 50_000_000  # a BPE learned from 50 M characters is as good as from all of them


def source_options(args: DataArguments, seed: int, shuffle: bool | None = None) -> dict[str, Any]:
    """`open_source` keyword arguments for the settings (plain values, so worker processes can reopen it)."""
    return dict(
        spec=args.dataset,
        text_field=args.text_field,
        split=args.dataset_split,
        txt_mode=args.txt_mode,
        shuffle=args.shuffle_shards if shuffle is None else shuffle,
        seed=seed,
        max_piece_chars=args.max_piece_chars,
        network={
            "retries": args.network_retries,
            "backoff": args.network_backoff,
            "backoff_max": args.network_backoff_max,
            "timeout": args.network_timeout,
            "prefetch": args.network_prefetch,
        },
    )


def source_from_args(args: DataArguments, seed: int, shuffle: bool | None = None):
    """The settings' data source; `shuffle` overrides --shuffle_shards (held-out data is read in order)."""
    return open_source(**source_options(args, seed, shuffle))


def resolve_tokenizer(args: DataArguments, seed: int = 0):
    """'auto': a BPE trained on the built-in corpus, GPT-2's tokenizer for anything else."""
    name = args.tokenizer
    if name == "auto":
        name = "train" if args.dataset == "builtin" else "gpt2"
    if name != "train":
        return load_tokenizer(name)
    source = source_from_args(args, seed)
    held_out = HeldOut(source, args.validation_per_mille)
    texts, chars = [], 0
    # training text only: held-out text stays unseen
    for text in split_texts(source, held_out, "train"):
        texts.append(text)
        chars += len(text)
        if chars >= TRAIN_TOKENIZER_MAX_CHARS:
            break
    return cached_bpe_tokenizer(texts, args.tokenizer_vocab_size)


def train_stream(
    args: DataArguments, tokenizer, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0
):
    """The endless, shuffled, resumable stream of training sequences for this process; `num_workers`
    background processes read and tokenize ahead of the training step (0: in this process)."""
    if args.shards_dir:
        return ShardStream(
            args.shards_dir, "train", args.block_size, seed=seed, rank=rank, world_size=world_size
        )
    source = source_from_args(args, seed)
    stream = TokenStream(
        source,
        tokenizer,
        args.block_size,
        split="train",
        validation_per_mille=args.validation_per_mille,
        shuffle_buffer=args.shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )
    if rank == 0 and not stream.held_out.by_document:
        print(f"data: {stream.held_out.note()}", flush=True)
    return stream


def validation_sequences(args: DataArguments, tokenizer, seed: int) -> np.ndarray:
    """The first `eval_max_sequences` held-out sequences, identical on every process and every run."""
    if args.shards_dir:
        stream = ShardStream(args.shards_dir, "validation", args.block_size, shuffle=False, loop=False)
    else:
        source = source_from_args(args, seed, shuffle=False)
        stream = TokenStream(
            source,
            tokenizer,
            args.block_size,
            split="validation",
            validation_per_mille=args.validation_per_mille,
            loop=False,
        )
    seqs = []
    for seq in stream:
        seqs.append(seq)
        if len(seqs) >= args.eval_max_sequences:
            break
    if hasattr(stream, "close"):
        stream.close()
    return np.stack(seqs).astype(np.int64)
