"""Tests for gpt2_training.data.sources: every source kind, resuming, format equivalence, huge and broken input.

All data is written to tmp_path and read through the real libraries (pyarrow, datasets streaming, deeplake 4);
the Hub and Activeloop cases check that an unreachable name fails fast with a useful message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2_training.data.opening import open_source
from gpt2_training.data.sources import (
    DEEPLAKE_CHUNK_ROWS,
    OPENWEBTEXT_HUB_NAME,
    BuiltinSource,
    DocumentSource,
    Piece,
)
from gpt2_training.errors import DataError

DOCS = [
    "First document.\nIt has two lines.",
    "Ünïcödé — 日本語 text with emoji 🙂",
    "",
    "short",
    "A longer document " * 20,
    '{"looks": "like json"} but is text',
    "tail",
]


def collect(source: DocumentSource, epoch: int = 0, position=None) -> list[Piece]:
    return list(source.pieces(epoch, position))


def documents(pieces: list[Piece]) -> list[str]:
    """Join pieces back into documents, checking that only document ends carry last=True."""
    docs, current = [], []
    for piece in pieces:
        current.append(piece.text)
        if piece.last:
            docs.append("".join(current))
            current = []
    assert not current, "the final piece must end its document"
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8"
    )
    return path


def write_parquet(path: Path, docs: list[str], row_group_size: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"text": docs, "id": list(range(len(docs)))}), path, row_group_size=row_group_size
    )
    return path


def write_deeplake(path: Path, docs: list[str]) -> Path:
    import deeplake

    ds = deeplake.create(f"file://{path}")
    ds.add_column("text", deeplake.types.Text())
    ds.add_column("id", deeplake.types.Int64())
    ds.append({"text": docs, "id": list(range(len(docs)))})
    ds.commit()
    return path


def split_in_three(docs: list[str]) -> list[list[str]]:
    return [docs[:3], docs[3:5], docs[5:]]


@pytest.fixture
def jsonl_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "jsonl"
    for i, part in enumerate(split_in_three(DOCS)):
        write_jsonl(folder / f"part{i}.jsonl", part)
    return folder


@pytest.fixture
def parquet_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "parquet"
    for i, part in enumerate(split_in_three(DOCS)):
        write_parquet(folder / f"part{i}.parquet", part, row_group_size=2)
    return folder


@pytest.fixture
def deeplake_path(tmp_path: Path) -> Path:
    return write_deeplake(tmp_path / "lake", DOCS)


# ---------------------------------------------------------------- local formats


def test_txt_file_mode_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\n\nsecond paragraph\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("sea\r\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    source = open_source(str(tmp_path), shuffle=False)
    assert documents(collect(source)) == ["ay", "bee\n\nsecond paragraph\n", "sea\r\n"]
    assert source.stats["documents_read"] == 3
    assert "3 .txt files" in source.description


def test_txt_paragraph_mode(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("\n\none\nstill one\n\n  \n\ntwo\n\n\nthree", encoding="utf-8")
    source = open_source(str(path), txt_mode="paragraph", shuffle=False)
    assert documents(collect(source)) == ["one\nstill one", "two", "three"]


def test_jsonl_json_and_parquet_give_the_documents(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    (tmp_path / "list.json").write_text(json.dumps([{"text": d} for d in DOCS]), encoding="utf-8")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n\n", "utf-8")
    write_parquet(tmp_path / "d.parquet", DOCS)
    for name in ("d.jsonl", "list.json", "lines.json", "d.parquet"):
        assert documents(collect(open_source(str(tmp_path / name), shuffle=False))) == DOCS, name


def test_other_text_field(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ["x", "y"], field="content")
    assert documents(collect(open_source(str(tmp_path / "d.jsonl"), text_field="content"))) == ["x", "y"]


def test_folders_recurse_and_globs_select(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "z" / "deep" / "a.jsonl", ["deep"])
    write_jsonl(tmp_path / "b.jsonl", ["top"])
    write_parquet(tmp_path / "c.parquet", ["pq"])
    (tmp_path / "d.txt").write_text("txt", encoding="utf-8")
    assert documents(collect(open_source(str(tmp_path), shuffle=False))) == ["top", "pq", "txt", "deep"]
    assert documents(collect(open_source(str(tmp_path / "*.jsonl"), shuffle=False))) == ["top"]
    assert documents(collect(open_source(str(tmp_path / "**" / "*.jsonl"), shuffle=False))) == ["top", "deep"]
    assert documents(collect(open_source(f"file://{tmp_path / 'c.parquet'}"))) == ["pq"]


def _loop_corpus(tmp_path: Path, files: int = 60) -> Path:
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    for i in range(files):
        (folder / ("sub" if i % 2 else ".") / f"doc{i:02d}.txt").write_text(f"document {i}")
    return folder


@pytest.mark.parametrize("spec", ["{d}", "{d}/**/*.txt", "{d}/**"])
def test_a_link_loop_is_read_once(tmp_path: Path, spec: str) -> None:
    """`ln -s . dir/loop` (and a second link to a file already listed): a folder scan and a recursive glob still
    read each of the 60 files once, so no copy lands in both the training and the held-out side."""
    folder = _loop_corpus(tmp_path)
    (folder / "loop").symlink_to(".")
    (folder / "sub" / "alias.txt").symlink_to("../doc00.txt")
    source = open_source(spec.format(d=folder), shuffle=False)
    assert len(source.files) == 60
    assert sorted(documents(collect(source))) == sorted(f"document {i}" for i in range(60))


def test_links_to_other_folders_are_still_followed(tmp_path: Path) -> None:
    folder = _loop_corpus(tmp_path, files=4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far.txt").write_text("far away")
    (folder / "linked").symlink_to(elsewhere)
    for spec in (str(folder), str(folder / "**" / "*.txt")):
        assert "far away" in documents(collect(open_source(spec, shuffle=False))), spec


@pytest.mark.timeout(30)
@pytest.mark.parametrize("spec", ["{d}", "{d}/**/*.txt"])
def test_two_link_loops_do_not_hang(tmp_path: Path, spec: str) -> None:
    """Two loops (one to the folder, one from a subfolder back up) made the old search grow without end."""
    folder = _loop_corpus(tmp_path)
    (folder / "loop").symlink_to(".")
    (folder / "sub" / "up").symlink_to("..")
    source = open_source(spec.format(d=folder), shuffle=False)
    assert len(source.files) == 60


def test_a_broken_link_in_the_corpus_is_named(tmp_path: Path) -> None:
    folder = _loop_corpus(tmp_path, files=2)
    (folder / "gone.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(
        DataError, match=rf"{re.escape(str(folder / 'gone.txt'))} is a link to .*missing\.txt"
    ):
        open_source(str(folder))


def test_builtin_corpus_opens() -> None:
    from gpt2_training.data.corpus import builtin_documents

    source = open_source("builtin", shuffle=False, max_piece_chars=50)
    first = next(source.pieces())
    assert first.text == builtin_documents()[0][:50]
    assert first.position in ([0, 1, 0], [0, 0, 50])


# ---------------------------------------------------------------- resume and order


def _sources_for_resume(tmp_path: Path, kind: str) -> DocumentSource:
    """A multi-shard source of each kind, with small pieces so resuming inside a document is exercised."""
    docs = [f"document {i} " + "xyz" * (i % 7) for i in range(40)]
    opts = {"max_piece_chars": 8, "seed": 3}
    if kind == "jsonl":
        for i in range(4):
            write_jsonl(tmp_path / f"{i}.jsonl", docs[i * 10 : (i + 1) * 10])
        return open_source(str(tmp_path), **opts)
    if kind == "json-list":
        for i in range(4):
            (tmp_path / f"{i}.json").write_text(json.dumps([{"text": d} for d in docs[i::4]]), "utf-8")
        return open_source(str(tmp_path), **opts)
    if kind == "txt-file":
        for i in range(5):
            (tmp_path / f"{i}.txt").write_text("".join(docs[i::5]), "utf-8")
        return open_source(str(tmp_path), **opts)
    if kind == "txt-paragraph":
        for i in range(3):
            (tmp_path / f"{i}.txt").write_text("\n\n".join(docs[i::3]), "utf-8")
        return open_source(str(tmp_path), txt_mode="paragraph", **opts)
    if kind == "parquet":
        for i in range(3):
            write_parquet(tmp_path / f"{i}.parquet", docs[i::3], row_group_size=4)
        return open_source(str(tmp_path), **opts)
    if kind == "hf-json":
        for i in range(4):
            write_jsonl(tmp_path / f"{i}.jsonl", docs[i::4])
        return open_source(f"hf-json:{tmp_path}", **opts)
    if kind == "deeplake":
        rows = [f"row {i}" for i in range(DEEPLAKE_CHUNK_ROWS * 2 + 100)]
        return open_source(f"deeplake:{write_deeplake(tmp_path / 'lake', rows)}", **opts)
    return BuiltinSource(docs, shuffle=True, seed=3, max_piece_chars=8)


RESUME_KINDS = [
    "jsonl",
    "json-list",
    "txt-file",
    "txt-paragraph",
    "parquet",
    "hf-json",
    "deeplake",
    "builtin",
]


@pytest.mark.parametrize("kind", RESUME_KINDS)
def test_resume_from_any_position_yields_exactly_the_rest(tmp_path: Path, kind: str) -> None:
    source = _sources_for_resume(tmp_path, kind)
    full = collect(source, epoch=1)
    assert len(full) > 20
    assert json.loads(json.dumps([p.position for p in full])) == [p.position for p in full]
    step = max(1, len(full) // 9)
    for i in [0, 1, 2, *range(3, len(full), step), len(full) - 2, len(full) - 1]:
        position = json.loads(json.dumps(full[i].position))  # as if read back from a checkpoint
        assert collect(source, epoch=1, position=position) == full[i + 1 :], (kind, i)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf-json", "deeplake", "builtin"])
def test_shuffle_depends_on_seed_and_epoch_only(tmp_path: Path, kind: str) -> None:
    source = _sources_for_resume(tmp_path, kind)
    epoch0 = documents(collect(source, 0))
    assert documents(collect(source, 0)) == epoch0
    epoch1 = documents(collect(source, 1))
    assert epoch1 != epoch0 and Counter(epoch1) == Counter(epoch0)
    assert source.shard_order(0) != source.shard_order(1)


def test_documents_within_a_file_keep_their_order(tmp_path: Path) -> None:
    for i in range(6):
        write_jsonl(tmp_path / f"{i}.jsonl", [f"{i}-{j}" for j in range(5)])
    source = open_source(str(tmp_path), seed=11)
    docs = documents(collect(source, 2))
    for i in range(6):
        assert [d for d in docs if d.startswith(f"{i}-")] == [f"{i}-{j}" for j in range(5)]


def test_invalid_position_is_a_clear_error(jsonl_folder: Path) -> None:
    source = open_source(str(jsonl_folder))
    with pytest.raises(DataError, match="position"):
        next(source.pieces(0, [99, 0, 0]))
    with pytest.raises(DataError, match="position"):
        next(source.pieces(0, "start"))


# ---------------------------------------------------------------- same documents, any format


def test_all_formats_give_the_same_documents(
    jsonl_folder: Path, parquet_folder: Path, deeplake_path: Path
) -> None:
    specs = [
        str(jsonl_folder),
        str(parquet_folder),
        f"hf-json:{jsonl_folder}",
        f"hf-parquet:{parquet_folder}",
        str(deeplake_path),
        f"deeplake:{deeplake_path}",
        f"file://{deeplake_path}",
    ]
    ordered = {
        s: [(p.text, p.last) for p in collect(open_source(s, shuffle=False, max_piece_chars=16))]
        for s in specs
    }
    for spec in specs:
        assert ordered[spec] == ordered[specs[0]], spec
    assert documents([Piece(t, None, last) for t, last in ordered[specs[0]]]) == DOCS
    for spec in specs:
        shuffled = documents(collect(open_source(spec, shuffle=True, seed=5), epoch=3))
        assert Counter(shuffled) == Counter(DOCS), spec


def test_hf_text_streaming_matches_local_txt(tmp_path: Path) -> None:
    for name, text in [("a.txt", "alpha\nbeta"), ("b.txt", "gamma")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
    local = documents(collect(open_source(str(tmp_path), shuffle=False)))
    assert (
        documents(collect(open_source(f"hf-text:{tmp_path}", shuffle=False)))
        == local
        == ["alpha\nbeta", "gamma"]
    )


# ---------------------------------------------------------------- huge and broken input


def test_huge_document_is_split_with_only_the_last_piece_flagged(tmp_path: Path) -> None:
    big = "".join(chr(0x41 + i % 26) for i in range(250_000))
    write_jsonl(tmp_path / "d.jsonl", ["small", big, "after"])
    pieces = collect(open_source(str(tmp_path / "d.jsonl"), max_piece_chars=100_000, shuffle=False))
    assert [len(p.text) for p in pieces] == [5, 100_000, 100_000, 50_000, 5]
    assert [p.last for p in pieces] == [True, False, False, True, True]
    assert documents(pieces) == ["small", big, "after"]


def test_huge_txt_file_is_read_incrementally(tmp_path: Path) -> None:
    # Multi-byte characters make block boundaries fall inside characters.
    unit = "plain ascii, é accents, 日本語, 🙂 emoji\n"
    text = unit * (5_000_000 // len(unit.encode()))
    path = tmp_path / "huge.txt"
    path.write_text(text, encoding="utf-8")
    source = open_source(str(path), max_piece_chars=100_000)
    digest, count, lasts, longest = hashlib.sha256(), 0, [], 0
    tracemalloc.start()
    for piece in source.pieces():
        digest.update(piece.text.encode())
        count, longest = count + 1, max(longest, len(piece.text))
        lasts.append(piece.last)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert digest.hexdigest() == hashlib.sha256(text.encode()).hexdigest()
    assert longest <= 100_000 and count >= 50
    assert lasts == [False] * (count - 1) + [True]
    assert peak < 2_000_000, f"peak {peak} bytes: the 5 MB file must not be held in memory"
    assert source.stats["replaced_characters"] == 0


def test_non_utf8_bytes_are_replaced_counted_and_reported(tmp_path: Path, capsys) -> None:
    bad_txt = tmp_path / "bad.txt"
    data = b"good \xef\xbf\xbd start \xff\xfe middle \xc3 end"
    bad_txt.write_bytes(data)
    first_bad = data.index(b"\xff")
    source = open_source(str(bad_txt))
    (text,) = documents(collect(source))
    assert text == "good \ufffd start \ufffd\ufffd middle \ufffd end"
    assert source.stats["replaced_characters"] == 3  # the valid U+FFFD in the file is not counted
    (line,) = capsys.readouterr().err.splitlines()  # once per file, though the file was read twice
    assert re.fullmatch(
        rf"warning: {re.escape(str(bad_txt))}: invalid UTF-8 at byte offset {first_bad};.*", line
    )

    bad_jsonl = tmp_path / "bad.jsonl"
    data = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'
    bad_jsonl.write_bytes(data)
    first_bad = data.index(b"\xe9")
    source = open_source(str(bad_jsonl), shuffle=False)
    assert documents(collect(source)) == ["ok", "caf\ufffd"]
    assert source.stats["replaced_characters"] == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert re.search(rf"bad\.jsonl: invalid UTF-8 at byte offset {first_bad};", line)


def test_non_utf8_warning_is_one_plain_line_without_a_source_line(tmp_path: Path) -> None:
    """In a real process with Python's default warning display, the user sees exactly one line: no
    `warnings.warn` header with a file name and line number, and no line of the project's source after it."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    code = (
        "import sys\n"
        "from gpt2_training.data.opening import open_source\n"
        "source = open_source(sys.argv[1])\n"
        "print(sum(len(p.text) for p in source.pieces()))\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(bad)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "12"  # "caf", one U+FFFD, " au lait"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: {bad}: invalid UTF-8 at byte offset 3;"), lines
    assert "Warning:" not in result.stderr and "sources.py" not in result.stderr


