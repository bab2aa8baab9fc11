"""Pre-tokenized token shards: `prepare` writes them once, training reads them through a memory map.

Layout of a shards folder:
    meta.json               tokenizer, dtype, token counts per split and shard, the source and settings
    train_000000.bin ...    raw little-endian token ids (uint16 while the vocabulary fits, else uint32)
    validation_000000.bin

Training reads `block_size` windows in a seeded random order per epoch; the data position is (epoch, index),
so resuming is O(1) and exact. This is the fastest path and the one a multi-day run should use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from .fingerprint import files_fingerprint
from .pipeline import READ_BATCH_CHARS, HeldOut, is_validation
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


PREPARE_BLOCK_DOCUMENTS = 4096  # a one-shard source is prepared in blocks of this many documents


def _split_pieces(pieces, held_out: HeldOut):
    """(split, text, last) for each piece: the same held-out rule as the streaming pipeline."""
    split = None
    cut = done = 0
    for piece in pieces:
        if split is None:
            done = 0
            if held_out.by_document:
                split = "validation" if is_validation(piece.text, held_out.per_mille) else "train"
            else:
                split, cut = "tail", held_out.cut(piece.text)
        if split == "tail":
            inside = max(0, min(len(piece.text), cut - done))
            if inside:
                yield "train", piece.text[:inside], done + inside >= cut, done == 0
            if inside < len(piece.text) or piece.last:
                yield "validation", piece.text[inside:], piece.last, done + inside == cut
        else:
            yield split, piece.text, piece.last, done == 0
        done += len(piece.text)
        if piece.last:
            split = None


class _UnitWriter:
    """Tokenizes one unit of work (a shard, or every stride-th block of a one-shard source) into
    `units/<name>.<split>.bin` files; a unit is done when its `.json` exists. Called with a job, it returns the
    counts of the units it wrote. Pickled into each `prepare` worker process, where it reopens the source
    once from `source_options` (`open_source` keywords)."""

    def __init__(self, source, source_options, encoder, held_out: HeldOut, eos: int, folder: Path):
        self.source, self.source_options = source, source_options
        self.encoder, self.held_out, self.eos, self.folder = encoder, held_out, eos, folder

    def __getstate__(self) -> dict:
        return {**self.__dict__, "source": None}

    def __call__(self, job: dict) -> list[dict]:
        if self.source is None:
            from .opening import open_source

            self.source = open_source(**self.source_options)
        if job["kind"] == "shard":
            pieces = self.source.pieces(0, None, shards=[job["index"]])
            return [self._write(f"s{job['index']:06d}", pieces)]
        # One shard: every process reads it and tokenizes the blocks b with b % stride == index.
        stride, index = job["stride"], job["index"]
        done: list[dict] = []
        block, docs, mine = 0, 0, []

        def finish() -> None:
            name = f"b{block:09d}"
            if block % stride == index and not (self.folder / f"{name}.json").exists():
                done.append(self._write(name, mine))

        for piece in self.source.pieces(0, None):
            if block % stride == index:  # the other processes' blocks are only counted
                mine.append(piece)
            if piece.last:
                docs += 1
                if docs == job["block"]:
                    finish()
                    block, docs, mine = block + 1, 0, []
        if docs:
            finish()
        return done

    def _write(self, name: str, pieces) -> dict:
        folder, encoder = self.folder, self.encoder
        counts = {
            "name": name,
            "documents": {"train": 0, "validation": 0},
            "tokens": {"train": 0, "validation": 0},
        }
        # The process id keeps a temporary file apart from one that a killed run's orphaned worker may
        # still be writing under the same unit name.
        temp = {s: folder / f".{name}.{os.getpid()}.{s}.bin" for s in ("train", "validation")}
        files = {s: open(path, "wb") for s, path in temp.items()}  # noqa: SIM115 - closed below
        batch: list[tuple[str, str, bool]] = []
        chars = 0

        def flush() -> None:
            for (split, _, last), ids in zip(batch, encoder([t for _, t, _ in batch]), strict=True):
                arr = np.append(ids, self.eos) if last else ids
                files[split].write(arr.astype(encoder.dtype).tobytes())
                counts["tokens"][split] += len(arr)
            batch.clear()

        try:
            for split, text, last, first in _split_pieces(pieces, self.held_out):
                if first:
                    counts["documents"][split] += 1
                batch.append((split, text, last))
                chars += len(text)
                if chars >= READ_BATCH_CHARS:
                    flush()
                    chars = 0
            if batch:
                flush()
        finally:
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
        for split, path in temp.items():
            os.replace(path, folder / f"{name}.{split}.bin")
        tmp = folder / f".{name}.{os.getpid()}.json"
        tmp.write_text(json.dumps(counts))
        os.replace(tmp, folder / f"{name}.json")  # the unit is complete only once this file exists
        return counts


def _run_jobs(task: _UnitWriter, jobs: list[dict], num_proc: int, where, tmp: Path):
    """Each job's result, in job order, from this process and `num_proc - 1` worker processes, each taking the
    next job when free. This process works too: it is already running, where a worker takes ~0.3 s to start."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    from .workers import _WorkerProcess

    advice = f"finished units are kept in {tmp}: run the same command again to resume, or use --num_proc 1"
    workers = [
        _WorkerProcess(i, task, name="prepare worker", doing="preparing", advice=advice)
        for i in range(1, num_proc)
    ]
    free: queue.SimpleQueue = queue.SimpleQueue()
    for runner in [None, *workers]:  # None: this process
        free.put(runner)

    def run(i: int) -> list[dict]:
        worker = free.get()
        try:
            if worker is None:
                return task(jobs[i])
            worker.submit(i, jobs[i])
            return worker.result(i, lambda: where(jobs[i]))
        finally:
            free.put(worker)

    # one thread per runner; those of the worker processes only wait on their pipes
    pool = ThreadPoolExecutor(num_proc, thread_name_prefix="prepare")
    try:
        yield from pool.map(run, range(len(jobs)))
    finally:
        # after an error, the jobs not started are dropped: their units are left for the next run
        pool.shutdown(wait=True, cancel_futures=True)
        for w in workers:
            w.close()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_shards(
    source: DocumentSource,
    tokenizer,
    out_dir: str | Path,
    *,
    validation_per_mille: int = 50,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = True,
    num_proc: int = 1,
    source_options: dict | None = None,
    block_documents: int = PREPARE_BLOCK_DOCUMENTS,
    before_publish=None,
) -> dict:
    """Tokenize every document of `source` once into train/validation shards; returns the metadata.

    `num_proc` processes work on the source's shards (or, for a one-shard source, on blocks of documents);
    the output is byte-identical for every `num_proc`. Work is kept per unit in `.<out>.partial/units`, so a
    killed prepare resumes with the units it finished; the folder appears under its name only when complete.
    Processes other than this one reopen the source from `source_options` (`open_source` keywords)."""
    from .workers import Encoder

    if num_proc < 1:
        raise DataError(f"--num_proc must be 1 or more, got {num_proc}")
    cores = usable_cores()
    if num_proc > cores:
        print(
            f"prepare: --num_proc {num_proc} is more than the {cores} usable cores; using {cores}", flush=True
        )
        num_proc = cores
    if num_proc > 1 and source_options is None:
        raise DataError("prepare with num_proc > 1 needs source_options to reopen the source in each process")
    out = Path(out_dir)
    if (out / "meta.json").exists():
        raise DataError(f"{out} already holds prepared shards; choose another --out or delete it first")
    tmp = out.with_name(f".{out.name}.partial")
    units_dir = tmp / "units"
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 65536 else np.uint32)
    encoder = Encoder(tokenizer, dtype)
    held_out = HeldOut(source, validation_per_mille)
    one_shard = getattr(source, "num_shards", 1) < 2
    plan = {
        "source": source.description,
        "tokenizer": hashlib.sha256((encoder._json or "").encode()).hexdigest()[:16],
        "vocab_size": len(tokenizer),
        "validation_per_mille": validation_per_mille,
        "held_out": "documents" if held_out.by_document else "tail",
        "units": "blocks" if one_shard else getattr(source, "num_shards", 1),
        "block_documents": block_documents,
    }
    plan_path = tmp / "plan.json"
    if plan_path.exists() and json.loads(plan_path.read_text()) == plan:
        kept = len(list(units_dir.glob("*.json")))
        if kept:
            print(f"prepare: resuming {tmp} with {kept} finished units", flush=True)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        units_dir.mkdir(parents=True)
        plan_path.write_text(json.dumps(plan))
    for leftover in units_dir.glob(".*"):  # a unit being written when the last run was killed
        leftover.unlink(missing_ok=True)
    task = _UnitWriter(source, source_options, encoder, held_out, tokenizer.eos_token_id, units_dir)
    if one_shard:
        jobs = [
            {"kind": "blocks", "index": i, "stride": num_proc, "block": block_documents}
            for i in range(num_proc)
        ]
    else:
        jobs = [
            {"kind": "shard", "index": u}
            for u in range(source.num_shards)
            if not (units_dir / f"s{u:06d}.json").exists()
        ]

    def where(job: dict) -> str:
        if job["kind"] == "shard":
            return f"shard {job['index']} of {source.description}"
        first, stride = job["index"], job["stride"]
        return f"blocks {first}, {first + stride}, ... of {block_documents} documents of {source.description}"

    bar = _Progress(len(jobs) if not one_shard else None, progress)
    for units in _run_jobs(task, jobs, num_proc, where, tmp):
        bar.update(units)
    bar.close()
    meta = _merge_units(tmp, units_dir, dtype, shard_tokens)
    meta.update(
        {
            "format": 1,
            "dtype": dtype.name,
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "tokenizer": getattr(tokenizer, "name_or_path", ""),
            "source": source.description,
            "validation_per_mille": validation_per_mille,
            "held_out": held_out.note(),
        }
    )
    shutil.rmtree(units_dir)
    plan_path.unlink()
    if before_publish is not None:
        before_publish(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out)  # the folder appears complete or not at all
    return meta


