"""Tests for gpt2_training.data.workers: background tokenization gives the same sequences and the same resume
states as the in-process path, resumes bit-exactly after SIGKILL, and a dying or failing worker is an error
naming the cause and the record, never a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_reliability import _bit_exact

from gpt2_training.data.opening import open_source
from gpt2_training.data.pipeline import TokenStream
from gpt2_training.data.tokenizer import tiktoken_encoding, train_bpe_tokenizer
from gpt2_training.data.workers import Encoder, _WorkerProcess
from gpt2_training.errors import DataError

DOCS = [f"Record {i}: " + " ".join(f"tok{(i * 11 + j) % 71}" for j in range(3 + i % 23)) for i in range(300)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(DOCS, 400, tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture()
def folder(tmp_path) -> Path:
    out = tmp_path / "docs"
    out.mkdir()
    for part in range(4):
        rows = DOCS[part * 75 : (part + 1) * 75]
        (out / f"part{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in rows))
    return out


def make(folder, tokenizer, workers: int, **kw) -> TokenStream:
    return TokenStream(
        open_source(str(folder), shuffle=True, seed=4),
        tokenizer,
        16,
        shuffle_buffer=9,
        seed=4,
        validation_per_mille=100,
        read_chars=700,
        num_workers=workers,
        **kw,
    )


def roundtrip(state):
    meta, arrays = state
    return json.loads(json.dumps(meta)), {k: v.copy() for k, v in arrays.items()}


def test_encoder_gives_the_tokenizers_own_ids(tokenizer):
    texts = DOCS[:20] + ["", "ünïcode 日本 🙂"]
    want = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [a.tolist() for a in Encoder(tokenizer, np.uint16)(texts)] == want


EDGE_CASES = [
    "",
    " ",
    "   \n\n\t  x  ",
    "a  \n  b\r\n\r\nc\u00a0d",
    "ünïcode 日本語のテキスト 🙂👍🏽 e\u0301 \u200d\u200b",
    "<|endoftext|>",
    "a<|endoftext|>b <|endoftext|><|endoftext|> <|endoftext",
    "I'm they'll it's we've 'S 'LL don't",
    "12345 1.5e10 3,141 x2 ２０２４",
    "\x00\x01\x7f control",
    "a" * 400,
    "    leading spaces and trailing    ",
    "!!!??? ... --- ''' \"\"\" @@@",
]


def test_tiktoken_gives_the_rust_tokenizers_ids(tmp_path):
    """A byte-level BPE trained here is encoded by tiktoken, with the Rust tokenizer's ids on the built-in
    corpus, edge cases (unicode, whitespace runs, the end-of-text token inside text, empty text) and the text
    of every token of the vocabulary."""
    from gpt2_training.data.corpus import builtin_documents

    docs = builtin_documents()
    tok = train_bpe_tokenizer(docs, 3000, tmp_path / "bpe")
    fast, rust = Encoder(tok, np.uint16), Encoder(tok, np.uint16, use_tiktoken=False)
    assert (fast.engine, rust.engine) == ("tiktoken", "tokenizers")
    vocab = [tok.convert_tokens_to_string([t]) for t in tok.get_vocab()]
    whole = [t for t in vocab if "\ufffd" not in t]  # the others are pieces of a UTF-8 character
    assert len(whole) > 0.9 * len(vocab)
    texts = docs + EDGE_CASES + whole
    ids = [a.tolist() for a in fast(texts)]
    assert ids == [a.tolist() for a in rust(texts)]
    assert ids == tok(texts, add_special_tokens=False)["input_ids"]


def _edited(tokenizer, edit) -> str:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    edit(spec)
    return json.dumps(spec)


def _swap_two_merges(spec: dict) -> None:
    merges = spec["model"]["merges"]
    merges[5], merges[6] = merges[6], merges[5]


@pytest.mark.parametrize(
    "edit",
    [
        lambda spec: spec.update(normalizer={"type": "Lowercase"}),
        lambda spec: spec["pre_tokenizer"].update(add_prefix_space=True),
        lambda spec: spec["model"].update(dropout=0.1),
        _swap_two_merges,
        lambda spec: spec["model"]["vocab"].pop("Ā"),
        lambda spec: spec["added_tokens"][0].update(lstrip=True),
    ],
    ids=["normalizer", "prefix-space", "dropout", "merge-order", "missing-byte", "lstrip-token"],
)
def test_tokenizers_where_tiktoken_could_differ_keep_the_rust_path(tokenizer, edit):
    assert tiktoken_encoding(tokenizer.backend_tokenizer.to_str()) is not None
    assert tiktoken_encoding(_edited(tokenizer, edit)) is None


def test_without_tiktoken_installed_the_rust_tokenizer_encodes_the_same_ids(tokenizer, monkeypatch):
    texts = DOCS[:20] + EDGE_CASES
    want = [a.tolist() for a in Encoder(tokenizer, np.uint16)(texts)]
    tiktoken_encoding.cache_clear()
    # None in sys.modules makes `import tiktoken` raise ImportError, as on a machine without it
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    try:
        encoder = Encoder(tokenizer, np.uint16)
        assert encoder.engine == "tokenizers"
        assert [a.tolist() for a in encoder(texts)] == want
    finally:
        tiktoken_encoding.cache_clear()


def test_a_tokenizer_with_a_normalizer_is_encoded_by_rust_with_its_own_ids(tokenizer):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    lowercase = _edited(tokenizer, lambda spec: spec.update(normalizer={"type": "Lowercase"}))
    lower = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(lowercase), eos_token="<|endoftext|>")
    encoder = Encoder(lower, np.uint16)
    texts = [d.upper() for d in DOCS[:20]]
    ids = [a.tolist() for a in encoder(texts)]
    assert encoder.engine == "tokenizers"
    assert ids == lower(texts, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer([d.lower() for d in texts], add_special_tokens=False)["input_ids"]


def test_any_number_of_workers_gives_the_same_sequences_and_states(folder, tokenizer):
    """0, 1 and 2 workers (and threads) hand out the same sequences over several epochs; a state saved with
    one worker count resumes exactly with another."""
    reference = [next(s).tolist() for s in [make(folder, tokenizer, 0)] for _ in range(500)]
    for workers, backend in ((1, "process"), (2, "process"), (2, "thread")):
        s = make(folder, tokenizer, workers, worker_backend=backend)
        assert [next(s).tolist() for _ in range(500)] == reference, (workers, backend)
        s.close()
    for k, saver, loader in ((37, 2, 0), (211, 0, 2), (333, 1, 2)):
        s = make(folder, tokenizer, saver)
        for _ in range(k):
            next(s)
        saved = roundtrip(s.state_dict())
        s.close()
        resumed = make(folder, tokenizer, loader)
        resumed.load_state_dict(*saved)
        assert [next(resumed).tolist() for _ in range(500 - k)] == reference[k:], (k, saver, loader)
        resumed.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_bit_exact_resume_after_sigkill_with_workers(tmp_path, env, workers):
    """The SIGKILL/resume property of tests/test_reliability.py (shuffled stream, dropout) with background
    workers: losses and final weights equal an uninterrupted run's bit for bit."""
    _bit_exact(tmp_path, env, shuffle_buffer=64, dataloader_num_workers=workers)


