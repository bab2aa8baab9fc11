"""From documents to training sequences: split, tokenize, pack and shuffle, with an exactly resumable state.

    source pieces -> held-out split -> this rank's documents -> batch tokenization (in-process or in
    background workers) -> EOS between documents -> pack into block_size sequences -> seeded shuffle buffer

Everything that has been read but not yet handed out (the packing remainder, the shuffle buffer, the RNG) is
part of `state_dict()`, next to the source position of the last piece packed. Resuming seeks the source to that
position instead of replaying the stream, so it costs the same at step 10 and at step 10 million, and the
sequences that follow are exactly those an uninterrupted run would have produced. Background workers
(`num_workers`) only move reading and tokenization ahead of the training step: batches are read and packed in
the same order, so the sequences, and the saved state, are the same with 0, 1 or 8 workers.

Which process reads what: with at least as many source shards as processes, each process reads only its own
shards (rank r takes shards r, r + world_size, ... of each epoch's order); with fewer, every process reads
every document and keeps every world_size-th one. A corpus too small for a document-level held-out split
(fewer documents than `min_documents_for_split`) holds out the last `validation_per_mille` of each document's
characters instead, and then every process reads everything and keeps every world_size-th sequence.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import DataError
from .sources import DocumentSource, Piece

READ_BATCH_CHARS = 1 << 18  # tokenize ~256 K characters per call: big enough for the Rust tokenizer's threads
# A document-level split needs enough documents that the held-out side is very unlikely to be empty:
# with this many expected held-out documents the chance of none is e**-10.
EXPECTED_HELD_OUT_DOCUMENTS = 10


def is_validation(text: str, per_mille: int) -> bool:
    """Stable split: the same document lands on the same side in every run, source and machine."""
    if per_mille <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8", "replace")[:65536], digest_size=8).digest()
    return int.from_bytes(h, "little") % 1000 < per_mille


def min_documents_for_split(per_mille: int) -> int:
    return math.ceil(EXPECTED_HELD_OUT_DOCUMENTS * 1000 / per_mille)


def _doc_key(first_piece: str) -> str:
    return hashlib.blake2b(first_piece.encode("utf-8", "replace")[:65536], digest_size=8).hexdigest()


class HeldOut:
    """Which text is held out for evaluation: whole documents chosen by a hash of their text or, for a source
    with fewer than `min_documents_for_split(per_mille)` documents, the last per_mille of every document.

    The choice reads at most that many documents of epoch 0 (in the seeded order, which only affects which
    documents are looked at first), so it is the same in every run and process."""

    def __init__(self, source: DocumentSource, per_mille: int):
        self.per_mille = per_mille
        self.cuts: dict[str, int] | None = None  # first-piece key -> character where the held-out tail starts
        self.documents = 0
        if per_mille > 0:
            self._measure(source)

    def _measure(self, source: DocumentSource) -> None:
        saved = Counter(source.stats)
        needed = min_documents_for_split(self.per_mille)
        lengths: dict[str, int] = {}
        key, length, docs = None, 0, 0
        for piece in source.pieces(0, None):
            if key is None:
                key, length = _doc_key(piece.text), 0
            length += len(piece.text)
            if piece.last:
                lengths[key] = max(lengths.get(key, 0), length)
                key, docs = None, docs + 1
                if docs >= needed:
                    break
        source.stats.clear()
        source.stats.update(saved)
        self.documents = docs
        if docs < needed:
            self.cuts = {k: n - math.ceil(n * self.per_mille / 1000) for k, n in lengths.items()}

    @property
    def by_document(self) -> bool:
        return self.cuts is None

    def note(self) -> str:
        if self.by_document:
            return f"held out: {self.per_mille} per mille of the documents, chosen by a hash of their text"
        return (
            f"held out: the last {self.per_mille} per mille of each document's characters, because the source has "
            f"{self.documents} documents, fewer than the {min_documents_for_split(self.per_mille)} a "
            "document-level split needs"
        )

    def cut(self, first_piece: str) -> int:
        return self.cuts.get(_doc_key(first_piece), 0) if self.cuts is not None else 0


@dataclass
class StreamStats:
    """What the pipeline has read and produced; reported so nothing disappears silently."""

    documents: int = 0  # documents of this split owned by this rank
    documents_other: int = 0  # documents skipped: the other split or another rank's
    tokens: int = 0  # tokens produced by the tokenizer (EOS included)
    tokens_packed: int = 0  # tokens handed out in sequences
    epochs_completed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Cursor:
    epoch: int = 0
    position: Any = None  # source position of the last piece consumed in this epoch
    more_expected: bool = True  # a piece was known to follow `position` when the state was saved
    doc_index: int = 0  # documents started in this epoch (all splits; all ranks unless each reads own shards)
    keep_current: bool | None = None  # decision for a document whose pieces are still arriving
    doc_chars: int = 0  # characters of the current document read so far (tail split)
    cut: int = 0  # where the current document's held-out tail starts (tail split)
    segment: int = 0  # index into a resize plan's segments (see `restore_stream`)


@dataclass
class _Batch:
    texts: list[str]
    ends: list[bool]
    cursor: _Cursor
    documents: int
    documents_other: int
    epoch_end: bool
    where: tuple[int, Any]  # (epoch, position) of the first piece, for error messages
    encoded: list[np.ndarray] | None = field(default=None, repr=False)


class _Reader:
    """Reads batches of this rank's text, advancing its own cursor; runs in-process or in a background thread."""

    def __init__(self, stream: TokenStream, cursor: _Cursor, plan: dict | None):
        self.s, self.cursor, self.plan = stream, copy.copy(cursor), plan
        self._pieces: Iterator[Piece] | None = None
        self._pending: Piece | None = None

    # -- which pieces this rank reads ----------------------------------------------------------------------
    def _mode(self) -> str:
        """How this epoch is divided: a resize plan (see restore.py) decides the epoch it was made in."""
        p = self.plan
        if p is not None and p.get("epoch") == self.cursor.epoch:
            if p.get("segments") is not None:
                return "segments"
            if p.get("consumed") is not None:
                return "documents"
        return self.s.mode

    def _iterate(self) -> Iterator[Piece]:
        s, c = self.s, self.cursor
        mode = self._mode()
        if mode == "segments":
            return self._iterate_segments(self.plan["segments"])
        if mode == "shards":
            own = list(range(s.rank, s.source.num_shards, s.world_size))
            return s.source.pieces(c.epoch, c.position, shards=own)
        return s.source.pieces(c.epoch, c.position)

    def _iterate_segments(self, segments: list) -> Iterator[Piece]:
        """A resize plan's segments [shard_rank, offset, chars, keep_current]: the parts of shards that the old
        processes had not read yet, each continued exactly where its reader stopped."""
        c = self.cursor
        for i in range(c.segment, len(segments)):
            rank, offset, chars, keep = segments[i]
            if i > c.segment or c.position is None:
                c.segment, c.keep_current = i, keep
                start = {rank: (offset, chars)}
                yield from self.s.source.pieces(c.epoch, None, shards=[rank], starts=start)
            else:
                yield from self.s.source.pieces(c.epoch, c.position, shards=[rank])

    def open(self) -> None:
        self._pieces = self._iterate()
        self._pending = next(self._pieces, None)
        c = self.cursor
        if self._pending is None and c.position is not None and c.more_expected:
            raise DataError(
                f"the data stream ran out while resuming (epoch {c.epoch}, position {c.position}): "
                f"{self.s.source.description} now holds less data than when the checkpoint was written; "
                "restore the data, or start over with --resume never --overwrite_output_dir (replaces this run's "
                "files) or in another --output_dir"
            )

    def _next_piece(self) -> Piece | None:
        if self._pieces is None:
            self.open()
        piece = self._pending
        if piece is not None:
            self._pending = next(self._pieces, None)
        return piece

    def _owns(self, doc_index: int) -> bool:
        mode = self._mode()
        if mode != "documents":
            return True
        p = self.plan
        if p is not None and p.get("consumed") is not None and p["epoch"] == self.cursor.epoch:
            old_world, consumed = p["world"], p["consumed"]
            if doc_index < consumed[doc_index % old_world]:
                return False  # the old process that owned it has already read it
        return doc_index % self.s.world_size == self.s.rank

    def read(self) -> _Batch:
        """The next batch of about `read_chars` characters of this rank's split (possibly empty at an epoch end)."""
        s, c = self.s, self.cursor
        texts: list[str] = []
        ends: list[bool] = []
        docs = other = chars = 0
        where = None
        while chars < s.read_chars:
            piece = self._next_piece()
            if piece is None:
                break
            if where is None:
                where = (c.epoch, piece.position)
            if c.keep_current is None:  # first piece of a document decides split and owner
                owner = self._owns(c.doc_index)
                c.doc_index += 1
                c.doc_chars = 0
                if s.held_out.by_document:
                    wanted = is_validation(piece.text, s.per_mille) == (s.split == "validation")
                else:
                    c.cut = s.held_out.cut(piece.text)
                    wanted = (c.cut > 0) if s.split == "train" else True
                c.keep_current = owner and wanted
                if c.keep_current:
                    docs += 1
                else:
                    other += 1
            if c.keep_current:
                text, last = piece.text, piece.last
                if not s.held_out.by_document:
                    text, last = self._tail_part(piece)
                if text or last:
                    texts.append(text)
                    ends.append(last)
                    chars += len(text)
            c.doc_chars += len(piece.text)
            if piece.last:
                c.keep_current = None
            c.position = piece.position
            c.more_expected = self._pending is not None
        epoch_end = self._pending is None
        snapshot = copy.copy(c)
        if epoch_end:  # the next read starts the next epoch
            self.cursor = _Cursor(epoch=c.epoch + 1)
            self._pieces = None
            if self.plan is not None and self.plan.get("epoch", self.cursor.epoch) < self.cursor.epoch:
                self.plan = None
        return _Batch(texts, ends, snapshot, docs, other, epoch_end, where or (c.epoch, c.position))

    def _tail_part(self, piece: Piece) -> tuple[str, bool]:
        """This split's part of a piece under the tail split: train takes [0, cut), validation [cut, end)."""
        c, start = self.cursor, self.cursor.doc_chars
        inside = max(0, min(len(piece.text), c.cut - start))
        if self.s.split == "train":
            return piece.text[:inside], inside > 0 and start + inside >= c.cut
        return piece.text[inside:], piece.last


