"""The output folder: which folders a run must never use, which entries the tool made (and so may replace), and the
lock that keeps one run per folder. Nothing here deletes an entry the tool did not make."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from .data.sources import local_root
from .errors import ConfigError

# Written into every output folder the tool creates or first uses: it says whose folder this is.
MARKER = "gpt2-training-run.json"
# The lock a run holds for its whole life (an OS file lock, so the kernel releases it when the process dies).
LOCK = "gpt2-training-run.lock"
# Everything a run writes at the top of its output folder. Only these names are ever replaced or deleted.
_OWN = re.compile(
    r"^(checkpoint-\d+|checkpoint-\d+\.damaged(-\d+)?"
    r"|\.checkpoint-\d+\.tmp|\.deleting-.+|\.final\.tmp|\.universal-.+"
    r"|final|train_log\.jsonl|train_log\.superseded\.jsonl|\.train_log\.jsonl\.tmp|loss_curve\.png|tensorboard|wandb"
    rf"|{re.escape(MARKER)}|{re.escape(LOCK)})$"
)
# How long a new run waits for a lock whose holder is exiting (a killed run's worker processes, which hold the
# inherited descriptor, exit within half a second of their parent).
LOCK_GRACE_S = 3.0
REPO_ROOT = Path(__file__).resolve().parents[2]


def own_entry(name: str) -> bool:
    """True for a top-level name that a run writes into its output folder."""
    return bool(_OWN.match(name))


def foreign_entries(folder: Path) -> list[str]:
    """Top-level entries of `folder` that no run of this tool wrote, sorted (folders end with '/')."""
    if not folder.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not own_entry(p.name))


def refuse_unsafe(folder: str | Path, option: str, protected: dict[str, str | None] | None = None) -> None:
    """Refuse, before anything is written, a folder that a run must never fill or clear: the file system's root,
    the home folder, the current folder or one of its parents, a git checkout (this repository included), and any
    folder that holds one of the `protected` paths (name -> setting value: the data, the tokenizer, the
    initial weights)."""
    path = Path(folder).expanduser().resolve()
    cwd = Path.cwd().resolve()
    why = None
    if path == Path(path.anchor):
        why = "is the root of the file system"
    elif path == Path.home().resolve():
        why = "is your home folder"
    elif cwd == path or cwd.is_relative_to(path):
        why = "is the current folder or one of its parents"
    elif (path / ".git").exists() or REPO_ROOT.is_relative_to(path) and (REPO_ROOT / ".git").exists():
        why = "holds a git checkout"
    else:
        for name, value in (protected or {}).items():
            other = local_root(value)
            if other is not None and other.is_relative_to(path):
                why = f"holds the {name} {value}"
                break
    data = local_root((protected or {}).get("dataset"))
    if not why and data is not None and data.is_dir() and path.is_relative_to(data):
        # a dataset folder is searched recursively: the run's own files would be read back as documents
        raise ConfigError(
            f"{option} {folder} is inside the dataset folder {data}, where the run's files would be read as data: "
            f"use a folder outside it, e.g. {option} {data.parent / (data.name + '-runs') / 'my-run'}"
        )
    if why:
        raise ConfigError(
            f"{option} {folder} {why}: a run writes into and may clear its folder, so it needs one of its own; "
            f"use a new folder, e.g. {option} runs/my-run"
        )


def describe_foreign(folder: Path, entries: list[str], action: str) -> str:
    shown = ", ".join(entries[:10]) + (f" and {len(entries) - 10} more" if len(entries) > 10 else "")
    return (
        f"{folder} holds files this tool did not write ({shown}), so it will not {action} it: move them "
        "elsewhere, or choose a new --output_dir"
    )


def claim(folder: Path) -> set[str]:
    """Create `folder` if needed and mark it as an output folder of this tool; returns what it made ("." for the
    folder itself, the marker's and the lock's names), for `unclaim`."""
    made = {name for name in (MARKER, LOCK) if not (folder / name).exists()}
    if not folder.exists():
        made.add(".")
    folder.mkdir(parents=True, exist_ok=True)
    if MARKER in made:
        (folder / MARKER).write_text(json.dumps({"tool": "gpt2-training", "created": time.time()}) + "\n")
    return made


def unclaim(folder: Path, made: set[str]) -> None:
    """Undo `claim` after a refusal: remove the marker (and the folder) it made."""
    if MARKER in made:
        (folder / MARKER).unlink(missing_ok=True)
    if "." in made and not any(folder.iterdir()):
        folder.rmdir()


def clear_own(folder: Path, keep: tuple[str, ...] = (MARKER, LOCK)) -> list[str]:
    """Delete what earlier runs wrote into `folder` (only names `own_entry` accepts) and return their names;
    refuses, deleting nothing, when anything else is there."""
    foreign = foreign_entries(folder)
    if foreign:
        raise ConfigError(describe_foreign(folder, foreign, "clear"))
    removed = []
    for p in sorted(folder.iterdir()):
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p.name)
    return removed


class RunLock:
    """An exclusive `flock` on `<folder>/gpt2-training-run.lock`, held while the run lives. The file says who holds
    it (PID and host); the kernel drops the lock when the holder dies, so a killed run never leaves a stale one."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.fd: int | None = None

    def acquire(self, grace_s: float = LOCK_GRACE_S) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + grace_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise ConfigError(
                        f"{self.path.parent} is in use by another run ({holder}): wait for it to finish, stop it, "
                        "or choose another --output_dir"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self, remove: bool = False) -> None:
        """Let go; `remove` also deletes the lock file (after a refusal, when this run created it)."""
        if self.fd is not None:
            # the holder line goes first, so a reader never names a process that has let go
            os.ftruncate(self.fd, 0)
            if remove:
                self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
