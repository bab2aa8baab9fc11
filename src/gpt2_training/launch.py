"""Multi-process launching from a notebook, and the DeepSpeed config of a run (its "auto" values filled in).

From a shell, use the usual launchers (all run the same `train.py`; each is tested on CPU with gloo in
tests/test_distributed.py):

    torchrun --nproc_per_node=8 01-Full-Fine-Tuning/train.py --config ...                  # DDP
    torchrun --nproc_per_node=8 01-Full-Fine-Tuning/train.py --fsdp "full_shard auto_wrap" ...   # FSDP2
    accelerate launch --config_file 01-Full-Fine-Tuning/configs/accelerate_ddp.yaml 01-Full-Fine-Tuning/train.py ...
    accelerate launch --config_file 01-Full-Fine-Tuning/configs/accelerate_fsdp.yaml ...    # FSDP2
    deepspeed --num_gpus=8 01-Full-Fine-Tuning/train.py --deepspeed 01-Full-Fine-Tuning/configs/ds_zero2.json ...
    sbatch 01-Full-Fine-Tuning/train.sbatch                                                  # several nodes

From a notebook, `launch_multiprocess(["--config", "...", "--max_steps", "100"], nproc=2)` runs
`python -m torch.distributed.run --nproc_per_node N 01-Full-Fine-Tuning/train.py ...` as a subprocess and
streams its output into the cell. Why a subprocess and not Accelerate's `notebook_launcher`: the latter forks the
kernel, and a forked child cannot use CUDA once the kernel has initialised it (any `torch.cuda` call in an earlier
cell does), it needs the training function and its data to be picklable/fork-safe, and a crash or a hang in a
worker takes the kernel with it. A fresh `torchrun` process group behaves exactly like the shell command, leaves
the kernel's CUDA state alone, and can be interrupted (the cell's interrupt sends SIGINT, the trainer saves a
checkpoint and exits).

DeepSpeed (`make install-deepspeed`, CPU or GPU): the shipped `ds_zero{1,2,3}.json` have no `optimizer` or
`scheduler` section, so the project's AdamW and learning-rate schedule are used exactly as on one GPU (a section
there would bring DeepSpeed's own and silently diverge from `TrainingArguments`). `deepspeed_config()` fills their
"auto" values from the training settings (micro-batch, accumulation, and `gradient_clipping` = `max_grad_norm`);
the global batch and bf16/fp16 are filled by the DeepSpeed backend (backends.py), which drives the engine.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "01-Full-Fine-Tuning" / "train.py"

# DeepSpeed keys the project's own loop owns; a DS config must not bring its own.
FORBIDDEN_DS_SECTIONS = ("optimizer", "scheduler")


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
    """The command line `launch_multiprocess` runs (shown in notebooks so it can be copied to a shell)."""
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nproc > 1:
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(master_port or _free_port())]
    return cmd + [str(script), *_as_argv(args)]


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """
    if nproc < 1:
        raise ValueError("nproc must be >= 1")
    cmd = torchrun_command(args, nproc, master_port=master_port)
    full_env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (src, full_env.get("PYTHONPATH")) if p)
    full_env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default too; silences its warning
    full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    full_env.update(env or {})
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=full_env,
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
    except KeyboardInterrupt:  # notebook interrupt: let the trainer save a checkpoint, then stop
        import signal

        proc.send_signal(signal.SIGINT)
        rc = proc.wait()
    result = subprocess.CompletedProcess(cmd, rc, "".join(lines), None)
    if check and rc != 0:
        raise subprocess.CalledProcessError(rc, cmd, output=result.stdout)
    return result


# -- DeepSpeed ---------------------------------------------------------------------------------------------------
def _deepspeed_source(train_args) -> Any:
    if getattr(train_args, "deepspeed", None):
        return train_args.deepspeed
    # the DeepSpeed JSON named by an `accelerate launch` config file
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        return None if path == "none" else path
    return None


def deepspeed_config(train_args) -> dict | None:
    """The DeepSpeed config of this run with the batch/accumulation/clipping "auto" values filled in.

    Source: `--deepspeed FILE|dict`, else the file of an `accelerate launch` DeepSpeed config; None when the run
    does not use DeepSpeed. Explicit values that disagree with the training settings are refused (one run, one
    meaning for each number), as is an optimizer or scheduler section.
    """
    src = _deepspeed_source(train_args)
    if not src:
        return None
    if isinstance(src, Mapping):
        cfg = copy.deepcopy(dict(src))
    else:
        path = Path(src)
        if not path.exists():
            raise ConfigError(f"DeepSpeed config {path} does not exist")
        cfg = json.loads(path.read_text())
    problems = [
        f"DeepSpeed config has a {s!r} section: remove it - this project builds AdamW and the learning-rate "
        f"schedule from the training settings (--optim, --learning_rate, --lr_scheduler_type ...)"
        for s in FORBIDDEN_DS_SECTIONS
        if s in cfg
    ]
    clip = (
        float(train_args.max_grad_norm) if train_args.max_grad_norm and train_args.max_grad_norm > 0 else 0.0
    )
    wanted = {
        "train_micro_batch_size_per_gpu": int(train_args.per_device_train_batch_size),
        "gradient_accumulation_steps": int(train_args.gradient_accumulation_steps),
        "gradient_clipping": clip,
    }
    for key, value in wanted.items():
        current = cfg.get(key, "auto")
        if current == "auto":
            cfg[key] = value
        elif float(current) != float(value):
            problems.append(
                f"DeepSpeed config sets {key}={current} but the training settings say {value}: "
                f'use "auto" in the JSON'
            )
    # train_batch_size "auto" is computed by Accelerate from the micro batch, accumulation and process count.
    if problems:
        raise ConfigError(problems)
    return cfg
