"""Atomic checkpoints, and the one module that decides what a checkpoint holds and in which files. The engine
hands `save` its stateful parts by name (each has `state_dict` / `load_state_dict`); `load` reads the files back
and hands every part its state. A folder is written to a temporary name, synced, then renamed, so a checkpoint
exists whole or not.

A checkpoint folder `checkpoint-<step>` holds:
    model.safetensors, config.json   the full model ("model" part's `full_state_dict`), loadable by
                                     `AutoModelForCausalLM.from_pretrained`
    optimizer.pt                     a replicated model state (single process, DDP): its optimizer state; its
                                     weights are model.safetensors
    dcp/                             a `Sharded` model state (FSDP): weights and optimizer, one file per process
                                     (torch.distributed.checkpoint), loadable by any number of processes
    deepspeed/                       an `OwnFiles` model state (DeepSpeed): the folder its engine fills itself
                                     (deepspeed/state/, one ZeRO optimizer partition per process)
    scheduler.pt                     the "scheduler" and "scaler" (fp16 loss scale) parts
    rank<r>.json / .npz / .pt        the per-process parts of process r: "data" (position: metadata in the JSON,
                                     arrays in the .npz) and "rng" (Python's generator in the JSON, torch's in the .pt)
    trainer_state.json               the "train_state" part: step, tokens seen, settings that must match to resume
    manifest.json                    size and SHA-256 of every file (sub-folders included): written last, checked
                                     on load

Nothing here unpickles arbitrary objects: a crafted pickle in any file is refused by `weights_only=True`
(DeepSpeed's own files are checked the same way before DeepSpeed reads them, see backends/deepspeed.py).
With several processes every process writes into the same temporary folder (on a multi-node run, output_dir
must be on a file system all nodes share); process 0 then writes the manifest and renames.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import model_shape
from .errors import CheckpointError, ConfigError, disk_full
from .export import save_hf_model
from .state import OwnFiles, Sharded

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


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-<step>` folder, complete or not, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    return [p for p in checkpoint_folders(output_dir) if (p / "manifest.json").exists()]


def find_resumable(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose files all match its manifest, and each newer one that does not, with why."""
    unusable = []
    for path in reversed(checkpoint_folders(output_dir)):
        problem = verify(path)
        if problem is None:
            return path, unusable
        unusable.append((path, problem))
    return None, unusable


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files all match its manifest; each damaged one skipped is named with why."""
    path, unusable = find_resumable(output_dir)
    for bad, problem in unusable:
        print(f"warning: skipping damaged checkpoint {bad}: {problem}", flush=True)
    return path


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `checkpoint-<step>.damaged` (kept as evidence, never counted or deleted)."""
    target, n = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, target)
    return target


def verify(path: Path, *, full: bool = True) -> str | None:
    """None when every file listed in the manifest is present with the recorded size and (`full`) hash."""
    try:
        if not any(path.iterdir()):
            return "the folder is empty"
        if not (path / "manifest.json").exists():
            return "it has no manifest.json (its save never finished, or the file was deleted)"
        manifest = json.loads((path / "manifest.json").read_text())
        for name, info in manifest["files"].items():
            f = path / name
            if not f.exists() or f.stat().st_size != info["size"]:
                return f"{name} is missing or truncated"
            if full and _sha256(f) != info["sha256"]:
                return f"{name} does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError) as exc:
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
        reason = "the disk is full" if disk_full(exc) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"could not write checkpoint {final} ({reason}); {kept}. Free space (or point --output_dir at a "
            "bigger disk) and run the same command again to resume"
        ) from exc
    finally:
        sync()
    if save_total_limit:
        rotate(out, final, save_total_limit)
    return final


# Checkpoints whose every hash was checked (or computed from the files as they were written) in this process,
# keyed by folder and manifest time: rotation hashes an older checkpoint once, not at every save.
_SOUND: set[tuple[str, int]] = set()


def _sound_key(path: Path) -> tuple[str, int]:
    return str(path), (path / "manifest.json").stat().st_mtime_ns


