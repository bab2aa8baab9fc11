"""Reliability properties of a training run, each proved on a CPU in seconds with tiny settings.

Where a property is about processes (kills, signals, exit statuses, file-size limits) the test runs
`train.py` as a real subprocess and uses real signals; the rest call the engine in-process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_log, run_train, start_train, tiny_args, train_losses, wait_for
from safetensors.torch import load_file

from gpt2_training import checkpoint as ckpt


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def _kill_at_random_step(args: list[str], env: dict, out: Path, first: int, last: int) -> int:
    """Start a run, SIGKILL it once its log reaches a random step in [first, last]; returns that step."""
    step = random.randint(first, last)
    with open(out.parent / f"{out.name}.stdout", "w") as log:
        proc = start_train(args, env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: max(train_losses(out), default=0) >= step, 90, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return step


# -- 3. bit-exact resume ---------------------------------------------------------------------------------------
def _bit_exact(tmp_path: Path, env: dict, **data) -> None:
    settings = dict(max_steps=10, save_steps=2, dropout=0.1, save_total_limit=2, **data)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = start_train(tiny_args(straight, **settings), env)  # runs alongside the killed run: 2 CPUs
    kill_step = _kill_at_random_step(tiny_args(killed, **settings), env, killed, 3, 8)
    assert ckpt.latest_checkpoint(killed) is not None
    resumed = run_train(tiny_args(killed, **settings), env)
    assert resumed.returncode == 0, resumed.stdout
    assert "resuming from" in resumed.stdout
    ref_out, _ = ref.communicate(timeout=120)
    assert ref.returncode == 0, ref_out
    msg = f"killed at step {kill_step}"
    assert train_losses(killed) == train_losses(straight), msg
    assert sorted(train_losses(straight)) == list(range(1, 11))
    _assert_same_weights(straight / "final" / "model.safetensors", killed / "final" / "model.safetensors")


def test_bit_exact_resume_streaming(tmp_path, env):
    """kill -9 at a random step, then resume: with dropout and a shuffled token stream, the training losses of
    every step and the final weights equal those of an uninterrupted run bit for bit (model, optimizer,
    scheduler, RNG states and data position are all restored)."""
    _bit_exact(tmp_path, env, shuffle_buffer=64)


def test_bit_exact_resume_shards(tmp_path, env):
    """Same as the streaming case for the pre-tokenized path (`train.py prepare`, then `--shards_dir`)."""
    shards = tmp_path / "shards"
    prep = run_train(
        ["prepare", "--dataset", "builtin", "--tokenizer_vocab_size", "1024", "--out", str(shards)], env
    )
    assert prep.returncode == 0, prep.stdout
    _bit_exact(tmp_path, env, shards_dir=str(shards), tokenizer=str(shards / "tokenizer"))


# -- 1 and 2. atomic checkpoints and rotation ------------------------------------------------------------------
def _fake_state(step: int) -> dict:
    """Files shaped like a real checkpoint's (a torch pickle, arrays, JSON); their content encodes `step`."""
    return {"weights": torch.full((300_000,), float(step)), "step": step}


def _save_forever(out: Path, start: int) -> None:
    """Worker: save checkpoints with save_total_limit=1 as fast as it can; every third save rewrites the same
    step (the replace-in-place path). Runs in a forked child until it is killed."""
    import numpy as np

    step = start
    while True:

        def write(tmp: Path, step=step) -> None:
            ckpt.torch_save(_fake_state(step), tmp / "optimizer.pt")
            ckpt.save_arrays({"a": np.full(100_000, step)}, tmp / "rank0.npz")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))

        ckpt.save_checkpoint(out, step, write, save_total_limit=1)
        step += 0 if random.random() < 1 / 3 else 1


