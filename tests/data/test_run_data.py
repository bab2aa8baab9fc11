"""`RunData`, the one data object of a run: a real training run opens its source once, and what it hands out
is what a freshly opened source gives (the same training stream, held-out set, tokenizer text and count)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_args

from gpt2_training.cli import parse_config
from gpt2_training.config import DataArguments
from gpt2_training.data import RunData, open_source, source_options
from gpt2_training.data import sources as sources_module
from gpt2_training.data.pipeline import HeldOut, TokenStream, is_validation, split_texts
from gpt2_training.errors import ConfigError
from gpt2_training.trainer import train


def _corpus(tmp_path: Path, documents: int = 60) -> Path:
    """Small text files, one document each, enough for the document-level held-out split at 200 per mille."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(documents):
        words = " ".join(f"word{(i * 7 + j) % 50} and more text" for j in range(12))
        (folder / f"doc{i}.txt").write_text(f"Document {i}. {words}\n")
    return folder


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A small BPE learned from the same kind of text as `_corpus` (the corpus itself is not needed)."""
    from gpt2_training.data.tokenizer import train_bpe_tokenizer

    texts = [" ".join(f"word{(i * 7 + j) % 50} and more text" for j in range(12)) for i in range(60)]
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The description of every source opened from here on: each opening of any source class runs
    `_ShardedSource.__init__` (listing files, reading footers, checking the source is not empty)."""
    seen: list[str] = []
    real = sources_module._ShardedSource.__init__

    def counting(self, description, *args, **kwargs):
        seen.append(description)
        real(self, description, *args, **kwargs)

    monkeypatch.setattr(sources_module._ShardedSource, "__init__", counting)
    return seen


def test_a_training_run_opens_its_source_once(tmp_path, env, opened):
    """A run that trains its tokenizer, counts its epochs, streams its training data and evaluates on held-out
    sequences needs all four things from the source, and opens it once (the code before `RunData`: 4 times)."""
    corpus = _corpus(tmp_path)
    cfg = parse_config(
        tiny_args(
            tmp_path / "run",
            "--num_train_epochs",
            "1",
            dataset=str(corpus),
            max_steps=-1,
            tokenizer="train",
            validation_per_mille=200,
            eval_steps=2,
            save_steps=0,
        )
    )
    result = train(cfg)
    assert len(opened) == 1, opened
    assert opened[0].startswith("local files: 60 .txt files")
    # the run really used all four: epochs became steps, and it evaluated on held-out text
    assert result.step >= 2 and len(result.losses) == result.step
    assert result.evals and all(math.isfinite(e["eval_loss"]) for e in result.evals)


def test_what_it_hands_out_is_what_a_fresh_source_gives(tmp_path, small_tokenizer):
    """The training stream, the validation sequences and the count read the one opened source in their own
    order; each equals the same reader built on a source opened for it alone, as the run did before."""
    corpus = _corpus(tmp_path)
    args = DataArguments(dataset=str(corpus), block_size=16, validation_per_mille=200, eval_max_sequences=6)
    data = RunData(args, seed=3, tokenizer=small_tokenizer)
    got_train = [next(s) for s in [data.train_stream()] for _ in range(40)]
    got_val = data.validation_sequences()
    count = data.count_train_sequences()

    fresh = TokenStream(
        open_source(**source_options(args, 3)),
        small_tokenizer,
        16,
        validation_per_mille=200,
        shuffle_buffer=args.shuffle_buffer,
        seed=3,
    )
    assert np.array_equal(np.stack(got_train), np.stack([next(fresh) for _ in range(40)]))
    in_order = open_source(**source_options(args, 3, shuffle=False))
    fresh_val = TokenStream(
        in_order, small_tokenizer, 16, split="validation", validation_per_mille=200, loop=False
    )
    assert np.array_equal(got_val, np.stack([next(fresh_val) for _ in range(6)]))
    one_pass = TokenStream(in_order, small_tokenizer, 16, validation_per_mille=200, loop=False)
    assert count == sum(1 for _ in one_pass)
    # and the count is the corpus's: its training documents' tokens (EOS included) in whole sequences
    docs = [p.read_text() for p in sorted(corpus.iterdir())]
    tokens = sum(len(small_tokenizer(d).input_ids) + 1 for d in docs if not is_validation(d, 200))
    assert count == tokens // 16


