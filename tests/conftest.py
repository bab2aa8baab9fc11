"""Shared fixtures: an isolated, offline environment with a session-wide cache, tiny run settings, and helpers
that run `train.py` as a real subprocess (for properties about processes: kills, signals, exit statuses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One intra-op thread in the test process too (set before any test module loads torch), unless the caller chose:
# on a small shared machine several threads per test process only wait on each other, and the engine's thread
# policy (threads.py) keeps a count the environment sets, so in-process runs are reproducible whatever the load.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TRAIN_PY = ROOT / "01-Full-Fine-Tuning" / "train.py"

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache folder per test session holding the built-in corpus and the tiny runs' BPE tokenizer.

    Building it costs ~12 s once; every test (in-process or subprocess) then reuses it."""
    cache = tmp_path_factory.mktemp("g2cache")
    old = os.environ.get("GPT2_TRAINING_CACHE")
    os.environ["GPT2_TRAINING_CACHE"] = str(cache)
    try:
        from gpt2_training.config import DataArguments
        from gpt2_training.data import resolve_tokenizer

        resolve_tokenizer(DataArguments(dataset="builtin", tokenizer_vocab_size=1024))
    finally:
        if old is None:
            os.environ.pop("GPT2_TRAINING_CACHE")
        else:
            os.environ["GPT2_TRAINING_CACHE"] = old
    return cache


@pytest.fixture
def env(shared_cache, monkeypatch) -> dict[str, str]:
    """Offline variables and the shared cache, set for this test's process; returns the environment that
    subprocesses should get (the same, plus PYTHONPATH so `train.py` imports this checkout)."""
    monkeypatch.setenv("GPT2_TRAINING_CACHE", str(shared_cache))
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    sub = dict(os.environ)
    sub["PYTHONPATH"] = os.pathsep.join([str(SRC), sub.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sub["OMP_NUM_THREADS"] = "1"  # the test machine is small and shared; also keeps CPU math reproducible
    return sub


def tiny_args(output_dir: str | Path, *extra: str, **settings) -> list[str]:
    """argv for a tiny fp32 CPU run (seconds) in `output_dir`; `extra` flags and `settings` override defaults."""
    base = {
        "preset": "tiny",
        "dataset": "builtin",
        "tokenizer_vocab_size": 1024,
        "block_size": 32,
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 1,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "eval_steps": 0,
        "save_steps": 2,
        "eval_max_sequences": 8,
        "sample_prompts": "The",
        "sample_max_new_tokens": 4,
        "plot": "false",
        "precision": "fp32",
        "report_to": "none",
        "output_dir": str(output_dir),
    }
    base.update(settings)
    argv: list[str] = []
    for k, v in base.items():
        argv += [f"--{k}", *(v if isinstance(v, list | tuple) else [str(v)])]
    return argv + list(extra)


def start_train(args: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
    """`train.py ARGS` as a real child process (stdout and stderr merged into one text pipe by default)."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.STDOUT)
    return subprocess.Popen([sys.executable, str(TRAIN_PY), *args], env=env, text=True, cwd=ROOT, **popen)


def run_train(
    args: list[str], env: dict[str, str], timeout: float = 120, **popen
) -> subprocess.CompletedProcess:
    """Run `train.py ARGS` to completion; returns the CompletedProcess with merged output in `.stdout`."""
    proc = start_train(args, env, **popen)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"train.py {' '.join(args)} timed out after {timeout}s:\n{out}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def read_log(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_losses(output_dir: str | Path) -> dict[int, float]:
    """step -> logged training loss; a resumed run's later record for a step replaces the killed run's."""
    return {r["step"]: r["loss"] for r in read_log(output_dir) if r.get("event") == "train"}


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.05) -> None:
    """Poll until `predicate()` is true; fails if `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited with {proc.returncode} before the condition held:\n{out}")
        time.sleep(poll)
    raise AssertionError(f"condition not met within {timeout}s")


def state_tensors(obj) -> list:
    """Every tensor in a nested state dict, copied, in a fixed order (an FSDP shard as its full values): two
    states are equal when these lists are. Also imported by driver scripts run with tests/ on PYTHONPATH."""
    import torch

    if torch.is_tensor(obj):
        return [(obj.full_tensor() if hasattr(obj, "full_tensor") else obj).detach().clone()]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in state_tensors(obj[k])]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in state_tensors(v)]
    return []
