"""Multi-process training on CPU with gloo: DDP (torchrun / accelerate launch / the notebook launcher), DeepSpeed
ZeRO 1-3 (each through another launcher), FSDP2, resume on another number of processes, and a two-node rendezvous.

Equivalence tolerance: 2 processes x B sequences equals 1 process x 2 accumulation x B in content (ShardStream
gives rank r window perm[index + r]), so only the floating-point summation order differs (gloo all-reduce of two
half-gradients vs. one accumulated gradient). In fp32 with dropout 0 the per-step losses agree to ~1e-7
relative; rtol=1e-5 leaves headroom for other BLAS builds while any real difference (another batch, a double
loss scaling, a missing all-reduce, a lost optimizer state) moves the loss by >1e-3 after a step or two. The same
tolerance holds for ZeRO 1-3 and FSDP against DDP: they shard the same fp32 arithmetic (observed: equal to 1e-7).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE, train_losses, wait_for
from safetensors.torch import load_file

from gpt2_training import checkpoint as ckpt
from gpt2_training.backends import deepspeed_config
from gpt2_training.launch import REPO_ROOT, TRAIN_SCRIPT, launch_multiprocess, torchrun_command

CONFIGS = REPO_ROOT / "01-Full-Fine-Tuning" / "configs"
# DS_ACCELERATOR: the `deepspeed` launcher runs before the trainer could choose DeepSpeed's CPU accelerator
ENV = {**OFFLINE, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src"), "DS_ACCELERATOR": "cpu"}
STEPS = 6
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 5e-5  # observed max |diff| 5.5e-6 after 6 Adam steps; one Adam step moves weights ~lr = 3e-3


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


def assert_equal_weights(a: Path, b: Path) -> None:
    """Bit-identical tensors (exact resume), not merely close ones."""
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    assert not [k for k in wa if not torch.equal(wa[k], wb[k])]


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
    # the start-up line names the backend and the processes
    assert proc.stdout.count("; DDP over 2 processes") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-3",
        "checkpoint-6",
        "final",
        # the marker that says whose folder this is, and the lock the run held (outdir.py)
        "gpt2-training-run.json",
        "gpt2-training-run.lock",
        "train_log.jsonl",
    ]
    ck = out / "checkpoint-6"
    assert {p.name for p in ck.glob("rank*")} == {
        f"rank{r}.{e}" for r in (0, 1) for e in ("json", "npz", "pt")
    }
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["fingerprint"]["world_size"] == 2 and state["step"] == STEPS


# train.py, then each rank's thread names (Linux: /proc) once `run` has returned
THREADS_AFTER_RUN = """
import glob, json, os, sys
from gpt2_training.cli import run

status = run()
names = []
for comm in glob.glob("/proc/self/task/*/comm"):
    with open(comm) as f:
        names.append(f.read().strip())
with open(sys.argv[sys.argv.index("--output_dir") + 1] + f"/threads-rank{os.environ['RANK']}.json", "w") as f:
    json.dump(names, f)
