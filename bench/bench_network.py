#!/usr/bin/env python
"""Training throughput from S3 with network latency, beside the same files on local disk, in one run.

The corpus (the built-in documents, repeated to --max_chars) is written as parquet files and as a DeepLake
dataset, put on moto's S3 server on 127.0.0.1 and read through a proxy that holds every request for
--latency_ms before passing it on. `train.py` (tiny preset, in its own process, so the servers do not share
its interpreter) trains from each input; a row's rate is the median of its logged tokens/s windows after the
first, best of --rounds interleaved rounds. Rows: local disk, S3 with the default read-ahead
(--network_prefetch 4) and S3 without read-ahead (0), for parquet and DeepLake. The same rows are then measured
for the training stream alone, consumed as fast as it comes (where a fast GPU would feel the latency).

  python bench/bench_network.py [--latency_ms 50] [--steps 100] [--rounds 2] [--out bench/results/network-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "01-Full-Fine-Tuning" / "train.py"


def _write_corpus(folder: Path, max_chars: int, files: int) -> int:
    import deeplake
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpt2_training.data.corpus import builtin_documents

    docs, chars, copy = [], 0, 0
    while chars < max_chars:
        for d in builtin_documents():
            docs.append(f"[{copy}] {d}")
            chars += len(docs[-1])
        copy += 1
    (folder / "parquet").mkdir(parents=True)
    for i in range(files):
        pq.write_table(pa.table({"text": docs[i::files]}), folder / "parquet" / f"part-{i:03d}.parquet")
    dataset = deeplake.create(str(folder / "deeplake"))
    dataset.add_column("text", deeplake.types.Text())
    dataset.append({"text": docs})
    dataset.commit()
    return chars


def _rate(args: list[str], env: dict[str, str], out: Path) -> float:
    """Median logged tokens/s after the first window of one `train.py` run."""
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), *args, "--output_dir", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed:\n{proc.stdout}\n{proc.stderr}")
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return statistics.median([r["tokens_per_s"] for r in records if r.get("event") == "train"][1:])


def _stream_rate(spec: str, prefetch: int, tokenizer, sequences: int) -> float:
    """Tokens/s of the training stream alone (read, tokenize, pack: what the model waits for), after its
    first sequence; the consumer takes sequences as fast as they come, as a fast GPU would."""
    from gpt2_training.config import DataArguments
    from gpt2_training.data import train_stream

    args = DataArguments(dataset=spec, block_size=64, shuffle_buffer=0, network_prefetch=prefetch)
    stream = train_stream(args, tokenizer, seed=0)
    next(stream)
    t0 = time.perf_counter()
    for _ in range(sequences):
        next(stream)
    return sequences * 64 / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency_ms", type=float, default=50.0, help="Added by the proxy to every request.")
    p.add_argument("--steps", type=int, default=100, help="Training steps per run.")
    p.add_argument("--rounds", type=int, default=2, help="Interleaved rounds; each row keeps its best.")
    p.add_argument("--max_chars", type=int, default=3_000_000, help="Corpus size in characters.")
    # many small files, so that every read batch of the pipeline (256 K characters) opens several of them
    p.add_argument("--files", type=int, default=64, help="Parquet files (one shard each).")
    p.add_argument("--stream_sequences", type=int, default=4000, help="Sequences per stream-only row.")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "network-cpu.json"))
    a = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests"))
    from netservers import FaultProxy, S3Server, free_env

    from gpt2_training.config import DataArguments
    from gpt2_training.data import resolve_tokenizer
    from gpt2_training.hardware import machine

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        chars = _write_corpus(tmp / "corpus", a.max_chars, a.files)
        resolve_tokenizer(DataArguments(dataset="builtin", tokenizer_vocab_size=8192)).save_pretrained(
            tmp / "tok"
        )
        s3 = S3Server()
        s3.upload_folder(tmp / "corpus", "corpus", "bench")
        proxy = FaultProxy(s3.endpoint, latency=a.latency_ms / 1000)
        env = free_env({"AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": str(ROOT / "src")})
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"})
        # one intra-op thread, as in the README's CPU figures: on a shared machine more threads only contend
        env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        common = [
            "--preset", "tiny", "--block_size", "64", "--per_device_train_batch_size", "8",
            "--max_steps", str(a.steps), "--logging_steps", "10", "--eval_steps", "0", "--save_steps", "0",
            "--eval_max_sequences", "8", "--plot", "false", "--save_final_model", "false",
            "--precision", "fp32", "--report_to", "none", "--sample_max_new_tokens", "0",
            "--tokenizer", str(tmp / "tok"),
        ]  # fmt: skip
        local = tmp / "corpus"
        runs = {
            "parquet, local disk": [f"hf-parquet:{local}/parquet"],
            "parquet, S3 + latency, read-ahead 4 (default)": ["hf-parquet:s3://corpus/bench/parquet"],
            "parquet, S3 + latency, no read-ahead": ["hf-parquet:s3://corpus/bench/parquet", "0"],
            "DeepLake, local disk": [f"deeplake:{local}/deeplake"],
            "DeepLake, S3 + latency, read-ahead 4 (default)": ["s3://corpus/bench/deeplake"],
            "DeepLake, S3 + latency, no read-ahead": ["s3://corpus/bench/deeplake", "0"],
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        requests: dict[str, int] = {}
        t0 = time.perf_counter()
        for round_ in range(a.rounds):  # interleaved, so a slow moment of the shared machine hits every row
            for i, (name, spec) in enumerate(runs.items()):
                extra = ["--dataset", spec[0]] + (["--network_prefetch", spec[1]] if len(spec) > 1 else [])
                before = proxy.requests
                rates[name].append(_rate(common + extra, env, tmp / f"run-{round_}-{i}"))
                print(
                    f"round {round_ + 1}: {name}: {rates[name][-1]:,.0f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
                requests[name] = proxy.requests - before
        wall = time.perf_counter() - t0
        # the stream alone, in this process (the proxy's and server's threads share its interpreter)
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        tokenizer = resolve_tokenizer(DataArguments(dataset="builtin", tokenizer_vocab_size=8192))
        stream_rows = []
        for name, spec in runs.items():
            prefetch = int(spec[1]) if len(spec) > 1 else 4
            rate = max(
                _stream_rate(spec[0], prefetch, tokenizer, a.stream_sequences) for _ in range(a.rounds)
            )
            print(f"stream: {name}: {rate:,.0f} tokens/s", file=sys.stderr, flush=True)
            stream_rows.append({"input": name, "tokens_per_s": rate})
        for row in stream_rows:
            base = next(r for r in stream_rows if r["input"] == row["input"].split(",")[0] + ", local disk")
            row["vs_local_disk"] = row["tokens_per_s"] / base["tokens_per_s"]
        proxy.stop()
        s3.stop()
    rows = []
    for name, values in rates.items():
        base = max(rates[name.split(",")[0] + ", local disk"])
        rows.append(
            {
                "input": name,
                "tokens_per_s": max(values),
                "runs": values,
                "vs_local_disk": max(values) / base,
                "requests_through_proxy": requests[name],
            }
        )
    result = {
        "benchmark": "network",
        "machine": machine(),
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "latency_ms_per_request": a.latency_ms,
        "corpus_chars": chars,
        "parquet_files": a.files,
        "settings": "tiny preset, block_size 64, micro-batch 8, fp32, OMP_NUM_THREADS=1, "
        f"{a.steps} steps, dataloader_num_workers 0 (in-process reading)",
        "tokens_per_s_convention": "median of the logged tokens/s windows after the first, best of the rounds",
        "wall_s": wall,
        "rows": rows,
        "stream_only": {
            "what": f"training stream alone (no model), {a.stream_sequences} sequences of 64 tokens after the "
            "first, in the benchmark's process, best of the rounds",
            "rows": stream_rows,
        },
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    main()
