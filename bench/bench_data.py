#!/usr/bin/env python
"""Data-pipeline throughput, tokens/s in ONE process, on the same text:

  raw_tokenizer  the fast tokenizer's batch encoding alone, `tokenizer(texts, add_special_tokens=False)`, on the
                 same ~256 K-character batches the pipeline uses (the ceiling for the pipeline);
  pipeline       `gpt2_training.data.pipeline.TokenStream`: read -> hash split -> tokenize -> EOS -> pack into
                 block_size sequences -> seeded shuffle buffer, consumed as micro-batches (np.stack, as the
                 Engine does), over the built-in corpus with the trained byte-level BPE;
  shards         `prepare_shards` once (timed separately), then `ShardStream` reading memory-mapped windows.

GPT-2's own tokenizer is used too when it is in the local Hugging Face cache (offline it usually is not).
TOKENIZERS_PARALLELISM is set ONCE, before the tokenizer is loaded, and applies to every row (default 'false':
the Rust tokenizer uses one thread, i.e. this is the cost per worker process); `--tokenizers_parallelism true`
lets it use every core for both the raw tokenizer and the pipeline.

    python bench/bench_data.py [--max_chars 2000000] [--vocab_size 8192] [--out bench/results/data-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _select_documents(max_chars: int) -> list[str]:
    from gpt2_training.data.corpus import builtin_documents

    docs, chars = [], 0
    for d in builtin_documents():
        docs.append(d)
        chars += len(d)
        if chars >= max_chars:
            break
    return docs


def _batches(texts: list[str], chars_per_batch: int) -> list[list[str]]:
    out, cur, n = [], [], 0
    for t in texts:
        cur.append(t)
        n += len(t)
        if n >= chars_per_batch:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def bench_tokenizer(
    name: str, tok, docs: list[str], block_size: int, micro_batch: int, shards: bool, repeats: int = 2
) -> list[dict]:
    import numpy as np

    from gpt2_training.data.pipeline import READ_BATCH_CHARS, TokenStream, is_validation
    from gpt2_training.data.shards import ShardStream, prepare_shards
    from gpt2_training.data.sources import BuiltinSource

    chars = sum(len(d) for d in docs)
    rows = []
    # raw tokenizer on exactly the training documents the pipeline tokenizes, in the same batch sizes
    train_docs = [d for d in docs if not is_validation(d, 50)]
    batches = _batches(train_docs, READ_BATCH_CHARS)
    tok(batches[0][:1], add_special_tokens=False)  # warm-up: first-call costs stay out of both timings

    def raw() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = sum(len(ids) for b in batches for ids in tok(b, add_special_tokens=False)["input_ids"])
        return n, time.perf_counter() - t0

    def pipeline() -> tuple[int, float, int]:
        source = BuiltinSource(docs, shuffle=False, seed=0, max_piece_chars=1_000_000)
        stream = TokenStream(
            source,
            tok,
            block_size,
            split="train",
            validation_per_mille=50,
            shuffle_buffer=512,
            seed=0,
            loop=False,
        )
        t0 = time.perf_counter()
        packed, done = 0, False
        while not done:
            seqs = []
            for _ in range(micro_batch):
                try:
                    seqs.append(next(stream))
                except StopIteration:
                    done = True
                    break
            if seqs:
                packed += np.stack(seqs).astype(np.int64).size
        return packed, time.perf_counter() - t0, stream.stats["tokens"]

    raw_runs, pipe_runs = [], []
    for _ in range(repeats):  # interleaved; the best run of each is the least disturbed by other processes
        raw_runs.append(raw())
        pipe_runs.append(pipeline())
    n_tokens, raw_s = min(raw_runs, key=lambda r: r[1])
    raw_tps = n_tokens / raw_s
    rows.append(
        {
            "name": "raw_tokenizer",
            "tokenizer": name,
            "tokens": n_tokens,
            "seconds": raw_s,
            "tokens_per_s": raw_tps,
            "chars_per_s": sum(len(d) for d in train_docs) / raw_s,
            "runs_s": [r[1] for r in raw_runs],
        }
    )
    packed, pipe_s, tokenized = min(pipe_runs, key=lambda r: r[1])
    pipe_tps = packed / pipe_s
    rows.append(
        {
            "name": "pipeline",
            "tokenizer": name,
            "tokens": packed,
            "seconds": pipe_s,
            "tokens_per_s": pipe_tps,
            "tokens_tokenized": tokenized,
            "ratio_to_raw_tokenizer": pipe_tps / raw_tps,
            "block_size": block_size,
            "micro_batch": micro_batch,
            "runs_s": [r[1] for r in pipe_runs],
        }
    )

    if shards:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "shards"
            t0 = time.perf_counter()
            meta = prepare_shards(
                BuiltinSource(docs, shuffle=False, seed=0, max_piece_chars=1_000_000),
                tok,
                out,
                progress=False,
            )
            prep_s = time.perf_counter() - t0
            total = meta["tokens"]["train"] + meta["tokens"]["validation"]
            rows.append(
                {
                    "name": "prepare_shards",
                    "tokenizer": name,
                    "tokens": total,
                    "seconds": prep_s,
                    "tokens_per_s": total / prep_s,
                    "ratio_to_raw_tokenizer": total / prep_s / raw_tps,
                }
            )
            reader = ShardStream(out, "train", block_size, seed=0, loop=False)
            t0 = time.perf_counter()
            read = 0
            done = False
            while not done:
                seqs = []
                for _ in range(micro_batch):
                    try:
                        seqs.append(next(reader))
                    except StopIteration:
                        done = True
                        break
                if seqs:
                    read += np.stack(seqs).astype(np.int64).size
            read_s = time.perf_counter() - t0
            rows.append(
                {
                    "name": "shard_reader",
                    "tokenizer": name,
                    "tokens": read,
                    "seconds": read_s,
                    "tokens_per_s": read / read_s,
                    "ratio_to_raw_tokenizer": read / read_s / raw_tps,
                }
            )
    for r in rows:
        r["chars_in_corpus_slice"] = chars
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--max_chars", type=int, default=2_000_000, help="characters of the built-in corpus to use"
    )
    p.add_argument("--vocab_size", type=int, default=8192, help="size of the trained BPE (cached after once)")
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument(
        "--tokenizers_parallelism",
        default=os.environ.get("TOKENIZERS_PARALLELISM", "false"),
        choices=["true", "false"],
    )
    p.add_argument("--no_gpt2", action="store_true", help="skip GPT-2's tokenizer even if it is cached")
    p.add_argument("--no_shards", action="store_true")
    p.add_argument(
        "--repeats", type=int, default=2, help="interleaved raw/pipeline runs; the best of each counts"
    )
    p.add_argument("--out", default=None, help="JSON path (default bench/results/data-cpu.json)")
    a = p.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = a.tokenizers_parallelism  # before any tokenizer exists

    from gpt2_training.config import DataArguments
    from gpt2_training.data import resolve_tokenizer

    t0 = time.perf_counter()
    docs = _select_documents(a.max_chars)
    tok = resolve_tokenizer(DataArguments(tokenizer="train", tokenizer_vocab_size=a.vocab_size), seed=0)
    setup_s = time.perf_counter() - t0
    rows = bench_tokenizer(
        f"trained BPE {a.vocab_size}", tok, docs, a.block_size, a.micro_batch, not a.no_shards, a.repeats
    )
    gpt2_note = "skipped (--no_gpt2)"
    if not a.no_gpt2:
        try:
            from transformers import AutoTokenizer

            gpt2 = AutoTokenizer.from_pretrained(
                "gpt2", use_fast=True, local_files_only=True, trust_remote_code=False
            )
            gpt2.model_max_length = 1 << 30
            rows += bench_tokenizer("gpt2", gpt2, docs, a.block_size, a.micro_batch, False, a.repeats)
            gpt2_note = "measured (found in the local Hugging Face cache)"
        except Exception as exc:  # noqa: BLE001 - any failure to load means "not cached"
            gpt2_note = f"not available offline ({type(exc).__name__})"
    from gpt2_training.hardware import machine

    result = {
        "benchmark": "data",
        "machine": machine(),
        "settings": vars(a),
        "setup_s": setup_s,
        "gpt2_tokenizer": gpt2_note,
        "rows": rows,
        "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
    }
    out = Path(a.out or ROOT / "bench" / "results" / "data-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return result


def markdown(result: dict) -> str:
    a = result["settings"]
    lines = [
        f"## Data pipeline throughput (one process, TOKENIZERS_PARALLELISM={result['tokenizers_parallelism']})",
        "",
        f"{result['rows'][0]['chars_in_corpus_slice']:,} characters of the built-in corpus; block_size "
        f"{a['block_size']}, micro-batch {a['micro_batch']}; GPT-2 tokenizer: {result['gpt2_tokenizer']}.",
        "",
        "| row | tokenizer | tokens | tokens/s (best of runs) | vs raw tokenizer |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio_to_raw_tokenizer']:.2f}x" if "ratio_to_raw_tokenizer" in r else "1.00x"
        lines.append(
            f"| {r['name']} | {r['tokenizer']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | {ratio} |"
        )
    lines += ["", "Goals: pipeline >= 0.8x the raw tokenizer; shard reader far above 0.5 M tokens/s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # Only as a script, before huggingface_hub is imported (it reads the variable once, at import): importing
    # this module (tests, run_all.py) leaves the environment alone.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