def _kill_loop(out: Path, kills: int, seed: int) -> None:
    """Driver, run in a fresh single-threaded interpreter (forking pytest, whose earlier tests started thread
    pools, can deadlock the child): fork a saving worker, SIGKILL it at a random moment, check what a restart
    would find, repeat."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    out.mkdir()
    step = 1
    for kill in range(kills):
        pid = os.fork()
        if pid == 0:  # child: saves until killed, never returns into the driver
            try:
                random.seed(seed + kill)
                _save_forever(out, step)
            finally:
                os._exit(1)
        if kill == 0:  # the property is about a run that has a checkpoint: let the first one complete
            wait_for(lambda: ckpt.list_checkpoints(out), 30)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        ckpt.cleanup_partial(out)  # what a restart does first
        latest = ckpt.latest_checkpoint(out)
        assert latest is not None, (
            f"no loadable checkpoint after kill {kill} (seed {seed}): {os.listdir(out)}"
        )
        assert ckpt.verify(latest) is None
        n = int(latest.name.split("-")[1])
        assert torch.equal(ckpt.torch_load(latest / "optimizer.pt")["weights"], _fake_state(n)["weights"])
        assert json.loads((latest / "trainer_state.json").read_text())["step"] == n
        assert not [p for p in os.listdir(out) if p.startswith(".")], os.listdir(out)
        step = n + 1
    print(f"{kills} kills, last checkpoint {latest.name}")


def test_sigkill_during_saves_and_rotation_always_leaves_a_loadable_checkpoint(tmp_path, env):
    """Atomic saves and safe rotation: a process saving checkpoints back to back with save_total_limit=1 is
    SIGKILLed at 40 random moments (mostly inside a save or a rotation). After every kill, the restart's clean-up
    leaves a checkpoint that verifies, whose content is the step its name says, and no temporary folder."""
    seed = random.randrange(1 << 30)
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
        f"from test_reliability import _kill_loop; _kill_loop(Path({str(tmp_path / 'run')!r}), 40, {seed})"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "40 kills" in proc.stdout


def test_interrupted_same_step_replace_is_rolled_forward(tmp_path):
    """With save_total_limit=1, dying after the old copy of a step was removed but before the new one was renamed
    into place leaves only a complete temporary folder: the restart must keep it, not delete the run's only
    checkpoint."""
    out = tmp_path / "run"
    ckpt.save_checkpoint(out, 4, lambda tmp: ckpt.torch_save(_fake_state(4), tmp / "optimizer.pt"), 1)
    os.replace(out / "checkpoint-4", out / ".checkpoint-4.tmp")  # the state between _remove and os.replace
    (out / ".deleting-checkpoint-4").mkdir()
    ckpt.cleanup_partial(out)
    assert sorted(os.listdir(out)) == ["checkpoint-4"]
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-4"


def test_resume_skips_partial_and_damaged_checkpoints(tmp_path, env):
    """A restart finds a leftover `.checkpoint-N.tmp` (half written: truncated file, no manifest) and a newest
    checkpoint whose file was truncated after the fact: it removes the first, skips the second with a warning
    and resumes from the newest complete checkpoint."""
    out = tmp_path / "run"
    first = run_train(tiny_args(out, max_steps=4, save_steps=2, save_total_limit=3), env)
    assert first.returncode == 0, first.stdout
    partial = out / ".checkpoint-6.tmp"
    partial.mkdir()
    data = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(data[: len(data) // 2])
    with open(out / "checkpoint-4" / "optimizer.pt", "r+b") as f:
        f.truncate(1000)
    resumed = run_train(tiny_args(out, max_steps=6, save_steps=2, save_total_limit=3), env)
    assert resumed.returncode == 0, resumed.stdout
    assert "skipping damaged checkpoint" in resumed.stdout and "checkpoint-4" in resumed.stdout
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in resumed.stdout
    assert not partial.exists()
    assert ckpt.verify(out / "checkpoint-6") is None


# -- 6. SIGTERM / SIGINT ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("signum", "code", "settings"),
    [
        (signal.SIGTERM, 143, {}),
        # evaluation after every step takes most of the time, so the signal usually lands inside one
        (signal.SIGINT, 130, {"eval_steps": 1, "eval_max_sequences": 64, "per_device_eval_batch_size": 1}),
    ],
    ids=["SIGTERM", "SIGINT-during-eval"],
)
def test_signal_saves_a_checkpoint_and_exits_with_128_plus_signal(tmp_path, env, signum, code, settings):
    """A real SIGTERM/SIGINT sent to a training `train.py` makes it save a complete checkpoint of the step it
    reached within seconds and exit with 128 + signal number; running the same command again resumes from it."""
    out = tmp_path / "run"
    args = tiny_args(out, max_steps=100_000, save_steps=100_000, **settings)
    with open(tmp_path / "stdout", "w") as log:
        proc = start_train(args, env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: max(train_losses(out), default=0) >= 2, 90, proc)
        time.sleep(random.uniform(0, 0.3))
        sent = time.monotonic()
        proc.send_signal(signum)
        rc = proc.wait(timeout=30)
    took = time.monotonic() - sent
    output = (tmp_path / "stdout").read_text()
    assert rc == code, output
    assert took < 10, f"took {took:.1f}s to save and exit"
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and ckpt.verify(latest) is None
    step = int(latest.name.split("-")[1])
    assert step == max(train_losses(out)), "the checkpoint holds the last completed step"
    assert f"received signal {int(signum)}: saved {latest}" in output
    assert not (out / "final").exists()
    from gpt2_training.cli import main

    result = main(tiny_args(out, max_steps=step + 1, save_steps=100_000, **settings))
    assert result.resumed_from == str(latest) and result.step == step + 1 and result.exit_code == 0


# -- 7. non-finite loss guard ----------------------------------------------------------------------------------
def _fault_training_forwards(monkeypatch, fault) -> dict:
    """Patch the wrapped model's forward so that training forward number n (from 1) returns fault(n, loss);
    evaluation runs through the same module and is left alone. Returns the counter (reset it with ["n"] = 0)."""
    from gpt2_training.model import CausalLMWithLoss

    calls = {"n": 0}
    real_forward = CausalLMWithLoss.forward

    def forward(self, input_ids):
        loss = real_forward(self, input_ids)
        if not self.lm.training:
            return loss
        calls["n"] += 1
        return fault(calls["n"], loss)

    monkeypatch.setattr(CausalLMWithLoss, "forward", forward)
    return calls


def test_nonfinite_steps_are_skipped_counted_logged_and_stop_the_run(tmp_path, env, monkeypatch, capsys):
    """A NaN loss (and so NaN gradients) is caught before the optimizer step: the step is skipped and counted,
    the log shows "nan" (not a masked number), the weights stay finite, the scheduler has stepped exactly as
    often as the optimizer, and after --max_bad_steps bad steps in a row training stops with TrainingStopped
    (exit status 3 from the CLI) and a message saying what to change."""
    from gpt2_training.cli import parse_config, run
    from gpt2_training.errors import TrainingStopped
    from gpt2_training.trainer import Engine

    bad = {3, 4} | set(range(7, 100))  # forward calls (= steps here) 3-4: NaN, then good, then NaN for good
    calls = _fault_training_forwards(monkeypatch, lambda n, loss: loss * float("nan") if n in bad else loss)
    out = tmp_path / "run"
    engine = Engine(parse_config(tiny_args(out, "--max_bad_steps", "3", max_steps=20, save_steps=100)))
    with pytest.raises(TrainingStopped, match="3 steps in a row had a non-finite loss"):
        engine.train()
    assert engine.state.step == 4  # calls 1, 2, 5, 6 were good
    assert engine.state.skipped_steps == 2 + 3
    assert engine.scheduler.last_epoch == engine.state.step
    adam_steps = {int(s["step"]) for s in engine.optimizer.state_dict()["state"].values()}
    assert adam_steps == {engine.state.step}
    assert all(torch.isfinite(p).all() for p in engine.lm.parameters())
    bad_records = [r for r in read_log(out) if r["event"] == "nonfinite"]
    assert [r["loss"] for r in bad_records] == ["nan"] * 5
    assert [r["in_a_row"] for r in bad_records] == [1, 2, 1, 2, 3]
    assert not (out / "final").exists()

    calls["n"] = 0
    assert run(tiny_args(tmp_path / "cli", "--max_bad_steps", "3", max_steps=20, save_steps=100)) == 3
    assert "steps in a row had a non-finite loss" in capsys.readouterr().err


# -- 8. resume compatibility -----------------------------------------------------------------------------------
def test_resume_refuses_changed_shape_tokenizer_length_or_batch(tmp_path, env, capsys):
    """Resuming with a different model shape, tokenizer, sequence length or effective batch is refused (exit 2)
    with a message naming the setting and both values; --allow_resume_changes permits only the safe changes
    (batch size and accumulation)."""
    from gpt2_training.cli import main, run

    out = tmp_path / "run"
    assert main(tiny_args(out, max_steps=2)).step == 2
    changes = {
        "model_shape": {"n_embd": 32},
        "tokenizer_hash": {"tokenizer_vocab_size": 512},
        "block_size": {"block_size": 48},
        "per_device_train_batch_size": {"per_device_train_batch_size": 2},
        "gradient_accumulation_steps": {"gradient_accumulation_steps": 2},
    }
    for key, change in changes.items():
        assert run(tiny_args(out, max_steps=4, **change)) == 2, key
        err = capsys.readouterr().err
        assert f"cannot resume: {key}: checkpoint has" in err, err
        assert err.count("error:") >= 2  # the difference and the fix, one line each
    for key in ("model_shape", "block_size", "tokenizer_hash"):
        assert run(tiny_args(out, "--allow_resume_changes", "true", max_steps=4, **changes[key])) == 2, key
        assert "cannot resume" in capsys.readouterr().err
    assert ckpt.list_checkpoints(out) == [out / "checkpoint-2"]
    result = main(
        tiny_args(
            out,
            "--allow_resume_changes",
            "true",
            max_steps=4,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
        )
    )
    assert result.resumed_from == str(out / "checkpoint-2") and result.step == 4


# -- 9 and bad input: validation up front ----------------------------------------------------------------------
def test_all_configuration_errors_are_reported_at_once_before_any_work(tmp_path, env, monkeypatch, capsys):
    """Several bad settings at once: every problem is listed (one line each, exit status 2) before any
    tokenizer, download or model build, and no output_dir is created."""
    import gpt2_training.parts as parts
    from gpt2_training.cli import run

    def forbidden(*a, **k):
        raise AssertionError("work started before the settings were validated")

    monkeypatch.setattr(parts, "build_for_training", forbidden)
    monkeypatch.setattr(parts, "RunData", forbidden)
    out = tmp_path / "run"
    rc = run(
        tiny_args(
            out,
            preset="huge",
            n_embd=65,
            n_head=2,
            block_size=512,
            gradient_accumulation_steps=0,
            precision="fp16",
            dataset=str(tmp_path / "missing.jsonl"),
        )
    )
    err = capsys.readouterr().err
    assert rc == 2
    for problem in (
        "unknown preset 'huge'",
        "n_embd=65 is not divisible by n_head=2",
        "block_size=512 exceeds",
        "gradient_accumulation_steps must be >= 1",
        "precision=fp16 needs a CUDA GPU",
        "missing.jsonl' does not exist",
    ):
        assert problem in err, (problem, err)
    assert all(line.startswith("error: ") for line in err.strip().splitlines())
    assert not out.exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"preset": "huge"}, "unknown preset"),
        ({"n_embd": 65}, "not divisible by n_head"),
        ({"block_size": 300}, "exceeds n_positions"),
        ({"dataset": "/nonexistent/data.jsonl"}, "does not exist"),
        ({"dataset": "TINY"}, "one sequence needs block_size"),
        ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size must be >= 1"),
        ({"eval_max_sequences": 0}, "eval_max_sequences must be >= 1"),
        ({"seed": -5}, "seed must be >= 0"),
        ({"data_seed": -1}, "data_seed must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"n_head": 0}, "n_head=0: n_layer, n_head, n_embd and n_positions must each be >= 1"),
        ({"n_layer": 0}, "n_layer=0: n_layer, n_head, n_embd and n_positions must each be >= 1"),
        ({"adam_beta1": 1.5}, "adam_beta1=1.5 must be in [0, 1)"),
        ({"adam_epsilon": -1}, "adam_epsilon must be >= 0"),
        ({"eval_steps": -1}, "eval_steps must be >= 0"),
        ({"shuffle_buffer": -1}, "shuffle_buffer must be >= 0"),
        ({"output_dir": "FILE"}, "is a file, not a folder: choose another --output_dir"),
        ({"config": "BROKEN_YAML"}, "is not valid YAML at line 2, column 1: expected ',' or ']'"),
    ],
    ids=[
        "unknown-preset",
        "n_embd",
        "block_size",
        "missing-path",
        "corpus-too-small",
        "eval-batch-0",
        "eval-sequences-0",
        "negative-seed",
        "negative-data-seed",
        "negative-weight-decay",
        "no-heads",
        "no-blocks",
        "adam-beta",
        "adam-epsilon",
        "negative-eval-steps",
        "negative-shuffle-buffer",
        "output-dir-is-a-file",
        "broken-yaml",
    ],
)
def test_bad_input_is_a_one_line_error_with_status_2(tmp_path, env, shared_cache, capsys, settings, message):
    """Bad input ends with one-line errors and exit status 2, and leaves nothing that looks like a finished
    model (no final/)."""
    from gpt2_training.cli import run

    if settings.get("dataset") == "TINY":
        tiny = tmp_path / "tiny.jsonl"
        tiny.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
        settings = {"dataset": str(tiny), "tokenizer": str(_cached_tokenizer(shared_cache))}
    out = tmp_path / "run"
    if settings.get("output_dir") == "FILE":
        out = tmp_path / "a-file"
        out.write_text("not a folder")
        settings = {}
    if settings.get("config") == "BROKEN_YAML":
        (tmp_path / "broken.yaml").write_text("preset: [tiny\n")
        settings = {"config": str(tmp_path / "broken.yaml")}
    assert run(tiny_args(out, **settings)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert all(line.startswith("error: ") for line in err.strip().splitlines()), err
    assert not (out / "final").exists()


def _cached_tokenizer(cache: Path) -> Path:
    return next((cache / "tokenizers").glob("bpe-1024-*"))


# -- 11. no arbitrary unpickling -------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_pickle_in_a_checkpoint_is_refused_without_running_code(tmp_path, env, capsys):
    """A checkpoint whose optimizer.pt is a pickle that would run code when loaded (checksums updated so the
    manifest still matches) is refused with a CheckpointError (exit 2), and the code never runs."""
    import hashlib
    import pickle

    from gpt2_training.cli import main, run

    live = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload is real: plain unpickling runs it
    assert live.exists()

    out = tmp_path / "run"
    main(tiny_args(out, max_steps=2))
    target = out / "checkpoint-2"
    marker = tmp_path / "pwned"
    data = pickle.dumps(_Payload(marker))
    (target / "optimizer.pt").write_bytes(data)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (target / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.verify(target) is None

    assert run(tiny_args(out, max_steps=4)) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "optimizer.pt" in err, err
    assert not marker.exists()


# -- 10. disk full during a save -------------------------------------------------------------------------------
def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, env):
    """A real write failure (RLIMIT_FSIZE with SIGXFSZ ignored: writes past the limit fail with EFBIG, as on a
    full disk) during a checkpoint save: the run stops with exit status 2 and a message saying the disk is full,
    the previous checkpoint still verifies, and no partial checkpoint is left behind."""
    import resource

    from gpt2_training.cli import main

    out = tmp_path / "run"
    main(tiny_args(out, max_steps=2))
    sizes = {p.name: p.stat().st_size for p in (out / "checkpoint-2").iterdir()}
    biggest_other = max(v for k, v in sizes.items() if k != "optimizer.pt")
    assert biggest_other < sizes["optimizer.pt"] / 1.2
    limit = (biggest_other + sizes["optimizer.pt"]) // 2  # room for everything but the optimizer state

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    proc = run_train(tiny_args(out, max_steps=4), env, preexec_fn=small_disk)
    assert proc.returncode == 2, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "the disk is full" in errors[0]
    assert "checkpoint-2 is intact" in errors[0]
    assert ckpt.list_checkpoints(out) == [out / "checkpoint-2"]
    assert ckpt.verify(out / "checkpoint-2") is None
    assert not [p for p in os.listdir(out) if p.startswith(".")]
    assert json.loads((out / "final" / "training_metrics.json").read_text())["step"] == 2  # the first run's


def test_disk_full_while_writing_the_final_model_cleans_up_and_names_the_checkpoint(tmp_path, env):
    """The final model written on a full disk was a traceback that left .final.tmp filling the disk. Now: one
    line naming the checkpoint, no temporary folder, and the same command, with space again, writes the model."""
    import resource

    from gpt2_training.cli import main

    out = tmp_path / "run"
    main(tiny_args(out, max_steps=2))
    model_size = (out / "final" / "model.safetensors").stat().st_size
    assert max(p.stat().st_size for p in (out / "final").iterdir()) == model_size
    shutil.rmtree(out / "final")

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (model_size // 2, resource.RLIM_INFINITY))

    # resumes at its last step (nothing left to train, nothing to save) and fails writing final/
    proc = run_train(tiny_args(out, max_steps=2), env, preexec_fn=small_disk)
    assert proc.returncode == 2, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write the final model" in errors[0], proc.stdout
    assert "the disk is full" in errors[0] and f"checkpoint {out / 'checkpoint-2'} holds step 2" in errors[0]
    assert not (out / ".final.tmp").exists() and not (out / "final").exists()
    main(tiny_args(out, max_steps=2))
    assert json.loads((out / "final" / "training_metrics.json").read_text())["step"] == 2


# -- 12. no secrets in any output ------------------------------------------------------------------------------
def test_no_secret_reaches_any_file_the_run_writes(tmp_path, env, capsys):
    """With HF_TOKEN and WANDB_API_KEY set to sentinel values, a run reporting to W&B (offline) and TensorBoard
    writes neither value into any file (logs, settings, W&B and TensorBoard files, checkpoints, model card) nor
    its output; a token given as a command-line flag is refused."""
    from gpt2_training.cli import run

    secrets = {"HF_TOKEN": "hf_SENTINELtokenVALUE1234", "WANDB_API_KEY": "SENTINELwandbKEY0123456789abcdef"}
    out = tmp_path / "run"
    proc = run_train(tiny_args(out, max_steps=2, report_to=["wandb", "tensorboard"]), {**env, **secrets})
    assert proc.returncode == 0, proc.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any("tensorboard" in p.parts for p in files)
    for value in secrets.values():
        assert value not in proc.stdout
        leaks = [p for p in files if value.encode() in p.read_bytes()]
        assert not leaks, leaks

    for flag in ("--hub_token", "--hub_token=x"):
        argv = tiny_args(tmp_path / "refused", flag, *(["x"] if "=" not in flag else []))
        assert run(argv) == 2
        assert "tokens are never accepted as arguments" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


# -- 13. offline with nothing cached ---------------------------------------------------------------------------
_OFFLINE_PROBE = r"""
import json, sys, time, io, contextlib
from gpt2_training.cli import run
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err):
        rc = run(argv)
    results.append({"rc": rc, "seconds": time.monotonic() - t0, "stderr": err.getvalue()})
