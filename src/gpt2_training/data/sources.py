"""Data sources: one string names where training text comes from, and every source yields the same thing.

`parse_source(spec)` is the one reading of a source string (every module that needs to know what a string
names asks it, and `local_root` the local folder it points into); `open_source(spec)` (opening.py) opens what it names:

* ``builtin``: the built-in corpus (`gpt2_training.data.corpus.builtin_documents`);
* local files, folders (searched recursively) and globs of ``.txt``, ``.jsonl``, ``.json`` and ``.parquet``;
* ``hf:<repo_id>[:<config>]``: a Hugging Face Hub dataset, streamed; ``openwebtext`` is an alias for
  ``hf:Skylion007/openwebtext`` pinned to its parquet revision (`OPENWEBTEXT_REVISION`), since the loading
  script on its main branch is refused by `datasets` >= 4;
* ``hf-json:``, ``hf-parquet:``, ``hf-text:`` followed by a local path or glob: local files read through the
  `datasets` streaming code, so that path can be exercised without network;
* over a network (`gpt2_training.data.remote`): ``s3://bucket/path`` or ``deeplake:s3://...`` (a DeepLake 4
  dataset on S3), and ``hf-parquet:`` / ``hf-json:`` followed by an ``s3://`` URL, folder prefix or glob, or an
  ``http(s)://`` URL, each read with retries and read-ahead;
* DeepLake: ``deeplake:<url>``, ``al://org/name``, ``hub://org/name``, ``file://<folder>`` or a plain folder
  that holds a DeepLake dataset. Version 4 datasets are opened with `deeplake.open_read_only`; version 3
  datasets (such as ``hub://activeloop/openwebtext``) are read through a TQL query, which deeplake 4 allows
  read-only and which reads the main branch only (convert the dataset to read another branch). Credentials
  come from the environment (``ACTIVELOOP_TOKEN``), never from arguments.

Any other ``scheme://`` URL (``gs://``, a bare ``https://``) is refused with the forms that are read.

Every source yields `Piece`s: a document's text, cut into pieces of at most ``max_piece_chars`` characters
(``last`` marks the piece that ends a document), each with a JSON-serialisable position. A position is
``[shard_rank, offset, chars_done]``: the rank of the file/shard in this epoch's order, an offset inside it
(byte offset for .txt and .jsonl files, list index for .json lists, row inside the row group for parquet,
whose row groups are shards of their own, example for Hugging Face shards, row within a 1024-row chunk for
DeepLake, 0 for a built-in document) and how many characters of the document at that offset were already
yielded. Resuming seeks straight to the shard and offset, so it costs nothing for the shards before it. With ``shuffle=True`` the shard order (files, Hugging Face shards, DeepLake
row chunks, built-in documents) is permuted by a RNG seeded from (seed, epoch); documents inside a shard keep
their order.

Text that is not valid UTF-8 is decoded with ``errors="replace"``: each bad byte sequence becomes U+FFFD, the
number of such characters is added to ``stats["replaced_characters"]``, and one warning line per file on stderr
names the file and the byte offset of the first bad byte. Training goes on: one damaged file must not stop a long run.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import random
import re
import socket
import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

from gpt2_training.errors import ConfigError, DataError, DataUnavailable

from .fingerprint import files_fingerprint

Position = Any  # JSON-serialisable marker; here always [shard_rank, offset, chars_done]

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
OPENWEBTEXT_HUB_NAME = "Skylion007/openwebtext"
# The Hub's parquet conversion of OpenWebText (80 parquet shards under plain_text/); main held the loading
# script that datasets >= 4 refuses. A branch, not a commit: no commit id could be verified from here.
OPENWEBTEXT_REVISION = "refs/convert/parquet"
OPENWEBTEXT_ALTERNATIVES = (
    "use --dataset openwebtext (pinned to its parquet revision), download the parquet files and pass their "
    "folder, or stream another corpus such as hf:HuggingFaceFW/fineweb-edu:sample-10BT"
)
DEEPLAKE_CHUNK_ROWS = 1024  # shuffle granularity for DeepLake: big enough for sequential reads
_DEEPLAKE_BATCH_ROWS = 256
# the source-name grammar (`parse_source`): prefixes and URL schemes
_HF_FILE_PREFIXES = {"hf-json": "json", "hf-parquet": "parquet", "hf-text": "text"}
_HF_SUFFIXES = {"json": (".jsonl", ".json"), "parquet": (".parquet",), "text": (".txt",)}
NETWORK_SCHEMES = ("s3://", "http://", "https://")
_HOSTED_DEEPLAKE = ("al://", "hub://")


@dataclass(frozen=True)
class SourceName:
    """What a source string names (`parse_source`), before anything is opened."""

    # builtin | hub | files | hf-files | deeplake | unsupported (a URL scheme no source reads)
    kind: str
    # the path, glob, URL or Hub repository, as `open_source` hands it to the reader
    location: str
    # hf-files: the `datasets` builder that reads them (json, parquet, text)
    format: str | None = None
    # hub: the dataset's configuration, None for the default one
    config: str | None = None
    # hub: the pinned revision (openwebtext), None for the default branch
    revision: str | None = None

    @property
    def remote(self) -> bool:
        """Read over the network with retries and read-ahead (`remote.py`)."""
        if self.kind == "hf-files":
            return self.format != "text" and self.location.startswith(NETWORK_SCHEMES)
        return self.kind == "deeplake" and self.location.startswith(NETWORK_SCHEMES)

    @property
    def streamed(self) -> bool:
        """Read over a network, so its size is not known without reading the whole corpus."""
        return self.kind == "hub" or self.remote or self.location.startswith(_HOSTED_DEEPLAKE)

    @property
    def local_path(self) -> str | None:
        """The local file, folder or glob it names (``file://`` removed), or None."""
        if self.kind not in ("files", "hf-files", "deeplake"):
            return None
        if self.location.startswith("file://"):
            return self.location.removeprefix("file://")
        return None if "://" in self.location else self.location


def parse_source(spec: str) -> SourceName:
    """The one reading of a source string (the forms in the module docstring); it touches no file."""
    if spec == "builtin":
        return SourceName("builtin", spec)
    if spec == "openwebtext":
        return SourceName("hub", OPENWEBTEXT_HUB_NAME, revision=OPENWEBTEXT_REVISION)
    prefix, colon, rest = spec.partition(":")
    if colon and prefix == "hf":
        repo, _, config = rest.partition(":")
        return SourceName("hub", repo, config=config or None)
    if colon and prefix in _HF_FILE_PREFIXES:
        return SourceName("hf-files", rest, format=_HF_FILE_PREFIXES[prefix])
    if colon and prefix == "deeplake":
        return SourceName("deeplake", rest)
    if spec.startswith(("s3://", *_HOSTED_DEEPLAKE)):
        return SourceName("deeplake", spec)
    if "://" in spec and not spec.startswith("file://") and "/" not in spec.split("://")[0]:
        return SourceName("unsupported", spec)
    return SourceName("files", spec)


def local_root(spec: str | None) -> Path | None:
    """The existing local file or folder a source (or tokenizer / model) setting names, the fixed folder of a
    glob, resolved; None for a built-in, Hub or remote source and for a path that does not exist."""
    path = parse_source(spec).local_path if spec else None
    if path is None:
        return None
    if glob.has_magic(path):
        parts = Path(path).parts
        path = str(Path(*parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]) or ".")
    found = Path(path).expanduser()
    return found.resolve() if found.exists() else None


