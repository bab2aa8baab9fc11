"""What a corpus held when a run started, cheap enough for a 50 GB corpus: per file its size, modification time
and a hash of its first and last 64 KiB; a resume compares it with the corpus now and names every changed file."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import DataError

END_BLOCK = 64 * 1024
MAX_LISTED = 10  # changes named in a refusal; a corpus copied without its times changes every file


def file_fingerprint(path: str | Path) -> list:
    """[size, modification time in ns, hash of the first and last END_BLOCK bytes] of one file."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            digest = hashlib.blake2b(digest_size=8)
            digest.update(f.read(END_BLOCK))
            # a file of up to two blocks is hashed whole; a longer one by its two ends
            if stat.st_size > END_BLOCK:
                f.seek(max(END_BLOCK, stat.st_size - END_BLOCK))
                digest.update(f.read(END_BLOCK))
    except OSError as error:
        raise DataError(
            f"cannot read {path} ({error.strerror or type(error).__name__}); make it readable, or leave it out "
            "of the corpus"
        ) from error
    return [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def files_fingerprint(paths: list[Path]) -> dict[str, list]:
    """`file_fingerprint` of each path, keyed by the path as the source names it."""
    return {str(path): file_fingerprint(path) for path in paths}


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _file_change(saved: list, now: list) -> str:
    (size, mtime, ends), (size_now, mtime_now, ends_now) = saved, now
    parts = []
    if size != size_now:
        parts.append(f"size {size} -> {size_now} bytes")
    if mtime != mtime_now:
        parts.append(f"modified {_when(mtime)} -> {_when(mtime_now)}")
    if ends != ends_now:
        parts.append(f"first/last {END_BLOCK // 1024} KiB differ")
    elif size == size_now:
        parts.append(f"same size and first/last {END_BLOCK // 1024} KiB")
    return ", ".join(parts)


def content_changes(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    """One line per difference between two content fingerprints (`DocumentSource.content_fingerprint()` or a
    shards folder's), naming the file or the remote revision; empty when the corpus is unchanged."""
    if saved is None:
        if not current:
            return []
        return [
            "the checkpoint records no corpus content (it was written before content checks), so the corpus "
            "cannot be verified"
        ]
    current = current or {}
    changes = []
    for name in sorted(saved.keys() | current.keys()):
        was, now = saved.get(name), current.get(name)
        if was == now:
            continue
        # a file's entry is [size, mtime, ends]; other entries (a remote revision) are plain values
        if not isinstance(now if was is None else was, list):
            changes.append(f"corpus {name}: checkpoint has {was!r}, this run has {now!r}")
        elif now is None:
            changes.append(f"corpus file {name} is gone")
        elif was is None:
            changes.append(f"corpus file {name} is new")
        else:
            changes.append(f"corpus file {name} changed ({_file_change(was, now)})")
    if len(changes) > MAX_LISTED:
        changes[MAX_LISTED:] = [f"and {len(changes) - MAX_LISTED} more corpus changes"]
    return changes
