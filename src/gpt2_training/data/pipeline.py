"""From documents to training sequences: split, tokenize, pack and shuffle, with an exactly resumable state.

    source pieces -> hash split (train / validation) -> this rank's documents -> batch tokenization
    -> EOS between documents -> pack into block_size sequences -> seeded shuffle buffer -> sequences

Everything that has been read but not yet handed out (the packing remainder, the shuffle buffer, the RNG) is
part of `state_dict()`, next to the source position of the last piece read. Resuming seeks the source to that
position instead of replaying the stream, so it costs the same at step 10 and at step 10 million, and the
sequences that follow are exactly those an uninterrupted run would have produced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError
from .sources import DocumentSource, Piece

READ_BATCH_CHARS = 1 << 18  # tokenize ~256 K characters per call: big enough for the Rust tokenizer's threads


def is_validation(text: str, per_mille: int) -> bool:
    """Stable split: the same document lands on the same side in every run, source and machine."""
    if per_mille <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8", "replace")[:65536], digest_size=8).digest()
    return int.from_bytes(h, "little") % 1000 < per_mille


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
    doc_index: int = 0  # documents started in this epoch (all splits, all ranks)
    keep_current: bool | None = None  # decision for a document whose pieces are still arriving
    extra: dict = field(default_factory=dict)


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
    ):
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
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
        self.counters = StreamStats()
        self.cursor = _Cursor()
        self.carry: list[int] = []
        self.buffer: list[np.ndarray] = []
        self.ready: list[np.ndarray] = []
        self.rng = np.random.Generator(np.random.PCG64([seed, rank, 0x5EED]))
        self.dtype = np.uint16 if len(tokenizer) <= 65536 else np.uint32
        self._pieces: Iterator[Piece] | None = None
        self._pending: Piece | None = None
        self._finished = False

    # -- reading -------------------------------------------------------------------------------------------
    def _open(self) -> None:
        self._pieces = self.source.pieces(self.cursor.epoch, self.cursor.position)
        self._pending = next(self._pieces, None)
        if self._pending is None and self.cursor.position is not None and self.cursor.more_expected:
            raise DataError(
                f"the data stream ran out while resuming (epoch {self.cursor.epoch}, position "
                f"{self.cursor.position}): {self.source.description} now holds less data than when the "
                "checkpoint was written; restore the data or start a new run with --resume never"
            )

    def _next_piece(self) -> Piece | None:
        if self._pieces is None:
            self._open()
        piece = self._pending
        if piece is not None:
            self._pending = next(self._pieces, None)
        return piece

    def _fill(self) -> bool:
        """Read and tokenize one batch of pieces into `ready` sequences; False at the end of an epoch."""
        texts, ends = [], []
        chars = 0
        while chars < self.read_chars:
            piece = self._next_piece()
            if piece is None:
                break
            c = self.cursor
            if c.keep_current is None:  # first piece of a document decides split and owner
                owner = c.doc_index % self.world_size == self.rank
                wanted = is_validation(piece.text, self.per_mille) == (self.split == "validation")
                c.keep_current = owner and wanted
                c.doc_index += 1
                if c.keep_current:
                    self.counters.documents += 1
                else:
                    self.counters.documents_other += 1
            if c.keep_current:
                texts.append(piece.text)
                ends.append(piece.last)
                chars += len(piece.text)
            if piece.last:
                c.keep_current = None
            c.position = piece.position
            c.more_expected = self._pending is not None
        if texts:
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            for ids, last in zip(encoded, ends, strict=True):
                self.carry.extend(ids)
                self.counters.tokens += len(ids)
                if last:
                    self.carry.append(self.eos)
                    self.counters.tokens += 1
            n_full = len(self.carry) // self.block_size
            if n_full:
                block = np.asarray(self.carry[: n_full * self.block_size], dtype=self.dtype)
                self.ready.extend(block.reshape(n_full, self.block_size))
                del self.carry[: n_full * self.block_size]
        if self._pending is None:  # end of epoch: the next read starts the next one
            self.cursor = _Cursor(epoch=self.cursor.epoch + 1)
            self._pieces = None
            self.counters.epochs_completed += 1
            return bool(texts)
        return True

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
                raise StopIteration
            epoch_before = self.cursor.epoch
            self._fill()
            if self.cursor.epoch != epoch_before:
                if self.counters.tokens_packed == 0 and not self.ready and not self.buffer:
                    raise DataError(
                        f"{self.source.description} has {self.counters.tokens} {self.split} tokens for this "
                        f"process (rank {self.rank} of {self.world_size}) but one sequence needs block_size="
                        f"{self.block_size}: add data, lower --block_size"
                        + (" or raise --validation_per_mille" if self.split == "validation" else "")
                    )
                self._finished = not self.loop

    def _emit(self, seq: np.ndarray) -> np.ndarray:
        self.counters.tokens_packed += len(seq)
        return seq

    @property
    def stats(self) -> dict[str, int]:
        """Counters plus what is read but not yet handed out (carried to the next sequence, never dropped)."""
        waiting = len(self.carry) + self.block_size * (len(self.buffer) + len(self.ready))
        return {**self.counters.as_dict(), "tokens_waiting": waiting}

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
            "cursor": self.cursor.__dict__,
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
        self.cursor = _Cursor(**meta["cursor"])
        self.rng.bit_generator.state = meta["rng"]
        self.counters = StreamStats(**meta["stats"])
        self.carry = [int(t) for t in arrays["carry"]]
        self.buffer = [row.astype(self.dtype) for row in arrays["buffer"]]
        self.ready = [row.astype(self.dtype) for row in arrays["ready"]]
        self._pieces, self._pending = None, None
        if self.cursor.position is not None:
            self._open()  # seek now, so data that no longer reaches the saved position fails at resume time