# ---------------------------------------------------------------- errors


def _make_unreadable(path: Path, how: str) -> None:
    """Tests run as root, which reads a chmod 000 file, so a file is made unreadable by deleting it, putting a
    folder in its place, or making it a link to nothing."""
    path.unlink()
    if how == "folder":
        path.mkdir()
    elif how == "dangling link":
        path.symlink_to(path.parent / "nothing-here")


@pytest.mark.parametrize("how", ["deleted", "folder", "dangling link"])
def test_a_file_that_stops_being_readable_mid_run_is_named(tmp_path: Path, how: str) -> None:
    """A file readable at start and unreadable later raises DataUnavailable, one line naming the file and what
    to do (restore it, run the same command again), never a FileNotFoundError or IsADirectoryError."""
    from gpt2_training.errors import DataUnavailable

    paths = [
        write_jsonl(tmp_path / "c" / f"part{i}.jsonl", [f"doc {i} {j}" for j in range(3)]) for i in range(3)
    ]
    source = open_source(str(tmp_path / "c"), shuffle=False)
    pieces = source.pieces()
    assert next(pieces).text == "doc 0 0"
    _make_unreadable(paths[2], how)
    with pytest.raises(DataUnavailable) as error:
        list(pieces)
    message = str(error.value)
    assert message.startswith(f"{paths[2]} stopped being readable during the run (")
    assert message.endswith("restore it, then run the same command to resume") and "\n" not in message


