"""Sources read over a network: DeepLake datasets on S3, and parquet / JSON lines over S3 or HTTP(S) through
🤗 `datasets` streaming, with retries under a bounded backoff, read-ahead threads and AWS credentials taken
from the environment the way the AWS tools take them (never written anywhere).

A failed read is retried from the record after the last one handed on (sources read any shard from an offset),
so a retry neither loses nor repeats a record; after `retries` failures in a row it raises `DataUnavailable`.
"""

from __future__ import annotations

import atexit
import functools
import os
import queue
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import DataError, DataUnavailable
from .sources import (
    DEEPLAKE_CHUNK_ROWS,
    DeepLakeSource,
    HuggingFaceSource,
    Position,
    SourceName,
    _Segment,
    _ShardedSource,
)

# segments (records) a read-ahead thread holds for its shard: bounds memory at a few MB of text per shard
_QUEUE_RECORDS = 1024
_HTTP_DENIED_ADVICE = "the server refuses this URL: check it, and any expiring signature or token in it"
_CREDENTIALS_ADVICE = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to credentials that may read it, and "
    "AWS_ENDPOINT_URL for an S3-compatible store (MinIO, R2, ...)"
)


@dataclass(frozen=True)
class NetworkSettings:
    """How hard to try a remote source (the `network_*` settings of `DataArguments`)."""

    retries: int = 8
    backoff: float = 1.0
    backoff_max: float = 60.0
    timeout: float = 60.0
    prefetch: int = 4

    def wait(self, attempt: int) -> float:
        """Seconds before retry number `attempt` (1-based): doubling from `backoff`, capped at `backoff_max`."""
        return min(self.backoff * 2 ** (attempt - 1), self.backoff_max)