# (offset where the document starts, its text or None for a null value, offset after it, whether it ends there)
_Segment = tuple[int, "str | None", int, bool]


@dataclass
class Piece:
    text: str
    position: Position  # resuming from this position yields exactly what comes after this piece
    last: bool  # True when this piece ends its document (the pipeline appends EOS only then)


class DocumentSource(ABC):
    """A named source of documents, read in a deterministic, resumable order."""

    description: str
    stats: Counter[str]

    @abstractmethod
    def pieces(self, epoch: int = 0, position: Position | None = None) -> Iterator[Piece]:
        """Pieces of documents in epoch order, starting after `position` (None: from the start of the epoch)."""

    def content_fingerprint(self) -> dict[str, Any]:
        """What the text is, beyond `description`: [size, mtime, hash of the ends] per local file, or a remote
        source's revision where it is known. A resume compares it (`fingerprint.content_changes`)."""
        return {}


class _ShardedSource(DocumentSource):
    """Common engine: shard order per epoch, seeking to a position, and cutting documents into pieces.

    Subclasses list their shards and read one shard from an offset as `_Segment`s.
    """

    def __init__(self, description: str, num_shards: int, shuffle: bool, seed: int, max_piece_chars: int):
        if max_piece_chars < 4:  # the .txt reader needs room for one whole UTF-8 character per piece
            raise ConfigError(f"max_piece_chars must be at least 4, got {max_piece_chars}")
        self.description = description
        self.num_shards = num_shards
        self.shuffle = shuffle
        self.seed = seed
        self.max_piece_chars = max_piece_chars
        self.stats = Counter()
        self._warned: set[str] = set()

    @abstractmethod
    def _read(self, shard: int, offset: int) -> Iterator[_Segment]: ...

    def reordered(self, shuffle: bool, seed: int) -> _ShardedSource:
        """This opened source read in another shard order, with counts and warnings of its own: one opening
        serves readers that each need their own order (a run's training stream, held-out set, tokenizer text)."""
        view = copy.copy(self)
        view.shuffle, view.seed = shuffle, seed
        view.stats, view._warned = Counter(), set()
        return view

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_shards))
        if self.shuffle:
            # A string seed is hashed with SHA-512 by `random`, so the order is the same in every process.
            random.Random(f"gpt2_training:{self.seed}:{epoch}").shuffle(order)
        return order

    def _check_not_empty(self) -> None:
        """Fail at open time, not hours later: read up to the first document in canonical order."""
        for shard in range(self.num_shards):
            if any(text is not None for _, text, _, _ in self._read(shard, 0)):
                self.stats.clear()  # the peek is not part of any epoch
                return
        raise DataError(f"{self.description}: no documents found; check that the source is not empty")

    def pieces(
        self,
        epoch: int = 0,
        position: Position | None = None,
        shards: list[int] | None = None,
        starts: dict[int, tuple[int, int]] | None = None,
    ) -> Iterator[Piece]:
        """Pieces in epoch order after `position`; `shards` limits reading to those shard ranks (this process's
        own, so it never reads another's bytes) and `starts` gives a shard rank's first [offset, chars]."""
        resuming = position is not None
        start_rank, start_offset, start_chars = self._parse_position(position)
        order = self.shard_order(epoch)
        size = self.max_piece_chars
        starts = dict(starts or {})
        if resuming:
            starts[start_rank] = (start_offset, start_chars)
        for rank in range(self.num_shards) if shards is None else shards:
            if resuming and rank < start_rank:
                continue
            offset, skip = starts.get(rank, (0, 0))
            for begin, text, end, ends_document in self._read(order[rank], offset):
                if text is None:  # a null value is a missing document, not an empty one
                    self.stats["documents_skipped"] += 1
                    continue
                done, skip = skip, 0
                text = text[done:]
                if ends_document and len(text) > size:
                    self.stats["documents_split"] += 1
                for cut in range(0, max(len(text), 1), size):
                    final = cut + size >= len(text)
                    position = [rank, end, 0] if final else [rank, begin, done + cut + size]
                    self.stats["pieces"] += 1
                    yield Piece(text[cut : cut + size], position, final and ends_document)
                if ends_document:
                    self.stats["documents_read"] += 1

    def describe(self, epoch: int, position: Position | None) -> str:
        """Where a position points, for error messages: the shard (file) and the offset inside it."""
        if position is None:
            return f"{self.description}, start of epoch {epoch}"
        rank, offset, _ = self._parse_position(position)
        return f"{self._shard_name(self.shard_order(epoch)[rank])}, offset {offset}"

    def _shard_name(self, shard: int) -> str:
        return f"{self.description}, shard {shard}"

    def _parse_position(self, position: Position | None) -> tuple[int, int, int]:
        if position is None:
            return 0, 0, 0
        if (
            isinstance(position, list | tuple)
            and len(position) == 3
            and all(isinstance(v, int) and v >= 0 for v in position)
            and position[0] < max(self.num_shards, 1)
        ):
            return position[0], position[1], position[2]
        raise DataError(
            f"{self.description}: position {position!r} is not [shard_rank, offset, chars] for this source; "
            "resume with a position this source produced"
        )

    def _decode(self, data: bytes, path: Path, offset: int) -> str:
        """UTF-8 with replacement; counts replaced characters and warns once per file (see module docstring)."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            text = data.decode("utf-8", errors="replace")
            # A valid U+FFFD in the input is the byte sequence EF BF BD; every other U+FFFD is a replacement.
            self.stats["replaced_characters"] += text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
            if str(path) not in self._warned:
                self._warned.add(str(path))
                # a plain log line: a Python warning would show the user a line of this file after it
                print(
                    f"warning: {path}: invalid UTF-8 at byte offset {offset + error.start}; bad bytes are "
                    "replaced by U+FFFD and counted in the data statistics (replaced_characters)",
                    file=sys.stderr,
                    flush=True,
                )
            return text


def _require_field(field: str, available: list[str], where: str) -> None:
    if field not in available:
        raise DataError(
            f"{where}: no text field {field!r}; available fields: {', '.join(available) or '(none)'}; "
            "set text_field to one of them"
        )


def _text_value(value: Any, field: str, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} holds {type(value).__name__}, not text; choose a text field"
        )
    return value


class BuiltinSource(_ShardedSource):
    """The built-in corpus; each document is its own shard, so shuffling permutes documents."""

    def __init__(self, documents: list[str], shuffle: bool, seed: int, max_piece_chars: int):
        super().__init__(
            f"built-in corpus: {len(documents)} documents", len(documents), shuffle, seed, max_piece_chars
        )
        self.documents = documents
        self._check_not_empty()

    def content_fingerprint(self) -> dict[str, Any]:
        # the corpus is assembled from this Python's standard library: another version builds other text
        digest = hashlib.blake2b(digest_size=8)
        for document in self.documents:
            digest.update(document.encode("utf-8", "replace") + b"\x00")
        return {"built-in corpus": digest.hexdigest()}

    def _read(self, shard: int, offset: int) -> Iterator[_Segment]:
        if offset == 0:
            yield 0, self.documents[shard], 1, True


class LocalFileSource(_ShardedSource):
    """Local .txt/.jsonl/.json/.parquet files; each file is a shard, and each row group of a parquet file."""

    def __init__(
        self,
        spec: str,
        files: list[Path],
        text_field: str,
        txt_mode: str,
        shuffle: bool,
        seed: int,
        max_piece_chars: int,
    ):
        self._running = False
        # (file, parquet row group or -1): row groups are shards so processes can split even one parquet file
        self.shards = []
        for i, path in enumerate(files):
            try:
                self.shards += [(i, group) for group in _row_groups(path, text_field)]
            except OSError as error:
                raise self._unreadable(path, error) from error
        super().__init__(
            _files_description("local files", spec, files), len(self.shards), shuffle, seed, max_piece_chars
        )
        self.files = files
        self.text_field = text_field
        self.txt_mode = txt_mode
        self._content: dict[str, Any] | None = None
        self._check_not_empty()
        # from here on a file that cannot be read was readable when the run started
        self._running = True

    def content_fingerprint(self) -> dict[str, Any]:
        if self._content is None:
            self._content = files_fingerprint(self.files)
        return self._content

    def _shard_name(self, shard: int) -> str:
        index, group = self.shards[shard]
        return f"{self.files[index]}" + (f" (row group {group})" if group >= 0 else "")

    def _unreadable(self, path: Path, error: OSError) -> DataError:
        reason = error.strerror or str(error) or type(error).__name__
        if not self._running:
            return DataError(f"cannot read {path} ({reason}); make it readable, or leave it out of --dataset")
        return DataUnavailable(
            f"{path} stopped being readable during the run ({reason}); restore it, then run the same command "
            "to resume"
        )

    def _read(self, shard: int, offset: int) -> Iterator[_Segment]:
        index, group = self.shards[shard]
        path = self.files[index]
        try:
            yield from self._read_file(path, group, offset)
        except OSError as error:
            raise self._unreadable(path, error) from error

    def _read_file(self, path: Path, group: int, offset: int) -> Iterator[_Segment]:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return self._read_parquet(path, group, offset)
        if suffix == ".txt":
            return (
                self._read_txt(path, offset)
                if self.txt_mode == "file"
                else self._read_paragraphs(path, offset)
            )
        if suffix == ".json" and _starts_with_bracket(path):
            return self._read_json_list(path, offset)
        return self._read_json_lines(path, offset)

    def _read_txt(self, path: Path, offset: int) -> Iterator[_Segment]:
        """One document per file, read a block at a time so a multi-GB file never sits in memory."""
        size = path.stat().st_size
        with path.open("rb") as f:
            f.seek(offset)
            while offset < size:
                # At most max_piece_chars bytes decode to at most max_piece_chars characters: one piece.
                block = f.read(self.max_piece_chars)
                if not block:  # the file shrank while we read it
                    return
                block, tail = _split_incomplete_utf8(block, at_eof=offset + len(block) >= size)
                f.seek(-len(tail), os.SEEK_CUR)  # an incomplete character is read again with the next block
                end = offset + len(block)
                yield offset, self._decode(block, path, offset), end, end >= size
                offset = end

    def _read_paragraphs(self, path: Path, offset: int) -> Iterator[_Segment]:
        """One document per run of non-blank lines; blank (whitespace-only) lines separate documents."""
        with path.open("rb") as f:
            f.seek(offset)
            lines: list[str] = []
            begin = offset
            for raw in f:
                line = self._decode(raw, path, offset)
                offset += len(raw)
                if line.strip():
                    lines.append(line)
                    continue
                if lines:
                    yield begin, "".join(lines).rstrip("\r\n"), offset, True
                    lines = []
                begin = offset
            if lines:
                yield begin, "".join(lines).rstrip("\r\n"), offset, True

    def _read_json_lines(self, path: Path, offset: int) -> Iterator[_Segment]:
        with path.open("rb") as f:
            f.seek(offset)
            for raw in f:
                begin, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                where = f"{path} (byte {begin})"
                text = self._decode(raw, path, begin)
                try:
                    record = json.loads(text)
                except (json.JSONDecodeError, RecursionError) as error:
                    raise _json_error(error, where, _line_number(path, begin)) from error
                yield begin, self._field(record, where), offset, True

    def _read_json_list(self, path: Path, offset: int) -> Iterator[_Segment]:
        # A JSON array cannot be read incrementally with the standard library; such files are small in practice.
        records = _parse_json(self._decode(path.read_bytes(), path, 0), str(path))
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of objects or JSON lines; convert the file to .jsonl")
        for index in range(offset, len(records)):
            yield index, self._field(records[index], f"{path} (item {index})"), index + 1, True

    def _read_parquet(self, path: Path, group: int, offset: int) -> Iterator[_Segment]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        texts = parquet.read_row_group(group, columns=[self.text_field]).column(0).to_pylist()
        for row in range(offset, len(texts)):
            where = f"{path} (row group {group}, row {row})"
            yield row, _text_value(texts[row], self.text_field, where), row + 1, True

    def _field(self, record: Any, where: str) -> str | None:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with a {self.text_field!r} field")
        _require_field(self.text_field, list(record), where)
        return _text_value(record[self.text_field], self.text_field, where)


class HuggingFaceSource(_ShardedSource):
    """A streamed `datasets.IterableDataset`, read shard by shard; resuming skips only inside one shard."""

    def __init__(
        self,
        description: str,
        dataset: Any,
        text_field: str,
        shuffle: bool,
        seed: int,
        max_piece_chars: int,
        content: dict[str, Any] | None = None,
    ):
        super().__init__(
            f"{description} ({dataset.num_shards} shards)", dataset.num_shards, shuffle, seed, max_piece_chars
        )
        self.dataset = dataset
        self.text_field = text_field
        self._content = content or {}
        if dataset.column_names is not None:  # known up front for parquet; json learns it from the first row
            _require_field(text_field, dataset.column_names, description)
        self._check_not_empty()

    def content_fingerprint(self) -> dict[str, Any]:
        return self._content

    def _read(self, shard: int, offset: int) -> Iterator[_Segment]:
        part = self.dataset.shard(num_shards=self.num_shards, index=shard)
        if offset:
            part = part.skip(offset)
        for index, example in enumerate(part, start=offset):
            where = f"{self.description}, shard {shard}, example {index}"
            _require_field(self.text_field, list(example), where)
            yield index, _text_value(example[self.text_field], self.text_field, where), index + 1, True


class DeepLakeSource(_ShardedSource):
    """A DeepLake dataset read by row index; shards are fixed-size row chunks.

    Text is read with range reads (`ds[a:b][column]`, one call per batch of rows), and the next batch is
    requested with the column's asynchronous read (`get_async`) before the current one is handed on, so
    fetching overlaps tokenization.
    """

    def __init__(
        self, url: str, dataset: Any, text_field: str, shuffle: bool, seed: int, max_piece_chars: int
    ):
        self.rows = len(dataset)
        chunks = -(-self.rows // DEEPLAKE_CHUNK_ROWS)
        super().__init__(f"DeepLake dataset {url}: {self.rows} rows", chunks, shuffle, seed, max_piece_chars)
        self.dataset = dataset
        self.text_field = text_field
        _require_field(text_field, [c.name for c in dataset.schema.columns], f"DeepLake dataset {url}")
        self._check_not_empty()

    def content_fingerprint(self) -> dict[str, Any]:
        # deeplake 4 datasets name their version; a version 3 dataset read through a query does not
        version = getattr(self.dataset, "version", None)
        return {"DeepLake version": str(version)} if version is not None else {}

    def _shard_name(self, shard: int) -> str:
        return f"{self.description}, rows {shard * DEEPLAKE_CHUNK_ROWS}-"

    def _fetch(self, start: int, stop: int) -> Any:
        return self.dataset[self.text_field].get_async(slice(start, stop))

    def _read(self, shard: int, offset: int) -> Iterator[_Segment]:
        first = shard * DEEPLAKE_CHUNK_ROWS
        stop = min(first + DEEPLAKE_CHUNK_ROWS, self.rows)
        starts = list(range(first + offset, stop, _DEEPLAKE_BATCH_ROWS))
        pending = self._fetch(starts[0], min(starts[0] + _DEEPLAKE_BATCH_ROWS, stop)) if starts else None
        for i, start in enumerate(starts):
            texts = pending.result()
            if i + 1 < len(starts):
                pending = self._fetch(starts[i + 1], min(starts[i + 1] + _DEEPLAKE_BATCH_ROWS, stop))
            for row, text in enumerate(texts, start=start - first):
                # DeepLake returns None for an empty string, so None cannot mean a missing document here.
                yield row, text or "", row + 1, True


def open_named(
    spec: str,
    name: SourceName,
    *,
    text_field: str,
    split: str,
    txt_mode: str,
    shuffle: bool,
    seed: int,
    max_piece_chars: int,
) -> DocumentSource:
    """Open a source this module reads (all but the remote ones, which remote.py reads; `open_source` in
    opening.py picks the reader); `name` is `parse_source(spec)`."""
    # here, not at the top: the settings module imports transformers, and importing the data package stays light
    from gpt2_training.config import TXT_MODES

    if txt_mode not in TXT_MODES:
        raise ConfigError(f"txt_mode must be one of {', '.join(TXT_MODES)}, got {txt_mode!r}")
    common = {"shuffle": shuffle, "seed": seed, "max_piece_chars": max_piece_chars}
    if name.kind == "builtin":
        from gpt2_training.data.corpus import builtin_documents

        return BuiltinSource(builtin_documents(), **common)
    if name.kind == "hub":
        where = name.location + (f":{name.config}" if name.config else "")
        dataset = _load_hf(name.location, name.config, None, split, name.revision)
        content = {"Hub revision": name.revision or "the default branch"}
        commit = _hub_commit(dataset)
        if commit is not None:
            content["Hub commit"] = commit
        return HuggingFaceSource(
            f"Hugging Face dataset {where} ({split})", dataset, text_field, **common, content=content
        )
    if name.kind == "hf-files":
        prefix = f"hf-{name.format}"
        files = _find_files(name.location, _HF_SUFFIXES[name.format])
        options = (
            {"sample_by": "document" if txt_mode == "file" else "paragraph"} if name.format == "text" else {}
        )
        dataset = _load_hf(name.format, None, [str(f) for f in files], "train", None, **options)
        return HuggingFaceSource(
            _files_description(f"{prefix} streaming", name.location, files),
            dataset,
            text_field,
            **common,
            content=files_fingerprint(files),
        )
    if name.kind == "deeplake":
        return _open_deeplake(name.location, text_field, **common)
    if name.kind == "unsupported":
        raise DataError(
            f"{spec!r}: no source reads this kind of URL; use s3:// or deeplake:URL for DeepLake, "
            "hf-parquet:URL or hf-json:URL for files over S3 or HTTP(S), or a local path"
        )
    path = name.local_path
    if _is_deeplake_folder(Path(path)):
        return _open_deeplake(path, text_field, **common)
    return LocalFileSource(path, _find_files(path, SUPPORTED_SUFFIXES), text_field, txt_mode, **common)


def _find_files(spec: str, suffixes: tuple[str, ...]) -> list[Path]:
    """Files named by a path, folder (recursive) or glob, sorted by path, keeping only supported suffixes.

    Links are followed, but never into a folder already visited, and a file reached by several paths counts
    once (under the first path in sorted order): a link loop such as `ln -s . dir/loop` neither repeats files
    nor keeps the search going forever."""
    if glob.has_magic(spec):
        matches = _glob(spec)
        if not matches:
            raise DataError(f"no files match {spec!r}; check the pattern and the working directory")
    else:
        matches = [Path(spec)]
        if not matches[0].exists():
            raise DataError(f"no such file or folder: {spec!r}; check the path")
    folders_seen: set[tuple[int, int]] = set()
    candidates: list[Path] = []
    for match in matches:
        candidates += _files_below(match, folders_seen) if match.is_dir() else [match]
    found: dict[tuple[int, int], Path] = {}
    for path in sorted(candidates):
        if path.suffix.lower() not in suffixes:
            continue
        if not path.exists() and path.is_symlink():
            raise DataError(
                f"{path} is a link to {os.readlink(path)!r}, which does not exist; restore the target or "
                "remove the link"
            )
        if path.is_file():
            found.setdefault(_identity(path), path)
    if not found:
        raise DataError(f"no supported files in {spec!r}; supported suffixes: {', '.join(suffixes)}")
    return sorted(found.values())


def _identity(path: str | Path) -> tuple[int, int]:
    """The file or folder a path leads to, links followed: the same for every path to it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _folder_error(error: OSError) -> NoReturn:
    raise DataError(
        f"cannot read folder {error.filename} ({error.strerror}); make it readable or leave it out of --dataset"
    ) from error