@pytest.mark.parametrize("name", ["b.jsonl", "b.parquet", "b.txt"])
def test_an_unreadable_file_at_start_is_a_one_line_error(tmp_path: Path, name: str) -> None:
    """At start-up an unreadable file is a plain DataError naming it (the run has nothing to resume yet). Tests
    run as root, which reads a chmod 000 file: the file listed is a folder instead, as if it had been replaced
    between the search and the first read."""
    from gpt2_training.data.sources import LocalFileSource
    from gpt2_training.errors import DataUnavailable

    broken = tmp_path / name
    broken.mkdir()
    with pytest.raises(DataError) as error:
        LocalFileSource(str(broken), [broken], "text", "file", False, 0, 1000).content_fingerprint()
    assert not isinstance(error.value, DataUnavailable)
    assert str(error.value).startswith(f"cannot read {broken} (")
    assert str(error.value).endswith("make it readable, or leave it out of --dataset")


def test_deeply_nested_json_is_a_one_line_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text(
        '{"text": "fine"}\n' + '{"text": "also fine"}\n' + '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    )
    source = open_source(str(path), shuffle=False)
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(str(path))} \(byte 39\): the JSON record on line 3 is nested too deeply",
    ):
        collect(source)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no files match"):
        open_source(str(tmp_path / "*.jsonl"))