def redact(url: str) -> str:
    """The URL without user name, password or query (a signed URL's query is a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def open_remote(
    name: SourceName, *, text_field: str, network: dict | None, shuffle: bool, seed: int, max_piece_chars: int
) -> _ShardedSource:
    """Open a remote source (`SourceName.remote`), retrying the opening itself under the same policy."""
    settings = NetworkSettings(**(network or {}))
    common = {"shuffle": shuffle, "seed": seed, "max_piece_chars": max_piece_chars}
    if name.kind == "hf-files":
        return RemoteHuggingFaceSource(name.format, name.location, text_field, settings, **common)
    return RemoteDeepLakeSource(name.location, text_field, settings, **common)


# -- what a failure means ----------------------------------------------------------------------------------
def _status(error: BaseException) -> int | None:
    """The HTTP status behind an error from aiohttp (fsspec's HTTP), botocore (s3fs) or deeplake's text."""
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if isinstance(error, PermissionError):
        return 403
    text = str(error)
    if "AccessDenied" in text or "Forbidden" in text or "InvalidAccessKeyId" in text:
        return 403
    return None


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def reason(error: BaseException) -> str:
    """One line: the innermost error's type and message (the wrappers' messages say less), without the query
    of any URL in it (a presigned URL's query holds its signature)."""
    inner = list(_causes(error))[-1]
    text = " ".join(str(inner).split()) or "no message"
    text = re.sub(r"(https?://[^\s'\"?]+)\?[^\s'\"]*", r"\1", text)
    return f"{type(inner).__name__}: {text[:200]}"


def _denied(error: BaseException) -> bool:
    return any(_status(e) in (401, 403) for e in _causes(error))


class Retrying:
    """Runs network operations on one URL under `NetworkSettings`: logs each retry once, fails fast on a
    refusal (401/403), raises `DataUnavailable` (or `DataError` while opening) when the budget is spent.
    Once `stop` is set (the read-ahead whose read this is was closed), a failed read ends without a retry."""

    def __init__(
        self,
        url: str,
        settings: NetworkSettings,
        log: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
    ):
        self.url, self.settings, self.stop = url, settings, stop
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def failed(self, error: Exception, attempt: int, since: float, opening: bool) -> float:
        """The wait before retry `attempt` of an operation failing since `since` (monotonic seconds), or the
        error to stop with."""
        if isinstance(error, DataError):
            raise error
        if _denied(error):
            advice = _CREDENTIALS_ADVICE if self.url.startswith("s3://") else _HTTP_DENIED_ADVICE
            raise DataError(f"{self.url}: access denied ({reason(error)}); {advice}") from error
        if attempt > self.settings.retries:
            failed = f"{attempt - 1} retries in {time.monotonic() - since:.1f} s failed ({reason(error)})"
            patience = "more patience: raise --network_retries or --network_backoff_max"
            if opening:
                raise DataError(
                    f"{self.url} could not be opened: {failed}; check the URL and the network ({patience})"
                ) from error
            raise DataUnavailable(
                f"{self.url} stopped answering: {failed}; once it answers again, run the same command to resume "
                f"({patience})"
            ) from error
        wait = self.settings.wait(attempt)
        self.log(
            f"network: retry {attempt}/{self.settings.retries} of {self.url} in {wait:.1f} s: {reason(error)}"
        )
        return wait

    def call(self, operation: Callable[[], Any]) -> Any:
        """`operation()` with retries (for opening a source: listing, reading a footer or a schema)."""
        attempt, since = 0, time.monotonic()
        while True:
            try:
                return operation()
            except Exception as error:
                attempt += 1
                time.sleep(self.failed(error, attempt, since, opening=True))

    def read(self, read: Callable[[int], Iterator[_Segment]], offset: int) -> Iterator[_Segment]:
        """The segments of `read(offset)`, reopened after the last segment handed on when a read fails; the
        budget counts failures in a row, so a long run survives any number of separate faults."""
        attempt = 0
        while True:
            try:
                for segment in read(offset):
                    yield segment
                    offset, attempt = segment[2], 0
                return
            except Exception as error:
                # nobody reads what a closed read-ahead would fetch: neither retry nor log
                if self.stop is not None and self.stop.is_set():
                    return
                if attempt == 0:
                    since = time.monotonic()
                attempt += 1
                wait = self.failed(error, attempt, since, opening=False)
                if self.stop is None:
                    time.sleep(wait)
                elif self.stop.wait(wait):
                    return


# -- read-ahead ----------------------------------------------------------------------------------------------
_END = object()
# how long the interpreter's exit waits for read-ahead threads to finish the read they are in
_EXIT_WAIT_S = 2.0


class _ShardThread:
    """Reads one shard in a daemon thread into a bounded queue; `read(stop)` gives the shard's segments and
    is told through `stop` when the thread is stopped."""

    def __init__(self, read: Callable[[threading.Event], Iterator[_Segment]]):
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_RECORDS)
        self._stop = threading.Event()
        segments = read(self._stop)
        self._thread = threading.Thread(target=self._run, args=(segments,), name="read-ahead", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def _run(self, segments: Iterator[_Segment]) -> None:
        try:
            for segment in segments:
                if not self._put(segment):
                    return
            self._put(_END)
        # handed to the consumer, which raises it where the shard is read
        except BaseException as error:
            self._put(error)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[_Segment]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# the read-ahead threads of this process, for `_stop_all` (a finished one drops out with its last reference)
_LIVE: weakref.WeakSet[_ShardThread] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At exit, stop every read-ahead thread and wait briefly for it: one left inside pyarrow's reader while
    Python finalizes can abort the interpreter (PyGILState_Release) after the run itself succeeded."""
    threads = list(_LIVE)
    for thread in threads:
        thread.stop()
    deadline = time.monotonic() + _EXIT_WAIT_S
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))


class ReadAhead:
    """Reads the next `depth` shards of a planned order in background threads, so network latency overlaps
    training; `take(shard, offset)` hands out the planned shard's segments (None if it was not planned)."""

    def __init__(
        self,
        plan: list[tuple[int, int]],
        read: Callable[[int, int, threading.Event], Iterator[_Segment]],
        depth: int,
    ):
        self.plan, self.read, self.depth = plan, read, depth
        self.next = 0
        self.threads: dict[int, _ShardThread] = {}

    def take(self, shard: int, offset: int) -> Iterator[_Segment] | None:
        if self.next >= len(self.plan) or self.plan[self.next] != (shard, offset):
            return None
        index = self.next
        self.next += 1
        # the shard before this one was read to its end; this one's thread is kept until then, so that
        # `close` stops it too when its reader is abandoned halfway
        for done in [i for i in self.threads if i < index]:
            self.threads.pop(done).stop()
        for ahead in range(index, min(index + self.depth, len(self.plan))):
            if ahead not in self.threads:
                self.threads[ahead] = _ShardThread(functools.partial(self.read, *self.plan[ahead]))
        return iter(self.threads[index])

    def close(self) -> None:
        for thread in self.threads.values():
            thread.stop()
        self.threads.clear()


class _RemoteMixin:
    """Retries and read-ahead around a `_ShardedSource`'s `_read`; the reading itself stays the source's."""

    settings: NetworkSettings
    _ahead: ReadAhead | None = None

    def _url_of(self, shard: int) -> str:
        raise NotImplementedError

    def _retrying_read(
        self, shard: int, offset: int, stop: threading.Event | None = None
    ) -> Iterator[_Segment]:
        retrying = Retrying(self._url_of(shard), self.settings, stop=stop)
        return retrying.read(lambda start: super(_RemoteMixin, self)._read(shard, start), offset)

    def _read(self, shard: int, offset: int) -> Iterator[_Segment]:
        ahead = self._ahead.take(shard, offset) if self._ahead is not None else None
        return ahead if ahead is not None else self._retrying_read(shard, offset)

    def pieces(
        self,
        epoch: int = 0,
        position: Position | None = None,
        shards: list[int] | None = None,
        starts: dict[int, tuple[int, int]] | None = None,
    ) -> Iterator[Any]:
        ahead = None
        if self.settings.prefetch > 0:
            ahead = ReadAhead(
                self._plan(epoch, position, shards, starts), self._retrying_read, self.settings.prefetch
            )
            self._ahead = ahead
        try:
            yield from super().pieces(epoch, position, shards, starts)  # type: ignore[misc]
        finally:
            if ahead is not None:
                ahead.close()
                if self._ahead is ahead:
                    self._ahead = None

    def _plan(
        self, epoch: int, position: Position | None, shards: list[int] | None, starts: dict | None
    ) -> list[tuple[int, int]]:
        """The (shard, offset) reads that `pieces` will make, in order (its own rules, read from its code)."""
        start_rank, start_offset, _ = self._parse_position(position)  # type: ignore[attr-defined]
        order = self.shard_order(epoch)  # type: ignore[attr-defined]
        offsets = {rank: offset for rank, (offset, _) in (starts or {}).items()}
        if position is not None:
            offsets[start_rank] = start_offset
        ranks = range(self.num_shards) if shards is None else shards  # type: ignore[attr-defined]
        return [
            (order[rank], offsets.get(rank, 0)) for rank in ranks if position is None or rank >= start_rank
        ]


# -- credentials ---------------------------------------------------------------------------------------------
def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_storage_options(settings: NetworkSettings) -> dict[str, Any]:
    """s3fs options: botocore finds the credentials itself (environment, AWS_PROFILE, config files, instance
    role); its own silent retries are turned off so that ours, which log, are the ones that run."""
    options: dict[str, Any] = {
        "config_kwargs": {
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "connect_timeout": settings.timeout,
            "read_timeout": settings.timeout,
        }
    }
    if _endpoint():
        options["client_kwargs"] = {"endpoint_url": _endpoint()}
    return options


def deeplake_creds() -> dict[str, str]:
    """DeepLake's `creds` for S3 from the AWS chain (botocore: environment, AWS_PROFILE, config files, instance
    role) and AWS_ENDPOINT_URL; held in memory only."""
    import botocore.session

    session = botocore.session.Session()
    creds: dict[str, str] = {}
    found = session.get_credentials()
    if found is not None:
        frozen = found.get_frozen_credentials()
        creds["aws_access_key_id"], creds["aws_secret_access_key"] = frozen.access_key, frozen.secret_key
        if frozen.token:
            creds["aws_session_token"] = frozen.token
    region = session.get_config_variable("region")
    if region:
        creds["aws_region"] = region
    endpoint = _endpoint() or session.get_scoped_config().get("endpoint_url")
    if endpoint:
        creds["endpoint_url"] = endpoint
    return creds


# -- the sources ---------------------------------------------------------------------------------------------
class RemoteDeepLakeSource(_RemoteMixin, DeepLakeSource):
    """A DeepLake 4 dataset on S3 (``s3://bucket/path``), read by row chunks with retries and read-ahead."""

    def __init__(self, url: str, text_field: str, settings: NetworkSettings, **common: Any):
        import deeplake

        self.settings, self.url = settings, redact(url)
        creds = deeplake_creds() if url.startswith("s3://") else None
        opening = Retrying(self.url, settings)
        dataset = opening.call(lambda: deeplake.open_read_only(url, creds=creds))
        super().__init__(self.url, dataset, text_field, **common)

    def _url_of(self, shard: int) -> str:
        return f"{self.url} (rows from {shard * DEEPLAKE_CHUNK_ROWS})"


class RemoteHuggingFaceSource(_RemoteMixin, HuggingFaceSource):
    """Parquet or JSON-lines files at ``s3://`` URLs (a folder prefix or a glob) or ``http(s)://`` URLs,
    streamed by 🤗 `datasets` one file per shard, with retries and read-ahead."""

    def __init__(self, builder: str, url: str, text_field: str, settings: NetworkSettings, **common: Any):
        self.settings = settings
        suffixes = (".parquet",) if builder == "parquet" else (".jsonl", ".json")
        opening = Retrying(redact(url), settings)
        if url.startswith("s3://"):
            options = s3_storage_options(settings)
            self.files = opening.call(lambda: _s3_files(url, suffixes, options))
        else:
            options = _http_storage_options(settings)
            opening.call(lambda: _http_check(url, settings.timeout))
            self.files = [url]
        dataset = opening.call(lambda: _streaming_dataset(builder, self.files, options))
        description = f"hf-{builder} streaming: {len(self.files)} files from {redact(url)}"
        super().__init__(description, dataset, text_field, **common)

    def _url_of(self, shard: int) -> str:
        return redact(self.files[shard])


def _s3_files(url: str, suffixes: tuple[str, ...], options: dict) -> list[str]:
    """The files a URL names: itself, the files under it as a folder prefix, or a glob's matches, sorted."""
    import fsspec

    fs = fsspec.filesystem("s3", **options)
    path = url.removeprefix("s3://")
    if any(c in path for c in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = fs.find(path)
    elif fs.exists(path):
        found = [path]
    else:
        raise DataError(f"{url}: no such object or prefix; check the bucket and path")
    files = sorted(f"s3://{f}" for f in found if f.lower().endswith(suffixes))
    if not files:
        raise DataError(f"{url}: no {' or '.join(suffixes)} files there; check the path")
    return files


def _http_check(url: str, timeout: float) -> None:
    """A HEAD request, so that a refusal (401/403) or a missing file is reported as such: `datasets` turns both
    into 'Unable to find'."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise DataError(f"{redact(url)}: no such file on the server (404); check the URL") from error
        raise


def _http_storage_options(settings: NetworkSettings) -> dict[str, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.timeout, sock_read=settings.timeout)
    return {"client_kwargs": {"timeout": timeout}}


def _streaming_dataset(builder: str, files: list[str], options: dict) -> Any:
    import datasets

    # datasets retries a dropped read itself (up to 20 times, 5 s apart, without naming the file); one
    # attempt each, without its wait, leaves the failure to `Retrying`, which resumes from the record and
    # logs the URL. These are process-wide settings of datasets, as s3fs's are below.
    datasets.config.STREAMING_READ_MAX_RETRIES = datasets.config.STREAMING_OPEN_MAX_RETRIES = 1
    datasets.config.STREAMING_READ_RETRY_INTERVAL = datasets.config.STREAMING_OPEN_RETRY_INTERVAL = 0
    if any(f.startswith("s3://") for f in files):
        import s3fs

        # s3fs retries a failed request 5 times in about 1.5 s, silently; its constructor has no option for it
        s3fs.S3FileSystem.retries = 1
    return datasets.load_dataset(
        builder, data_files=files, split="train", streaming=True, storage_options=options
    )
