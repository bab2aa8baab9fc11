"""Atomic checkpoints: written to a temporary folder, synced, then renamed, so a checkpoint exists whole or not.
This module owns the layout; the engine hands it the state of each part (every part has `state_dict` /
`load_state_dict`) and the backend writes its own model/optimizer files into the folder.

A checkpoint folder `checkpoint-<step>` holds:
    model.safetensors, config.json   the full model, loadable by `AutoModelForCausalLM.from_pretrained`
    optimizer.pt                     single process / DDP: the optimizer state (replicated on every process)
    dcp/                             FSDP: weights and optimizer, one shard file per process (torch.distributed
                                     .checkpoint), loadable by any number of processes
    deepspeed/state/                 DeepSpeed: the engine's files, one ZeRO optimizer partition per process
    scheduler.pt                     learning-rate schedule and fp16 loss scaler
    rank<r>.pt / rank<r>.json / .npz RNG states and the data position of every process
    trainer_state.json               step, tokens seen, settings that must match to resume
    manifest.json                    size and SHA-256 of every file (sub-folders included): written last, checked
                                     on load

Nothing here unpickles arbitrary objects: a crafted pickle in any file is refused by `weights_only=True`
(DeepSpeed's own files are checked the same way before DeepSpeed reads them, see backends.py).
With several processes every process writes into the same temporary folder (on a multi-node run, output_dir
must be on a file system all nodes share); process 0 then writes the manifest and renames.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_NAME = re.compile(r"^\.(checkpoint-\d+)\.tmp$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "manifest.json").exists()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files all match its manifest; damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        print(f"warning: skipping damaged checkpoint {path}: {problem}")
    return None


def verify(path: Path) -> str | None:
    """None when every file listed in the manifest is present with the recorded size and hash."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        for name, info in manifest["files"].items():
            f = path / name
            if not f.exists() or f.stat().st_size != info["size"]:
                return f"{name} is missing or truncated"
            if _sha256(f) != info["sha256"]:
                return f"{name} does not match its checksum"
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    return None


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    write_files: Any,
    save_total_limit: int | None,
    *,
    is_main: bool = True,
    barrier: Any = None,
) -> Path:
    """Create `checkpoint-<step>` atomically: `write_files(tmp_dir)` fills a temporary folder, which is synced,
    given a manifest and renamed into place; then old checkpoints beyond `save_total_limit` are removed.

    With several processes pass `barrier` (a function all processes call together): every process runs
    `write_files` into the one temporary folder, and only `is_main` creates, seals and renames it."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    sync = barrier or (lambda: None)
    if not is_main:
        sync()
        write_files(tmp)
        sync()
        sync()
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    # the other processes wait at the same barriers whatever happens here, so a failure cannot hang them
    failure: BaseException | None = None
    try:
        tmp.mkdir(parents=True)
    except Exception as exc:
        failure = exc
    sync()
    if failure is None:
        try:
            write_files(tmp)
        except Exception as exc:
            failure = exc
    sync()
    try:
        if failure is not None:
            raise failure
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        for d in sorted(p for p in tmp.rglob("*") if p.is_dir()):
            _fsync_dir(d)
        manifest = tmp / "manifest.json"
        manifest.write_text(json.dumps({"step": step, "files": files}, indent=1))
        with open(manifest, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        # the same step saved again (e.g. after skipped non-finite steps moved the data on); dying before the
        # rename below leaves a complete tmp folder, which cleanup_partial renames into place
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(out)
    # whatever failed (OSError, torch's RuntimeError, SafetensorError), clean up the same way
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        reason = "the disk is full" if _disk_full(exc) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"could not write checkpoint {final} ({reason}); {kept}. Free space (or point --output_dir at a "
            "bigger disk) and run the same command again to resume"
        ) from exc
    finally:
        sync()
    if save_total_limit:
        for old in list_checkpoints(out)[:-save_total_limit]:
            _remove(old)
    return final


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_full(exc: BaseException | None) -> bool:
    """True when `exc` (or an exception it was raised from) is a write failing for lack of space or a file-size
    limit. Rust writers (safetensors) only put the OS error number in their message: "... (os error 28)"."""
    while exc is not None:
        if getattr(exc, "errno", None) in _DISK_FULL:
            return True
        m = re.search(r"os error (\d+)", str(exc))
        if m and int(m.group(1)) in _DISK_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _remove(path: Path) -> None:
    """Rename first, so a half-deleted checkpoint never looks like a checkpoint."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def cleanup_partial(output_dir: str | Path) -> None:
    """Finish or undo what a run killed mid-save or mid-rotation left behind.

    A `.checkpoint-<step>.tmp` folder whose manifest verifies was complete: the process died between removing an
    older save of the same step and renaming this one into place (see save_checkpoint), and with
    save_total_limit=1 it may be the only copy of the run, so it is renamed into place rather than deleted.
    Everything else temporary (incomplete saves, half-deleted checkpoints, an unfinished final model, a DeepSpeed
    universal conversion) goes."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    for p in sorted(out.iterdir()):
        m = _TMP_NAME.match(p.name)
        if m and not (out / m.group(1)).exists() and verify(p) is None:
            os.replace(p, out / m.group(1))
            _fsync_dir(out)
        elif p.name.startswith((".checkpoint-", ".deleting-", ".final.", ".universal-")):
            shutil.rmtree(p, ignore_errors=True)


class _WriteRecorder:
    """A file wrapper that remembers the OSError of a failed write: torch's C++ writer turns it into an opaque
    RuntimeError ("unexpected pos ..."), which would hide that the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        recorder = _WriteRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise


