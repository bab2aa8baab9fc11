"""Start-up cost: from the command to the first training step, beside the imports that any GPT-2 script pays.

    python bench/bench_startup.py [--repeats 5] [--out bench/results/startup-cpu.json]

Rows (median of --repeats fresh processes, warm caches: the built-in corpus and its tokenizer are built once
before timing):
  python            `python -c pass`, the interpreter alone
  torch+transformers  importing torch and GPT2LMHeadModel: the floor for any script that trains GPT-2
  gpt2_training     `import gpt2_training` (the package's front door; imports nothing heavy)
  engine            `import gpt2_training.trainer`
  first step        `train.py --preset tiny --max_steps 1` until it prints step 1 (goal: 4 s here)
It also records which optional heavy libraries the engine import pulled in (should be none: deeplake, wandb,
datasets, bitsandbytes and deepspeed load only when a run uses them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "01-Full-Fine-Tuning" / "train.py"
HEAVY = ("deeplake", "wandb", "datasets", "bitsandbytes", "deepspeed", "matplotlib", "pandas")


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def time_command(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def train_argv(out: str) -> list[str]:
    return [
        sys.executable,
        str(TRAIN),
        "--preset",
        "tiny",
        "--max_steps",
        "1",
        "--logging_steps",
        "1",
        "--eval_on_start",
        "false",
        "--save_steps",
        "0",
        "--save_final_model",
        "false",
        "--plot",
        "false",
        "--tokenizer_vocab_size",
        "1024",
        "--output_dir",
        out,
    ]


def time_to_first_step() -> float:
    """Seconds from starting train.py to the line that reports step 1."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            train_argv(str(Path(tmp) / "run")),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen = None
        for line in proc.stdout:
            if seen is None and line.startswith("[train] step=1 "):
                seen = time.perf_counter() - t0
        proc.wait()
        if proc.returncode != 0 or seen is None:
            raise RuntimeError(f"train.py failed (exit {proc.returncode}) before step 1")
        return seen


def heavy_modules_after_engine_import() -> list[str]:
    code = f"import sys, gpt2_training.trainer; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from gpt2_training.hardware import describe

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    # warm the caches (corpus, tokenizer, .pyc files) once, untimed
    time_to_first_step()
    rows = {
        "python": [sys.executable, "-c", "pass"],
        "torch+transformers": [
            sys.executable,
            "-c",
            "import torch; from transformers import GPT2LMHeadModel",
        ],
        "gpt2_training": [sys.executable, "-c", "import gpt2_training"],
        "engine": [sys.executable, "-c", "import gpt2_training.trainer"],
    }
    results: dict[str, float] = {}
    for name, cmd in rows.items():
        results[name] = statistics.median(time_command(cmd) for _ in range(args.repeats))
    results["first step"] = statistics.median(time_to_first_step() for _ in range(args.repeats))
    record = {
        "machine": describe(),
        "python": platform.python_version(),
        "repeats": args.repeats,
        "median_seconds": results,
        "heavy_modules_loaded_by_engine_import": heavy_modules_after_engine_import(),
        "goal_first_step_s": 4.0,
    }
    for name, value in results.items():
        print(f"{name:>20}: {value:6.2f} s")
    print(
        f"heavy libraries imported by the engine: {record['heavy_modules_loaded_by_engine_import'] or 'none'}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
