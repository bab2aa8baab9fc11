"""Training speed beside one competing CPU-bound process: torch's thread defaults against this project's thread
policy (src/gpt2_training/threads.py), interleaved in one run, with the machine's load average named per row.

Each row runs `train.py --config cpu-quickstart.yaml` (the `make train` recipe, shortened) as a subprocess and
takes the median tokens/s of its logging windows after the first. "torch defaults" sets what torch and GNU
OpenMP do unasked (as many threads as usable cores, a 300,000-iteration spin before an idle thread sleeps)
explicitly, so the project's policy, which never overrides a user's setting, leaves them alone.

    .venv/bin/python bench/bench_contention.py [--steps 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "01-Full-Fine-Tuning/configs/cpu-quickstart.yaml"
# a pure-Python busy loop: one core's worth of work, like a busy browser tab or a notebook computing
COMPETITOR = [sys.executable, "-c", "while True: pass"]


def policies(cpus: int) -> dict[str, dict[str, str]]:
    return {
        "torch defaults": {"OMP_NUM_THREADS": str(cpus), "GOMP_SPINCOUNT": "300000"},
        "project policy": {},
    }


def run_row(steps: int, extra_env: dict[str, str], cache: Path, tmp: Path) -> dict:
    from gpt2_training.threads import COUNT_SETTINGS, WAIT_SETTINGS

    # this process imported gpt2_training, which set its own wait policy: the child starts from none
    env = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS + COUNT_SETTINGS}
    env.update(
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", GPT2_TRAINING_CACHE=str(cache), **extra_env
    )
    out = tmp / f"run{time.monotonic_ns()}"
    log_every = max(steps // 8, 1)
    cmd = [sys.executable, str(ROOT / "01-Full-Fine-Tuning/train.py"), "--config", str(CONFIG)]
    cmd += ["--output_dir", str(out), "--max_steps", str(steps), "--logging_steps", str(log_every)]
    cmd += ["--eval_steps", "0", "--save_steps", "0", "--sample_max_new_tokens", "0", "--plot", "false"]
    cmd += ["--save_final_model", "false", "--eval_max_sequences", "16", "--disable_tqdm", "true"]
    load = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rates = [float(x) for x in re.findall(r"\[train\].*?tokens_per_s=([0-9.e+]+)", proc.stdout)]
    threads = re.search(r"^threads: .*$", proc.stdout, re.M)
    return {
        "tokens_per_s": round(statistics.median(rates[1:] or rates)),
        "windows": [round(r) for r in rates],
        "wall_s": round(time.perf_counter() - start, 1),
        "load_average_at_start": [round(x, 2) for x in load],
        "threads_line": threads.group(0) if threads else None,
    }


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from gpt2_training.hardware import machine
    from gpt2_training.threads import usable_cpus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/contention-cpu"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "cache"
        # builds the corpus and tokenizer caches, so no row pays for them
        run_row(2, {}, cache, tmp)
        for repeat in range(a.repeats):
            for competing in (0, 1):
                for name, extra in policies(usable_cpus()).items():
                    busy = [subprocess.Popen(COMPETITOR) for _ in range(competing)]
                    try:
                        # the competitor is running before the run starts, as a browser would be
                        time.sleep(1.0)
                        row = run_row(a.steps, extra, cache, tmp)
                    finally:
                        for p in busy:
                            p.kill()
                            p.wait()
                    row.update(repeat=repeat, competing_processes=competing, threads=name, env=extra)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    record = {
        "what": "train.py (cpu-quickstart.yaml, shortened) beside 0 or 1 competing CPU-bound processes",
        "steps": a.steps,
        "machine": machine(),
        "rows": rows,
    }
    Path(a.out + ".json").write_text(json.dumps(record, indent=1))
    Path(a.out + ".md").write_text(markdown(record))
    print(markdown(record))
    return 0


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        f"## Training beside a competing process ({m['cpu']}, {m['usable_cpus']} usable cores, torch {m['torch']})",
        "",
        f"`bench/bench_contention.py`: {record['what']}, {record['steps']} steps each, rows interleaved. The machine",
        "is shared with other users' jobs: the load average (1, 5, 15 minutes) at the start of each row is named.",
        "",
        "| repeat | competing processes | threads | tokens/s (median window) | wall s | load average | chosen |",
        "|---:|---:|---|---:|---:|---|---|",
    ]
    for r in record["rows"]:
        load = " / ".join(f"{x:.1f}" for x in r["load_average_at_start"])
        lines.append(
            f"| {r['repeat']} | {r['competing_processes']} | {r['threads']} | {r['tokens_per_s']:,} | {r['wall_s']} "
            f"| {load} | {r['threads_line'] or ''} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
