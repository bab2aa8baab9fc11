"""Background data workers (`--dataloader_num_workers N`): a reader thread reads batches of text ahead of the
training step and N tokenizer processes encode them; the stream packs the results in reading order.

Processes or threads (`worker_backend`, measured side by side in bench/bench_workers.py): on the 2-core test
machine, shared with other jobs, 2 tokenizer threads out-ran 2 processes in the stream alone (they skip the
pickling), and the engine's step time was the same within that machine's noise. Processes are the default
because the Rust tokenizer releases the GIL only while it encodes, and turning encodings into id arrays holds
it: N threads would share one GIL with the training loop, where processes scale with the cores, and a process
that crashes or is killed (out of memory) is reported with its exit status instead of taking the run with it.
Each worker is a plain child process started with this package's interpreter (`python -c`), so it imports only
numpy and `tokenizers` (not torch), starts in a fraction of a second, and exits when its input pipe closes,
i.e. when the training process dies. Messages are length-prefixed pickles over the child's stdin/stdout.

A worker that raises reports the error text, and a worker that dies closes its pipe: either becomes a
DataError naming the cause and the batch's first record (file and offset). Nothing waits forever.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

_HEADER = struct.Struct("<Q")
_POLL_S = 0.5


class Encoder:
    """A picklable batch tokenizer giving the ids of `tokenizer(texts, add_special_tokens=False)`.

    It calls the Rust tokenizer directly (`encode_batch_fast`, no offsets), in this process and in workers
    alike, so 0 and N workers produce the same ids by construction. Tokenizers without a Rust backend are
    called as they are (in-process and threads only)."""

    def __init__(self, tokenizer: Any, dtype: Any):
        self.dtype = np.dtype(dtype)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._rust = backend
        self._json = backend.to_str() if backend is not None else None
        self._callable = None if backend is not None else tokenizer

    def __getstate__(self) -> dict:
        if self._json is None:
            raise DataError("background workers need a fast (Rust) tokenizer; use --dataloader_num_workers 0")
        return {"dtype": self.dtype.str, "json": self._json}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.dtype, self._json, self._callable = np.dtype(state["dtype"]), state["json"], None
        self._rust = Tokenizer.from_str(self._json)

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self._rust is not None:
            encodings = self._rust.encode_batch_fast(texts, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=self.dtype) for e in encodings]
        ids = self._callable(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(i, dtype=self.dtype) for i in ids]


def _send(stream, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream) -> Any:
    """The next message, or None when the other side has closed the pipe (exited or died)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(header)
    data = stream.read(n)
    return pickle.loads(data) if len(data) == n else None


def worker_main() -> None:
    """A tokenizer process: read (job, texts), answer ("ok", job, ids) or ("error", job, text) until EOF."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but protocol messages may reach the pipe
    encoder = _receive(inp)
    while (message := _receive(inp)) is not None:
        job, texts = message
        try:
            reply = ("ok", job, encoder(texts))
        except Exception as error:  # reported to the training process, which raises it with the record
            reply = ("error", job, f"{type(error).__name__}: {error}")
        _send(out, reply)


class _WorkerProcess:
    def __init__(self, index: int, encoder: Encoder):
        self.index = index
        src = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.insert(0, {src!r}); from gpt2_training.data.workers import worker_main; worker_main()"
        env = dict(os.environ)
        # N workers each running the Rust tokenizer's own thread pool would oversubscribe the cores.
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.lock = threading.Lock()
        _send(self.proc.stdin, encoder)

    def submit(self, job: int, texts: list[str]) -> None:
        with self.lock:
            _send(self.proc.stdin, (job, texts))

    def result(self, job: int, where: Callable[[], str]) -> list[np.ndarray]:
        reply = _receive(self.proc.stdout)
        if reply is None:
            code = self.proc.wait()
            cause = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise DataError(
                f"data worker {self.index} (pid {self.proc.pid}) {cause} while tokenizing the batch that starts "
                f"at {where()}; check memory (the kernel kills the largest process when it runs out) and run "
                "again, or use --dataloader_num_workers 0 to tokenize in the training process"
            )
        status, got, payload = reply
        if status == "error":
            raise DataError(
                f"data worker {self.index} failed on the batch that starts at {where()}: {payload}"
            )
        if got != job:
            raise DataError(f"data worker {self.index} answered job {got} instead of {job}")
        return payload

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Prefetcher:
    """Reads batches in a background thread and has them tokenized by workers, `depth` batches ahead."""

    def __init__(self, reader: Any, encoder: Encoder, num_workers: int, backend: str = "process"):
        if backend not in ("process", "thread"):
            raise ValueError(f"backend must be 'process' or 'thread', not {backend!r}")
        self.reader, self.encoder, self.backend = reader, encoder, backend
        self.num_workers = num_workers
        self._queue: queue.Queue = queue.Queue(maxsize=2 * num_workers + 1)
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._workers: list[_WorkerProcess] = []
        if backend == "thread":
            self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="tokenize")
        else:
            self._workers = [_WorkerProcess(i, encoder) for i in range(num_workers)]
        self._thread = threading.Thread(target=self._read_ahead, name="data-reader", daemon=True)
        self._thread.start()

    def _read_ahead(self) -> None:
        job = 0
        try:
            while not self._stop.is_set():
                batch = self.reader.read()
                handle: Any = None
                if batch.texts:
                    if self._pool is not None:
                        handle = self._pool.submit(self.encoder, batch.texts)
                    else:
                        worker = self._workers[job % self.num_workers]
                        worker.submit(job, batch.texts)
                        handle = (worker, job)
                    job += 1
                self._put((batch, handle))
                if batch.epoch_end and not self.reader.s.loop:
                    return
        except BaseException as error:  # handed to the consumer, which raises it in the training process
            self._put((None, error))

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def next(self) -> Any:
        while True:
            try:
                batch, handle = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise DataError("the data reader thread stopped without a reason") from None
        if batch is None:
            raise handle
        if handle is None:
            batch.encoded = []
        elif isinstance(handle, Future):
            try:
                batch.encoded = handle.result()
            except Exception as error:
                where = self.reader.s.describe(batch.where)
                raise DataError(f"tokenizing the batch that starts at {where} failed: {error}") from error
        else:
            worker, job = handle
            batch.encoded = worker.result(job, lambda: self.reader.s.describe(batch.where))
        return batch

    def close(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout=5)
