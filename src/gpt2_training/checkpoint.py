"""Atomic checkpoints: written to a temporary folder, synced, then renamed, so a checkpoint exists whole or not.

A checkpoint folder `checkpoint-<step>` holds:
    model.safetensors, config.json   the model, loadable by `AutoModelForCausalLM.from_pretrained`
    optimizer.pt, scheduler.pt       tensors and numbers only; loaded with `torch.load(weights_only=True)`
    rank<r>.pt / rank<r>.json / .npz RNG states and the data position of every process
    trainer_state.json               step, tokens seen, settings that must match to resume
    manifest.json                    size and SHA-256 of every file: written last, checked on load

Nothing here unpickles arbitrary objects: a crafted pickle in any file is refused by `weights_only=True`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
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
    output_dir: str | Path, step: int, write_files: Any, save_total_limit: int | None
) -> Path:
    """Create `checkpoint-<step>` atomically: `write_files(tmp_dir)` fills a temporary folder, which is synced,
    given a manifest and renamed into place; then old checkpoints beyond `save_total_limit` are removed."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_files(tmp)
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        manifest = tmp / "manifest.json"
        manifest.write_text(json.dumps({"step": step, "files": files}, indent=1))
        with open(manifest, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if (
            final.exists()
        ):  # the same step saved again (e.g. after skipped non-finite steps moved the data on);
            _remove(
                final
            )  # dying before the rename below leaves a complete tmp folder: cleanup_partial renames it
        os.replace(tmp, final)
        _fsync_dir(out)
    except (
        Exception
    ) as exc:  # whatever failed (OSError, torch's RuntimeError, SafetensorError), clean up the same way
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        reason = "the disk is full" if _disk_full(exc) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"could not write checkpoint {final} ({reason}); {kept}. Free space (or point --output_dir at a "
            "bigger disk) and run the same command again to resume"
        ) from exc
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
    Everything else temporary (incomplete saves, half-deleted checkpoints, an unfinished final model) goes."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    for p in sorted(out.iterdir()):
        m = _TMP_NAME.match(p.name)
        if m and not (out / m.group(1)).exists() and verify(p) is None:
            os.replace(p, out / m.group(1))
            _fsync_dir(out)
        elif p.name.startswith((".checkpoint-", ".deleting-", ".final.")):
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
