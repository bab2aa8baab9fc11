"""One run's data, opened once: the source, its held-out split, the tokenizer, each process's training stream,
the validation sequences and the corpus's size in sequences. Construct it from the settings, then ask it."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from .opening import open_source
from .pipeline import HeldOut, TokenStream, split_texts
from .shards import ShardStream
from .sources import DocumentSource, parse_source
from .tokenizer import cached_bpe_tokenizer, load_tokenizer

if TYPE_CHECKING:
    from ..config import DataArguments

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


def source_from_args(args: DataArguments, seed: int, shuffle: bool | None = None) -> DocumentSource:
    """The settings' data source; `shuffle` overrides --shuffle_shards (held-out data is read in order)."""
    return open_source(**source_options(args, seed, shuffle))


class RunData:
    """The data of one run (litgpt's DataModule: construct, then ask). The source is opened on first need and
    only once; the held-out split is measured once; each reader (the tokenizer's text, the training stream, the
    validation set, the count) reads the same opened source in its own shard order with its own counts.

    `seed` orders the training data (--data_seed, else --seed); `tokenizer_seed` orders the text a BPE is
    trained on (--seed: the cached tokenizer is keyed by that text); `tokenizer`, when given, is used as is."""

    def __init__(self, args: DataArguments, seed: int, *, tokenizer_seed: int | None = None, tokenizer=None):
        self.args, self.seed = args, seed
        self.tokenizer_seed = seed if tokenizer_seed is None else tokenizer_seed
        if tokenizer is not None:
            # stored where the cached property keeps its value, so it is never resolved
            self.tokenizer = tokenizer

    @cached_property
    def source(self) -> DocumentSource:
        """The opened source, in --shuffle_shards' order for `seed`."""
        return source_from_args(self.args, self.seed)

    def _reader(self, shuffle: bool, seed: int) -> DocumentSource:
        return self.source.reordered(shuffle, seed)

    @cached_property
    def held_out(self) -> HeldOut:
        """Which text is held out (it does not depend on the shard order, so every reader shares it)."""
        return HeldOut(self.source, self.args.validation_per_mille)

    @cached_property
    def tokenizer(self):
        """'auto': a BPE trained on the built-in corpus, GPT-2's tokenizer for anything else."""
        name = self.args.tokenizer
        if name == "auto":
            name = "train" if self.args.dataset == "builtin" else "gpt2"
        if name != "train":
            return load_tokenizer(name)
        texts, chars = [], 0
        reader = self._reader(self.args.shuffle_shards, self.tokenizer_seed)
        # training text only: held-out text stays unseen
        for text in split_texts(reader, self.held_out, "train"):
            texts.append(text)
            chars += len(text)
            if chars >= TRAIN_TOKENIZER_MAX_CHARS:
                break
        return cached_bpe_tokenizer(texts, self.args.tokenizer_vocab_size)

    def train_stream(self, rank: int = 0, world_size: int = 1, num_workers: int = 0):
        """The endless, shuffled, resumable stream of training sequences for this process; `num_workers`
        background processes read and tokenize ahead of the training step (0: in this process)."""
        a = self.args
        if a.shards_dir:
            return ShardStream(
                a.shards_dir, "train", a.block_size, seed=self.seed, rank=rank, world_size=world_size
            )
        reader = self._reader(a.shuffle_shards, self.seed)
        options = {"shuffle_buffer": a.shuffle_buffer, "seed": self.seed, "num_workers": num_workers}
        stream = self._token_stream(reader, "train", rank=rank, world_size=world_size, **options)
        if rank == 0 and not stream.held_out.by_document:
            print(f"data: {stream.held_out.note()}", flush=True)
        return stream

    def _one_pass(self, split: str):
        """Every `split` sequence once, in the source's own order (the same on every process and in every run)."""
        a = self.args
        if a.shards_dir:
            return ShardStream(a.shards_dir, split, a.block_size, shuffle=False, loop=False)
        return self._token_stream(self._reader(False, self.seed), split, loop=False)

    def _token_stream(self, reader: DocumentSource, split: str, **options: Any) -> TokenStream:
        """A stream of `split` sequences over `reader`, cut by the run's held-out split."""
        a = self.args
        return TokenStream(
            reader,
            self.tokenizer,
            a.block_size,
            split=split,
            validation_per_mille=a.validation_per_mille,
            held_out=self.held_out,
            **options,
        )

    def validation_sequences(self) -> np.ndarray:
        """The first `eval_max_sequences` held-out sequences, identical on every process and every run."""
        stream = self._one_pass("validation")
        seqs = []
        for seq in stream:
            seqs.append(seq)
            if len(seqs) >= self.args.eval_max_sequences:
                break
        if hasattr(stream, "close"):
            stream.close()
        return np.stack(seqs).astype(np.int64)

    def count_train_sequences(self) -> int:
        """Training sequences of one pass over the corpus (one process, no shuffle): exact, by reading it once."""
        a = self.args
        if a.shards_dir:
            stream = self._one_pass("train")
            windows = getattr(stream, "windows_per_shard", None)
            if windows is not None:
                return int(windows.sum())
            return sum(1 for _ in stream)
        if parse_source(a.dataset).streamed:
            raise ConfigError(
                f"--num_train_epochs needs a corpus of known size, and {a.dataset} is streamed: set --max_steps, "
                "or tokenize it once with `train.py prepare --dataset ... --out DIR` and train with --shards_dir DIR"
            )
        return sum(1 for _ in self._one_pass("train"))
