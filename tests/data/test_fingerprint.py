"""Tests for gpt2_training.data.fingerprint: a corpus changed in place (same names, same sizes, other text) is
refused on resume with the file named, for streamed files and for prepared shards; --allow_resume_changes resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import tiny_args

from gpt2_training import checkpoint as ckpt
from gpt2_training.data.fingerprint import END_BLOCK, content_changes, file_fingerprint
from gpt2_training.data.opening import open_source

WORDS = "the quick brown fox jumps over the lazy dog while a small model learns to predict text".split()


def write_corpus(folder: Path, files: int = 12, words: int = 400) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(files):
        text = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words))
        paths.append(folder / f"doc{i:02d}.txt")
        paths[-1].write_text(text + "\n")
    return paths


def same_size_other_text(path: Path, unit: int = 1) -> None:
    """Rewrite `path` with its `unit`-byte items (characters, or token ids) in reverse order: other content of
    the same length, written one second later, as an edit in place would be."""
    data = path.read_bytes()
    items = [data[i : i + unit] for i in range(0, len(data), unit)]
    path.write_bytes(b"".join(reversed(items)))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == len(data)


def builtin_tokenizer(shared_cache: Path) -> str:
    """A BPE tokenizer from the session cache, fixed for the whole test: a corpus change then changes nothing
    else (with --tokenizer train it would change the tokenizer too)."""
    return str(sorted((shared_cache / "tokenizers").glob("bpe-1024-*"))[0])


def test_a_file_changed_in_the_middle_keeps_its_ends_but_not_its_time(tmp_path: Path) -> None:
    """Only the ends are hashed (cheap on a 50 GB corpus); an edit between them shows in the time."""
    path = tmp_path / "big.txt"
    path.write_bytes(b"a" * (3 * END_BLOCK))
    before = file_fingerprint(path)
    with path.open("r+b") as f:
        f.seek(END_BLOCK + 10)
        f.write(b"b")
    os.utime(path, ns=(before[1], before[1] + 5_000_000_000))
    after = file_fingerprint(path)
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    (change,) = content_changes({str(path): before}, {str(path): after})
    assert change.startswith(f"corpus file {path} changed (modified ")
    assert "same size and first/last 64 KiB" in change


def test_source_content_names_each_file_and_its_change(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "corpus", files=3)
    saved = open_source(str(tmp_path / "corpus")).content_fingerprint()
    assert sorted(saved) == [str(p) for p in paths]
    same_size_other_text(paths[1])
    paths[2].unlink()
    (paths[0].parent / "new.txt").write_text("a new document")
    now = open_source(str(tmp_path / "corpus")).content_fingerprint()
    changed, gone, new = content_changes(saved, now)
    assert changed.startswith(f"corpus file {paths[1]} changed (modified ")
    assert changed.endswith(" UTC, first/last 64 KiB differ)")
    assert gone == f"corpus file {paths[2]} is gone"
    assert new == f"corpus file {paths[0].parent / 'new.txt'} is new"
    assert content_changes(saved, saved) == []


def _resume_refused_then_allowed(out: Path, args: list[str], changed: Path, capsys) -> None:
    from gpt2_training.cli import main, run

    assert run(tiny_args(out, *args, max_steps=4)) == 2
    errors = capsys.readouterr().err.splitlines()
    assert f"error: cannot resume: corpus file {changed} changed (" in errors[0], errors
    assert "--allow_resume_changes" in errors[-1], errors
    assert len(errors) == 2, errors
    assert ckpt.list_checkpoints(out) == [out / "checkpoint-2"]

    result = main(tiny_args(out, *args, "--allow_resume_changes", "true", max_steps=4))
    assert result.resumed_from == str(out / "checkpoint-2") and result.step == 4
    assert f"resuming on a changed corpus: corpus file {changed} changed" in capsys.readouterr().out


def test_resume_refuses_a_corpus_file_changed_in_place(tmp_path, env, shared_cache, capsys) -> None:
    """Same file names, same sizes, same file count, other text: the resume is refused (exit 2) with the file
    named and --allow_resume_changes as the way on; with it, the run resumes from its checkpoint."""
    from gpt2_training.cli import main

    paths = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    args = ["--dataset", str(tmp_path / "corpus"), "--tokenizer", builtin_tokenizer(shared_cache)]
    assert main(tiny_args(out, *args, max_steps=2)).step == 2
    capsys.readouterr()
    same_size_other_text(paths[5])
    _resume_refused_then_allowed(out, args, paths[5], capsys)


def test_resume_refuses_prepared_shards_changed_in_place(tmp_path, env, shared_cache, capsys) -> None:
    """The same for `prepare` output: a shard file rewritten with other tokens of the same length is named."""
    from gpt2_training.cli import main

    write_corpus(tmp_path / "corpus")
    shards = tmp_path / "shards"
    tokenizer = builtin_tokenizer(shared_cache)
    main(["prepare", "--dataset", str(tmp_path / "corpus"), "--tokenizer", tokenizer, "--out", str(shards)])
    out = tmp_path / "run"
    args = ["--shards_dir", str(shards), "--tokenizer", tokenizer]
    assert main(tiny_args(out, *args, max_steps=2)).step == 2
    capsys.readouterr()
    shard = shards / "train_000000.bin"
    same_size_other_text(shard, unit=2)  # uint16 token ids: every id stays in the vocabulary
    _resume_refused_then_allowed(out, args, shard, capsys)


def test_a_checkpoint_without_content_cannot_vouch_for_the_corpus() -> None:
    """A checkpoint written before content checks is not taken as proof that nothing changed."""
    (change,) = content_changes(None, {"a.txt": [1, 2, "00"]})
    assert "records no corpus content" in change
    assert content_changes(None, {}) == []


def test_a_deeplake_dataset_records_its_version(tmp_path: Path) -> None:
    """A remote-style source has no files to hash: its version is recorded, and a new commit is named."""
    import deeplake
    from test_sources import write_deeplake

    lake = write_deeplake(tmp_path / "lake", ["one", "two"])
    saved = open_source(str(lake)).content_fingerprint()
    assert list(saved) == ["DeepLake version"] and saved["DeepLake version"]
    dataset = deeplake.open(str(lake))
    dataset.append({"text": ["three"], "id": [2]})
    dataset.commit()
    (change,) = content_changes(saved, open_source(str(lake)).content_fingerprint())
    assert change.startswith(f"corpus DeepLake version: checkpoint has {saved['DeepLake version']!r}")


def test_local_files_read_through_datasets_are_fingerprinted_too(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "corpus", files=2)
    content = open_source(f"hf-text:{tmp_path / 'corpus'}").content_fingerprint()
    assert content == {str(p): file_fingerprint(p) for p in paths}


def test_the_commit_of_a_streamed_hub_dataset_is_read_from_its_resolved_files(tmp_path: Path) -> None:
    """`datasets` resolves a Hub dataset's files to hf://datasets/NAME@COMMIT/... URLs; offline, a local folder
    named like one stands in for them, read through the same streaming loader."""
    import datasets

    from gpt2_training.data.sources import _hub_commit

    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / f"Skylion007/openwebtext@{commit}" / "plain_text"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"text": "a"}\n')
    dataset = datasets.load_dataset(
        "json", data_files=[str(folder / "train.jsonl")], split="train", streaming=True
    )
    assert _hub_commit(dataset) == commit
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "b"}\n')
    assert (
        _hub_commit(datasets.load_dataset("json", data_files=[str(other)], split="train", streaming=True))
        is None
    )