def test_the_tokenizer_learns_from_the_training_text_in_its_own_seed_order(tmp_path, env):
    """--seed orders the text a BPE learns from (the cache is keyed by it), --data_seed the training stream:
    the tokenizer of a run with another data seed is the one a fresh source in --seed's order trains."""
    corpus = _corpus(tmp_path)
    args = DataArguments(
        dataset=str(corpus), tokenizer="train", tokenizer_vocab_size=300, validation_per_mille=200
    )
    data = RunData(args, seed=11, tokenizer_seed=5)
    source = open_source(str(corpus), seed=5)
    texts = list(split_texts(source, HeldOut(source, 200), "train"))
    from gpt2_training.data.tokenizer import cached_bpe_tokenizer

    assert data.tokenizer.name_or_path == cached_bpe_tokenizer(texts, 300).name_or_path
    # another order is other text, so another cached tokenizer: the seed really decides
    other = open_source(str(corpus), seed=11)
    other_texts = list(split_texts(other, HeldOut(other, 200), "train"))
    assert other_texts != texts
    assert cached_bpe_tokenizer(other_texts, 300).name_or_path != data.tokenizer.name_or_path


def test_each_reader_has_its_own_order_and_counts(tmp_path):
    """`reordered` shares the opening, not the order or the statistics of what was read."""
    corpus = _corpus(tmp_path, documents=12)
    source = open_source(str(corpus), shuffle=True, seed=1)
    in_order = source.reordered(False, 0)
    assert in_order.shard_order(0) == list(range(12)) != source.shard_order(0)
    assert sum(1 for _ in in_order.pieces()) == 12
    assert in_order.stats["documents_read"] == 12 and source.stats["documents_read"] == 0


def test_shards_and_given_tokenizers_open_no_source(tmp_path, small_tokenizer, opened):
    """With --shards_dir and a given tokenizer, nothing needs the source: it is never opened."""
    from gpt2_training.data.shards import prepare_shards

    corpus = _corpus(tmp_path)
    prepare_shards(open_source(str(corpus)), small_tokenizer, tmp_path / "shards", progress=False)
    opened.clear()
    args = DataArguments(shards_dir=str(tmp_path / "shards"), block_size=16, eval_max_sequences=2)
    data = RunData(args, seed=0, tokenizer=small_tokenizer)
    assert next(data.train_stream()).shape == (16,)
    assert data.validation_sequences().shape == (2, 16)
    assert data.count_train_sequences() > 0
    assert opened == []


@pytest.mark.parametrize(
    "spec",
    ["openwebtext", "hf:org/corpus", "s3://bucket/ds", "deeplake:s3://bucket/ds", "hf-parquet:s3://b/x"],
)
def test_epochs_over_a_streamed_source_are_refused_before_it_is_opened(spec, opened):
    with pytest.raises(ConfigError, match="is streamed: set --max_steps"):
        RunData(DataArguments(dataset=spec), seed=0, tokenizer=object()).count_train_sequences()
    assert opened == []


def test_prepare_opens_its_source_once(tmp_path, opened, monkeypatch):
    """`train.py prepare` trains its tokenizer on the source it then tokenizes: one opening (before: two)."""
    from gpt2_training.cli import prepare_main

    monkeypatch.setenv("GPT2_TRAINING_CACHE", str(tmp_path / "cache"))
    corpus = _corpus(tmp_path)
    args = ["--dataset", str(corpus), "--tokenizer", "train", "--tokenizer_vocab_size", "300"]
    meta = prepare_main([*args, "--out", str(tmp_path / "shards")])
    # 60 documents are too few for a document-level split at 50 per mille: each gives its head and its tail
    assert meta["documents"] == {"train": 60, "validation": 60}
    assert len(opened) == 1, opened
