"""The data flow, one file per step: sources -> tokenizer -> pipeline (split, pack, shuffle) -> shards, with
background workers (workers.py) and the mapping of data positions onto another number of processes (restore.py).

`RunData` (run_data.py) wires them together from a run's settings and opens the source once. Importing the
package loads neither torch, transformers, datasets nor deeplake: each is imported when a source or tokenizer
that needs it is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .opening import open_source, parse_source
from .pipeline import HeldOut, TokenStream, is_validation
from .restore import restore_stream
from .run_data import RunData, source_from_args, source_options
from .shards import ShardStream
from .tokenizer import cached_bpe_tokenizer, load_tokenizer

if TYPE_CHECKING:
    from ..config import DataArguments

__all__ = [
    "HeldOut",
    "RunData",
    "ShardStream",
    "TokenStream",
    "cached_bpe_tokenizer",
    "is_validation",
    "load_tokenizer",
    "open_source",
    "parse_source",
    "resolve_tokenizer",
    "restore_stream",
    "source_from_args",
    "source_options",
    "train_stream",
    "validation_sequences",
]


# One-call shortcuts for a notebook cell, a benchmark or a test that needs one thing: each opens the source
# afresh, so a run asks one `RunData` for all of them instead.
def resolve_tokenizer(args: DataArguments, seed: int = 0):
    """`RunData.tokenizer`: 'auto' is a BPE trained on the built-in corpus, GPT-2's tokenizer for anything else."""
    return RunData(args, seed).tokenizer


def train_stream(
    args: DataArguments, tokenizer, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0
):
    """`RunData.train_stream`: this process's endless, shuffled, resumable stream of training sequences."""
    return RunData(args, seed, tokenizer=tokenizer).train_stream(rank, world_size, num_workers)


def validation_sequences(args: DataArguments, tokenizer, seed: int) -> np.ndarray:
    """`RunData.validation_sequences`: the first `eval_max_sequences` held-out sequences."""
    return RunData(args, seed, tokenizer=tokenizer).validation_sequences()