def _check_once(path: Path) -> str | None:
    try:
        if _sound_key(path) in _SOUND:
            return None
    except OSError:
        pass
    problem = verify(path)
    if problem is None:
        _SOUND.add(_sound_key(path))
    return problem


def rotate(out: Path, newest: Path, limit: int) -> None:
    """Keep `newest` (the checkpoint just written) and the `limit - 1` newest others whose files match their
    manifest's hashes; a damaged one is set aside as `.damaged`, never counted as kept and never deleted."""
    _SOUND.add(_sound_key(newest))
    kept = [newest]
    for path in reversed(checkpoint_folders(out)):
        if path == newest:
            continue
        problem = _check_once(path)
        if problem is not None:
            moved = set_aside(path)
            print(
                f"warning: checkpoint {path} is damaged ({problem}); moved aside to {moved.name}", flush=True
            )
            continue
        kept.append(path)
    for old in kept[limit:]:
        _remove(old)


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
        elif p.name.startswith((".checkpoint-", ".deleting-", ".universal-")) or p.name == ".final.tmp":
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
    """Plain numeric arrays only: an array of Python objects (which numpy would unpickle) is refused."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise CheckpointError(
            f"refusing to load {path}: it is not an archive of plain arrays ({exc}); it may have been tampered "
            "with. Pass an older checkpoint to --resume, or start over with --resume never --overwrite_output_dir "
            "(replaces this run's files) or in another --output_dir"
        ) from exc


# -- the layout: which part goes into which file -----------------------------------------------------------------
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SHARDED_DIR = "dcp"
OWN_FILES_DIR = "deepspeed"
SCHEDULE_FILE = "scheduler.pt"
TRAIN_STATE_FILE = "trainer_state.json"
SCHEDULE_PARTS = ("scheduler", "scaler")
# parts every process holds its own of: their states are keyed by rank, and loading hands each part every old
# process's state, so that a run on another number of processes can redistribute them
PER_PROCESS_PARTS = ("data", "rng")
_RANK_FILE = re.compile(r"^rank(\d+)\.json$")


def save(
    output_dir: str | Path,
    step: int,
    parts: dict[str, Any],
    lm: Any,
    save_total_limit: int | None,
    *,
    is_main: bool = True,
    barrier: Callable[[], Any] | None = None,
    gather: Callable[[Any], list] | None = None,
) -> Path:
    """Checkpoint `checkpoint-<step>` of the stateful `parts` (named as in the module docstring; "scaler" may be
    None), written atomically by `save_checkpoint`. `lm` is the Hugging Face model whose config goes with the
    weights. A collective: with several processes every process calls it, with `barrier` and `gather` (which
    returns every process's object, in rank order)."""
    model = parts["model"]
    model_state = model.state_dict()
    replicated = not isinstance(model_state, (Sharded, OwnFiles))
    # gathers shards onto every process under FSDP and ZeRO-3; a replicated state holds the weights already
    weights = model_state["model"] if replicated else model.full_state_dict()
    mine = {name: parts[name].state_dict() for name in PER_PROCESS_PARTS}
    everyone = gather(mine) if gather is not None else [mine]
    processes = {name: {r: s for st in everyone for r, s in st[name].items()} for name in PER_PROCESS_PARTS}
    schedule = {
        name: parts[name].state_dict() if parts.get(name) is not None else None for name in SCHEDULE_PARTS
    }
    train_state = parts["train_state"].state_dict()

    def write(tmp: Path) -> None:
        if is_main:
            save_hf_model(lm, tmp, weights)
            if replicated:
                torch_save(model_state["optimizer"], tmp / OPTIMIZER_FILE)
            torch_save(schedule, tmp / SCHEDULE_FILE)
            _write_processes(tmp, processes)
            (tmp / TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=1, default=str))
        if isinstance(model_state, Sharded):
            import torch.distributed.checkpoint as dcp

            dcp.save(model_state, checkpoint_id=str(tmp / SHARDED_DIR))
        elif isinstance(model_state, OwnFiles):
            model_state.save(tmp / OWN_FILES_DIR)

    return save_checkpoint(output_dir, step, write, save_total_limit, is_main=is_main, barrier=barrier)


