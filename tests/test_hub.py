"""hub.py: a push to the Hub that cannot happen (offline, no token, an unreachable Hub) stops the run at start-up,
before any training, with what to set."""

from __future__ import annotations

import pytest
from conftest import run_train, tiny_args

from gpt2_training.cli import parse_config
from gpt2_training.errors import ConfigError


def _push_env(env, tmp_path, **extra):
    sub = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    sub["HF_HOME"] = str(tmp_path / "hf_home")  # no stored login
    sub.update(extra)
    return sub


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1"),
        ({}, "needs a Hugging Face token"),
        # a token, but a Hub that cannot be reached (a closed local port)
        ({"HF_TOKEN": "hf_" + "x" * 34, "HF_ENDPOINT": "http://127.0.0.1:9"}, "could not be reached"),
    ],
)
def test_push_to_hub_fails_at_start_up(tmp_path, env, extra, message):
    out = tmp_path / "run"
    argv = tiny_args(out, "--push_to_hub", "true", "--hub_model_id", "me/tiny", "--hub_private_repo", "true")
    proc = run_train(argv, _push_env(env, tmp_path, **extra), timeout=60)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stdout and not out.exists()
    with pytest.raises(ConfigError, match="--hub_strategy every_save is not supported"):
        parse_config(argv + ["--hub_strategy", "every_save"])
