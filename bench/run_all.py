#!/usr/bin/env python
"""Run every benchmark with its defaults for this machine and write one combined report:
bench/results/<cpu|gpu>-<machine description>.md and .json (CPU model from /proc/cpuinfo, usable cores, torch
version and GPU name are recorded in the files; no number is written by hand).

    python bench/run_all.py [--device auto|cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="smallest settings (smoke test)")
    p.add_argument("--out_dir", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    import bench_data
    import bench_training

    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = out_dir / ".parts"
    tmp.mkdir(exist_ok=True)
    train_args = ["--device", a.device, "--out", str(tmp / "training.json")]
    import torch

    if a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available()):
        # One intra-op thread: on a small shared CPU, OpenMP threads waiting for a descheduled sibling make tiny
        # steps 10-30x slower at random, which swamps the engine-vs-raw comparison. Recorded in the results.
        # and 9 interleaved engine/raw pairs: single pairs on a shared 2-core machine vary by about +-5%
        train_args += ["--threads", "1", "--repeats", "9"]
    data_args = ["--out", str(tmp / "data.json")]
    if a.quick:
        train_args += [
            "--steps",
            "1",
            "--warmup",
            "1",
            "--engine_steps",
            "3",
            "--repeats",
            "1",
            "--micro_batch",
            "2",
            "--seq_len",
            "32",
        ]
        data_args += ["--max_chars", "200000", "--vocab_size", "1024", "--repeats", "1"]
    training = bench_training.main(train_args)
    data = bench_data.main(data_args)
    m = training["machine"]
    kind = "gpu" if training["device"] == "cuda" else "cpu"
    what = m["gpu"] if kind == "gpu" else m["cpu"]
    name = f"{kind}-{slug(what)}-{m['usable_cpus']}cpu"
    combined = {"machine": m, "training": training, "data": data, "wall_s": time.perf_counter() - t0}
    (out_dir / f"{name}.json").write_text(json.dumps(combined, indent=1, default=str))
    md = (
        f"# Benchmarks: {what}\n\nMachine: {m['cpu']}, {m['cpu_count']} CPUs ({m['usable_cpus']} usable), "
        f"GPU: {m['gpu'] or 'none'}, torch {m['torch']}, transformers {m.get('transformers')}, Python {m['python']}, "
        f"{m['platform']}. TOKENIZERS_PARALLELISM={data['tokenizers_parallelism']}. Total wall time "
        f"{combined['wall_s']:.0f} s. A shared machine makes these numbers noisy.\n\n"
        + bench_training.markdown(training)
        + "\n"
        + bench_data.markdown(data)
    )
    (out_dir / f"{name}.md").write_text(md)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    print(f"\nwrote {out_dir / name}.md and .json")
    combined["report"] = str(out_dir / f"{name}.md")
    return combined


if __name__ == "__main__":
    main()
