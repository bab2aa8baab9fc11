#!/usr/bin/env python
"""Data at GPU-host speed, each comparison side by side in one run on this machine:

tokenize_per_worker  tokens/s of one tokenizer worker (`data.workers.Encoder`: tiktoken built from the
                     tokenizer's vocabulary, one thread: the cost per core) beside the Rust `tokenizers` with
                     one thread and with its own threads, whether their ids are identical, with a 50 K-token
                     byte-level BPE trained here on the built-in corpus (GPT-2's own tokenizer cannot be
                     downloaded on this machine), and the projection for a 16-core host feeding eight GPUs
                     (about 4 M tokens/s for GPT-2 124M on H100s; stated as arithmetic);
stream_workers       `TokenStream` throughput with 0 workers, 1 and 2 worker processes and 2 threads;
prepare              `prepare_shards` tokens/s over the same 16 jsonl files (--prepare_chars): num_proc 1 and 2
                     with the default Encoder, and the Rust tokenizer with its own threads, one thread and
                     num_proc 2; the bytes written are compared;
engine_step          the training engine's tokens/s on the streamed source with 1 worker against the same
                     model on prepared shards (median of the logged windows after the first).

  python bench/bench_workers.py [--max_chars 3000000] [--prepare_chars 8000000] [--out ...json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100_TOKENS_PER_S_124M = 0.5e6  # issue 13's figure for one H100 on GPT-2 124M; eight GPUs: 4 M tokens/s


def _documents(max_chars: int) -> list[str]:
    """The built-in corpus, repeated (each copy numbered) until it holds `max_chars` characters."""
    from gpt2_training.data.corpus import builtin_documents

    docs, chars, copy = [], 0, 0
    while chars < max_chars:
        for d in builtin_documents():
            docs.append(f"[{copy}] {d}" if copy else d)
            chars += len(docs[-1])
            if chars >= max_chars:
                break
        copy += 1
    return docs


def _write_jsonl(folder: Path, docs: list[str], files: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        rows = docs[f::files]
        (folder / f"part{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in rows))
    return folder


def _batches(docs: list[str]) -> list[list[str]]:
    batches, cur, n = [], [], 0
    for d in docs:
        cur.append(d)
        n += len(d)
        if n >= 1 << 18:
            batches.append(cur)
            cur, n = [], 0
    return [*batches, cur] if cur else batches


@contextlib.contextmanager
def _parallelism(value: str | None):
    """TOKENIZERS_PARALLELISM for one row: the Rust tokenizer reads it at every call."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    if value is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def bench_tokenize(tok, docs: list[str], rounds: int = 3) -> dict:
    """Encoding rate of each engine over the same batches, interleaved, best of `rounds`; one-thread rows are
    the cost per core, the Rust tokenizer's own threads are shown beside them."""
    import numpy as np

    from gpt2_training.data.workers import Encoder

    batches = _batches(docs)
    rows = {
        "tiktoken (Encoder's default), one thread": (Encoder(tok, np.uint32), None),
        "tokenizers (Rust), one thread": (Encoder(tok, np.uint32, use_tiktoken=False), "false"),
        "tokenizers (Rust), its own threads (TOKENIZERS_PARALLELISM unset)": (
            Encoder(tok, np.uint32, use_tiktoken=False),
            None,
        ),
    }
    assert next(iter(rows.values()))[0].engine == "tiktoken"
    best: dict[str, float] = {}
    ids: dict[str, list] = {}
    for _ in range(rounds):
        for name, (encoder, parallelism) in rows.items():
            with _parallelism(parallelism):
                encoder(batches[0][:2])
                t0 = time.perf_counter()
                out = [a for b in batches for a in encoder(b)]
                s = time.perf_counter() - t0
            best[name] = min(best.get(name, s), s)
            ids[name] = out
    tokens = sum(len(a) for a in ids[next(iter(rows))])
    reference = ids["tokenizers (Rust), one thread"]
    identical = all(np.array_equal(a, b) for a, b in zip(ids[next(iter(rows))], reference, strict=True))
    per_worker = tokens / best[next(iter(rows))]
    workers_16 = 16 - 8  # one core per GPU's training process, the rest tokenize
    return {
        "vocab_size": len(tok),
        "tokens": tokens,
        "tiktoken_ids_identical_to_tokenizers": identical,
        "engines": [
            {"engine": name, "seconds": best[name], "tokens_per_s": tokens / best[name]} for name in rows
        ],
        "tokens_per_s_per_worker": per_worker,
        "projection": {
            "host_cores": 16,
            "training_processes": 8,
            "tokenizer_workers": workers_16,
            "tokens_per_s": per_worker * workers_16,
            "gpus_consume_tokens_per_s": 8 * H100_TOKENS_PER_S_124M,
            "ratio": per_worker * workers_16 / (8 * H100_TOKENS_PER_S_124M),
            "arithmetic": f"{per_worker:,.0f} tokens/s per worker (tiktoken, one core) x {workers_16} workers = "
            f"{per_worker * workers_16:,.0f} tokens/s against 8 x {H100_TOKENS_PER_S_124M:,.0f} = "
            f"{8 * H100_TOKENS_PER_S_124M:,.0f} tokens/s",
            "kind": "projection from this CPU's per-core rate, not a measurement on a GPU host",
        },
    }