def test_empty_folder_lists_supported_suffixes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\.txt, \.jsonl, \.json, \.parquet"):
        open_source(str(tmp_path))
    (tmp_path / "readme.md").write_text("not data", encoding="utf-8")
    with pytest.raises(DataError, match="supported suffixes"):
        open_source(str(tmp_path))


@pytest.mark.parametrize(
    "name,content", [("e.jsonl", ""), ("e.txt", ""), ("blank.jsonl", "\n\n"), ("e.json", "[]")]
)
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no documents"):
        open_source(str(tmp_path / name))


def test_wrong_text_field_lists_available_fields(tmp_path: Path, deeplake_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ["x"])
    write_parquet(tmp_path / "d.parquet", ["x"])
    for spec in (
        str(tmp_path / "d.jsonl"),
        str(tmp_path / "d.parquet"),
        f"hf-json:{tmp_path / 'd.jsonl'}",
        f"hf-parquet:{tmp_path / 'd.parquet'}",
        str(deeplake_path),
    ):
        with pytest.raises(DataError, match=r"no text field 'body'; available fields: (text, id|id, text)"):
            open_source(spec, text_field="body")


def test_hub_dataset_offline_fails_fast() -> None:
    for spec, name in [
        ("hf:some/unknown-dataset", "some/unknown-dataset"),
        ("openwebtext", OPENWEBTEXT_HUB_NAME),
    ]:
        start = time.monotonic()
        with pytest.raises(DataError, match=name) as caught:
            open_source(spec)
        assert time.monotonic() - start < 10
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("spec", ["al://org/missing", "hub://activeloop/openwebtext"])
def test_activeloop_dataset_offline_fails_fast(spec: str) -> None:
    start = time.monotonic()
    with pytest.raises(DataError, match="could not reach or find DeepLake dataset") as caught:
        open_source(spec)
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert "ACTIVELOOP_TOKEN" in message and "deeplake.convert" in message and "\n" not in message


