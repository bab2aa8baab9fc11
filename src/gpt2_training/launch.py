"""Multi-process training from Python (a notebook cell): `launch_multiprocess` runs train.py under torchrun in a
subprocess and streams its output; from a shell, use torchrun, `accelerate launch` or `deepspeed` (SETUP.md 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "01-Full-Fine-Tuning" / "train.py"


def _as_argv(args: Sequence[str] | Mapping[str, Any]) -> list[str]:
    if isinstance(args, Mapping):
        argv: list[str] = []
        for k, v in args.items():
            argv += [f"--{k}", json.dumps(v) if isinstance(v, list | dict) else str(v)]
        return argv
    return [str(a) for a in args]


def torchrun_command(
    args: Sequence[str] | Mapping[str, Any],
    nproc: int,
    *,
    master_port: int | None = None,
    script: str | Path = TRAIN_SCRIPT,
    python: str = sys.executable,
) -> list[str]:
    """The command line `launch_multiprocess` runs (print it to run the same from a shell)."""
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nproc > 1:
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(master_port or _free_port())]
    return cmd + [str(script), *_as_argv(args)]


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment `launch_multiprocess` gives torchrun: this process's, with this checkout's `src` first on
    PYTHONPATH (the workers import this package even where it is not installed), one OpenMP thread per worker
    and no tokenizer threads unless set already, then `env` on top."""
    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), full.get("PYTHONPATH")) if p)
    # torchrun's own default too; setting it silences its warning
    full.setdefault("OMP_NUM_THREADS", "1")
    full.setdefault("TOKENIZERS_PARALLELISM", "false")
    full.update(env or {})
    return full


def launch_multiprocess(
    args: Sequence[str] | Mapping[str, Any],
    nproc: int = 2,
    *,
    env: Mapping[str, str] | None = None,
    stream: bool = True,
    check: bool = True,
    cwd: str | Path | None = None,
    master_port: int | None = None,
) -> subprocess.CompletedProcess:
    """Run `train.py` on `nproc` processes with torchrun, streaming its output; returns the completed process.

    `args` is a train.py argument list (`["--config", "x.yaml", "--max_steps", "50"]`) or a mapping of settings
    (`{"config": "x.yaml", "max_steps": 50}`). The returned object's `stdout` holds the whole output. With
    `check=True` a non-zero exit status raises `subprocess.CalledProcessError` (the output is in the exception).

    Why a subprocess and not Accelerate's `notebook_launcher`: the latter forks the kernel, and a forked child
    cannot use CUDA once the kernel has initialised it (any `torch.cuda` call in an earlier cell does), it needs
    the training function and its data to be picklable, and a crash or a hang in a worker takes the kernel with
    it. A fresh `torchrun` process group behaves exactly like the shell command, leaves the kernel's CUDA state
    alone, and can be interrupted: the cell's interrupt sends SIGINT, and the trainer saves a checkpoint and exits.
    """
    if nproc < 1:
        raise ValueError("nproc must be >= 1")
    cmd = torchrun_command(args, nproc, master_port=master_port)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=launch_environment(env),
        cwd=str(cwd or REPO_ROOT),
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if stream:
                print(line, end="", flush=True)
        rc = proc.wait()
    except KeyboardInterrupt:
        import signal

        # a notebook interrupt: the trainer saves a checkpoint on SIGINT, then stops

        proc.send_signal(signal.SIGINT)
        rc = proc.wait()
    result = subprocess.CompletedProcess(cmd, rc, "".join(lines), None)
    if check and rc != 0:
        raise subprocess.CalledProcessError(rc, cmd, output=result.stdout)
    return result