def bench_stream(tok, folder: Path) -> list[dict]:
    from gpt2_training.data.opening import open_source
    from gpt2_training.data.pipeline import TokenStream

    rows = []
    for workers, backend in ((0, "process"), (1, "process"), (2, "process"), (2, "thread")):
        best = None
        for _ in range(2):
            stream = TokenStream(
                open_source(str(folder), shuffle=False),
                tok,
                256,
                validation_per_mille=50,
                shuffle_buffer=512,
                loop=False,
                num_workers=workers,
                worker_backend=backend,
            )
            t0 = time.perf_counter()
            packed = sum(len(s) for s in stream)
            s = time.perf_counter() - t0
            best = (packed, s) if best is None or s < best[1] else best
        rows.append(
            {
                "workers": workers,
                "backend": backend if workers else "in-process",
                "tokens": best[0],
                "seconds": best[1],
                "tokens_per_s": best[0] / best[1],
            }
        )
    return rows


@contextlib.contextmanager
def _rust_encoder():
    """prepare_shards with the Rust tokenizer: its Encoder's default is switched (prepare has no option for it,
    and a replaced class could not be pickled to the worker processes)."""
    from gpt2_training.data.workers import Encoder

    defaults = Encoder.__init__.__kwdefaults__
    defaults["use_tiktoken"] = False
    try:
        yield
    finally:
        defaults["use_tiktoken"] = True


