"""Background data workers (`--dataloader_num_workers N`): a reader thread reads batches of text ahead of the
training step and N tokenizer processes encode them; the stream packs the results in reading order.

Processes or threads (`worker_backend`, measured side by side in bench/bench_workers.py): on the 2-core test
machine, shared with other jobs, 2 tokenizer threads out-ran 2 processes in the stream alone (they skip the
pickling), and the engine's step time was the same within that machine's noise. Processes are the default
because the tokenizer (tiktoken or Rust) releases the GIL only while it encodes, and making id arrays holds
it: N threads would share one GIL with the training loop, where processes scale with the cores, and a process
that crashes or is killed (out of memory) is reported with its exit status instead of taking the run with it.
Each worker is a plain child process started with this package's interpreter (`python -c`), so it imports only
numpy and the tokenizer's library (not torch), starts in a fraction of a second, and exits when its input pipe
closes or, in the middle of a job, within half a second of the process that started it dying. Messages are length-prefixed pickles over the child's stdin/stdout.

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
import time
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

    GPT-2's recipe (a byte-level BPE, as trained here) is encoded by tiktoken built from the tokenizer's own
    vocabulary (`tiktoken_encoding`), several times faster per core than the Rust `tokenizers` library and
    single-threaded, so one process uses one core; any other fast tokenizer goes through the Rust tokenizer
    (`encode_batch_fast`, no offsets). The same path runs in this process and in workers, so 0 and N workers
    produce the same ids by construction. Tokenizers without a Rust backend are called as they are
    (in-process and threads only). `use_tiktoken=False` keeps the Rust path, for comparisons."""

    def __init__(self, tokenizer: Any, dtype: Any, *, use_tiktoken: bool = True):
        self.dtype = np.dtype(dtype)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._json = backend.to_str() if backend is not None else None
        self._callable = None if backend is not None else tokenizer
        from .tokenizer import tiktoken_encoding

        self._tiktoken = tiktoken_encoding(self._json) if use_tiktoken and self._json is not None else None
        self._rust = backend if self._tiktoken is None else None

    @property
    def engine(self) -> str:
        """Which library encodes: "tiktoken", "tokenizers" or "python" (a tokenizer without a Rust backend)."""
        if self._tiktoken is not None:
            return "tiktoken"
        return "tokenizers" if self._rust is not None else "python"

    def __getstate__(self) -> dict:
        if self._json is None:
            raise DataError("background workers need a fast (Rust) tokenizer; use --dataloader_num_workers 0")
        # the tiktoken encoding itself, not the JSON it was built from: a worker then starts ~0.1 s sooner
        if self._tiktoken is not None:
            return {"dtype": self.dtype.str, "tiktoken": self._tiktoken}
        return {"dtype": self.dtype.str, "json": self._json}

    def __setstate__(self, state: dict) -> None:
        self.dtype, self._callable = np.dtype(state["dtype"]), None
        self._tiktoken, self._json, self._rust = state.get("tiktoken"), state.get("json"), None
        if self._json is not None:
            from tokenizers import Tokenizer

            self._rust = Tokenizer.from_str(self._json)

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self._tiktoken is not None:
            # allowed_special="all": the tokenizer's added tokens are cut out of the text, as `tokenizers` does
            encode = self._tiktoken.encode_to_numpy
            return [encode(t, allowed_special="all").astype(self.dtype, copy=False) for t in texts]
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


def _exit_with(parent: int) -> None:
    """End this process as soon as `parent` is gone. EOF on the input pipe ends the worker only between jobs, and
    one job can be long (a unit of `prepare`): without this, a killed `prepare` would leave its workers burning
    cores until they finish. Polling the parent id works whichever thread started the worker."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(parent: int | None = None) -> None:
    """A worker process: read a picklable callable, then answer each (job, argument) with ("ok", job, result)
    or ("error", job, text) until EOF. The callable is an Encoder here and a unit writer in `prepare`. With
    `parent` (the process id of the process that started it) it also exits as soon as that process dies."""
    if parent is not None:
        _exit_with(parent)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but protocol messages may reach the pipe
    task = _receive(inp)
    while (message := _receive(inp)) is not None:
        job, argument = message
        try:
            reply = ("ok", job, task(argument))
        except Exception as error:  # reported to the parent process, which raises it with the record
            reply = ("error", job, f"{type(error).__name__}: {error}")
        _send(out, reply)


_STREAM_ADVICE = (
    "check memory (the kernel kills the largest process when it runs out) and run again, or use "
    "--dataloader_num_workers 0 to tokenize in the training process"
)


class _WorkerProcess:
    """One worker process running `task` on the arguments it is sent; `doing` and `advice` word its errors."""

    def __init__(
        self,
        index: int,
        task: Callable[[Any], Any],
        *,
        name: str = "data worker",
        doing: str = "tokenizing the batch that starts at",
        advice: str = _STREAM_ADVICE,
    ):
        self.index, self.name, self.doing, self.advice = index, name, doing, advice
        src = str(Path(__file__).resolve().parents[2])
        code = (
            f"import sys; sys.path.insert(0, {src!r}); from gpt2_training.data.workers import worker_main; "
            f"worker_main({os.getpid()})"
        )
        env = dict(os.environ)
        # One process, one core: N workers each running the Rust tokenizer's own thread pool would
        # oversubscribe the cores (a user's TOKENIZERS_PARALLELISM=true, set to silence fork warnings, too).
        env["TOKENIZERS_PARALLELISM"] = "false"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.lock = threading.Lock()
        _send(self.proc.stdin, task)

    def submit(self, job: int, argument: Any) -> None:
        with self.lock:
            _send(self.proc.stdin, (job, argument))

    def result(self, job: int, where: Callable[[], str]) -> Any:
        reply = _receive(self.proc.stdout)
        if reply is None:
            code = self.proc.wait()
            cause = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise DataError(
                f"{self.name} {self.index} (pid {self.proc.pid}) {cause} while {self.doing} {where()}; "
                f"{self.advice}"
            )
        status, got, payload = reply
        if status == "error":
            raise DataError(f"{self.name} {self.index} failed {self.doing} {where()}: {payload}")
        if got != job:
            raise DataError(f"{self.name} {self.index} answered job {got} instead of {job}")
        return payload

    def close(self) -> None:
        # The worker goes first: the read-ahead thread may be blocked writing a job to it (the worker itself blocked
        # on a reply nobody reads), holding the pipe's lock that closing the pipe needs; once the worker is gone
        # that write fails and lets go. Jobs still in flight are not wanted after close.
        if self.proc.poll() is None:
            self.proc.kill()
        for pipe in (self.proc.stdout, self.proc.stdin):
            try:
                pipe.close()
            except OSError:
                pass
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
