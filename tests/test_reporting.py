"""Reporters: W&B online exactly when wandb finds a key (as `wandb login` leaves it), offline otherwise;
report_to's values; run_name, project and logging_dir reaching W&B and TensorBoard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gpt2_training.errors import ConfigError
from gpt2_training.options import report_to_list
from gpt2_training.reporting import Reporter

KEY = "k" * 40


def _mode(home, **env) -> str:
    """wandb_mode() in a fresh process whose HOME is `home` (wandb caches its settings per process)."""
    sub = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    sub.update(HOME=str(home), **env)
    code = "from gpt2_training.reporting import wandb_mode; print(wandb_mode()[0])"
    out = subprocess.run([sys.executable, "-c", code], env=sub, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-1]


def test_wandb_mode_follows_wandb_login(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert _mode(home) == "offline"
    # what `wandb login` writes: a netrc entry for the W&B API host
    netrc = home / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    netrc.chmod(0o600)
    assert _mode(home) == "online"
    assert _mode(home, WANDB_MODE="offline") == "offline"
    netrc.unlink()
    assert _mode(home, WANDB_API_KEY=KEY) == "online"


def test_report_to_values():
    assert report_to_list("none") == [] and report_to_list(None) == []
    assert report_to_list("all") == ["tensorboard", "wandb"]
    assert report_to_list(["wandb", "tensorboard"]) == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match="--report_to mlflow"):
        report_to_list("mlflow")


def test_run_name_and_logging_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tb = tmp_path / "tb"
    rep = Reporter(
        tmp_path / "out",
        ["tensorboard", "wandb"],
        {"a": 1},
        run_name="my-run",
        project="proj",
        logging_dir=str(tb),
    )
    rep.log({"event": "train", "step": 1, "loss": 2.0})
    assert rep._wandb.name == "my-run" and rep._wandb.project == "proj"
    rep.close()
    assert list(tb.glob("events.out.tfevents.*")), "TensorBoard wrote elsewhere"
    printed = capsys.readouterr().out
    assert printed.count("W&B: logging offline") == 1 and "wandb sync" in printed
