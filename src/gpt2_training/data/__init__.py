"""The data flow, one file per step: sources -> tokenizer -> pipeline (split, pack, shuffle) -> shards.

This module wires them together from a run's settings.
"""

from __future__ import annotations

import numpy as np

from ..config import DataArguments
from .pipeline import TokenStream, is_validation
from .shards import ShardStream
from .sources import open_source
from .tokenizer import cached_bpe_tokenizer, load_tokenizer

TRAIN_TOKENIZER_MAX_CHARS = 50_000_000  # a BPE learned from 50 M characters is as good as from all of them


def source_from_args(args: DataArguments, seed: int, shuffle: bool | None = None):
    """The settings' data source; `shuffle` overrides --shuffle_shards (held-out data is read in order)."""
    return open_source(
        args.dataset,
        text_field=args.text_field,
        split=args.dataset_split,
        txt_mode=args.txt_mode,
        shuffle=args.shuffle_shards if shuffle is None else shuffle,
        seed=seed,
        max_piece_chars=args.max_piece_chars,
    )


def resolve_tokenizer(args: DataArguments, seed: int = 0):
    """'auto': a BPE trained on the built-in corpus, GPT-2's tokenizer for anything else."""
    name = args.tokenizer
    if name == "auto":
        name = "train" if args.dataset == "builtin" else "gpt2"
    if name != "train":
        return load_tokenizer(name)
    texts, chars = [], 0
    for piece in source_from_args(args, seed).pieces(
        0, None
    ):  # training documents only: held-out stays unseen
        if not is_validation(piece.text, args.validation_per_mille):
            texts.append(piece.text)
            chars += len(piece.text)
        if chars >= TRAIN_TOKENIZER_MAX_CHARS:
            break
    return cached_bpe_tokenizer(texts, args.tokenizer_vocab_size)


def train_stream(args: DataArguments, tokenizer, seed: int, rank: int = 0, world_size: int = 1):
    """The endless, shuffled, resumable stream of training sequences for this process."""
    if args.shards_dir:
        return ShardStream(
            args.shards_dir, "train", args.block_size, seed=seed, rank=rank, world_size=world_size
        )
    return TokenStream(
        source_from_args(args, seed),
        tokenizer,
        args.block_size,
        split="train",
        validation_per_mille=args.validation_per_mille,
        shuffle_buffer=args.shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )


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
    return np.stack(seqs).astype(np.int64)