def load(path: Path, parts: dict[str, Any]) -> None:
    """Hand every part its state from checkpoint `path`. The train state goes first, so that settings a resume
    cannot take are refused before any other part changes; the model state is read in the form the "model" part
    asks for (its `state_dict()` is the template). A collective under FSDP and DeepSpeed."""
    problem = verify(path)
    if problem:
        if not (path / "manifest.json").exists() and not _NAME.match(path.name):
            raise CheckpointError(
                f"{path} is not a checkpoint folder (no manifest.json): pass a checkpoint-<step> folder to "
                "--resume, or --resume auto for the newest in --output_dir"
            )
        raise CheckpointError(f"checkpoint {path} is damaged ({problem}); pass an older one to --resume")
    train_state = json.loads((path / TRAIN_STATE_FILE).read_text())
    parts["train_state"].load_state_dict(train_state)

    model = parts["model"]
    template = model.state_dict()
    written, uses = (
        train_state.get("backend", "another backend"),
        getattr(model, "name", type(model).__name__),
    )
    if written != uses or not (path / _location(template)).exists():
        raise CheckpointError(
            f"checkpoint {path} was written under {written}, this run uses {uses}: resume it with the backend "
            f"that wrote it, or start anew from its weights with --resume never --init_from {path} "
            "--output_dir <a new folder>"
        )
    if isinstance(template, Sharded):
        import torch.distributed.checkpoint as dcp

        # fills the template's tensors in place, resharded for this number of processes
        dcp.load(template, checkpoint_id=str(path / SHARDED_DIR))
    elif isinstance(template, OwnFiles):
        template.load(path / OWN_FILES_DIR)
    else:
        from safetensors.torch import load_file

        template = {"model": load_file(path / MODEL_FILE), "optimizer": torch_load(path / OPTIMIZER_FILE)}
    model.load_state_dict(template)

    schedule = torch_load(path / SCHEDULE_FILE)
    for name in SCHEDULE_PARTS:
        if parts.get(name) is not None and schedule.get(name) is not None:
            parts[name].load_state_dict(schedule[name])
    processes = _read_processes(path)
    for name in PER_PROCESS_PARTS:
        parts[name].load_state_dict(processes[name])


class Checkpointer:
    """The run's checkpoints in `out`: every stateful part saved together (`save`) and loaded together (`load`),
    with the newest remembered, so that the same state is never written twice (`save_if_changed`)."""

    def __init__(self, out: Path, parts: dict[str, Any], lm: Any, save_total_limit: int | None, acc: Any):
        """`acc` is the run's Accelerator: with several processes a save is a collective."""
        self.out, self.parts, self.lm, self.limit, self.acc = out, parts, lm, save_total_limit, acc
        self.saved: tuple[int, int] | None = None  # (step, tokens_seen) of the newest checkpoint
        self.path: Path | None = None

    def _position(self) -> tuple[int, int]:
        state = self.parts["train_state"]
        return state.step, state.tokens_seen

    def save(self) -> Path:
        several = self.acc.num_processes > 1
        if several:
            from accelerate.utils import gather_object
        self.path = save(
            self.out,
            self.parts["train_state"].step,
            self.parts,
            self.lm,
            self.limit,
            is_main=self.acc.is_main_process,
            barrier=self.acc.wait_for_everyone if several else None,
            gather=(lambda obj: gather_object([obj])) if several else None,
        )
        self.saved = self._position()
        return self.path

    def save_if_changed(self) -> Path | None:
        """Save unless the newest checkpoint already holds this exact state (same step and data position),
        e.g. on a signal right after a periodic save: rewriting it would only cost time."""
        if self.saved != self._position():
            self.save()
        return self.path

    def load(self, path: Path) -> None:
        """Every stateful part from checkpoint `path`, on this run's number of processes."""
        load(path, self.parts)
        self.saved, self.path = self._position(), path


def _location(model_state: Any) -> str:
    """The file or folder a model state of this form is saved to."""
    if isinstance(model_state, Sharded):
        return SHARDED_DIR
    if isinstance(model_state, OwnFiles):
        return OWN_FILES_DIR
    return OPTIMIZER_FILE


