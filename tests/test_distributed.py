"""Multi-process training: DDP (torchrun / accelerate launch / the notebook launcher) on CPU with gloo, and the
GPU-only paths (FSDP, DeepSpeed ZeRO) marked `gpu`.

Equivalence tolerance: 2 processes x B sequences equals 1 process x 2 accumulation x B in content (ShardStream
gives rank r window perm[index + r]), so only the floating-point summation order differs (gloo all-reduce of two
half-gradients vs. one accumulated gradient). In fp32 with dropout 0 the per-step losses agree to ~1e-7
relative; rtol=1e-5 leaves headroom for other BLAS builds while any real difference (another batch, a double
loss scaling, a missing all-reduce) moves the loss by >1e-3 after a step or two.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE
from safetensors.torch import load_file

from gpt2_training.launch import (
    REPO_ROOT,
    TRAIN_SCRIPT,
    deepspeed_config,
    launch_multiprocess,
    torchrun_command,
)

CONFIGS = REPO_ROOT / "01-Full-Fine-Tuning" / "configs"
ENV = {**OFFLINE, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
STEPS = 6
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 5e-5  # observed max |diff| 5.5e-6 after 6 Adam steps; one Adam step moves weights ~lr = 3e-3

requires_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (FSDP/DeepSpeed shard across GPUs; none here)"
)


def _env() -> dict[str, str]:
    return {**os.environ, **ENV}


def _common(shards: Path, out: Path, **overrides) -> list[str]:
    settings = {
        "config": CONFIGS / "tiny.yaml",
        "shards_dir": shards,
        "tokenizer": shards / "tokenizer",
        "output_dir": out,
        "block_size": 32,
        "per_device_train_batch_size": 4,
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_steps": 3,
        "eval_steps": 0,
        "precision": "fp32",
        "dropout": 0.0,
        # a constant schedule after warmup, so a run stopped at step 3 and extended to 6 follows the same LRs
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 2,
        "plot": "false",
        "sample_max_new_tokens": 4,
        "eval_max_sequences": 8,
        "report_to": "none",
    }
    settings.update(overrides)
    argv: list[str] = []
    for k, v in settings.items():
        argv += [f"--{k}", str(v)]
    return argv


def _run(cmd: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def _train_losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["event"] == "train"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=WEIGHT_ATOL, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_cache) -> Path:  # shared_cache: conftest.py, session-wide corpus cache
    root = tmp_path_factory.mktemp("dist")
    out = root / "shards"
    _run(
        [
            sys.executable,
            str(TRAIN_SCRIPT),
            "prepare",
            "--dataset",
            "builtin",
            "--tokenizer_vocab_size",
            "1024",
            "--out",
            str(out),
        ]
    )
    return out


@pytest.fixture(scope="module")
def single(shards) -> Path:
    """1 process x 2 accumulation x 4 sequences."""
    out = shards.parent / "single"
    _run([sys.executable, str(TRAIN_SCRIPT), *_common(shards, out, gradient_accumulation_steps=2)])
    return out


@pytest.fixture(scope="module")
def ddp(shards) -> tuple[Path, subprocess.CompletedProcess]:
    """2 processes x 4 sequences, started through the notebook launcher (torchrun in a subprocess)."""
    out = shards.parent / "ddp"
    proc = launch_multiprocess(_common(shards, out), nproc=2, env=ENV, stream=False)
    return out, proc


# -- DDP on CPU (gloo) --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_twice_the_accumulation(single, ddp):
    out, _ = ddp
    one, two = _train_losses(single), _train_losses(out)
    assert len(one) == len(two) == STEPS
    np.testing.assert_allclose(two, one, rtol=LOSS_RTOL)
    assert one[-1] < one[0]  # it trains
    _assert_same_weights(single, out)


@pytest.mark.slow
def test_only_rank0_writes_logs_checkpoints_and_samples(ddp):
    out, proc = ddp
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["event"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # one line per step, not one per rank
    assert sum(r["event"] == "sample" for r in recs) == 2  # two prompts, once
    for step in range(1, STEPS + 1):
        assert len(re.findall(rf"^\[train\] step={step} ", proc.stdout, re.M)) == 1
    assert proc.stdout.count("model saved to") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-3",
        "checkpoint-6",
        "final",
        "train_log.jsonl",
    ]
    ck = out / "checkpoint-6"
    assert {p.name for p in ck.glob("rank*")} == {
        f"rank{r}.{e}" for r in (0, 1) for e in ("json", "npz", "pt")
    }
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["fingerprint"]["world_size"] == 2 and state["step"] == STEPS


@pytest.mark.slow
def test_ranks_see_disjoint_data(ddp, shards):
    out, _ = ddp
    ck = out / "checkpoint-6"
    r0, r1 = (json.loads((ck / f"rank{r}.json").read_text())["data"] for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["index"] == r1["index"] == STEPS * 4 * 2  # the shared position: 2 ranks x 4 sequences per step
    # what each rank read: the window order of rank r is perm[r::2], so the ranks never share a window
    from gpt2_training.data.shards import ShardStream

    ranks = [ShardStream(shards, "train", 32, seed=1337, rank=r, world_size=2) for r in (0, 1)]
    one = ShardStream(shards, "train", 32, seed=1337)
    n = 64
    got = [[next(s).tobytes() for _ in range(n)] for s in ranks]
    ref = [next(one).tobytes() for _ in range(2 * n)]
    assert got[0] == ref[0::2] and got[1] == ref[1::2]
    assert not set(got[0]) & set(got[1])


def test_token_stream_assigns_each_document_to_one_rank(tmp_path):
    """TokenStream (the streaming path): documents are split between ranks by index modulo world size."""
    from gpt2_training.data.pipeline import TokenStream
    from gpt2_training.data.sources import open_source

    class WordTokenizer:  # one token per word; enough to see which document a token came from
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[int(w) for w in t.split()] for t in texts]}

        def __len__(self):
            return 1000

    docs = tmp_path / "docs"
    docs.mkdir()
    for d in range(40):
        (docs / f"{d:03d}.txt").write_text(" ".join([str(d + 100)] * 5))
    seen = []
    for rank in (0, 1):
        src = open_source(str(docs), txt_mode="file", shuffle=False, seed=0)
        stream = TokenStream(
            src,
            WordTokenizer(),
            4,
            split="train",
            validation_per_mille=0,
            rank=rank,
            world_size=2,
            loop=False,
        )
        ids = np.concatenate(list(stream))
        seen.append({int(i) for i in ids if i})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) >= 38  # every document but at most a packing remainder per rank


@pytest.mark.slow
def test_resume_under_ddp_matches_an_uninterrupted_run(shards, ddp):
    """Stop a 2-process run at its step-3 checkpoint (max_steps 3), continue it to step 6 with `accelerate
    launch` and the shipped 2-process CPU config, and compare with the uninterrupted run."""
    full, _ = ddp
    out = shards.parent / "resumed"
    _run(torchrun_command(_common(shards, out, max_steps=3), 2))
    assert (out / "checkpoint-3" / "manifest.json").exists()
    port = str(29500 + os.getpid() % 1000)
    proc = _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / "accelerate_cpu_2proc.yaml"),
            "--main_process_port",
            port,
            str(TRAIN_SCRIPT),
            *_common(shards, out, max_steps=STEPS),
        ]
    )
    assert "resuming from" in proc.stdout and "x 2 processes" in proc.stdout
    np.testing.assert_allclose(_train_losses(out), _train_losses(full), rtol=LOSS_RTOL)
    _assert_same_weights(full, out)


def test_launcher_command_line():
    cmd = torchrun_command({"config": "x.yaml", "max_steps": 5}, 4, master_port=1234)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "4"]
    assert cmd[-5:] == [str(TRAIN_SCRIPT), "--config", "x.yaml", "--max_steps", "5"]


# -- DeepSpeed: config handling runs here, the engine only on GPUs -------------------------------------------------
def test_deepspeed_config_auto_values_are_filled_from_training_arguments(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin

    from gpt2_training.errors import ConfigError

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    args = SimpleNamespace(
        deepspeed=str(CONFIGS / "ds_zero2.json"),
        per_device_train_batch_size=16,
        gradient_accumulation_steps=4,
        max_grad_norm=0.5,
    )
    cfg = deepspeed_config(args)
    assert cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5
    plugin = DeepSpeedPlugin(hf_ds_config=cfg)  # what Engine does; needs no deepspeed install
    plugin.set_mixed_precision("bf16")
    assert (
        plugin.deepspeed_config["bf16"]["enabled"] is True
        and plugin.deepspeed_config["fp16"]["enabled"] is False
    )
    assert plugin.gradient_accumulation_steps == 4 and plugin.zero_stage == 2
    assert deepspeed_config(SimpleNamespace(deepspeed=None)) is None
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(
            SimpleNamespace(**(vars(args) | {"deepspeed": {**cfg, "optimizer": {"type": "AdamW"}}}))
        )
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        deepspeed_config(
            SimpleNamespace(**(vars(args) | {"deepspeed": {**cfg, "gradient_accumulation_steps": 8}}))
        )
    # `accelerate launch` with a DeepSpeed config passes the JSON through the environment
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(CONFIGS / "ds_zero3.json"))
    assert (
        deepspeed_config(SimpleNamespace(**(vars(args) | {"deepspeed": None})))["zero_optimization"]["stage"]
        == 3
    )


@pytest.mark.gpu
@pytest.mark.slow
@requires_gpus
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_matches_ddp(stage, tmp_path):
    """GPU-pending: DeepSpeed is an optional dependency and needs CUDA. Runs 2 GPUs x ZeRO-`stage` against DDP."""
    pytest.importorskip("deepspeed", reason="the optional `deepspeed` dependency group is not installed")
    shards = tmp_path / "shards"
    _run(
        [
            sys.executable,
            str(TRAIN_SCRIPT),
            "prepare",
            "--dataset",
            "builtin",
            "--tokenizer_vocab_size",
            "1024",
            "--out",
            str(shards),
        ]
    )
    ref, ds = tmp_path / "ddp", tmp_path / f"zero{stage}"
    _run(torchrun_command(_common(shards, ref, save_steps=0, gradient_accumulation_steps=2), 2), timeout=600)
    _run(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            str(TRAIN_SCRIPT),
            *_common(
                shards,
                ds,
                save_steps=0,
                gradient_accumulation_steps=2,
                deepspeed=CONFIGS / f"ds_zero{stage}.json",
            ),
        ],
        timeout=600,
    )
    np.testing.assert_allclose(_train_losses(ds), _train_losses(ref), rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.slow
@requires_gpus
def test_fsdp_matches_ddp(tmp_path):
    """GPU-only. On a CPU accelerate 1.15 silently ignores distributed_type FSDP: AcceleratorState switches to
    FSDP only for GPU-like device types, a cpu=True run stays MULTI_CPU (observed: identical losses to DDP)."""
    shards = tmp_path / "shards"
    _run(
        [
            sys.executable,
            str(TRAIN_SCRIPT),
            "prepare",
            "--dataset",
            "builtin",
            "--tokenizer_vocab_size",
            "1024",
            "--out",
            str(shards),
        ]
    )
    ref, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _run(torchrun_command(_common(shards, ref), 2), timeout=600)
    _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / "accelerate_fsdp.yaml"),
            "--num_processes",
            "2",
            str(TRAIN_SCRIPT),
            *_common(shards, fsdp),
        ],
        timeout=600,
    )
    np.testing.assert_allclose(_train_losses(fsdp), _train_losses(ref), rtol=1e-4)
    _assert_same_weights(ref, fsdp)  # get_state_dict gathers the full state dict on rank 0
