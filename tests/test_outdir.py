"""The output folder (outdir.py and the engine's use of it): folders a run must never use, only the tool's own files
replaced, resume that never silently starts over, one run per folder, one log record per step."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, read_log, run_train, start_train, tiny_args, wait_for

from gpt2_training import checkpoint as ckpt
from gpt2_training import outdir
from gpt2_training.errors import CheckpointError, ConfigError


def _user_files(folder: Path) -> dict[str, bytes]:
    """Files a user keeps in `folder` (the tool never wrote them)."""
    (folder / "sub").mkdir(parents=True)
    files = {"precious.txt": b"do not delete\n", "sub/notes.md": b"# notes\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("error:")]


def _train(argv: list[str], capsys) -> subprocess.CompletedProcess:
    """`train.py ARGV` in this process (seconds faster than a subprocess), its output merged as `stdout`."""
    from gpt2_training.cli import run

    code = run(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out + captured.err, None)


# -- folders a run must never use ----------------------------------------------------------------------------------
def test_root_home_cwd_parents_and_repository_are_refused(tmp_path, monkeypatch):
    """Checked on the guard itself: nothing is ever run against these folders."""
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for folder, why in [
        ("/", "root of the file system"),
        (str(Path.home()), "home folder"),
        (".", "current folder"),
        (str(tmp_path / "work"), "current folder or one of its parents"),
        (str(ROOT), "git checkout"),
    ]:
        with pytest.raises(ConfigError, match=why):
            outdir.refuse_unsafe(folder, "--output_dir")
    # a new folder below the current one is fine
    outdir.refuse_unsafe(work / "runs" / "a", "--output_dir")


def test_a_folder_holding_the_data_tokenizer_or_weights_is_refused(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("text\n")
    for protected in [
        {"dataset": str(data)},
        {"dataset": f"{data}/**/*.txt"},
        {"dataset": f"hf-json:{data}"},
        {"tokenizer": str(data)},
        {"initial weights": str(data)},
    ]:
        for folder in (data, tmp_path):
            with pytest.raises(ConfigError, match=f"holds the {next(iter(protected))}"):
                outdir.refuse_unsafe(folder, "--output_dir", protected)
    outdir.refuse_unsafe(tmp_path / "run", "--output_dir", {"dataset": str(data)})


def test_a_folder_inside_the_dataset_folder_is_refused(tmp_path, env, capsys):
    """A folder dataset is searched recursively: a run inside it would read its own files as documents (its
    marker file was refused as a record without a text field)."""
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("Some text for training.\n" * 50)
    for dataset in (str(data), f"{data}/**/*.txt"):
        with pytest.raises(ConfigError, match="inside the dataset folder") as err:
            outdir.refuse_unsafe(data / "run", "--output_dir", {"dataset": dataset})
        suggested = re.search(r"e\.g\. --output_dir (\S+)", str(err.value)).group(1)
        outdir.refuse_unsafe(suggested, "--output_dir", {"dataset": dataset})
    proc = _train(tiny_args(data / "run", dataset=str(data)), capsys)
    assert proc.returncode == 2 and len(_error_lines(proc)) == 1, proc.stdout
    assert "inside the dataset folder" in proc.stdout
    assert sorted(p.name for p in data.iterdir()) == ["a.txt"]


def test_dataset_folder_as_output_dir_is_refused_and_kept(tmp_path, env, capsys):
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("Some text for training.\n" * 50)
    proc = _train(tiny_args(data, dataset=str(data)), capsys)
    assert proc.returncode == 2, proc.stdout
    assert "holds the dataset" in proc.stdout
    assert sorted(p.name for p in data.iterdir()) == ["a.txt"]


def test_prepare_refuses_an_unsafe_out(tmp_path, env):
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("Some text.\n" * 50)
    checkout = tmp_path / "project"
    (checkout / ".git").mkdir(parents=True)
    for out, why in [(tmp_path, "holds the dataset"), (checkout, "holds a git checkout")]:
        proc = run_train(["prepare", "--dataset", str(data), "--out", str(out)], env)
        assert proc.returncode == 2 and why in proc.stdout, proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "project"]


def test_prepare_refuses_a_non_empty_out_before_any_work(tmp_path, env, capsys):
    """A folder of the user's as --out was tokenized in full, then the final rename failed with a traceback
    (Directory not empty); now it is refused at once, and the suggested --out works."""
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("Some text for the shards.\n" * 50)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    argv = ["prepare", "--dataset", str(data), "--tokenizer", "train", "--tokenizer_vocab_size", "300"]
    proc = _train([*argv, "--out", str(out)], capsys)
    assert proc.returncode == 2 and len(_error_lines(proc)) == 1, proc.stdout
    assert "not an empty folder" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "mine"]
    suggested = re.search(r"e\.g\. --out (\S+)", proc.stdout).group(1)
    assert _train([*argv, "--out", suggested], capsys).returncode == 0
    assert (Path(suggested) / "meta.json").exists()


# -- only the tool's own files are replaced ------------------------------------------------------------------------
def test_overwrite_keeps_foreign_files_and_lists_them(tmp_path, env, capsys):
    out = tmp_path / "run"
    assert _train(tiny_args(out, max_steps=2), capsys).returncode == 0
    files = _user_files(out)
    before = sorted(p.name for p in out.iterdir())
    proc = _train(tiny_args(out, "--overwrite_output_dir", "--resume", "never", max_steps=2), capsys)
    assert proc.returncode == 2, proc.stdout
    (line,) = _error_lines(proc)
    assert "precious.txt" in line and "sub/" in line and "move them elsewhere" in line
    assert sorted(p.name for p in out.iterdir()) == before
    assert all((out / name).read_bytes() == data for name, data in files.items())


def test_overwrite_replaces_only_what_the_tool_wrote(tmp_path, env, capsys):
    out = tmp_path / "run"
    assert _train(tiny_args(out, max_steps=4), capsys).returncode == 0
    old_model = (out / "final" / "model.safetensors").read_bytes()
    proc = _train(tiny_args(out, "--overwrite_output_dir", "--resume", "never", max_steps=2, seed=7), capsys)
    assert proc.returncode == 0, proc.stdout
    assert "removed the earlier run's checkpoint-2, checkpoint-4" in proc.stdout
    assert (out / "final" / "model.safetensors").read_bytes() != old_model
    assert [r["step"] for r in read_log(out) if r["event"] == "train"] == [1, 2]


def test_a_users_folder_is_never_trained_into(tmp_path, env, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    _user_files(out)
    proc = _train(tiny_args(out, max_steps=2), capsys)
    assert proc.returncode == 2 and "precious.txt" in proc.stdout, proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt", "sub"]


def test_a_folder_without_a_run_record_is_neither_cleared_nor_marked(tmp_path, env, capsys):
    """A folder holding only a `final/` (a model copied there) and no marker or log: --overwrite_output_dir does
    not clear it, and a refused resume leaves no marker or lock behind."""
    out = tmp_path / "models"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(b"weights")
    proc = _train(tiny_args(out, "--overwrite_output_dir", "--resume", "never", max_steps=2), capsys)
    assert proc.returncode == 2 and "holds no record of a run by this tool" in proc.stdout, proc.stdout
    proc = _train(tiny_args(out, max_steps=2), capsys)
    assert proc.returncode == 2 and "only a finished model in final/" in proc.stdout, proc.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["final", "final/model.safetensors"]


def test_clear_own_deletes_nothing_when_anything_foreign_is_there(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "train_log.jsonl").write_text("{}\n")
    (tmp_path / "checkpoint-2-mine").mkdir()
    with pytest.raises(ConfigError, match="checkpoint-2-mine/"):
        outdir.clear_own(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-2",
        "checkpoint-2-mine",
        "train_log.jsonl",
    ]


# -- resume never silently starts over ------------------------------------------------------------------------------
def test_all_damaged_checkpoints_refuse_and_change_nothing(tmp_path, env, capsys):
    out = tmp_path / "run"
    assert _train(tiny_args(out, max_steps=4, save_steps=2), capsys).returncode == 0
    for step in (2, 4):
        with open(out / f"checkpoint-{step}" / "optimizer.pt", "r+b") as f:
            f.truncate(100)
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    proc = _train(tiny_args(out, max_steps=8, save_steps=2), capsys)
    assert proc.returncode == 2, proc.stdout
    err = "\n".join(_error_lines(proc))
    assert "no usable checkpoint" in err
    assert "checkpoint-4: optimizer.pt is missing or truncated" in err
    assert "checkpoint-2: optimizer.pt is missing or truncated" in err
    assert "--resume never --overwrite_output_dir" in err and f"--init_from {out / 'final'}" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing
    # without a finished model the refusal offers no --init_from of a folder that does not exist
    shutil.rmtree(out / "final")
    proc = _train(tiny_args(out, max_steps=8, save_steps=2), capsys)
    assert proc.returncode == 2 and "no usable checkpoint" in proc.stdout, proc.stdout
    assert "--init_from" not in proc.stdout and "another --output_dir" in proc.stdout


def test_a_folder_with_only_a_final_model_refuses_to_resume(tmp_path, env, capsys):
    out = tmp_path / "run"
    assert _train(tiny_args(out, max_steps=2, save_steps=0), capsys).returncode == 0
    assert (out / "final").is_dir() and not list(out.glob("checkpoint-*"))
    model = (out / "final" / "model.safetensors").read_bytes()
    proc = _train(tiny_args(out, max_steps=4), capsys)
    assert proc.returncode == 2 and "only a finished model in final/" in proc.stdout, proc.stdout
    assert (out / "final" / "model.safetensors").read_bytes() == model
    # the suggested way on works: the finished model's weights in a new folder
    suggested = _train(
        tiny_args(tmp_path / "next", "--resume", "never", max_steps=2, init_from=str(out / "final")), capsys
    )
    assert suggested.returncode == 0, suggested.stdout


def test_a_refused_resume_names_a_way_to_start_over_that_works(tmp_path, env, capsys):
    """The refusal said 'start a new run with --resume never', which in the same folder only met another
    refusal (the folder holds a run); the flags it names now start over when added as they are."""
    out = tmp_path / "run"
    assert _train(tiny_args(out, max_steps=2), capsys).returncode == 0
    proc = _train(tiny_args(out, max_steps=4, block_size=16), capsys)
    assert proc.returncode == 2 and "cannot resume: block_size" in proc.stdout, proc.stdout
    flags = (
        re.search(r"start over with (--resume never --overwrite_output_dir) ", proc.stdout).group(1).split()
    )
    followed = _train(tiny_args(out, *flags, max_steps=4, block_size=16), capsys)
    assert followed.returncode == 0, followed.stdout


@pytest.mark.parametrize("damage", ["manifest deleted", "empty folder"])
def test_a_skipped_checkpoint_is_named_and_set_aside(tmp_path, env, capsys, damage):
    out = tmp_path / "run"
    assert _train(tiny_args(out, max_steps=4, save_steps=2), capsys).returncode == 0
    newest = out / "checkpoint-4"
    if damage == "manifest deleted":
        (newest / "manifest.json").unlink()
    else:
        for p in newest.iterdir():
            p.unlink()
    proc = _train(tiny_args(out, max_steps=6, save_steps=2), capsys)
    assert proc.returncode == 0, proc.stdout
    reason = "no manifest.json" if damage == "manifest deleted" else "the folder is empty"
    assert f"skipping damaged checkpoint {newest}: " in proc.stdout and reason in proc.stdout
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in proc.stdout
    assert (out / "checkpoint-4.damaged").is_dir() and ckpt.verify(out / "checkpoint-4") is None


def test_rotation_counts_only_sound_checkpoints_and_keeps_the_new_one(tmp_path):
    def save(step: int) -> Path:
        return ckpt.save_checkpoint(tmp_path, step, lambda d: (d / "w.bin").write_bytes(b"x" * step), None)

    for step in (2, 4, 6):
        save(step)
    with open(tmp_path / "checkpoint-6" / "w.bin", "r+b") as f:
        f.truncate(1)
    # the same size, another byte: only the hash tells
    (tmp_path / "checkpoint-4" / "w.bin").write_bytes(b"x" * 3 + b"z")
    # a checkpoint older than the others (a run resumed from an earlier step) is still the one kept
    new = ckpt.save_checkpoint(tmp_path, 3, lambda d: (d / "w.bin").write_bytes(b"y"), 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert new.name in names
    assert names == ["checkpoint-2", "checkpoint-3", "checkpoint-4.damaged", "checkpoint-6.damaged"]


# -- one run per folder ---------------------------------------------------------------------------------------------
def test_the_lock_names_its_holder_and_is_released(tmp_path):
    first = outdir.RunLock(tmp_path)
    first.acquire()
    with pytest.raises(ConfigError, match=rf"in use by another run \(PID {os.getpid()} on host "):
        outdir.RunLock(tmp_path).acquire(grace_s=0)
    first.release()
    second = outdir.RunLock(tmp_path)
    second.acquire(grace_s=0)
    second.release()


def test_a_second_run_on_the_same_folder_fails_fast_and_the_first_goes_on(tmp_path, env):
    out = tmp_path / "run"
    settings = dict(max_steps=100_000, save_steps=5, save_total_limit=2)
    with open(tmp_path / "first.log", "w") as log:
        first = start_train(tiny_args(out, **settings), env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: bool(read_log(out)), 60, first)
        second = run_train(tiny_args(out, **settings, seed=99), env, timeout=60)
        assert first.poll() is None, "the first run must still be running"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 143, (tmp_path / "first.log").read_text()
    assert second.returncode == 2, second.stdout
    (line,) = _error_lines(second)
    assert f"in use by another run (PID {first.pid} on host " in line
    # every checkpoint is the first run's: the resume continues it, one record per step
    stopped_at = max(r["step"] for r in read_log(out) if r["event"] == "train")
    again = run_train(tiny_args(out, **{**settings, "max_steps": stopped_at + 2}), env)
    assert again.returncode == 0, again.stdout
    assert f"resuming from {out / f'checkpoint-{stopped_at}'} at step {stopped_at}" in again.stdout
    assert [r["step"] for r in read_log(out) if r["event"] == "train"] == list(range(1, stopped_at + 3))


def test_a_killed_run_leaves_no_stale_lock(tmp_path, env):
    out = tmp_path / "run"
    proc = start_train(tiny_args(out, max_steps=200, save_steps=2), env)
    wait_for(lambda: len(list(out.glob("checkpoint-*"))) >= 1, 60, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_train(tiny_args(out, max_steps=4, save_steps=2), env)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout


# -- one log record per step ----------------------------------------------------------------------------------------
def test_log_keeps_one_record_per_step_after_a_kill_and_resume(tmp_path, env):
    out = tmp_path / "run"
    settings = dict(max_steps=12, save_steps=4, eval_steps=3)
    proc = start_train(tiny_args(out, **settings), env)
    wait_for(
        lambda: max((r["step"] for r in read_log(out) if r["event"] == "train"), default=0) >= 6, 90, proc
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in read_log(out) if r["event"] == "train")
    resumed = run_train(tiny_args(out, **settings), env)
    assert resumed.returncode == 0, resumed.stdout
    resumed_at = int(re.search(r"resuming from \S*checkpoint-(\d+)", resumed.stdout).group(1))
    log = read_log(out)
    assert [r["step"] for r in log if r["event"] == "train"] == list(range(1, 13))
    eval_steps = [r["step"] for r in log if r["event"] == "eval"]
    assert eval_steps == sorted(set(eval_steps))
    if killed_at > resumed_at:
        lines = (out / "train_log.superseded.jsonl").read_text().splitlines()
        superseded = [json.loads(x) for x in lines]
        assert {r["step"] for r in superseded if r["event"] == "train"} == set(
            range(resumed_at + 1, killed_at + 1)
        )


# -- bad checkpoint contents ----------------------------------------------------------------------------------------
def test_an_object_array_in_a_checkpoint_is_a_one_line_error(tmp_path, env, capsys):
    out = tmp_path / "run"
    assert _train(tiny_args(out, max_steps=2), capsys).returncode == 0
    target = out / "checkpoint-2"
    buf = io.BytesIO()
    np.savez(buf, carry=np.array([{"a": 1}], dtype=object))
    data = buf.getvalue()
    (target / "rank0.npz").write_bytes(data)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["rank0.npz"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not an archive of plain arrays"):
        ckpt.load_arrays(target / "rank0.npz")
    proc = _train(tiny_args(out, max_steps=4), capsys)
    assert proc.returncode == 2, proc.stdout
    (line,) = _error_lines(proc)
    assert "rank0.npz" in line and "Traceback" not in proc.stdout


# -- a source that stops being readable mid-run -------------------------------------------------------------------
def _word_corpus(folder: Path, files: int, words: int) -> None:
    """`files` text files of seeded random words: every file is read in its own turn, long after the start."""
    rng = np.random.default_rng(0)
    vocab = np.array(
        ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "paper", "green"]
    )
    folder.mkdir()
    for i in range(files):
        (folder / f"part-{i:02d}.txt").write_text(" ".join(rng.choice(vocab, words)) + "\n")


def test_a_corpus_file_deleted_mid_run_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, env):
    corpus, away = tmp_path / "corpus", tmp_path / "away"
    _word_corpus(corpus, files=12, words=60_000)
    settings = dict(
        dataset=str(corpus),
        tokenizer="train",
        block_size=64,
        per_device_train_batch_size=32,
        save_steps=100_000,
        shuffle_shards="false",
        sample_max_new_tokens=0,
        # the learning rate does not depend on max_steps, so runs of different lengths are comparable
        lr_scheduler_type="constant_with_warmup",
    )
    out = tmp_path / "run"
    proc = start_train(tiny_args(out, **settings, max_steps=100_000), env)
    wait_for(lambda: len(read_log(out)) >= 3, 120, proc)
    away.mkdir()
    for f in corpus.iterdir():
        os.replace(f, away / f.name)
    stopped, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, stopped
    (line,) = [x for x in stopped.splitlines() if x.startswith("error:")]
    assert str(corpus) in line and "run the same command to resume" in line, line
    step = int(re.search(r"checkpoint \S*checkpoint-(\d+) holds step (\d+)", line).group(2))
    assert ckpt.verify(out / f"checkpoint-{step}") is None
    for f in away.iterdir():
        os.replace(f, corpus / f.name)
    resumed = run_train(tiny_args(out, **settings, max_steps=step + 3), env)
    assert resumed.returncode == 0, resumed.stdout
    assert f"resuming from {out / f'checkpoint-{step}'} at step {step}" in resumed.stdout
    straight = run_train(tiny_args(tmp_path / "straight", **settings, max_steps=step + 3), env)
    assert straight.returncode == 0, straight.stdout
    ref = {r["step"]: r["loss"] for r in read_log(tmp_path / "straight") if r["event"] == "train"}
    got = {r["step"]: r["loss"] for r in read_log(out) if r["event"] == "train"}
    assert got == ref