def bench_prepare(tok, folder: Path, tmp: Path, rounds: int = 2) -> list[dict]:
    """`prepare_shards` over the same files: the default (tiktoken, one thread per process) with num_proc 1 and
    2, and the Rust tokenizer with its own threads in one process, one thread, and num_proc 2; interleaved,
    best of `rounds`. The bytes written are compared between all of them."""
    from gpt2_training.data.opening import open_source
    from gpt2_training.data.shards import prepare_shards

    options = {"spec": str(folder), "shuffle": False}
    runs = [
        ("tiktoken", 1, None),
        ("tiktoken", 2, None),
        ("tokenizers, its own threads", 1, None),
        ("tokenizers, one thread", 1, "false"),
        ("tokenizers", 2, None),
    ]
    best: dict[int, tuple[int, float]] = {}
    outputs: dict[int, dict[str, bytes]] = {}
    for round_ in range(rounds):
        for i, (engine, n, parallelism) in enumerate(runs):
            out = tmp / f"prep{i}-{round_}"
            rust = _rust_encoder() if engine.startswith("tokenizers") else contextlib.nullcontext()
            with rust, _parallelism(parallelism):
                t0 = time.perf_counter()
                meta = prepare_shards(
                    open_source(**options), tok, out, progress=False, num_proc=n, source_options=options
                )
                s = time.perf_counter() - t0
            tokens = meta["tokens"]["train"] + meta["tokens"]["validation"]
            best[i] = min(best.get(i, (tokens, s)), (tokens, s), key=lambda r: r[1])
            outputs[i] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
            shutil.rmtree(out)
    rows = [
        {
            "engine": engine,
            "num_proc": n,
            "tokens": best[i][0],
            "seconds": best[i][1],
            "tokens_per_s": best[i][0] / best[i][1],
            "identical_to_first_row": outputs[i] == outputs[0],
        }
        for i, (engine, n, _) in enumerate(runs)
    ]
    rows[1]["speedup_vs_num_proc_1"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    rows[4]["speedup_vs_one_thread"] = rows[4]["tokens_per_s"] / rows[3]["tokens_per_s"]
    rows[4]["speedup_vs_own_threads"] = rows[4]["tokens_per_s"] / rows[2]["tokens_per_s"]
    return rows


def bench_engine(tmp: Path, steps: int, rounds: int = 2) -> list[dict]:
    from gpt2_training.cli import main, prepare_main

    common = [
        "--preset", "tiny", "--block_size", "256", "--per_device_train_batch_size", "8",
        "--max_steps", str(steps), "--logging_steps", "20", "--eval_steps", "0", "--save_steps", "0",
        "--eval_max_sequences", "8", "--plot", "false", "--save_final_model", "false", "--precision", "fp32",
        "--report_to", "none", "--sample_max_new_tokens", "1", "--tokenizer_vocab_size", "8192",
    ]  # fmt: skip
    shards = tmp / "engine-shards"
    prepare_main(["--dataset", "builtin", "--tokenizer_vocab_size", "8192", "--out", str(shards)])
    runs = {
        "streamed, 1 worker process": ["--dataset", "builtin", "--dataloader_num_workers", "1"],
        "streamed, 1 worker thread": ["--dataset", "builtin", "--dataloader_num_workers", "1"],
        "streamed, in-process": ["--dataset", "builtin", "--dataloader_num_workers", "0"],
        "prepared shards": ["--shards_dir", str(shards), "--tokenizer", str(shards / "tokenizer")],
    }
    from gpt2_training.data.pipeline import TokenStream

    defaults = TokenStream.__init__.__kwdefaults__
    best: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):  # interleaved, so a slow moment of the shared machine hits every input
        for name, extra in runs.items():
            out = tmp / f"{name.replace(' ', '_').replace(',', '')}-{round_}"
            # the thread backend has no command-line switch (processes are the default): set it for this run
            defaults["worker_backend"] = "thread" if "thread" in name else "process"
            main([*common, *extra, "--output_dir", str(out)])
            records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            tps = [r["tokens_per_s"] for r in records if r.get("event") == "train"][1:]
            best[name].append(statistics.median(tps))
    rows = [
        {"input": name, "tokens_per_s_median": max(values), "runs": values} for name, values in best.items()
    ]
    base = next(r for r in rows if r["input"] == "prepared shards")["tokens_per_s_median"]
    for r in rows:
        r["step_time_vs_shards"] = base / r["tokens_per_s_median"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_chars", type=int, default=16_000_000)
    # prepare is measured on more text: a worker's ~0.3 s start-up is paid once per run, as in a real prepare
    p.add_argument("--prepare_chars", type=int, default=64_000_000)
    p.add_argument("--engine_steps", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "data-workers-cpu.json"))
    a = p.parse_args(argv)
    from gpt2_training.data.tokenizer import train_bpe_tokenizer
    from gpt2_training.hardware import machine

    docs = _documents(a.max_chars)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        t0 = time.perf_counter()
        from gpt2_training.data.corpus import builtin_documents

        bpe50k = train_bpe_tokenizer(builtin_documents(), 50_257, tmp / "bpe50k")
        train_s = time.perf_counter() - t0
        folder = _write_jsonl(tmp / "jsonl", docs, 8)
        prepare_folder = _write_jsonl(tmp / "prepare-jsonl", _documents(a.prepare_chars), 16)
        result = {
            "benchmark": "data-workers",
            "machine": machine(),
            "tokens_per_s_convention": "packed or written tokens per wall-clock second, best of 2 runs",
            "text_chars": sum(len(d) for d in docs),
            "prepare_text_chars": a.prepare_chars,
            "tokenizer": f"byte-level BPE asked for 50,257 tokens, {len(bpe50k):,} reached on the built-in corpus "
            f"(its distinct merges run out), trained here in {train_s:.1f} s",
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)"),
            "load_average_1min_at_start": os.getloadavg()[0],
            "tokenize_per_worker": bench_tokenize(bpe50k, docs),
            "stream_workers": bench_stream(bpe50k, folder),
            "prepare": bench_prepare(bpe50k, prepare_folder, tmp),
            "engine_step": bench_engine(tmp, a.engine_steps),
        }
    # other jobs on a shared machine take cores from the parallel rows: the load is part of the record
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    main()
