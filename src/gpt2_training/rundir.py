"""A run's output folder at start-up: lock it, then decide from --resume / --overwrite_output_dir whether the run
continues a checkpoint, starts afresh, or is refused with what to do (outdir.py holds the folder's safety rules,
checkpoint.py the checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import outdir
from .errors import ConfigError, GPT2TrainingError


def prepare_output_dir(
    out: Path, run: Any, *, is_main: bool, world: int
) -> tuple[outdir.RunLock | None, Path | None]:
    """(the lock held on `out` by this process, the checkpoint to resume from). Process 0 decides (it alone
    touches the folder) and tells the others, so every process fails with the same message rather than waiting
    for one that has stopped. `run` is the RunArguments."""
    decision: list[Any] = [None, None]
    lock = None
    if is_main:
        try:
            lock, decision[0] = _claim(out, run)
        except GPT2TrainingError as exc:
            decision[1] = getattr(exc, "problems", [str(exc)])
    if world > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(decision, from_process=0)
    if decision[1] is not None:
        raise ConfigError(decision[1])
    return lock, None if decision[0] is None else Path(decision[0])


def _claim(out: Path, run: Any) -> tuple[outdir.RunLock, str | None]:
    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    foreign = outdir.foreign_entries(out)
    if names and not (out / outdir.MARKER).exists():
        if foreign and not any(outdir.own_entry(n) for n in names):
            # a folder of the user's: a run never settles into it
            raise ConfigError(outdir.describe_foreign(out, foreign, "train into"))
        if run.overwrite_output_dir and "train_log.jsonl" not in names:
            # names alone do not make a folder the tool's: a final/ copied there may be the user's only copy
            raise ConfigError(
                f"{out} holds no record of a run by this tool (no {outdir.MARKER} or train_log.jsonl), so "
                "--overwrite_output_dir will not clear it: move its contents elsewhere, or choose a new --output_dir"
            )
    made = outdir.claim(out)
    lock = outdir.RunLock(out)
    lock.acquire()
    try:
        return lock, resume_point(out, run)
    except GPT2TrainingError:
        # a refusal leaves the folder as it found it
        lock.release(remove=outdir.LOCK in made)
        outdir.unclaim(out, made)
        raise


def resume_point(out: Path, run: Any) -> str | None:
    """What --resume / --overwrite_output_dir make of the locked output folder `out`: the checkpoint to resume
    from, or None to start at step 0."""
    r = run
    ckpt.cleanup_partial(out)
    if r.resume not in ("auto", "never"):
        return r.resume
    if r.resume == "never":
        has_run = any(p.name not in (outdir.MARKER, outdir.LOCK) for p in out.iterdir())
        if has_run and not r.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {out} already holds a run: use --resume auto to continue it, "
                "--resume never --overwrite_output_dir to replace it, or another --output_dir"
            )
        if has_run:
            removed = outdir.clear_own(out)
            print(
                f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)} from {out}",
                flush=True,
            )
        return None
    path, unusable = ckpt.find_resumable(out)
    if path is None and (unusable or (out / "final").exists()):
        found = [f"{p.name}: {why}" for p, why in unusable] or [
            "no checkpoint, only a finished model in final/"
        ]
        # the finished model's weights are offered only where there is a finished model
        weights = (
            f" (add --init_from {out / 'final'} to start from the finished model's weights)"
            if (out / "final").is_dir()
            else ""
        )
        raise ConfigError(
            [f"cannot resume {out}, which holds a run but no usable checkpoint", *found]
            + [
                "nothing was changed. To start over here: --resume never --overwrite_output_dir (replaces this "
                f"run's files); to keep them: another --output_dir{weights}"
            ]
        )
    for bad, why in unusable:
        moved = ckpt.set_aside(bad)
        print(f"warning: skipping damaged checkpoint {bad}: {why}; moved aside to {moved.name}", flush=True)
    if path is None and (out / "train_log.jsonl").exists():
        print(f"{out} holds a run that never wrote a checkpoint: starting it again from step 0", flush=True)
    return None if path is None else str(path)