sys.exit(status)
"""


@pytest.mark.slow
def test_a_run_with_nothing_left_to_train_exits_0_on_every_rank(shards, ddp, tmp_path):
    """The same command again on a finished 2-process run: it resumes at its last step, trains nothing, evaluates
    and saves; every rank leaves its process group and exits 0 (torchrun reports any other status as a failure),
    and the log keeps one record per step. Leaving the group joins gloo's threads before the interpreter shuts
    down: left to shutdown (the finished engine's reference cycles kept DDP's reducer and with it the group
    alive), they aborted a successful run now and then with "terminate called without an active exception"
    (CI, stop 25)."""
    out = tmp_path / "again"
    shutil.copytree(ddp[0], out)
    script = tmp_path / "train_then_threads.py"
    script.write_text(THREADS_AFTER_RUN)
    proc = _run(torchrun_command(_common(shards, out), 2, script=script))
    assert f"resuming from {out / f'checkpoint-{STEPS}'} at step {STEPS}" in proc.stdout
    assert "terminate called" not in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, STEPS + 1))
    assert [r["event"] for r in records if r["step"] == STEPS].count("eval") == 1, records
    for rank in (0, 1):
        names = json.loads((out / f"threads-rank{rank}.json").read_text())
        assert "python" in names and not [n for n in names if "gloo" in n], (rank, names)


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
    from gpt2_training.data.opening import open_source
    from gpt2_training.data.pipeline import TokenStream

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


# -- DeepSpeed: config handling --------------------------------------------------------------------------------
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


# -- DeepSpeed ZeRO 1-3 on CPU (gloo), one launcher each ---------------------------------------------------------
def _torchrun(n: int, *args: str) -> list[str]:
    port = str(_free_port())
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_port",
        port,
        *args,
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero_command(stage: int, out: Path, shards: Path, **overrides) -> list[str]:
    """ZeRO-1 through the `deepspeed` launcher, ZeRO-2 through `accelerate launch` and the shipped DeepSpeed
    config, ZeRO-3 through torchrun: every launcher a user may pick, one run each."""
    args = [str(TRAIN_SCRIPT), *_common(shards, out, **overrides)]
    if stage == 1:
        runner = ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port())]
        return [sys.executable, *runner, *args, "--deepspeed", str(CONFIGS / "ds_zero1.json")]
    if stage == 2:
        accelerate = [
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / "accelerate_deepspeed.yaml"),
        ]
        return [
            sys.executable,
            *accelerate,
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            *args,
        ]
    return _torchrun(2, *args, "--deepspeed", str(CONFIGS / "ds_zero3.json"))


@pytest.fixture(scope="module")
def zero(shards) -> dict[int, Path]:
    runs = {}
    for stage in (1, 2, 3):
        runs[stage] = shards.parent / f"zero{stage}"
        _run(_zero_command(stage, runs[stage], shards), timeout=240)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_matches_ddp(zero, ddp, stage):
    out = zero[stage]
    np.testing.assert_allclose(_train_losses(out), _train_losses(ddp[0]), rtol=LOSS_RTOL)
    _assert_same_weights(ddp[0], out)
    # every process's optimizer partition is in the checkpoint and its manifest
    ck = out / "checkpoint-6"
    manifest = json.loads((ck / "manifest.json").read_text())["files"]
    parts = sorted(n for n in manifest if re.search(r"zero_pp_rank_\d+_mp_rank_00_optim_states\.pt$", n))
    assert parts == [f"deepspeed/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], parts
    assert ckpt.verify(ck) is None
    # the backend that ran, named in the model card as on the start-up line
    assert f"DeepSpeed ZeRO-{stage} over 2 processes" in (out / "final" / "README.md").read_text()


@pytest.mark.slow
def test_zero3_final_model_loads_with_pipeline(zero):
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(zero[3] / "final"))
    text = generate("The", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("The") and len(text) > len("The")


def _kill_after(cmd: list[str], out: Path, step: int) -> None:
    """Start a multi-process run and SIGKILL its whole process group once step `step` is logged."""
    proc = subprocess.Popen(
        cmd,
        env=_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: max(train_losses(out), default=0) >= step, 180, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_zero3_sigkill_then_resume_is_exact(shards, zero):
    out = shards.parent / "zero3-killed"
    cmd = _zero_command(3, out, shards)
    _kill_after(cmd, out, 4)
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-3"
    proc = _run(cmd, timeout=240)
    assert "resuming from" in proc.stdout
    assert train_losses(out) == train_losses(zero[3])
    assert_equal_weights(out / "final" / "model.safetensors", zero[3] / "final" / "model.safetensors")


NAN_DRIVER = """
import json, os, sys, torch
from conftest import state_tensors
from gpt2_training import backends, model

rank = int(os.environ["RANK"])
calls = {"n": 0}
forward = model.CausalLMWithLoss.forward


def poisoned(self, x):
    loss = forward(self, x)
    if self.lm.training:
        calls["n"] += 1
        # the third training forward of process 0 only: the all-reduce spreads the NaN to every process
        if calls["n"] == 3 and rank == 0:
            loss = loss * float("nan")
    return loss


skip = backends.DeepSpeedBackend.skip


def checked_skip(self):
    before = state_tensors(self.full_state_dict()) + state_tensors(self.model.optimizer.state_dict())
    skip(self)
    after = state_tensors(self.full_state_dict()) + state_tensors(self.model.optimizer.state_dict())
    same = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    with open(os.environ["SKIP_REPORT"] + f".{rank}", "a") as f:
        f.write(json.dumps({"tensors": len(before), "unchanged": same}) + "\\n")


model.CausalLMWithLoss.forward = poisoned
backends.DeepSpeedBackend.skip = checked_skip
sys.argv = ["train.py", *sys.argv[1:]]
from gpt2_training.cli import run