def test_a_killed_worker_is_an_error_naming_signal_and_record(folder, tokenizer):
    s = make(folder, tokenizer, 1)
    next(s)
    worker = s._prefetch._workers[0]
    os.kill(worker.proc.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(
        DataError, match=r"data worker 0 .* was killed by signal 9 .*part\d\.jsonl, offset \d+"
    ):
        for _ in range(10_000):
            next(s)
    assert time.monotonic() - start < 30


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited orphan may wait for a reaper that never comes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_worker_busy_with_a_long_job_exits_when_its_parent_is_killed(tmp_path):
    """SIGKILL the process that started a worker while the worker is inside a 60 s job: the worker exits within
    seconds instead of finishing the job (a killed `prepare` must not leave cores busy)."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    parent_code = (
        f"import sys, time; sys.path.insert(0, {src!r})\n"
        "from gpt2_training.data.workers import _WorkerProcess\n"
        "w = _WorkerProcess(0, time.sleep)\n"
        "w.submit(0, 60)\n"
        "print(w.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(1.0)  # the worker has started the job
        assert _running(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker), "the worker outlived its killed parent"
    finally:
        parent.kill()


def test_a_failing_worker_reports_the_error_and_record(tokenizer):
    worker = _WorkerProcess(0, Encoder(tokenizer, np.uint16))
    try:
        worker.submit(0, [None])  # not text: the Rust tokenizer raises inside the worker
        with pytest.raises(
            DataError, match=r"failed tokenizing the batch that starts at somefile.jsonl, offset 7: "
        ):
            worker.result(0, lambda: "somefile.jsonl, offset 7")
    finally:
        worker.close()


def test_a_malformed_record_read_ahead_names_file_and_byte(folder, tokenizer):
    s = make(folder, tokenizer, 2)  # opened first, so the bad line is met by the reader thread
    bad = folder / "part1.jsonl"
    lines = bad.read_text().splitlines(keepends=True)
    offset = sum(len(line.encode()) for line in lines[:30])
    bad.write_text("".join(lines[:30]) + "{not json\n" + "".join(lines[30:]))
    with pytest.raises(DataError, match=rf"part1\.jsonl \(byte {offset}\): invalid JSON"):
        for _ in range(10_000):
            next(s)
    s.close()


def test_negative_workers_is_an_error(folder, tokenizer):
    with pytest.raises(DataError, match="dataloader_num_workers must be 0"):
        make(folder, tokenizer, -1)
