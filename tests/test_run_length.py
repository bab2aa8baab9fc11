"""`run_length.resolve_max_steps`: the Trainer's precedence (max_steps over num_train_epochs), epochs as the
corpus's training sequences over the global batch, rounded up, and a corpus smaller than one step refused."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_args

from gpt2_training.cli import parse_config
from gpt2_training.data import RunData
from gpt2_training.errors import ConfigError
from gpt2_training.run_length import resolve_max_steps


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from gpt2_training.data.tokenizer import train_bpe_tokenizer

    texts = [f"Document {i}: some words, then a few more words." for i in range(40)]
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "bpe")


def _setup(tmp_path, tokenizer, documents: int, *extra: str, **settings):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(documents):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: some words, then a few more words. " * 8)
    settings = {"dataset": str(corpus), "validation_per_mille": 0, "block_size": 16, **settings}
    cfg = parse_config(tiny_args(tmp_path / "run", *extra, **settings))
    return cfg, RunData(cfg.data, seed=0, tokenizer=tokenizer)


def test_epochs_are_sequences_over_the_global_batch_rounded_up(tmp_path, tokenizer):
    cfg, data = _setup(tmp_path, tokenizer, 30, "--num_train_epochs", "1.5", max_steps=-1)
    sequences = data.count_train_sequences()
    steps, note = resolve_max_steps(cfg, data, world_size=3, epochs_set=True)
    per_step = 4 * 1 * 3  # per-device batch x accumulation x processes
    assert steps == math.ceil(1.5 * sequences / per_step) and steps > 1
    assert note.startswith(
        f"num_train_epochs=1.5: {sequences:,} training sequences / {per_step} per step = {steps}"
    )


def test_max_steps_wins_and_says_so_when_epochs_were_set(tmp_path, tokenizer):
    cfg, data = _setup(tmp_path, tokenizer, 3, "--num_train_epochs", "2", max_steps=5)
    assert resolve_max_steps(cfg, data, world_size=1, epochs_set=True) == (
        5,
        "max_steps=5 overrides num_train_epochs=2 (the Trainer's precedence); drop --max_steps to train by epochs",
    )
    assert resolve_max_steps(cfg, data, world_size=1, epochs_set=False) == (5, None)


def test_a_corpus_smaller_than_one_step_is_refused_with_fixes(tmp_path, tokenizer):
    cfg, data = _setup(tmp_path, tokenizer, 1, "--num_train_epochs", "1", max_steps=-1)
    sequences = data.count_train_sequences()
    with pytest.raises(
        ConfigError, match=f"has {sequences} training sequences of 16 tokens, fewer than one step"
    ):
        resolve_max_steps(cfg, data, world_size=64, epochs_set=True)
