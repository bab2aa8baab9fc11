"""launch.py: the torchrun command line and environment it builds, a real one-process launch of train.py whose
output streams back, and the refusals (a non-zero exit raises with the output; no process count below 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_training.launch import (
    REPO_ROOT,
    TRAIN_SCRIPT,
    launch_environment,
    launch_multiprocess,
    torchrun_command,
)


def test_the_command_line_is_torchrun_over_train_py():
    one = torchrun_command(["--config", Path("x.yaml"), "--max_steps", 5], 1)
    assert one == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        str(TRAIN_SCRIPT),
        "--config",
        "x.yaml",
        "--max_steps",
        "5",
    ]
    # several processes rendezvous on this machine's loopback, on the port given or a free one
    two = torchrun_command(
        {"report_to": ["wandb", "tensorboard"], "fsdp_config": {"a": 1}}, 2, master_port=1234
    )
    assert two[3:9] == ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "1234"]
    # lists and dicts of a mapping travel as JSON, which train.py's parser reads back
    assert two[-4:] == ["--report_to", '["wandb", "tensorboard"]', "--fsdp_config", '{"a": 1}']
    port = int(torchrun_command([], 2)[8])
    assert 0 < port < 65536


def test_the_environment_puts_this_checkout_first_and_keeps_the_callers_choices(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    env = launch_environment({"EXTRA": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT / "src"), "/elsewhere"]
    assert env["OMP_NUM_THREADS"] == "1" and env["TOKENIZERS_PARALLELISM"] == "true" and env["EXTRA"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch_environment()["OMP_NUM_THREADS"] == "3"
    assert launch_environment({"OMP_NUM_THREADS": "2"})["OMP_NUM_THREADS"] == "2"


def test_a_launch_streams_train_py_output_and_a_failed_one_raises_with_it(tmp_path, env, capsys):
    """Real torchrun processes: `--help` comes back streamed and in the result; a setting train.py refuses
    makes the launch raise, with train.py's one-line error in the exception's output, and nothing written."""
    done = launch_multiprocess(["--help"], nproc=1, env=env)
    assert done.returncode == 0 and "--per_device_train_batch_size" in done.stdout
    assert "--per_device_train_batch_size" in capsys.readouterr().out
    out = tmp_path / "run"
    args = {"output_dir": out, "learning_rate": -1, "max_steps": 1}
    with pytest.raises(subprocess.CalledProcessError) as failed:
        launch_multiprocess(args, nproc=1, env=env, stream=False)
    assert "error: learning_rate must be > 0" in failed.value.output
    assert capsys.readouterr().out == "" and not out.exists()


def test_fewer_than_one_process_is_refused():
    with pytest.raises(ValueError, match="nproc must be >= 1"):
        launch_multiprocess(["--help"], nproc=0)