def _files_below(folder: Path, seen: set[tuple[int, int]]) -> list[Path]:
    """Every file under `folder`, entering each folder once however many links lead to it (`seen` is shared
    by the calls of one search)."""
    if _identity(folder) in seen:
        return []
    seen.add(_identity(folder))
    files: list[Path] = []
    for where, folders, names in os.walk(folder, followlinks=True, onerror=_folder_error):
        # pruning `folders` in place keeps os.walk out of folders already visited, loops included
        kept = []
        for name in sorted(folders):
            key = _identity(os.path.join(where, name))
            if key not in seen:
                seen.add(key)
                kept.append(name)
        folders[:] = kept
        files += [Path(where, name) for name in names]
    return files


def _glob(pattern: str) -> list[Path]:
    """`glob.glob(pattern, recursive=True)` without its link loops: `**` enters each folder once. As in glob,
    wildcards do not match names that start with a dot unless the pattern's part does."""
    parts = Path(pattern).parts
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    matches: list[Path] = []
    _glob_from(Path(*parts[:first_magic]) if first_magic else Path(), parts[first_magic:], matches)
    return matches


def _glob_from(folder: Path, parts: tuple[str, ...], matches: list[Path]) -> None:
    if not parts:
        matches.append(folder)
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        for below in _folders_below(folder):
            _glob_from(below, rest, matches)
        return
    if not glob.has_magic(head):
        names = [head] if os.path.lexists(folder / head) else []
    else:
        hidden_too = head.startswith(".")
        names = [n for n in _list(folder) if (hidden_too or not n.startswith(".")) and fnmatchcase(n, head)]
    for name in names:
        if not rest or (folder / name).is_dir():
            _glob_from(folder / name, rest, matches)


