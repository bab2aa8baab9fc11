"""Tokenizers: GPT-2's byte-level BPE from the Hub, or one trained on your own corpus with the same recipe.

A trained tokenizer is saved as a standard Hugging Face tokenizer (`AutoTokenizer.from_pretrained(dir)`)
and cached by a hash of the corpus and the vocabulary size, so a second run reuses it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .corpus import cache_dir

if TYPE_CHECKING:  # transformers is imported when a tokenizer is built, not with the package
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE (same pre-tokenizer, same end-of-text token) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is ever unknown
        show_progress=False,
    )
    from ..progress import bar

    # the bar counts documents read; the merges that follow take a fraction of that time
    shown = bar(len(texts) if hasattr(texts, "__len__") else None, "tokenizer", unit="doc", leave=False)
    tok.train_from_iterator(texts if shown is None else _counted(texts, shown), trainer=trainer)
    if shown is not None:
        shown.close()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    fast.model_max_length = 1 << 30  # packing handles length; silence the "sequence too long" warning
    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    fast.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a cache entry is complete or absent
    except OSError:  # another process finished the same tokenizer first: theirs is identical, keep it
        shutil.rmtree(tmp, ignore_errors=True)
    # loaded back, so a new and a cached tokenizer are the same object (name, settings)
    return load_tokenizer(str(out))


def _counted(texts: Iterable[str], shown) -> Iterable[str]:
    for text in texts:
        shown.update(1)
        yield text


def cached_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train once per (corpus, vocabulary size); later calls load the cached tokenizer."""
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8", "replace"))
        digest.update(b"\x00")
    path = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}"
    if (path / "tokenizer.json").exists():
        return load_tokenizer(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return train_bpe_tokenizer(texts, vocab_size, path)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a folder or the Hub, with a clear message when it cannot be reached."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load tokenizer {name_or_path!r} ({type(exc).__name__}): check the name and your network, "
            "or use --tokenizer train (a BPE trained on your corpus) or a local tokenizer folder"
        ) from exc
    if not tok.is_fast:
        raise ConfigError(
            f"tokenizer {name_or_path!r} has no fast (Rust) version; batch tokenization needs one"
        )
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {name_or_path!r} has no end-of-text token to separate documents")
    tok.model_max_length = 1 << 30
    return tok
