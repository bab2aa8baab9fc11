"""Tests for gpt2_training.data.shards' prepare: N processes write the same bytes as one, a killed prepare
resumes and never leaves a folder that looks complete, and --num_proc is checked."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_PY

from gpt2_training.data.opening import open_source
from gpt2_training.data.pipeline import TokenStream
from gpt2_training.data.shards import prepare_shards, usable_cores
from gpt2_training.data.tokenizer import train_bpe_tokenizer
from gpt2_training.errors import DataError

DOCS = [f"Line {i}: " + " ".join(f"z{(i * 3 + j) % 61}" for j in range(2 + i % 29)) for i in range(600)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(DOCS, 300, tmp_path_factory.mktemp("tok") / "bpe")


def write(folder: Path, files: int) -> Path:
    folder.mkdir(parents=True)
    per = len(DOCS) // files
    for f in range(files):
        rows = DOCS[f * per : (f + 1) * per]
        (folder / f"p{f:03d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in rows))
    return folder


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("files", [1, 5])
def test_two_processes_write_the_same_bytes_as_one(tmp_path, tokenizer, files):
    data = write(tmp_path / "d", files)
    options = {"spec": str(data), "shuffle": True, "seed": 3}
    outs = {}
    for n in (1, 2):
        prepare_shards(
            open_source(**options),
            tokenizer,
            tmp_path / f"o{n}",
            validation_per_mille=100,
            shard_tokens=700,
            progress=False,
            num_proc=n,
            source_options=options,
            block_documents=50,
        )
        outs[n] = folder_bytes(tmp_path / f"o{n}")
    assert outs[1] == outs[2]
    meta = json.loads(outs[1]["meta.json"])
    assert (
        len(meta["shards"]["train"]) > 2
        and meta["documents"]["train"] + meta["documents"]["validation"] == 600
    )
    # and the shards hold exactly what the streaming pipeline produces from the same source
    source = open_source(**options)
    streamed = TokenStream(source, tokenizer, 1, validation_per_mille=100, loop=False)
    on_disk = np.concatenate(
        [np.frombuffer(outs[1][f["file"]], dtype=np.uint16) for f in meta["shards"]["train"]]
    )
    assert on_disk.tolist() == [int(t[0]) for t in streamed]


def test_single_document_prepare_holds_out_its_tail(tmp_path, tokenizer):
    f = tmp_path / "input.txt"
    f.write_text(" ".join(DOCS))
    meta = prepare_shards(open_source(str(f)), tokenizer, tmp_path / "o", progress=False)
    assert meta["tokens"]["validation"] > 0 and meta["tokens"]["train"] > 10 * meta["tokens"]["validation"]
    assert "last 50 per mille" in meta["held_out"]


def test_num_proc_is_checked(tmp_path, tokenizer, capsys):
    data = write(tmp_path / "d", 2)
    with pytest.raises(DataError, match="--num_proc must be 1 or more, got 0"):
        prepare_shards(open_source(str(data)), tokenizer, tmp_path / "o", num_proc=0, progress=False)
    options = {"spec": str(data)}
    prepare_shards(
        open_source(str(data)), tokenizer, tmp_path / "o", num_proc=99, progress=False, source_options=options
    )
    assert f"--num_proc 99 is more than the {usable_cores()} usable cores; using {usable_cores()}" in (
        capsys.readouterr().out
    )


def test_a_malformed_record_names_file_and_byte_and_leaves_nothing_complete(tmp_path, tokenizer):
    """Every file has a bad line, so whichever runner meets one first (this process or the worker process)
    reports it, and no folder appears; after the files are fixed the same call finishes."""
    data = write(tmp_path / "d", 4)
    for f in data.iterdir():
        lines = f.read_text().splitlines(keepends=True)
        f.write_text("".join(lines[:40]) + "{not json\n" + "".join(lines[40:]))
    options = {"spec": str(data)}
    out = tmp_path / "o"
    kw = dict(progress=False, num_proc=2, source_options=options)
    with pytest.raises(DataError, match=r"p00\d\.jsonl \(byte \d+\): invalid JSON"):
        prepare_shards(open_source(**options), tokenizer, out, **kw)
    assert not out.exists()
    for f in data.iterdir():
        f.write_text(
            "".join(line for line in f.read_text().splitlines(keepends=True) if line != "{not json\n")
        )
    meta = prepare_shards(open_source(**options), tokenizer, out, **kw)
    assert meta["documents"]["train"] + meta["documents"]["validation"] == 600


def test_killed_prepare_resumes_and_never_looks_complete(tmp_path, env):
    """SIGKILL a real `train.py prepare --num_proc 2` once some units are done: no complete-looking folder is
    left, and running the same command again reuses the finished units and writes the same bytes as a run that
    was never interrupted."""
    data = write(tmp_path / "d", 60)
    cmd = [
        sys.executable,
        str(TRAIN_PY),
        "prepare",
        "--dataset",
        str(data),
        "--tokenizer_vocab_size",
        "300",
        "--tokenizer",
        "train",
        "--num_proc",
        "2",
    ]
    straight = subprocess.run(
        [*cmd, "--out", str(tmp_path / "straight")], env=env, capture_output=True, text=True, timeout=300
    )
    assert straight.returncode == 0, straight.stdout + straight.stderr
    out = tmp_path / "killed"
    units = tmp_path / ".killed.partial" / "units"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if units.exists() and len(list(units.glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "prepare finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "meta.json").exists()
    again = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "prepare: resuming" in again.stdout
    assert folder_bytes(out) == folder_bytes(tmp_path / "straight")


def test_out_inside_the_dataset_folder_is_refused_and_the_suggested_out_works(tmp_path, monkeypatch):
    """A folder source is searched recursively, so shards written inside it would come back as documents: the
    command is refused before any work, and the --out its message suggests prepares the same data."""
    from gpt2_training.cli import prepare_main
    from gpt2_training.errors import ConfigError

    monkeypatch.setenv("GPT2_TRAINING_CACHE", str(tmp_path / "cache"))
    data = write(tmp_path / "d", 2)
    args = ["--dataset", str(data), "--tokenizer", "train", "--tokenizer_vocab_size", "300"]
    with pytest.raises(ConfigError, match=r"inside the dataset folder .* --out (\S+)$") as refused:
        prepare_main([*args, "--out", str(data / "shards")])
    assert not (data / "shards").exists() and not list(data.glob(".*"))
    suggested = str(refused.value).rsplit("--out ", 1)[1]
    meta = prepare_main([*args, "--out", suggested])
    assert Path(suggested).parent == tmp_path and (Path(suggested) / "meta.json").exists()
    assert meta["documents"]["train"] + meta["documents"]["validation"] == sum(
        len(f.read_text().splitlines()) for f in data.iterdir()
    )
