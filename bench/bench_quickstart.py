"""Record what `make train` does on this machine: wall time, tokens/s and the final held-out metrics.

Runs the quick-start config exactly as `make train` does (a fresh output folder, same flags) as a subprocess,
then writes `bench/results/quickstart-<machine>.json` and `.md`. The README's quick-start figures come from here.

    .venv/bin/python bench/bench_quickstart.py [--config 01-Full-Fine-Tuning/configs/cpu-quickstart.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from gpt2_training.hardware import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "01-Full-Fine-Tuning/configs/cpu-quickstart.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--cold", action="store_true", help="also rebuild the corpus and tokenizer caches")
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp:
        if args.cold:
            env["GPT2_TRAINING_CACHE"] = str(Path(tmp) / "cache")
        out_dir = Path(tmp) / "run"
        cmd = [
            sys.executable,
            str(ROOT / "01-Full-Fine-Tuning/train.py"),
            "--config",
            args.config,
            "--output_dir",
            str(out_dir),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return proc.returncode
        log = [json.loads(x) for x in (out_dir / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r["event"] == "eval"]
    train = [r for r in log if r["event"] == "train"]
    record = {
        "what": "make train (cpu-quickstart.yaml) from a warm cache"
        if not args.cold
        else "make train, cold cache",
        "command": "train.py --config " + os.path.relpath(args.config, ROOT),
        "machine": machine(),
        "wall_time_s": round(wall, 1),
        "steps": train[-1]["step"],
        "tokens_seen": train[-1]["tokens_seen"],
        "tokens_per_s_last_window": round(train[-1]["tokens_per_s"]),
        "tokens_per_s_mean": round(sum(r["tokens_per_s"] for r in train) / len(train)),
        "untrained_bpb": evals[0]["eval_bpb"],
        "unigram_byte_entropy": evals[0]["unigram_byte_entropy"],
        "final_eval_loss": evals[-1]["eval_loss"],
        "final_perplexity": evals[-1]["eval_perplexity"],
        "final_bpb": evals[-1]["eval_bpb"],
        "samples": [r["text"] for r in log if r["event"] == "sample"][-3:],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "quickstart-cpu" if record["machine"]["gpu"] is None else "quickstart-gpu"
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    m = record["machine"]
    md = [
        f"# `make train` on {m['cpu']} ({m['usable_cpus']} cores){', ' + m['gpu'] if m['gpu'] else ''}",
        "",
        f"Produced by `bench/bench_quickstart.py`: {record['what']}; Python {m['python']}, torch {m['torch']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| wall time (whole command) | {record['wall_time_s']:.0f} s |",
        f"| steps / tokens | {record['steps']} / {record['tokens_seen']:,} |",
        f"| training throughput (mean of logged windows) | {record['tokens_per_s_mean']:,} tokens/s |",
        f"| held-out bits per byte: untrained model | {record['untrained_bpb']:.3f} |",
        f"| held-out bits per byte: byte frequencies alone (unigram entropy) | {record['unigram_byte_entropy']:.3f} |",
        f"| held-out bits per byte: trained | **{record['final_bpb']:.3f}** |",
        f"| held-out loss / perplexity | {record['final_eval_loss']:.3f} / {record['final_perplexity']:.1f} |",
        "",
        "Samples:",
        "",
        *[f"```\n{s}\n```" for s in record["samples"]],
    ]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