def torch_load(path: Path) -> Any:
    """Tensors, numbers, strings and containers only: any other pickled object is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError (or RuntimeError) for disallowed globals
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain data "
            f"({type(exc).__name__}); it may have been tampered with. Use a checkpoint written by this tool"
        ) from exc


def save_arrays(arrays: dict[str, np.ndarray], path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# -- the run's own state (everything but the model and optimizer, which the backend writes) ----------------------
TRAIN_STATE = "trainer_state.json"
SCHEDULE = "scheduler.pt"


def rng_state() -> dict:
    """This process's random generators (dropout, and anything else seeded), as a state dict."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def load_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def write_run_state(folder: Path, train_state: dict, schedule: dict, rank_states: list[dict]) -> None:
    """trainer_state.json, scheduler.pt and, for every process r, rank<r>.json/.npz/.pt.

    `rank_states[r]` is {"data": the data stream's (meta, arrays) state, "rng": rng_state()} of process r."""
    for r, st in enumerate(rank_states):
        meta, arrays = st["data"]
        py = st["rng"]["python"]
        (folder / f"rank{r}.json").write_text(
            json.dumps({"data": meta, "python_rng": [py[0], list(py[1]), py[2]]})
        )
        save_arrays(arrays, folder / f"rank{r}.npz")
        torch_save({"torch_rng": st["rng"]["torch"], "cuda_rng": st["rng"]["cuda"]}, folder / f"rank{r}.pt")
    torch_save(schedule, folder / SCHEDULE)
    (folder / TRAIN_STATE).write_text(json.dumps(train_state, indent=1, default=str))


def read_run_state(folder: Path) -> tuple[dict, dict, list[dict]]:
    """(train_state, schedule, rank_states) as written by `write_run_state`, for every process of the run
    that wrote it (so a run on another number of processes can redistribute the data position)."""
    train_state = json.loads((folder / TRAIN_STATE).read_text())
    schedule = torch_load(folder / SCHEDULE)
    ranks = []
    for r in range(int(train_state["fingerprint"]["world_size"])):
        info = json.loads((folder / f"rank{r}.json").read_text())
        rng = torch_load(folder / f"rank{r}.pt")
        py = info["python_rng"]
        ranks.append(
            {
                "data": (info["data"], load_arrays(folder / f"rank{r}.npz")),
                "rng": {
                    "torch": rng["torch_rng"],
                    "cuda": rng["cuda_rng"],
                    "python": (py[0], tuple(py[1]), py[2]),
                },
            }
        )
    return train_state, schedule, ranks


def save_hf_model(lm, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`lm` in Hugging Face's format (model.safetensors + config.json + generation_config.json), with the
    weights of `state_dict` when given (gathered from shards). Written directly rather than by `save_pretrained`,
    whose unwrapping imports DeepSpeed (seconds, and a warning) whenever it is installed."""
    from safetensors.torch import save

    weights = state_dict if state_dict is not None else lm.state_dict()
    # a tied output matrix is the embedding: Hugging Face saves it once and ties it again on load
    if getattr(lm.config, "tie_word_embeddings", False):
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    data = save({k: v.detach().contiguous() for k, v in weights.items()}, metadata={"format": "pt"})
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(data)
    lm.config.save_pretrained(folder)
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(folder)
