"""precision.py: auto picks what the hardware runs (bf16 where supported, fp16 on older GPUs, fp32 otherwise), and an
explicit choice is honoured or refused with the reason."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_args

import gpt2_training.parts as parts_mod
from gpt2_training.cli import main
from gpt2_training.errors import ConfigError
from gpt2_training.precision import resolve_precision


def run(tmp_path, name="run", *extra, **settings):
    settings.setdefault("save_steps", 0)
    return main(tiny_args(tmp_path / name, *extra, **settings))


def test_auto_precision_matches_the_hardware():
    precision, reason = resolve_precision("auto")
    if torch.cuda.is_available():
        assert precision in ("bf16", "fp16")
    else:
        assert precision == ("bf16" if parts_mod.bf16_supported() else "fp32") and reason


def test_fp16_on_cpu_is_refused_with_the_reason(env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        run(tmp_path, precision="fp16")
    assert not (tmp_path / "run").exists()


def test_bf16_autocast_trains_on_cpu(env, tmp_path, monkeypatch):
    """bf16 autocast is the CPU path on CPUs with native bf16; elsewhere it is refused, so force the check."""
    monkeypatch.setattr(parts_mod, "bf16_supported", lambda: True)
    res = run(tmp_path, precision="bf16", max_steps=3)
    assert res.precision == "bf16" and all(math.isfinite(x) for x in res.losses)
