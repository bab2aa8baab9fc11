"""The pipeline from documents to sequences: packing loses nothing, the split is stable and disjoint, ranks
read disjoint documents, the same documents give the same tokens through every source kind, and a stream
resumes exactly from its saved state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2_training.data.opening import open_source
from gpt2_training.data.pipeline import TokenStream, is_validation
from gpt2_training.data.shards import ShardStream, prepare_shards
from gpt2_training.data.tokenizer import train_bpe_tokenizer
from gpt2_training.errors import DataError

DOCS = [
    f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 53}" for j in range(5 + i % 17)) for i in range(120)
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(DOCS, 300, tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture()
def jsonl(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for part in range(3):  # several files, so shard-order shuffling has something to shuffle
        rows = DOCS[part * 40 : (part + 1) * 40]
        (folder / f"part{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in rows))
    return folder


def stream(source, tokenizer, **kw) -> TokenStream:
    kw.setdefault("block_size", 16)
    return TokenStream(source, tokenizer, kw.pop("block_size"), **kw)


def expected_tokens(tokenizer, docs):
    out = []
    for d in docs:
        out += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


def test_packing_keeps_every_token_in_order(jsonl, tokenizer):
    src = open_source(str(jsonl), shuffle=False)
    s = stream(src, tokenizer, split="train", validation_per_mille=0, loop=False)
    packed = np.concatenate(list(s)).tolist()
    want = expected_tokens(tokenizer, DOCS)
    assert packed == want[: len(packed)]
    assert len(want) - len(packed) < 16  # only the final partial block waits
    stats = s.stats
    assert stats["tokens"] == len(want) and stats["tokens_packed"] + stats["tokens_waiting"] == len(want)
    assert stats["documents"] == len(DOCS)


def test_split_is_stable_and_disjoint(jsonl, tokenizer):
    train = [d for d in DOCS if not is_validation(d, 200)]
    val = [d for d in DOCS if is_validation(d, 200)]
    assert 0 < len(val) < len(DOCS) and set(train).isdisjoint(val)
    assert val == [d for d in DOCS if is_validation(d, 200)]  # stable
    for split, docs in (("train", train), ("validation", val)):
        s = stream(
            open_source(str(jsonl), shuffle=False),
            tokenizer,
            split=split,
            validation_per_mille=200,
            loop=False,
            block_size=8,
        )
        packed = np.concatenate(list(s)).tolist()
        assert packed == expected_tokens(tokenizer, docs)[: len(packed)]


@pytest.mark.parametrize("files", [1, 3])
def test_two_ranks_read_disjoint_documents_and_tokenize_only_their_own(tmp_path, tokenizer, files):
    """One file: both ranks read it and each keeps every other document. Three files (at least one shard per
    process): each rank reads only its own files, measured by the documents its source yields."""
    folder = tmp_path / f"docs{files}"
    folder.mkdir()
    per_file = len(DOCS) // files
    for part in range(files):
        rows = DOCS[part * per_file : (part + 1) * per_file]
        (folder / f"part{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in rows))
    seen: dict[int, list[str]] = {0: [], 1: []}
    read: dict[int, int] = {}

    class Recording:
        """The real tokenizer, recording which texts each rank asks it to encode."""

        def __init__(self, rank):
            self.rank = rank

        def __call__(self, texts, **kw):
            seen[self.rank].extend(texts)
            return tokenizer(texts, **kw)

        def __len__(self):
            return len(tokenizer)

        eos_token_id = tokenizer.eos_token_id

    for rank in (0, 1):
        source = open_source(str(folder), shuffle=False)
        s = stream(
            source, Recording(rank), validation_per_mille=0, rank=rank, world_size=2, loop=False, block_size=8
        )
        list(s)
        read[rank] = source.stats["documents_read"]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(DOCS)
    if files == 1:
        assert abs(len(seen[0]) - len(seen[1])) <= 1
        assert read == {0: len(DOCS), 1: len(DOCS)}
    else:
        # rank 0 owns files 0 and 2, rank 1 file 1: each read exactly the documents it tokenized
        assert read == {0: len(seen[0]), 1: len(seen[1])} == {0: 2 * per_file, 1: per_file}


def write_deeplake(path: Path, docs: list[str]) -> Path:
    import deeplake

    ds = deeplake.create(f"file://{path}")
    ds.add_column("text", deeplake.types.Text())
    ds.append({"text": docs})
    ds.commit()
    return path


def test_same_documents_give_the_same_tokens_through_files_deeplake_and_hf_datasets(
    jsonl, tmp_path, tokenizer
):
    lake = write_deeplake(tmp_path / "lake", DOCS)
    single = tmp_path / "all.jsonl"
    single.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    streams = {
        "local": open_source(str(single), shuffle=False),
        "deeplake": open_source(f"deeplake:{lake}", shuffle=False),
        "hf-datasets": open_source(f"hf-json:{single}", shuffle=False),
    }
    tokens = {
        name: np.concatenate(list(stream(src, tokenizer, validation_per_mille=100, loop=False))).tolist()
        for name, src in streams.items()
    }
    assert tokens["local"] == tokens["deeplake"] == tokens["hf-datasets"]
    assert len(tokens["local"]) > 1000


def roundtrip(state):
    meta, arrays = state
    return json.loads(json.dumps(meta)), {k: v.copy() for k, v in arrays.items()}


@pytest.mark.parametrize("shuffle_buffer", [0, 7])
def test_token_stream_resumes_exactly(jsonl, tokenizer, shuffle_buffer):
    def make():
        return stream(
            open_source(str(jsonl), shuffle=True, seed=3),
            tokenizer,
            shuffle_buffer=shuffle_buffer,
            seed=3,
            validation_per_mille=100,
            read_chars=300,
        )

    straight = make()
    reference = [next(straight).tolist() for _ in range(400)]  # several epochs of this small corpus
    for k in (0, 1, 37, 150, 333):
        s = make()
        for _ in range(k):
            next(s)
        saved = roundtrip(s.state_dict())
        resumed = make()
        resumed.load_state_dict(*saved)
        assert [next(resumed).tolist() for _ in range(400 - k)] == reference[k:], k


def test_epochs_reshuffle_but_replay_identically(jsonl, tokenizer):
    a = stream(open_source(str(jsonl), shuffle=True, seed=1), tokenizer, shuffle_buffer=5, seed=1)
    b = stream(open_source(str(jsonl), shuffle=True, seed=1), tokenizer, shuffle_buffer=5, seed=1)
    c = stream(open_source(str(jsonl), shuffle=True, seed=2), tokenizer, shuffle_buffer=5, seed=2)
    first = [next(a).tolist() for _ in range(60)]
    assert first == [next(b).tolist() for _ in range(60)]
    assert first != [next(c).tolist() for _ in range(60)]


def test_resume_fails_when_the_data_shrank(jsonl, tokenizer):
    s = stream(open_source(str(jsonl), shuffle=False), tokenizer, validation_per_mille=0, read_chars=100)
    for _ in range(5):
        next(s)
    saved = roundtrip(s.state_dict())
    for f in sorted(jsonl.iterdir())[1:]:
        f.unlink()
    first = sorted(jsonl.iterdir())[0]
    first.write_text(first.read_text().splitlines(keepends=True)[0])  # the saved position is now past the end
    resumed = stream(
        open_source(str(jsonl), shuffle=False), tokenizer, validation_per_mille=0, read_chars=100
    )
    with pytest.raises(DataError, match="ran out while resuming"):
        resumed.load_state_dict(*saved)  # fails at once, not after the already-packed sequences run out


def test_corpus_smaller_than_one_block_says_how_many_tokens(tmp_path, tokenizer):
    f = tmp_path / "tiny.txt"
    f.write_text("just a few words")
    s = stream(open_source(str(f)), tokenizer, block_size=512, validation_per_mille=0)
    with pytest.raises(DataError, match=r"has \d+ train tokens .* block_size=512"):
        next(s)


def test_shards_hold_exactly_the_tokens_and_resume_in_o1(jsonl, tmp_path, tokenizer):
    meta = prepare_shards(
        open_source(str(jsonl), shuffle=False),
        tokenizer,
        tmp_path / "shards",
        validation_per_mille=100,
        shard_tokens=500,
        progress=False,
    )
    assert meta["dtype"] == "uint16" and len(meta["shards"]["train"]) > 1
    on_disk = np.concatenate(
        [np.fromfile(tmp_path / "shards" / f["file"], dtype=np.uint16) for f in meta["shards"]["train"]]
    ).tolist()
    train_docs = [d for d in DOCS if not is_validation(d, 100)]
    assert on_disk == expected_tokens(tokenizer, train_docs)
    assert meta["tokens"]["train"] == len(on_disk)

    def make(rank=0, world=1):
        return ShardStream(tmp_path / "shards", "train", 16, seed=5, rank=rank, world_size=world)

    straight = make()
    reference = [next(straight).tolist() for _ in range(300)]
    s = make()
    for _ in range(123):
        next(s)
    resumed = make()
    resumed.load_state_dict(*roundtrip(s.state_dict()))
    assert [next(resumed).tolist() for _ in range(177)] == reference[123:]
    r0, r1 = make(0, 2), make(1, 2)
    w0 = {tuple(next(r0).tolist()) for _ in range(20)}
    w1 = {tuple(next(r1).tolist()) for _ in range(20)}
    assert w0.isdisjoint(w1)


def test_prepare_refuses_to_overwrite(jsonl, tmp_path, tokenizer):
    prepare_shards(open_source(str(jsonl)), tokenizer, tmp_path / "s", progress=False)
    with pytest.raises(DataError, match="already holds"):
        prepare_shards(open_source(str(jsonl)), tokenizer, tmp_path / "s", progress=False)


LICENCE_LIKE = " ".join(f"clause{i % 97} shall apply to part{i % 13}." for i in range(2500))  # ~ 60 K chars


def test_a_single_document_trains_and_holds_out_its_tail(tmp_path, tokenizer, capsys):
    """One text file is one document: the held-out part is the last validation_per_mille of its characters, the
    same in every run, and the log says so once."""
    from gpt2_training.config import DataArguments
    from gpt2_training.data import train_stream, validation_sequences

    f = tmp_path / "input.txt"
    f.write_text(LICENCE_LIKE)
    args = DataArguments(dataset=str(f), block_size=32, eval_max_sequences=4, shuffle_buffer=0)
    train = train_stream(args, tokenizer, seed=1)
    assert "held out: the last 50 per mille of each document's characters" in capsys.readouterr().out
    val = validation_sequences(args, tokenizer, seed=1)
    cut = len(LICENCE_LIKE) - -(-len(LICENCE_LIKE) * 50 // 1000)
    want_val = tokenizer(LICENCE_LIKE[cut:], add_special_tokens=False)["input_ids"]
    assert val.reshape(-1).tolist() == want_val[: val.size]
    want_train = tokenizer(LICENCE_LIKE[:cut], add_special_tokens=False)["input_ids"]
    got = np.concatenate([next(train) for _ in range(20)]).tolist()
    assert got == want_train[: len(got)]
    again = TokenStream(open_source(str(f)), tokenizer, 32, split="validation", loop=False)
    assert np.array_equal(np.stack([next(again) for _ in range(4)]), val)


def test_every_suggestion_of_a_too_small_error_works(tmp_path, tokenizer):
    f = tmp_path / "input.txt"
    f.write_text(LICENCE_LIKE)

    def first(split, block, per_mille):
        return next(
            TokenStream(open_source(str(f)), tokenizer, block, split=split, validation_per_mille=per_mille)
        )

    with pytest.raises(DataError, match=r"lower --block_size or raise --validation_per_mille \(now 5\)"):
        first("validation", 512, 5)
    assert first("validation", 64, 5).shape == (64,)  # followed: lower --block_size
    assert first("validation", 512, 200).shape == (512,)  # followed: raise --validation_per_mille
    with pytest.raises(DataError, match=r"lower --validation_per_mille \(now 995\)"):
        first("train", 512, 995)
    assert first("train", 512, 500).shape == (512,)  # followed: lower --validation_per_mille
    more = tmp_path / "more"
    more.mkdir()
    (more / "a.txt").write_text(LICENCE_LIKE[:2000])
    with pytest.raises(DataError, match="add data"):
        next(TokenStream(open_source(str(more)), tokenizer, 4096, validation_per_mille=0))
    (more / "b.txt").write_text(LICENCE_LIKE)  # followed: add data
    assert next(TokenStream(open_source(str(more)), tokenizer, 4096, validation_per_mille=0)).shape == (4096,)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_file_deleted_mid_run_stops_the_stream_with_the_file_named(jsonl, tokenizer, num_workers):
    """The training stream (read in this thread, or ahead in the reader thread that background workers use) raises
    DataUnavailable naming the file, which the engine turns into a checkpoint and a one-line stop. A deletion is
    used because tests run as root, which reads a chmod 000 file."""
    from gpt2_training.errors import DataUnavailable

    src = open_source(str(jsonl), shuffle=False)
    s = stream(
        src,
        tokenizer,
        validation_per_mille=0,
        read_chars=256,
        num_workers=num_workers,
        worker_backend="thread",
    )
    next(s)
    (jsonl / "part2.jsonl").unlink()
    with pytest.raises(
        DataUnavailable, match=rf"^{jsonl / 'part2.jsonl'} stopped being readable during the run"
    ):
        for _ in range(10_000):
            next(s)
    s.close()