def _list(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except (NotADirectoryError, FileNotFoundError):
        return []
    except OSError as error:
        _folder_error(error)


def _folders_below(folder: Path) -> list[Path]:
    """`folder` and every folder below it whose name does not start with a dot, each real folder once."""
    seen: set[tuple[int, int]] = set()
    found, stack = [], [folder]
    while stack:
        current = stack.pop()
        key = _identity(current)
        if key in seen:
            continue
        seen.add(key)
        found.append(current)
        below = [current / n for n in _list(current) if not n.startswith(".") and (current / n).is_dir()]
        stack += reversed(below)
    return found


def _row_groups(path: Path, text_field: str) -> list[int]:
    """A parquet file's row groups (checking the text field from its footer); [-1] for other files."""
    if path.suffix.lower() != ".parquet":
        return [-1]
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    _require_field(text_field, parquet.schema_arrow.names, str(path))
    return list(range(parquet.num_row_groups))


def _files_description(what: str, spec: str, files: list[Path]) -> str:
    kinds = Counter(f.suffix.lower() for f in files)
    return (
        f"{what}: "
        + ", ".join(f"{n} {suffix} files" for suffix, n in sorted(kinds.items()))
        + f" from {spec}"
    )


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise _json_error(error, where) from error


def _json_error(error: ValueError | RecursionError, where: str, line: int | None = None) -> DataError:
    on_line = f" on line {line}" if line is not None else ""
    if isinstance(error, RecursionError):
        return DataError(
            f"{where}: the JSON record{on_line} is nested too deeply to read; flatten or remove it"
        )
    return DataError(f"{where}: invalid JSON{on_line} ({error.msg}); fix or remove the line")


def _line_number(path: Path, offset: int) -> int:
    """The line that starts at byte `offset` (counted only for an error message: a resumed reader seeks)."""
    lines = 1
    with path.open("rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 20))
            if not block:
                break
            lines += block.count(b"\n")
            offset -= len(block)
    return lines


def _split_incomplete_utf8(block: bytes, at_eof: bool) -> tuple[bytes, bytes]:
    """Split off a UTF-8 character cut by the block boundary, so it is decoded whole with the next block."""
    if at_eof:
        return block, b""
    for back in range(1, min(4, len(block)) + 1):
        byte = block[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        needed = 2 if byte >= 0xC0 else 1
        needed += (byte >= 0xE0) + (byte >= 0xF0)
        return (block[:-back], block[-back:]) if needed > back and back < len(block) else (block, b"")
    return block, b""


def _load_hf(
    path: str,
    name: str | None,
    data_files: list[str] | None,
    split: str,
    revision: str | None,
    **options: Any,
) -> Any:
    """`datasets.load_dataset(..., streaming=True)`, turning every failure into a prompt one-line DataError."""
    from huggingface_hub import is_offline_mode

    # huggingface_hub reads HF_HUB_OFFLINE once, at its import; asking it (not os.environ) keeps us in step
    offline = is_offline_mode()
    advice = "check the name and network access, or use a local path"
    if offline:
        advice = "HF_HUB_OFFLINE is set, so only datasets already in the cache load"
    elif data_files is None and not _hub_resolvable():
        # Without this check `datasets` retries for half a minute before giving up.
        raise DataError(
            f"cannot reach the Hugging Face Hub to load {path!r}: no network; "
            "set HF_HUB_OFFLINE=1 before starting Python to use a cached copy, or use a local path"
        )
    import datasets

    try:
        return datasets.load_dataset(
            path, name, data_files=data_files, split=split, streaming=True, revision=revision, **options
        )
    # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, RuntimeError...)
    except Exception as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "scripts are no longer supported" in detail:
            advice = f"this repository holds a loading script, which datasets 4 refuses; {OPENWEBTEXT_ALTERNATIVES}"
        raise DataError(
            f"could not load Hugging Face dataset {path!r} (split {split!r}): {detail}; {advice}"
        ) from error


def _hub_commit(dataset: Any) -> str | None:
    """The commit a streamed Hub dataset reads: `datasets` resolves its files to hf://datasets/NAME@COMMIT/...
    URLs, kept by the example iterable it builds (not a public attribute: None when it is not found)."""
    kwargs = getattr(getattr(dataset, "_ex_iterable", None), "kwargs", None) or {}
    for name in kwargs.get("base_files") or []:
        found = re.search(r"@([0-9a-f]{40})/", str(name))
        if found:
            return found.group(1)
    return None


def _hub_resolvable() -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy resolves names; we cannot check cheaply
    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


def _is_deeplake_folder(path: Path) -> bool:
    # v4 keeps a `_deeplake_log` folder; v3 a `dataset_meta.json` file.
    return path.is_dir() and ((path / "_deeplake_log").is_dir() or (path / "dataset_meta.json").is_file())


def _open_deeplake(url: str, text_field: str, **common: Any) -> DeepLakeSource:
    import deeplake

    remote = url.startswith(_HOSTED_DEEPLAKE)
    if not remote and "://" not in url and not _is_deeplake_folder(Path(url)):
        raise DataError(f"no DeepLake dataset at {url!r}; check the path")
    try:
        dataset = deeplake.open_read_only(url)
    except Exception as v4_error:  # deeplake's errors derive from Exception only
        try:
            # deeplake 4 cannot open version 3 datasets, but it can read them through a query (main branch only).
            dataset = deeplake.query(f'SELECT * FROM "{url}"')
        except Exception as query_error:
            query_text = " ".join(str(query_error).split())
            raise DataError(
                f"could not reach or find DeepLake dataset {url!r} (as version 4: {' '.join(str(v4_error).split())}; "
                f"as version 3 through deeplake.query: {query_text}); check the network and credentials "
                "(ACTIVELOOP_TOKEN env var) or use a local path; for a version 3 dataset, convert it once with "
                f"python -c \"import deeplake; deeplake.convert('{url}', './dataset-v4')\" and use "
                "deeplake:./dataset-v4, or use the openwebtext (Hugging Face) alias"
            ) from v4_error
    return DeepLakeSource(url, dataset, text_field, **common)
