"""Resuming a data stream on a different number of processes: `restore_stream` maps every old process's saved
data state onto this process's stream.

* Token shards (`ShardStream`): exact. The position is global (windows of this epoch's seeded order handed out
  by all processes together), so M processes continue at the same index: no window lost, none repeated.
* Streaming (`TokenStream`): no sequence is repeated, and every token read but not yet handed out (packing
  remainders, shuffle buffers) is handed on: old process r's buffers go to new process r % M. What the new
  processes read next:
  - when each old process read its own shards, the unread rest of each (from the exact saved offset) and
    the untouched shards are dealt out among the new processes: nothing lost;
  - when every old process read every document and kept every N-th, reading restarts at the earliest saved
    position and skips each document that its old owner had started: nothing repeated; lost at most the
    unread rest of one document per old process, and only a document longer than `max_piece_chars` can be
    partly read;
  - for a corpus under the tail held-out split (every process reads everything and keeps every N-th sequence),
    packing restarts at the least advanced process and skips each sequence its old owner had packed: exact;
  - old processes a full epoch behind the others (possible only right at an epoch boundary) lose the rest of
    that epoch.
  The shuffle RNG of each new process starts from its seed, so the order differs from an uninterrupted run.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ..errors import DataError
from .pipeline import StreamStats, TokenStream, _Cursor
from .shards import ShardStream

State = tuple[dict, dict[str, np.ndarray]]


def restore_stream(stream: Any, saved_states: list[State], saved_world_size: int) -> None:
    """Restore `stream` (this process's new stream) from `saved_states`: the `state_dict()` of every old
    process, in rank order, saved by `saved_world_size` processes. With the same number of processes this is
    `stream.load_state_dict(*saved_states[rank])`, bit-exact; otherwise see the module docstring."""
    if len(saved_states) != saved_world_size:
        raise DataError(
            f"restore_stream needs the data state of all {saved_world_size} old processes, got "
            f"{len(saved_states)}: pass every rank's saved state in rank order"
        )
    metas = [meta for meta, _ in saved_states]
    kinds = {meta.get("kind") for meta in metas}
    expected = "shards" if isinstance(stream, ShardStream) else "token_stream"
    if kinds != {expected}:
        raise DataError(
            f"the checkpoint's data states are {sorted(map(str, kinds))}, this run reads {expected}: resume "
            "with the same data settings (--shards_dir or --dataset) as the checkpoint"
        )
    if any(meta.get("block_size") != stream.block_size for meta in metas):
        raise DataError(
            f"the checkpoint's data was cut into block_size={metas[0].get('block_size')} sequences, this run "
            f"uses {stream.block_size}: resume with the same --block_size"
        )
    if saved_world_size == stream.world_size:
        stream.load_state_dict(*saved_states[stream.rank])
        return
    if isinstance(stream, ShardStream):
        _restore_shards(stream, metas)
    else:
        _restore_tokens(stream, saved_states, saved_world_size)


def _restore_shards(stream: ShardStream, metas: list[dict]) -> None:
    positions = {(meta["epoch"], meta["index"]) for meta in metas}
    if len(positions) != 1:
        raise DataError(
            f"the old processes' shard positions disagree ({sorted(positions)}): the checkpoint was not "
            "written at one step by all processes; resume from another checkpoint"
        )
    ((epoch, index),) = positions
    stream.epoch, stream.index, stream._order = epoch, index, None


def _position_key(cursor: _Cursor) -> tuple:
    return (-1, -1, -1) if cursor.position is None else tuple(cursor.position)


def _restore_tokens(stream: TokenStream, saved_states: list[State], old_world: int) -> None:
    metas = [meta for meta, _ in saved_states]
    cursors = [
        _Cursor(**{k: v for k, v in meta["cursor"].items() if k in _Cursor.__dataclass_fields__})
        for meta in metas
    ]
    for meta in metas:
        if meta.get("plan"):
            raise DataError(
                "this checkpoint was itself resumed on another number of processes and has not finished that "
                "epoch yet; resume it on the number of processes that wrote it"
            )
    stream.close()
    mine = [r for r in range(old_world) if r % stream.world_size == stream.rank]
    # Sequences read but not handed out move to new process r % M, in old rank order.
    carry: list[int] = []
    ready: list[np.ndarray] = []
    counters = StreamStats()
    for r in mine:
        meta, arrays = saved_states[r]
        carry += [int(t) for t in arrays["carry"]]
        for name in ("ready", "buffer"):
            ready += [row.astype(stream.dtype) for row in arrays[name]]
        for key, value in meta["stats"].items():
            setattr(counters, key, getattr(counters, key) + value)
    epoch = max(c.epoch for c in cursors)
    current = [i for i, c in enumerate(cursors) if c.epoch == epoch]
    behind = len(current) < old_world
    held_out = metas[0].get("held_out", "documents")
    mode = metas[0].get("mode", "documents")

    if held_out == "tail":
        # Every old process read and packed the same token stream; start from the least advanced one.
        first = min(range(old_world), key=lambda r: (cursors[r].epoch, _position_key(cursors[r])))
        # Every new process packs that same stream again from there, so each takes its packing remainder.
        cursor = copy.copy(cursors[first])
        carry = [int(t) for t in saved_states[first][1]["carry"]]
        plan = {"world": old_world, "sequences_consumed": [m.get("seq_index", 0) for m in metas]}
        stream.seq_index = metas[first].get("seq_index", 0)
    elif mode == "shards":
        segments = []
        num_shards = stream.source.num_shards
        for r in range(old_world):
            own = list(range(r, num_shards, old_world))
            c = cursors[r]
            if c.epoch == epoch and c.position is not None:
                shard, offset, chars = c.position
                segments.append([shard, offset, chars, c.keep_current])
                own = [j for j in own if j > shard]
            segments += [[j, 0, 0, None] for j in own]
        segments.sort(key=lambda seg: seg[0])
        plan = {"epoch": epoch, "segments": segments[stream.rank :: stream.world_size]}
        cursor = _Cursor(epoch=epoch)
    else:
        consumed = [cursors[r].doc_index if r in current else 0 for r in range(old_world)]
        plan = {"epoch": epoch, "world": old_world, "consumed": consumed}
        if behind:
            cursor = _Cursor(epoch=epoch)
        else:
            first = min(current, key=lambda r: _position_key(cursors[r]))
            cursor = copy.copy(cursors[first])
            if cursor.keep_current is not None:
                # the rest of a document its owner had started: skipped (the documented bound)
                cursor.keep_current = False
    stream.cursor, stream.plan = cursor, plan
    stream.carry, stream.ready, stream.buffer = carry, ready, []
    stream.counters = counters
    stream._finished = False
    stream._reader = None
    if cursor.position is not None:
        from .pipeline import _Reader

        stream._reader = _Reader(stream, stream.cursor, stream.plan)
        stream._reader.open()
