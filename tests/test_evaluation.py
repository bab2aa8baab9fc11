"""evaluation.py: held-out figures that do not depend on how the sequences are batched, and samples that leave
the training run's random state as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args

from gpt2_training.cli import parse_config
from gpt2_training.trainer import Engine


def _engine(tmp_path, *extra, **settings) -> Engine:
    engine = Engine(parse_config(tiny_args(tmp_path, *extra, **settings)))
    engine.setup()
    return engine


def test_eval_batch_size_does_not_change_the_loss(tmp_path, env):
    one = _engine(tmp_path / "a", per_device_eval_batch_size=1).evaluate()
    eight = _engine(tmp_path / "b", per_device_eval_batch_size=8).evaluate()
    assert one["eval_loss"] == pytest.approx(eight["eval_loss"], rel=1e-6)


def test_sampling_leaves_the_random_state_as_it_was(tmp_path, env):
    engine = _engine(tmp_path)
    before = torch.random.get_rng_state()
    first = engine.sample(seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    # the same seed gives the same text; the prompts are the settings'
    assert engine.sample(seed=3) == first and len(first) == len(engine.cfg.run.sample_prompts)
    assert all(
        text.startswith(prompt) for text, prompt in zip(first, engine.cfg.run.sample_prompts, strict=True)
    )
    engine.close()