def _write_processes(folder: Path, processes: dict[str, dict[int, Any]]) -> None:
    for r in sorted(processes["data"]):
        meta, arrays = processes["data"][r]
        rng = processes["rng"][r]
        py = rng["python"]
        (folder / f"rank{r}.json").write_text(
            json.dumps({"data": meta, "python_rng": [py[0], list(py[1]), py[2]]})
        )
        save_arrays(arrays, folder / f"rank{r}.npz")
        torch_save({"torch_rng": rng["torch"], "cuda_rng": rng["cuda"]}, folder / f"rank{r}.pt")


def _read_processes(folder: Path) -> dict[str, dict[int, Any]]:
    ranks = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _RANK_FILE.match(p.name)))
    if not ranks or ranks != list(range(len(ranks))):
        raise CheckpointError(
            f"checkpoint {folder} lacks the state of some processes (found ranks {ranks}); pass an older one to --resume"
        )
    processes: dict[str, dict[int, Any]] = {name: {} for name in PER_PROCESS_PARTS}
    for r in ranks:
        info = json.loads((folder / f"rank{r}.json").read_text())
        rng = torch_load(folder / f"rank{r}.pt")
        py = info["python_rng"]
        processes["data"][r] = (info["data"], load_arrays(folder / f"rank{r}.npz"))
        processes["rng"][r] = {
            "torch": rng["torch_rng"],
            "cuda": rng["cuda_rng"],
            "python": (py[0], tuple(py[1]), py[2]),
        }
    return processes