def split_texts(source: DocumentSource, held_out: HeldOut, split: str = "train") -> Iterator[str]:
    """One pass over one split's text, cut exactly as the stream cuts it (what a tokenizer is trained on)."""
    view = SimpleNamespace(
        source=source,
        held_out=held_out,
        per_mille=held_out.per_mille,
        split=split,
        mode="documents",
        rank=0,
        world_size=1,
        read_chars=READ_BATCH_CHARS,
        loop=False,
    )
    reader = _Reader(view, _Cursor(), None)
    while True:
        batch = reader.read()
        yield from batch.texts
        if batch.epoch_end:
            return


class TokenStream:
    """An endless stream of packed `block_size` token sequences from a DocumentSource, epoch after epoch."""

    def __init__(
        self,
        source: DocumentSource,
        tokenizer,
        block_size: int,
        *,
        split: str = "train",
        validation_per_mille: int = 50,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        loop: bool = True,
        read_chars: int = READ_BATCH_CHARS,
        num_workers: int = 0,
        worker_backend: str = "process",
        held_out: HeldOut | None = None,
    ):
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
        if num_workers < 0:
            raise DataError(f"dataloader_num_workers must be 0 (in-process) or more, got {num_workers}")
        self.source, self.tokenizer, self.block_size = source, tokenizer, block_size
        self.split, self.per_mille = split, validation_per_mille
        self.shuffle_buffer, self.seed, self.rank, self.world_size, self.loop = (
            shuffle_buffer,
            seed,
            rank,
            world_size,
            loop,
        )
        self.eos = tokenizer.eos_token_id
        self.read_chars = read_chars
        self.num_workers, self.worker_backend = num_workers, worker_backend
        self.held_out = held_out if held_out is not None else HeldOut(source, validation_per_mille)
        if not self.held_out.by_document and world_size > 1:
            self.mode = "sequences"
        elif world_size > 1 and getattr(source, "num_shards", 1) >= world_size:
            self.mode = "shards"
        else:
            self.mode = "documents"
        self.counters = StreamStats()
        self.cursor = _Cursor()
        self.plan: dict | None = None
        self.seq_index = 0  # sequences packed so far by the whole stream (sequence-level ownership)
        self.carry: list[int] = []
        self.buffer: list[np.ndarray] = []
        self.ready: list[np.ndarray] = []
        self.rng = np.random.Generator(np.random.PCG64([seed, rank, 0x5EED]))
        self.dtype = np.uint16 if len(tokenizer) <= 65536 else np.uint32
        from .workers import Encoder

        self.encoder = Encoder(tokenizer, self.dtype)
        self._reader: _Reader | None = None
        self._prefetch = None
        self._finished = False

    # -- reading -------------------------------------------------------------------------------------------
    def _next_batch(self) -> _Batch:
        if self._reader is None:
            self._reader = _Reader(self, self.cursor, self.plan)
        if not self.num_workers:
            batch = self._reader.read()
            batch.encoded = self.encoder(batch.texts) if batch.texts else []
            return batch
        if self._prefetch is None:
            from .workers import Prefetcher

            self._prefetch = Prefetcher(self._reader, self.encoder, self.num_workers, self.worker_backend)
        return self._prefetch.next()

    def _fill(self) -> bool:
        """Pack one batch of tokenized text into `ready` sequences; False when an epoch ended with nothing."""
        batch = self._next_batch()
        self.counters.documents += batch.documents
        self.counters.documents_other += batch.documents_other
        for ids, last in zip(batch.encoded, batch.ends, strict=True):
            self.carry.extend(ids.tolist())
            self.counters.tokens += len(ids)
            if last:
                self.carry.append(self.eos)
                self.counters.tokens += 1
        n_full = len(self.carry) // self.block_size
        if n_full:
            block = np.asarray(self.carry[: n_full * self.block_size], dtype=self.dtype)
            for seq in block.reshape(n_full, self.block_size):
                if self._owns_sequence(self.seq_index):
                    self.ready.append(seq)
                self.seq_index += 1
            del self.carry[: n_full * self.block_size]
        self.cursor = batch.cursor
        if batch.epoch_end:
            self.cursor = _Cursor(epoch=batch.cursor.epoch + 1)
            if self.plan is not None and self.plan.get("epoch", self.cursor.epoch) < self.cursor.epoch:
                self.plan = None
            self.counters.epochs_completed += 1
            return bool(batch.texts)
        return True

    def _owns_sequence(self, index: int) -> bool:
        p = self.plan
        if p is not None and p.get("sequences_consumed") is not None:
            old_world, consumed = p["world"], p["sequences_consumed"]
            if index < consumed[index % old_world]:
                return False  # packed by the old process that owned it: handed out or in its saved buffers
        return self.mode != "sequences" or index % self.world_size == self.rank

    # -- handing out ----------------------------------------------------------------------------------------
    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> np.ndarray:
        while True:
            if (
                self.shuffle_buffer
                and self.buffer
                and (len(self.buffer) >= self.shuffle_buffer or self._finished)
            ):
                i = int(self.rng.integers(len(self.buffer)))
                self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
                return self._emit(self.buffer.pop())
            if self.ready:
                seq = self.ready.pop(0)
                if not self.shuffle_buffer:
                    return self._emit(seq)
                self.buffer.append(seq)
                continue
            if self._finished:  # a single pass (loop=False) has handed out everything
                self.close()
                raise StopIteration
            epoch_before = self.cursor.epoch
            self._fill()
            if self.cursor.epoch != epoch_before:
                if self.counters.tokens_packed == 0 and not self.ready and not self.buffer:
                    self.close()
                    raise DataError(self._too_small_message())
                self._finished = not self.loop

    def _too_small_message(self) -> str:
        where = f"{self.source.description} has {self.counters.tokens} {self.split} tokens"
        if self.world_size > 1:
            where += f" for this process (rank {self.rank} of {self.world_size})"
        fixes = ["add data", "lower --block_size"]
        if self.split == "validation":
            fixes.append(f"raise --validation_per_mille (now {self.per_mille})")
        elif self.per_mille > 0:
            fixes.append(f"lower --validation_per_mille (now {self.per_mille})")
        return (
            f"{where} but one sequence needs block_size={self.block_size}: "
            + ", ".join(fixes[:-1])
            + f" or {fixes[-1]}"
        )

    def describe(self, where: tuple[int, Any]) -> str:
        """A batch's place in the source (file and offset where the source knows them)."""
        describe = getattr(self.source, "describe", None)
        return describe(*where) if describe else f"{self.source.description}, position {where[1]}"

    def _emit(self, seq: np.ndarray) -> np.ndarray:
        self.counters.tokens_packed += len(seq)
        return seq

    def close(self) -> None:
        """Stop background workers (also done when the stream is garbage-collected or the process exits)."""
        if getattr(self, "_prefetch", None) is not None:
            self._prefetch.close()
            self._prefetch = None

    def __del__(self) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, int]:
        """Counters, the source's own counts (replaced characters, documents read), and what is read but not yet
        handed out (carried to the next sequence, never dropped)."""
        waiting = len(self.carry) + self.block_size * (len(self.buffer) + len(self.ready))
        source = getattr(self.source, "stats", {})
        return {
            **self.counters.as_dict(),
            "tokens_waiting": waiting,
            "replaced_characters": int(source.get("replaced_characters", 0)),
            "documents_skipped": int(source.get("documents_skipped", 0)),
            "documents_split": int(source.get("documents_split", 0)),
        }

    def fingerprint(self) -> dict[str, Any]:
        """What the saved positions depend on: a resume with other values cannot seek to them, and one on other
        text (`content`: each file's size, time and ends; a remote revision) would read other documents."""
        content = getattr(self.source, "content_fingerprint", dict)()
        return {
            "source": self.source.description,
            "source_shards": int(getattr(self.source, "num_shards", 1)),
            "held_out": "documents" if self.held_out.by_document else "tail",
            "content": content,
        }

    # -- exact resumption -----------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """JSON-able metadata and arrays: enough to continue exactly where this stream is."""
        meta = {
            "kind": "token_stream",
            "source": self.source.description,
            "split": self.split,
            "block_size": self.block_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "mode": self.mode,
            "held_out": "documents" if self.held_out.by_document else "tail",
            "cursor": dict(self.cursor.__dict__),
            "plan": self.plan,
            "seq_index": self.seq_index,
            "rng": self.rng.bit_generator.state,
            "stats": self.counters.as_dict(),
        }
        arrays = {
            "carry": np.asarray(self.carry, dtype=np.int64),
            "buffer": np.asarray(self.buffer, dtype=np.int64).reshape(-1, self.block_size),
            "ready": np.asarray(self.ready, dtype=np.int64).reshape(-1, self.block_size),
        }
        return meta, arrays

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        if meta.get("block_size") != self.block_size:
            raise DataError(
                f"data state was saved with block_size={meta.get('block_size')}, not {self.block_size}"
            )
        if meta.get("world_size", 1) != self.world_size:
            raise DataError(
                f"data state was saved by {meta.get('world_size')} processes, this run has {self.world_size}: "
                "restore it with gpt2_training.data.restore_stream, which maps every old process's state"
            )
        self.close()
        cursor = {k: v for k, v in meta["cursor"].items() if k in _Cursor.__dataclass_fields__}
        self.cursor = _Cursor(**cursor)
        self.plan = meta.get("plan")
        self.seq_index = meta.get("seq_index", 0)
        self.rng.bit_generator.state = meta["rng"]
        self.counters = StreamStats(**meta["stats"])
        self.carry = [int(t) for t in arrays["carry"]]
        self.buffer = [row.astype(self.dtype) for row in arrays["buffer"]]
        self.ready = [row.astype(self.dtype) for row in arrays["ready"]]
        self._finished = False
        self._reader = _Reader(self, self.cursor, self.plan)
        if self.cursor.position is not None:
            self._reader.open()  # seek now, so data that no longer reaches the saved position fails at resume time
