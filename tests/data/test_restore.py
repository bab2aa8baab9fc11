"""Tests for gpt2_training.data.restore: a data position saved by N processes continues on M. Every sequence is
recorded by its tokens, so the tests check what was lost and what was repeated, not just that it runs."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from gpt2_training.data import restore_stream
from gpt2_training.data.opening import open_source
from gpt2_training.data.pipeline import TokenStream
from gpt2_training.data.shards import ShardStream, prepare_shards
from gpt2_training.data.tokenizer import train_bpe_tokenizer
from gpt2_training.errors import DataError

DOCS = [f"Item {i} says " + " ".join(f"v{(i * 5 + j) % 89}" for j in range(4 + i % 19)) for i in range(160)]
BLOCK = 8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(DOCS, 350, tmp_path_factory.mktemp("tok") / "bpe")


def write(folder, files: int):
    folder.mkdir()
    per = len(DOCS) // files
    for f in range(files):
        rows = DOCS[f * per : (f + 1) * per]
        (folder / f"p{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in rows))
    return folder


def roundtrip(state):
    meta, arrays = state
    return json.loads(json.dumps(meta)), {k: v.copy() for k, v in arrays.items()}


def token_stream(folder, tokenizer, rank, world, **kw):
    return TokenStream(
        open_source(str(folder), shuffle=False),
        tokenizer,
        BLOCK,
        validation_per_mille=0,
        shuffle_buffer=kw.pop("shuffle_buffer", 5),
        seed=2,
        rank=rank,
        world_size=world,
        loop=False,
        read_chars=kw.pop("read_chars", 200),
        **kw,
    )


def drain(stream) -> list[list[int]]:
    out = [seq.tolist() for seq in stream]
    return out


def all_tokens(tokenizer) -> Counter:
    ids = []
    for d in DOCS:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Counter(ids)


@pytest.mark.parametrize("files", [1, 8])
@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 3)])
def test_streaming_resize_loses_nothing_and_repeats_nothing(tmp_path, tokenizer, files, old, new):
    """One pass over the corpus: N processes hand out k sequences each, save, and M processes finish the pass.
    Tokens handed out before + after + left in the final packing remainders equal the corpus's tokens exactly
    (documents here are shorter than max_piece_chars, so the documented bound is zero loss)."""
    folder = write(tmp_path / "d", files)
    olds = [token_stream(folder, tokenizer, r, old) for r in range(old)]
    before = [next(s).tolist() for s in olds for _ in range(7)]
    saved = [roundtrip(s.state_dict()) for s in olds]
    news = [token_stream(folder, tokenizer, r, new) for r in range(new)]
    for s in news:
        restore_stream(s, saved, old)
    after = [seq for s in news for seq in drain(s)]
    leftover = [t for s in news for t in s.carry]
    got = Counter(t for seq in before + after for t in seq) + Counter(leftover)
    assert got == all_tokens(tokenizer)
    assert len(after) > 10


def test_same_world_size_is_the_exact_load(tmp_path, tokenizer):
    folder = write(tmp_path / "d", 8)
    ref = token_stream(folder, tokenizer, 1, 2)
    reference = drain(ref)
    s = token_stream(folder, tokenizer, 1, 2)
    first = [next(s).tolist() for _ in range(9)]
    saved = [roundtrip(token_stream(folder, tokenizer, 0, 2).state_dict()), roundtrip(s.state_dict())]
    resumed = token_stream(folder, tokenizer, 1, 2)
    restore_stream(resumed, saved, 2)
    assert first + drain(resumed) == reference


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 3)])
def test_shards_resize_is_exact(tmp_path, tokenizer, old, new):
    """Token shards: the windows handed out before and after a resize are each epoch's windows, each once."""
    folder = write(tmp_path / "d", 2)
    prepare_shards(
        open_source(str(folder), shuffle=False),
        tokenizer,
        tmp_path / "s",
        validation_per_mille=0,
        progress=False,
    )
    olds = [ShardStream(tmp_path / "s", "train", BLOCK, seed=3, rank=r, world_size=old) for r in range(old)]
    n = olds[0].n_windows
    before = [tuple(next(s).tolist()) for _ in range(5) for s in olds]
    saved = [roundtrip(s.state_dict()) for s in olds]
    news = [
        ShardStream(tmp_path / "s", "train", BLOCK, seed=3, rank=r, world_size=new, loop=False)
        for r in range(new)
    ]
    for s in news:
        restore_stream(s, saved, old)
    after = [tuple(seq.tolist()) for s in news for seq in s]
    everything = [
        tuple(seq.tolist()) for seq in ShardStream(tmp_path / "s", "train", BLOCK, shuffle=False, loop=False)
    ]
    handed = before + after
    # every window of the epoch once, but for the remainder that M processes cannot share equally
    assert Counter(handed) <= Counter(everything)
    assert len(handed) == n - (n - 5 * old) % new


def test_mismatched_states_are_refused(tmp_path, tokenizer):
    folder = write(tmp_path / "d", 2)
    s = token_stream(folder, tokenizer, 0, 1)
    with pytest.raises(DataError, match="all 2 old processes"):
        restore_stream(s, [roundtrip(s.state_dict())], 2)
    prepare_shards(
        open_source(str(folder)), tokenizer, tmp_path / "s", validation_per_mille=0, progress=False
    )
    shards = ShardStream(tmp_path / "s", "train", BLOCK)
    with pytest.raises(DataError, match="same data settings"):
        restore_stream(shards, [roundtrip(s.state_dict())], 1)
    other = ShardStream(tmp_path / "s", "train", BLOCK * 2)
    with pytest.raises(DataError, match="same --block_size"):
        restore_stream(other, [roundtrip(shards.state_dict())], 1)
    assert np.asarray(next(shards)).shape == (BLOCK,)
