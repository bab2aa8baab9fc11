"""The engine honours the TrainingArguments it inherits: epochs, strategies, resume_from_checkpoint, data_seed,
activation checkpointing, torch.compile's mode, the progress bar and the start-up check of --push_to_hub."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_log, tiny_args

from gpt2_training.cli import parse_config
from gpt2_training.data import resolve_tokenizer
from gpt2_training.data.pipeline import is_validation
from gpt2_training.errors import ConfigError
from gpt2_training.trainer import Engine, train


def _engine(tmp_path, *extra, **settings) -> Engine:
    engine = Engine(parse_config(tiny_args(tmp_path, *extra, **settings)))
    engine.setup()
    return engine


def _corpus(tmp_path: Path) -> Path:
    """Sixty small documents (enough for the document-level held-out split at 200 per mille): a finite local
    corpus whose size the test can count by itself."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(60):
        words = " ".join(f"word{(i * 7 + j) % 50} and more text" for j in range(12))
        (folder / f"doc{i}.txt").write_text(f"Document {i}. {words}\n")
    return folder


def test_num_train_epochs_sets_the_steps(tmp_path, env):
    corpus = _corpus(tmp_path)
    cfg = parse_config(
        tiny_args(
            tmp_path / "run",
            "--num_train_epochs",
            "2",
            dataset=str(corpus),
            max_steps=-1,
            tokenizer="train",
            validation_per_mille=200,
            save_steps=0,
            logging_steps=100,
        )
    )
    tok = resolve_tokenizer(cfg.data, seed=cfg.train.seed)
    # the count the engine should arrive at, from the documents themselves
    docs = [p.read_text() for p in sorted(corpus.iterdir())]
    train_tokens = sum(len(tok(d).input_ids) + 1 for d in docs if not is_validation(d, 200))
    expected = math.ceil(2 * (train_tokens // 32) / 4)
    result = train(cfg)
    assert result.step == expected and len(result.losses) == expected
    # the engine sets the step count on its own copy: the caller's TrainingArguments are as they were built
    assert cfg.train.max_steps == -1 and cfg.train.num_train_epochs == 2


def test_strategies_no(tmp_path, env):
    out = tmp_path / "run"
    argv = tiny_args(out, "--eval_strategy", "no", "--save_strategy", "no", "--logging_strategy", "no")
    result = train(parse_config(argv + ["--eval_on_start", "false", "--eval_steps", "2"]))
    events = [r["event"] for r in read_log(out)]
    assert "train" not in events and events.count("eval") == 1, events
    assert result.initial_eval is None and result.final_eval is not None
    assert not list(out.glob("checkpoint-*"))


def test_sample_max_new_tokens_0_means_no_samples_and_negative_is_refused(tmp_path, env):
    out = tmp_path / "run"
    argv = tiny_args(out, eval_steps=3, sample_max_new_tokens=0)
    result = train(parse_config(argv))
    assert result.samples == [] and "sample" not in [r["event"] for r in read_log(out)]
    assert (out / "final" / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="sample_max_new_tokens must be >= 0"):
        train(parse_config(tiny_args(tmp_path / "neg", sample_max_new_tokens=-1)))


def test_logging_first_step(tmp_path, env):
    out = tmp_path / "run"
    result = train(
        parse_config(tiny_args(out, "--logging_first_step", "true", logging_steps=5, save_steps=0))
    )
    logged = [r for r in read_log(out) if r["event"] == "train"]
    assert [r["step"] for r in logged] == [1, 5, 6]
    # the logged loss is the mean over the window since the last log line, as the Trainer logs it
    windows = [result.losses[0:1], result.losses[1:5], result.losses[5:6]]
    assert [r["loss"] for r in logged] == pytest.approx([sum(w) / len(w) for w in windows], rel=1e-12)
    assert logged[1]["loss"] != pytest.approx(result.losses[4])
    # a ratio below 1 is a fraction of the run, as in the Trainer: 0.5 of 6 steps = every 3
    out2 = tmp_path / "run2"
    train(parse_config(tiny_args(out2, logging_steps=0.5, save_steps=0)))
    assert [r["step"] for r in read_log(out2) if r["event"] == "train"] == [3, 6]


def test_resume_from_checkpoint(tmp_path, env):
    out = tmp_path / "run"
    first = train(parse_config(tiny_args(out, max_steps=4, save_steps=2, save_total_limit=3)))
    again = train(
        parse_config(tiny_args(out, "--resume_from_checkpoint", str(out / "checkpoint-2"), max_steps=4))
    )
    assert again.resumed_from == str(out / "checkpoint-2")
    assert again.losses == first.losses[2:]
    newest = parse_config(tiny_args(out, "--resume_from_checkpoint", "True", max_steps=4))
    assert newest.run.resume == str(out / "checkpoint-4")
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        parse_config(tiny_args(tmp_path / "empty", "--resume_from_checkpoint", "true"))
    with pytest.raises(ConfigError, match="contradicts --resume never"):
        parse_config(tiny_args(out, "--resume_from_checkpoint", "True", resume="never"))


def test_resume_is_exact_with_muon(tmp_path, env):
    # Muon's momentum buffers and the AdamW part's moments are one optimizer state in the checkpoint
    out = tmp_path / "run"
    first = train(
        parse_config(tiny_args(out, "--optim", "muon", max_steps=4, save_steps=2, learning_rate=0.02))
    )
    again = train(
        parse_config(
            tiny_args(
                out, "--optim", "muon", "--resume_from_checkpoint", str(out / "checkpoint-2"), max_steps=4
            )
        )
    )
    assert again.losses == first.losses[2:] and len(again.losses) == 2


def test_data_seed_changes_only_the_data(tmp_path, env):
    a = _engine(tmp_path / "a", "--data_seed", "1", shuffle_buffer=64)
    b = _engine(tmp_path / "b", "--data_seed", "2", shuffle_buffer=64)
    wa, wb = a.lm.transformer.wte.weight, b.lm.transformer.wte.weight
    assert torch.equal(wa, wb), "the model seed did not change"
    assert not torch.equal(a._to_device(a._read_step(4)[0]), b._to_device(b._read_step(4)[0]))


def test_batch_shape(tmp_path, env):
    engine = _engine(tmp_path, per_device_train_batch_size=3)
    x = engine._to_device(engine._read_step(3)[0])
    assert x.shape == (3, 32) and x.dtype == torch.int64


def test_gradient_checkpointing_kwargs(tmp_path, env):
    plain = _engine(tmp_path / "a", "--gradient_checkpointing", "true")
    block = plain.lm.transformer.h[0]
    assert block.gradient_checkpointing and block._gradient_checkpointing_func.keywords == {
        "use_reentrant": False
    }
    kw = _engine(
        tmp_path / "b",
        "--gradient_checkpointing",
        "true",
        "--gradient_checkpointing_kwargs",
        '{"use_reentrant": true}',
    )
    assert kw.lm.transformer.h[0]._gradient_checkpointing_func.keywords == {"use_reentrant": True}


def test_torch_compile_mode(tmp_path, env):
    compiled = _engine(tmp_path / "a", "--torch_compile_mode", "reduce-overhead")
    assert type(compiled.model).__name__ == "OptimizedModule"
    with pytest.raises(ConfigError, match="bogus"):
        _engine(tmp_path / "b", "--torch_compile_mode", "bogus")


def test_first_batch_is_the_stream_s_first_sequences(tmp_path, env):
    engine = _engine(tmp_path, per_device_train_batch_size=2)
    fresh = _engine(tmp_path / "b", per_device_train_batch_size=2)
    expected = np.stack([next(fresh.train_data) for _ in range(2)])
    assert np.array_equal(engine._to_device(engine._read_step(2)[0]).numpy(), expected)


def test_resume_refuses_a_source_with_other_shards(tmp_path, env):
    """Saved positions are per source shard: a folder that gained a file cannot be resumed into."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(f"Part {i}. " + "some words of text " * 300)
    settings = dict(dataset=str(folder), tokenizer="train", max_steps=2, save_steps=2)
    train(parse_config(tiny_args(tmp_path / "run", **settings)))
    (folder / "part3.txt").write_text("Part 3. " + "more words " * 300)
    with pytest.raises(ConfigError, match="data_stream"):
        train(parse_config(tiny_args(tmp_path / "run", **{**settings, "max_steps": 4})))


HEAVY = ("deeplake", "wandb", "datasets", "bitsandbytes", "deepspeed", "tensorboard", "matplotlib", "pandas")


def test_a_plain_run_imports_no_optional_heavy_library(tmp_path, env):
    """Start-up: a run on local data with report_to none, torch AdamW and no backend loads none of the heavy
    optional libraries (each costs up to seconds of import); they load only for runs that use them."""
    import subprocess

    argv = tiny_args(tmp_path / "run", max_steps=2, report_to="none", plot="false")
    code = (
        "import sys\nfrom gpt2_training.cli import run\nrc = run(sys.argv[1:])\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED []" in done.stdout, done.stdout[-500:]