def _merge_units(tmp: Path, units_dir: Path, dtype: np.dtype, shard_tokens: int) -> dict:
    """Concatenate the units, in source order, into the final shard files."""
    names = sorted(p.name[: -len(".json")] for p in units_dir.glob("*.json"))
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "validation")}
    counts = {"documents": {"train": 0, "validation": 0}, "tokens": {"train": 0, "validation": 0}}
    for name in names:
        unit = json.loads((units_dir / f"{name}.json").read_text())
        for split, w in writers.items():
            counts["documents"][split] += unit["documents"][split]
            counts["tokens"][split] += unit["tokens"][split]
            data = np.fromfile(units_dir / f"{name}.{split}.bin", dtype=dtype)
            w.write(data)
    for w in writers.values():
        w._close()
    return {"shards": {s: w.files for s, w in writers.items()}, **counts}


class _Progress:
    """tqdm's bar with tokens/s and (when the number of units is known) an ETA; plain lines without a TTY."""

    def __init__(self, total: int | None, enabled: bool):
        import sys
        import time

        self.enabled, self.total, self.done, self.tokens = enabled, total, 0, 0
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="prepare", unit=" unit", disable=not (enabled and self.tty))

    def update(self, units: list[dict]) -> None:
        import time

        tokens = sum(u["tokens"]["train"] + u["tokens"]["validation"] for u in units)
        self.done += len(units) if self.total is not None else 0
        self.tokens += tokens
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        if self.tty:
            self.bar.update(len(units) if self.total is not None else 0)
            self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s")
        elif self.enabled and time.monotonic() - self.last > 10:
            self.last = time.monotonic()
            eta = ""
            if self.total:
                eta = f", ETA {(time.monotonic() - self.start) / self.done * (self.total - self.done):.0f} s"
            print(
                f"prepare: {self.done}/{self.total or '?'} units, {self.tokens:,} tokens, {rate:,.0f} tokens/s{eta}",
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


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
        self.maps = []
        for f in self.meta["shards"][split]:
            try:
                self.maps.append(np.memmap(self.folder / f["file"], dtype=dtype, mode="r"))
            except OSError as error:
                raise DataError(
                    f"cannot read {self.folder / f['file']} ({error.strerror or error}): restore the shards "
                    f"folder, or prepare it again with `train.py prepare --out {self.folder}`"
                ) from error
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
        """What the saved positions depend on: the shards' source, how many token windows they hold, and what
        the files hold (`content`: size, time and ends of meta.json and every shard file)."""
        names = ["meta.json"] + [
            f["file"] for split in sorted(self.meta["shards"]) for f in self.meta["shards"][split]
        ]
        return {
            "source": self.meta.get("source", str(self.folder)),
            "source_shards": len(self.maps),
            "windows": self.n_windows,
            "content": files_fingerprint([self.folder / n for n in names]),
        }