sys.exit(run())
"""


@pytest.mark.slow
def test_nonfinite_step_is_really_skipped_under_deepspeed(shards, tmp_path):
    """A NaN planted in process 0's third forward (ZeRO-2): the guard skips that step on both processes, and the
    weights and every optimizer tensor (ZeRO's fp32 partitions, Adam's moments) are bit-identical across it."""
    driver = tmp_path / "nan_driver.py"
    driver.write_text(NAN_DRIVER)
    out, report = tmp_path / "nan", tmp_path / "skip"
    args = _common(shards, out, max_steps=4, save_steps=0, deepspeed=CONFIGS / "ds_zero2.json")
    proc = subprocess.run(
        _torchrun(2, str(driver), *args),
        # tests/ on the path for conftest's state_tensors
        env={
            **_env(),
            "SKIP_REPORT": str(report),
            "PYTHONPATH": f"{ENV['PYTHONPATH']}{os.pathsep}{Path(__file__).parent}",
        },
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (0, 1):
        records = [json.loads(line) for line in Path(f"{report}.{r}").read_text().splitlines()]
        assert records and all(rec["unchanged"] and rec["tensors"] > 10 for rec in records), records
        assert len(records) == 1
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    bad = [r for r in log if r["event"] == "nonfinite"]
    assert len(bad) == 1 and bad[0]["loss"] == "nan" and bad[0]["step"] == 2
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resumes_on_another_process_count(shards, zero, tmp_path, stage):
    """ZeRO-2's and ZeRO-3's step-3 checkpoints (2 processes) continued on 1 process with twice the accumulation:
    converted to DeepSpeed's universal format on the fly, they follow the uninterrupted 2-process run (ZeRO-3
    only with the repair of DeepSpeed 0.19.8's universal load in backends/deepspeed.py: without it the losses part from
    step 5 on)."""
    out = tmp_path / f"zero{stage}-on-1"
    shutil.copytree(zero[stage] / "checkpoint-3", out / "checkpoint-3")
    args = _common(shards, out, deepspeed=CONFIGS / f"ds_zero{stage}.json", gradient_accumulation_steps=2)
    proc = _run(_torchrun(1, str(TRAIN_SCRIPT), *args), timeout=240)
    assert "resuming from" in proc.stdout and "x 1 processes" in proc.stdout
    got, ref = train_losses(out), train_losses(zero[stage])
    assert sorted(got) == [4, 5, 6]
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=LOSS_RTOL)
    _assert_same_weights(zero[stage], out)
    # the converted copy is gone; the checkpoint it came from is untouched
    assert not list(out.glob(".universal-*")) and ckpt.verify(out / "checkpoint-3") is None


@pytest.mark.slow
def test_a_checkpoint_of_another_backend_is_refused_with_a_fix_that_works(shards, zero, tmp_path):
    """ZeRO-3's checkpoint resumed without --deepspeed: refused before training; the suggestion, followed, starts a
    new run from its weights, which evaluate as they did at the end of the old run."""
    out = tmp_path / "zero3-as-ddp"
    shutil.copytree(zero[3] / "checkpoint-6", out / "checkpoint-6")
    args = _common(shards, out, gradient_accumulation_steps=2)
    proc = subprocess.run(
        _torchrun(1, str(TRAIN_SCRIPT), *args),
        env=_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "was written under deepspeed ZeRO-3, this run uses ddp" in err, err[-3000:]
    assert "--resume never --init_from" in err and "--output_dir <a new folder>" in err
    new = tmp_path / "from-weights"
    follow = [*args, "--resume", "never", "--init_from", str(out / "checkpoint-6"), "--output_dir", str(new)]
    _run(_torchrun(1, str(TRAIN_SCRIPT), *follow, "--max_steps", "1"), timeout=240)
    first = next(json.loads(line) for line in (new / "train_log.jsonl").read_text().splitlines())
    old = [json.loads(line) for line in (zero[3] / "train_log.jsonl").read_text().splitlines()]
    final_eval = [r for r in old if r["event"] == "eval"][-1]
    assert first["event"] == "eval" and first["step"] == 0 and final_eval["step"] == STEPS
    assert first["eval_loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-6)


# -- FSDP2 on CPU (gloo) and resume on another number of processes ------------------------------------------------
# A global batch of 12 sequences splits over 1, 2 and 3 processes: 2 x 6, 2 x 2 x 3, 2 x 2 x 2 (per device x
# accumulation x processes), so every resumed run sees the same 12 windows per step as the reference run.
SPLITS = {1: 6, 2: 3, 3: 2}


def _split(n: int) -> dict:
    return {"per_device_train_batch_size": 2, "gradient_accumulation_steps": SPLITS[n]}


def _backend_args(backend: str) -> list[str]:
    return ["--fsdp", "full_shard auto_wrap"] if backend == "fsdp" else []


def _resize_chain(shards: Path, backend: str) -> dict[str, Path]:
    """A 9-step reference on 2 processes (checkpoints at 3 and 6); then its step-3 checkpoint continued on 1
    process to step 6, that one's step-6 checkpoint on 2 processes to step 9, and the reference's step-6
    checkpoint on 3 processes to step 9."""
    root = shards.parent / f"resize-{backend}"
    runs = {name: root / name for name in ("ref", "2to1", "1to2", "2to3")}

    def train(name: str, n: int, steps: int, source: Path | None = None) -> None:
        if source is not None:
            shutil.copytree(source, runs[name] / source.name)
        args = _common(shards, runs[name], max_steps=steps, save_total_limit=3, **_split(n))
        _run(_torchrun(n, str(TRAIN_SCRIPT), *args, *_backend_args(backend)), timeout=240)

    train("ref", 2, 9)
    train("2to1", 1, 6, runs["ref"] / "checkpoint-3")
    train("1to2", 2, 9, runs["2to1"] / "checkpoint-6")
    train("2to3", 3, 9, runs["ref"] / "checkpoint-6")
    return runs


@pytest.fixture(scope="module")
def resize_ddp(shards) -> dict[str, Path]:
    return _resize_chain(shards, "ddp")


@pytest.fixture(scope="module")
def resize_fsdp(shards) -> dict[str, Path]:
    return _resize_chain(shards, "fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_resume_on_another_number_of_processes_continues_the_same_run(backend, request):
    """2 -> 1, 1 -> 2 and 2 -> 3 processes, under DDP and FSDP: the continued steps have the reference's losses
    (weights, optimizer state, schedule and step all carried over: a reset Adam state or a wrong learning rate
    would move the loss by far more than the tolerance) and the same final weights."""
    runs = request.getfixturevalue(f"resize_{backend}")
    ref = train_losses(runs["ref"])
    assert sorted(ref) == list(range(1, 10))
    for name, steps in (("2to1", range(4, 7)), ("1to2", range(7, 10)), ("2to3", range(7, 10))):
        got = train_losses(runs[name])
        assert sorted(got) == list(steps), (backend, name)
        np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps], rtol=LOSS_RTOL)
        state = json.loads((runs[name] / f"checkpoint-{max(steps)}" / "trainer_state.json").read_text())
        assert state["step"] == max(steps)
        assert state["fingerprint"]["world_size"] == {"2to1": 1, "1to2": 2, "2to3": 3}[name]
    _assert_same_weights(runs["ref"], runs["1to2"])
    _assert_same_weights(runs["ref"], runs["2to3"])


@pytest.mark.slow
def test_fsdp_matches_ddp_and_saves_a_loadable_model(resize_ddp, resize_fsdp):
    runs, ddp_ref = resize_fsdp, resize_ddp["ref"]
    np.testing.assert_allclose(_train_losses(runs["ref"]), _train_losses(ddp_ref), rtol=LOSS_RTOL)
    _assert_same_weights(ddp_ref, runs["ref"])
    ck = runs["ref"] / "checkpoint-9"
    names = json.loads((ck / "manifest.json").read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(names)
    card = (runs["ref"] / "final" / "README.md").read_text()
    assert "FSDP2 (full_shard: weights, gradients and optimizer state sharded over 2 processes)" in card
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(runs["ref"] / "final"))
    assert generate("The", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("The")


@pytest.mark.slow
def test_fsdp_sigkill_then_resume_is_exact(shards, resize_fsdp):
    """Killed under torchrun --fsdp, resumed under `accelerate launch` and accelerate_fsdp.yaml: the same run."""
    runs = resize_fsdp
    out = shards.parent / "fsdp-killed"
    args = _common(shards, out, max_steps=9, save_total_limit=3, **_split(2))
    _kill_after(_torchrun(2, str(TRAIN_SCRIPT), *args, *_backend_args("fsdp")), out, 4)
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-3"
    # resumed through the other way to ask for FSDP: `accelerate launch` with the shipped FSDP config file
    accelerate = ["-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate_fsdp.yaml")]
    port = str(_free_port())
    cmd = [
        sys.executable,
        *accelerate,
        "--num_processes",
        "2",
        "--main_process_port",
        port,
        str(TRAIN_SCRIPT),
    ]
    proc = _run(cmd + args, timeout=240)
    assert "resuming from" in proc.stdout
    assert train_losses(out) == train_losses(runs["ref"])
    assert_equal_weights(out / "final" / "model.safetensors", runs["ref"] / "final" / "model.safetensors")


# -- two nodes ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_node_rendezvous_on_localhost_trains_and_checkpoints(shards, ddp):
    """The form SETUP.md and train.sbatch use: one torchrun per node, c10d rendezvous on the first node."""
    out = shards.parent / "two-nodes"
    port = str(_free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "two-node-test",
                str(TRAIN_SCRIPT),
                *_common(shards, out),
            ],
            env=_env(),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "x 2 processes" in outputs[0] + outputs[1]
    np.testing.assert_allclose(_train_losses(out), _train_losses(ddp[0]), rtol=LOSS_RTOL)
    ck = out / "checkpoint-6"
    assert ckpt.verify(ck) is None and {f"rank{r}.json" for r in (0, 1)} <= {p.name for p in ck.iterdir()}