# ---------------------------------------------------------------- DeepLake version 3 (read-only query path)

V3_FIXTURE = Path(__file__).parents[1] / "fixtures" / "deeplake_v3"


def v3_document(i: int) -> str:
    """tools/build_deeplake_v3_fixture.py's `fixture_document`: the fixture's rows."""
    return (
        ""
        if i == 7
        else f"Fixture document {i}: " + " ".join(f"w{(i * 13 + j) % 97}" for j in range(i % 9 + 1))
    )


def test_deeplake_v3_fixture_reads_through_the_query_path() -> None:
    source = open_source(f"deeplake:{V3_FIXTURE}", shuffle=False)
    assert source.num_shards == 3 and "2100 rows" in source.description
    assert documents(collect(source)) == [v3_document(i) for i in range(2100)]


def test_deeplake_v3_resumes_from_any_position_across_chunks() -> None:
    source = open_source(f"deeplake:{V3_FIXTURE}", shuffle=True, seed=5)
    pieces = collect(source, epoch=1)
    assert source.shard_order(1) != [0, 1, 2]  # the chunks are read in a shuffled order
    assert sorted(documents(pieces)) == sorted(v3_document(i) for i in range(2100))
    for k in (0, 1, 1023, 1024, 1500, 2098):
        assert collect(source, 1, pieces[k].position) == pieces[k + 1 :], k