# -- the run's own stateful parts ----------------------------------------------------------------------------------
def run_fingerprint(cfg: Any, tokenizer: Any, world_size: int) -> dict[str, Any]:
    """Settings that must not change across a resume (model shape, tokenizer, sequence length, batch); `cfg` is
    the run's Config. TrainState compares the checkpoint's with the new run's."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return {
        "model_shape": model_shape(cfg.model),
        "tokenizer_vocab": len(tokenizer),
        "tokenizer_hash": hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16],
        "block_size": cfg.data.block_size,
        "world_size": world_size,
        "per_device_train_batch_size": cfg.train.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "data": cfg.data.shards_dir or cfg.data.dataset,
    }


@dataclass
class TrainState:
    """Where the run stands (optimizer steps, tokens seen, steps skipped as non-finite or fp16 overflows) and what
    a resume must not change (`fingerprint`: model shape, tokenizer, data, batch split; see
    `check_resume_compatible`). Loading a state this run cannot continue is refused."""

    fingerprint: dict
    backend: str = "ddp"
    settings: dict = field(default_factory=dict)
    allow_changes: bool = False
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    # records in train_log.jsonl when the checkpoint was written (None: a checkpoint from before this was kept)
    log_records: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "log_records": self.log_records,
            "fingerprint": self.fingerprint,
            "backend": self.backend,
            "settings": self.settings,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resume_compatible(state["fingerprint"], self.fingerprint, self.allow_changes)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self.log_records = state.get("log_records")


class RNGState:
    """This process's random generators (dropout, and anything else seeded), keyed by rank. On another number of
    processes, process r continues the generators of old process r modulo the old count."""

    def __init__(self, rank: int = 0):
        self.rank = rank

    def state_dict(self) -> dict[int, dict]:
        return {
            self.rank: {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
            }
        }

    def load_state_dict(self, states: dict[int, dict]) -> None:
        state = states[self.rank % len(states)]
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(state["python"])


class DataPosition:
    """A data stream's position, keyed by rank, and the sequences drawn for a step that never ran. The loop reads
    a whole step's sequences before training on them; when the source fails part-way (`give_back`), the drawn
    ones are handed out again first, so a checkpoint written then resumes exactly where the run stood. On another
    number of processes `data.restore_stream` maps every old process's position onto this process's stream (see
    data/restore.py for what is exact)."""

    def __init__(self, stream: Any, rank: int = 0):
        self.stream, self.rank = stream, rank
        self.pending: list[np.ndarray] = []

    def next(self) -> np.ndarray:
        return self.pending.pop(0) if self.pending else next(self.stream)

    def give_back(self, sequences: list[np.ndarray]) -> None:
        self.pending = list(sequences) + self.pending

    def state_dict(self) -> dict[int, tuple[dict, dict[str, np.ndarray]]]:
        meta, arrays = self.stream.state_dict()
        if self.pending:
            meta, arrays = (
                {**meta, "pending": len(self.pending)},
                {**arrays, "pending": np.stack(self.pending)},
            )
        return {self.rank: (meta, arrays)}

    def load_state_dict(self, states: dict[int, tuple[dict, dict[str, np.ndarray]]]) -> None:
        from .data import restore_stream

        pending = {r: arrays.get("pending") for r, (_, arrays) in states.items()}
        if any(p is not None for p in pending.values()) and len(states) != self.stream.world_size:
            raise CheckpointError(
                f"this checkpoint was written when a data source failed mid-step on {len(states)} processes: "
                f"resume it on {len(states)} processes (then change the count at a later checkpoint)"
            )
        plain = [
            (
                {k: v for k, v in meta.items() if k != "pending"},
                {k: v for k, v in a.items() if k != "pending"},
            )
            for meta, a in (states[r] for r in range(len(states)))
        ]
        restore_stream(self.stream, plain, len(states))
        mine = pending.get(self.rank)
        self.pending = [row.astype(mine.dtype) for row in mine] if mine is not None else []


SAFE_TO_CHANGE = {"per_device_train_batch_size", "gradient_accumulation_steps"}
# how the global batch is split: free to change while the global batch (their product) stays the same
BATCH_SPLIT = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")


def _global_batch(fp: dict) -> int:
    return math.prod(int(fp.get(k) or 1) for k in BATCH_SPLIT)


def _split_content(fingerprint: dict) -> tuple[dict, dict | None]:
    """The fingerprint without the corpus content (`data_stream.content`), and that content."""
    stream = fingerprint.get("data_stream")
    if not isinstance(stream, dict):
        return fingerprint, None
    stream = dict(stream)
    content = stream.pop("content", None)
    return {**fingerprint, "data_stream": stream}, content


def check_resume_compatible(saved: dict, current: dict, allow_changes: bool) -> None:
    from .data.fingerprint import content_changes

    # the corpus content is compared apart: each changed file is named, and --allow_resume_changes accepts it
    saved, saved_content = _split_content(saved)
    current, current_content = _split_content(current)
    corpus = content_changes(saved_content, current_content) if "data_stream" in current else []
    accepted, corpus = (corpus, []) if allow_changes else ([], corpus)
    same_batch = _global_batch(saved) == _global_batch(current)

    def differs(k: str) -> bool:
        if saved.get(k) == current[k] or (k in BATCH_SPLIT and same_batch):
            return False
        # another process count with the same per-process batch changes the global batch: allowed on request
        return not (k == "world_size" and allow_changes)

    diffs = [
        f"{k}: checkpoint has {saved.get(k)!r}, this run has {current[k]!r}" for k in current if differs(k)
    ]
    if allow_changes:
        diffs = [d for d in diffs if d.split(":")[0] not in SAFE_TO_CHANGE]
    if diffs or corpus:
        hint = (
            " (--allow_resume_changes permits a different batch size or accumulation)"
            if not allow_changes and any(d.split(":")[0] in SAFE_TO_CHANGE for d in diffs)
            else ""
        )
        if any(d.startswith("world_size:") for d in diffs):
            g, n = _global_batch(saved), int(current["world_size"])
            hint += (
                f" (on {n} processes the same global batch of {g} sequences needs per_device_train_batch_size x "
                f"gradient_accumulation_steps = {g / n:g}; --allow_resume_changes accepts another global batch)"
            )
        what = "settings and corpus files" if corpus else "settings"
        if corpus:
            hint += " (--allow_resume_changes resumes on the changed corpus from the saved positions)"
        raise ConfigError(
            [f"cannot resume: {d}" for d in diffs + corpus]
            + [
                f"restore the original {what}, or start over with --resume never --overwrite_output_dir (replaces "
                f"this run's files) or in another --output_dir{hint}"
            ]
        )
    if accepted:
        print(
            f"warning: --allow_resume_changes: resuming on a changed corpus: {'; '.join(accepted)}",
            flush=True,
        )
