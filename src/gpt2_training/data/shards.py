"""Pre-tokenized token shards: `prepare` writes them once, training reads them through a memory map.

Layout of a shards folder:
    meta.json               tokenizer, dtype, token counts per split and shard, the source and settings
    train_000000.bin ...    raw little-endian token ids (uint16 while the vocabulary fits, else uint32)
    validation_000000.bin

Training reads `block_size` windows in a seeded random order per epoch; the data position is (epoch, index),
so resuming is O(1) and exact. This is the fastest path and the one a multi-day run should use.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from .pipeline import READ_BATCH_CHARS, is_validation
from .sources import DocumentSource

SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard: few files, each cheap to map


class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.files: list[dict] = []
        self._file = None
        self._count = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None:
                name = f"{self.split}_{len(self.files):06d}.bin"
                self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _close
                self.files.append({"file": name, "tokens": 0})
                self._count = 0
            room = self.shard_tokens - self._count
            chunk, ids = ids[:room], ids[room:]
            self._file.write(chunk.astype(self.dtype).tobytes())
            self._count += len(chunk)
            self.files[-1]["tokens"] = self._count
            if self._count >= self.shard_tokens:
                self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def prepare_shards(
    source: DocumentSource,
    tokenizer,
    out_dir: str | Path,
    *,
    validation_per_mille: int = 50,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = True,
) -> dict:
    """Tokenize every document of `source` once into train/validation shards; returns the metadata."""
    out = Path(out_dir)
    if (out / "meta.json").exists():
        raise DataError(f"{out} already holds prepared shards; choose another --out or delete it first")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 65536 else np.uint32)
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "validation")}
    counts = {"documents": {"train": 0, "validation": 0}, "tokens": {"train": 0, "validation": 0}}
    eos = tokenizer.eos_token_id
    bar = tqdm(desc="prepare", unit=" tok", unit_scale=True, disable=not progress)
    batch: list[tuple[str, bool, str]] = []
    split_of_doc: str | None = None

    def flush() -> None:
        encoded = tokenizer([t for t, _, _ in batch], add_special_tokens=False)["input_ids"]
        for ids, (_, last, split) in zip(encoded, batch, strict=True):
            arr = np.asarray(ids + [eos] if last else ids, dtype=np.int64)
            writers[split].write(arr)
            counts["tokens"][split] += len(arr)
            bar.update(len(arr))
        batch.clear()

    chars = 0
    for piece in source.pieces(0, None):
        if split_of_doc is None:
            split_of_doc = "validation" if is_validation(piece.text, validation_per_mille) else "train"
            counts["documents"][split_of_doc] += 1
        batch.append((piece.text, piece.last, split_of_doc))
        chars += len(piece.text)
        if piece.last:
            split_of_doc = None
        if chars >= READ_BATCH_CHARS:
            flush()
            chars = 0
    if batch:
        flush()
    bar.close()
    for w in writers.values():
        w._close()
    meta = {
        "format": 1,
        "dtype": dtype.name,
        "vocab_size": len(tokenizer),
        "eos_token_id": eos,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "source": source.description,
        "validation_per_mille": validation_per_mille,
        "shards": {s: w.files for s, w in writers.items()},
        **counts,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out)  # the folder appears complete or not at all
    return meta


class ShardStream:
    """`block_size` windows from memory-mapped shards, in a seeded order per epoch, split across ranks."""

    def __init__(
        self,
        folder: str | Path,
        split: str,
        block_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        loop: bool = True,
    ):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise DataError(
                f"{self.folder} has no meta.json: run `train.py prepare --out {self.folder}` first"
            )
        self.meta = json.loads(meta_path.read_text())
        self.split, self.block_size, self.seed = split, block_size, seed
        self.rank, self.world_size, self.shuffle, self.loop = rank, world_size, shuffle, loop
        dtype = np.dtype(self.meta["dtype"])
        self.maps = [
            np.memmap(self.folder / f["file"], dtype=dtype, mode="r") for f in self.meta["shards"][split]
        ]
        # Window w of shard s starts at token w * block_size; the remainder of each shard is reported, not used.
        self.windows_per_shard = np.array([len(m) // block_size for m in self.maps], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.windows_per_shard)])
        self.n_windows = int(self.offsets[-1])
        self.unused_tokens = int(sum(len(m) % block_size for m in self.maps))
        if self.n_windows < world_size:
            total = int(sum(len(m) for m in self.maps))
            raise DataError(
                f"{self.folder} has {total} {split} tokens, fewer than one block_size={block_size} window per "
                f"process ({world_size}): prepare more data or lower --block_size"
            )
        self.epoch, self.index = 0, 0  # index counts windows handed out by ALL ranks in this epoch
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                self._order = np.random.Generator(np.random.PCG64([self.seed, self.epoch])).permutation(
                    self.n_windows
                )
            else:
                self._order = np.arange(self.n_windows)
        return self._order

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> np.ndarray:
        # every rank gets the same count per epoch: the windows that cannot be shared equally wait for the next
        if self.index + self.world_size > self.n_windows:
            if not self.loop:
                raise StopIteration
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        w = int(self._epoch_order()[self.index + self.rank])
        self.index += self.world_size
        shard = int(np.searchsorted(self.offsets, w, side="right") - 1)
        start = (w - int(self.offsets[shard])) * self.block_size
        return np.asarray(self.maps[shard][start : start + self.block_size])

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {
            "kind": "shards",
            "source": str(self.folder),
            "split": self.split,
            "block_size": self.block_size,
            "epoch": self.epoch,
            "index": self.index,
            "world_size": self.world_size,
        }, {}

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        if meta.get("block_size") != self.block_size or meta.get("world_size") != self.world_size:
            raise DataError("shard data state was saved with another block_size or number of processes")
        self.epoch, self.index, self._order = meta["epoch"], meta["index"], None

    @property
    def stats(self) -> dict[str, int]:
        return {"windows": self.n_windows, "unused_tokens": self.unused_tokens}

    def fingerprint(self) -> dict:
        """What the saved positions depend on: the shards' source and how many token windows they hold."""
        return {
            "source": self.meta.get("source", str(self.folder)),
            "source_shards": len(self.maps),
            "windows": self.n_windows,
        }