def test_deeplake_error_includes_the_query_error_and_the_convert_suggestion_works(tmp_path: Path) -> None:
    # a local path that neither version opens
    with pytest.raises(
        DataError, match=r"as version 3 through deeplake.query: The query source .* not found"
    ) as caught:
        open_source(f"deeplake:file://{tmp_path / 'missing'}")
    message = str(caught.value)
    assert "deeplake.convert" in message and "\n" not in message
    # follow the suggestion on the version 3 fixture: the converted copy opens with deeplake 4 directly
    import deeplake

    deeplake.convert(str(V3_FIXTURE), str(tmp_path / "dataset-v4"))
    converted = open_source(f"deeplake:{tmp_path / 'dataset-v4'}", shuffle=False)
    assert documents(collect(converted))[:9] == [v3_document(i) for i in range(9)]


def test_parquet_row_groups_are_shards(tmp_path: Path) -> None:
    write_parquet(tmp_path / "one.parquet", DOCS, row_group_size=2)
    source = open_source(str(tmp_path / "one.parquet"), shuffle=False)
    assert source.num_shards == 4
    assert documents(collect(source)) == [d for d in DOCS]
    assert "row group 1" in source.describe(0, [1, 1, 0])


def test_importing_the_data_package_loads_no_heavy_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gpt2_training.data; "
        "print(sorted(m for m in ('deeplake', 'datasets', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_offline_detection_follows_huggingface_hub(monkeypatch) -> None:
    """Setting HF_HUB_OFFLINE after huggingface_hub was imported does not make it offline, so neither are we:
    the source asks huggingface_hub instead of reading the variable itself (fails fast either way)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):
        open_source("hf:some/unknown-dataset")


def test_a_script_dataset_names_working_alternatives(tmp_path: Path) -> None:
    """datasets >= 4 refuses loading scripts (as on OpenWebText's main branch): the error says what works."""
    repo = tmp_path / "scripted"
    repo.mkdir()
    (repo / "scripted.py").write_text("import datasets\n")
    with pytest.raises(
        DataError, match=r"loading script, which datasets 4 refuses; use --dataset openwebtext"
    ):
        open_source(f"hf:{repo}")