print("RESULTS" + json.dumps(results))
"""


def test_remote_names_fail_fast_offline_with_a_clear_fix(tmp_path, env, shared_cache):
    """Offline (HF_HUB_OFFLINE=1) with an empty Hugging Face cache, every remote name (model --init_from gpt2,
    --tokenizer gpt2, dataset openwebtext and hf:...) fails in well under 15 s with exit status 2 and a message
    that names the way out. One real subprocess runs all four so the import cost is paid once."""
    tok = str(_cached_tokenizer(shared_cache))
    cases = {
        "init_from": (tiny_args(tmp_path / "a", init_from="gpt2", tokenizer=tok), ["gpt2"]),
        "tokenizer": (tiny_args(tmp_path / "b", tokenizer="gpt2"), ["--tokenizer train"]),
        "openwebtext": (tiny_args(tmp_path / "c", dataset="openwebtext", tokenizer=tok), ["openwebtext"]),
        "hf": (
            tiny_args(tmp_path / "d", dataset="hf:nobody/no-such-data", tokenizer=tok),
            ["nobody/no-such-data"],
        ),
    }
    sub = {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE_PROBE, json.dumps([a for a, _ in cases.values()])],
        env=sub,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    for (name, (_, words)), r in zip(cases.items(), results, strict=True):
        assert r["rc"] == 2, (name, r)
        assert r["seconds"] < 15, (name, r)
        lines = r["stderr"].strip().splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), (name, r)
        assert all(w in r["stderr"] for w in words), (name, r)
        assert "offline" in r["stderr"].lower() or "network" in r["stderr"].lower(), (name, r)
    for d in "abcd":
        assert not (tmp_path / d / "final").exists()


# -- 4 and 5. resuming the data stream -------------------------------------------------------------------------
_WORDS = "the model reads text and learns which token follows which one in long streams of data".split()


def _write_corpus(path: Path, docs: int, seed: int = 0) -> Path:
    """A jsonl file of `docs` documents of ~400 characters each (deterministic)."""
    rng = random.Random(seed)
    lines = [
        json.dumps({"text": " ".join(rng.choice(_WORDS) for _ in range(80)) + f" #{i}"}) for i in range(docs)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class _CountingSource:
    """Wraps a DocumentSource and counts the pieces it yields, i.e. how much data a stream reads."""

    def __init__(self, source):
        self.source, self.description, self.stats, self.read = source, source.description, source.stats, 0

    def pieces(self, epoch=0, position=None):
        for piece in self.source.pieces(epoch, position):
            self.read += 1
            yield piece


def test_resume_cost_does_not_grow_with_the_data_already_consumed(tmp_path, env, shared_cache):
    """Restoring a TokenStream and producing the first batch reads the same amount of source data (and takes
    about the same time) whether the state was saved after 5 sequences or after most of a 2 MB file: the
    stream seeks to its saved position instead of replaying what was consumed."""
    from gpt2_training.data import load_tokenizer
    from gpt2_training.data.opening import open_source
    from gpt2_training.data.pipeline import TokenStream

    corpus = _write_corpus(tmp_path / "data.jsonl", 5000)
    tokenizer = load_tokenizer(str(_cached_tokenizer(shared_cache)))

    def stream():
        src = _CountingSource(open_source(str(corpus), shuffle=False))
        return src, TokenStream(src, tokenizer, 32, shuffle_buffer=64, seed=1)

    def state_after(n: int):
        _, s = stream()
        for _ in range(n):
            next(s)
        return s.state_dict()

    early = state_after(5)
    late = state_after(40_000)
    assert late[0]["cursor"]["position"][1] > 1_000_000  # deep into the file (byte offset)

    def restore_cost(state) -> tuple[int, float, list]:
        src, s = stream()
        t0 = time.perf_counter()
        s.load_state_dict(*state)
        batch = [next(s) for _ in range(8)]
        return src.read, time.perf_counter() - t0, batch

    early_reads, early_s, _ = restore_cost(early)
    late_reads, late_s, late_batch = restore_cost(late)
    assert late_reads <= early_reads + 10, (early_reads, late_reads)
    assert late_s < 5 * early_s + 0.5, (early_s, late_s)

    _, uninterrupted = stream()  # and the restored stream continues exactly where the original was
    for _ in range(40_000):
        next(uninterrupted)
    assert all(
        (a == b).all() for a, b in zip(late_batch, [next(uninterrupted) for _ in range(8)], strict=True)
    )


def test_data_that_runs_out_on_resume_is_an_error_not_a_finished_run(tmp_path, env, shared_cache):
    """If the data holds less than when the checkpoint was written (a jsonl file truncated after it), the
    resumed run stops with a DataError naming the problem and exit status 2; it never reports a finished
    training (no final/ model). The resume passes --allow_resume_changes: without it the content check refuses
    the changed file before reading (tests/data/test_fingerprint.py)."""
    from gpt2_training.cli import main

    corpus = _write_corpus(tmp_path / "data.jsonl", 1500)  # ~600 K characters: read in more than one batch
    settings = dict(
        dataset=str(corpus),
        tokenizer=str(_cached_tokenizer(shared_cache)),
        block_size=64,
        per_device_train_batch_size=16,
        shuffle_buffer=0,
        save_final_model="false",
    )
    out = tmp_path / "run"
    main(tiny_args(out, max_steps=2, **settings))
    saved = json.loads((out / "checkpoint-2" / "rank0.json").read_text())["data"]["cursor"]
    assert saved["more_expected"] and saved["position"][1] > 0
    lines = corpus.read_text().splitlines(keepends=True)
    # far less than the position the checkpoint recorded, still enough documents for the same held-out rule
    corpus.write_text("".join(lines[:250]))

    proc = run_train(tiny_args(out, "--allow_resume_changes", "true", max_steps=400, **settings), env)
    assert proc.returncode == 2, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the data stream ran out while resuming" in errors[0], errors
    assert "--resume never" in errors[0]
    assert not (out / "final").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs a CUDA GPU")
def test_fp16_overflow_skips_keep_step_and_schedule_consistent(tmp_path, env, monkeypatch):
    """Under fp16 an inf gradient with a finite loss is the loss scaler's business: the optimizer step is skipped,
    counted and logged, the scale is lowered, and neither the step counter nor the schedule advances."""
    from gpt2_training.cli import parse_config
    from gpt2_training.trainer import Engine

    # overflows fp16 gradients, the loss stays a finite fp32
    _fault_training_forwards(monkeypatch, lambda n, loss: loss * 1e30 if n in (2, 3) else loss)
    out = tmp_path / "run"
    engine = Engine(parse_config(tiny_args(out, precision="fp16", max_steps=5, save_steps=100)))
    engine.train()
    assert engine.state.step == 5 and engine.state.skipped_steps == 2
    assert engine.scheduler.last_epoch == engine.state.step
    assert [r["event"] for r in read_log(out)].count("fp16_overflow") == 2
    assert all(torch.isfinite(p).all() for p in engine.lm.parameters())
