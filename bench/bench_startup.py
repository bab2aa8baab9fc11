"""Start-up cost: from the command to the first training step, beside the imports that any GPT-2 script pays.

    python bench/bench_startup.py [--repeats 5] [--out bench/results/startup-cpu.json]

Every row is the median over --repeats fresh processes of the time from starting the process to the moment it
prints a marker line (so the interpreter's shutdown, which takes about a second after torch, is not counted),
with warm caches (the built-in corpus and its tokenizer are built once before timing):
  python              the interpreter alone
  torch               `import torch`
  hf floor            `import torch`, `from transformers import GPT2LMHeadModel, TrainingArguments` and one
                      `TrainingArguments(...)` (which imports transformers' integrations): what every script
                      that trains GPT-2 with transformers pays before its first line of work
  gpt2_training       `import gpt2_training` (the package's front door; imports nothing heavy)
  first step          `train.py --preset tiny --max_steps 1` until it prints step 1 (goal: 4 s here)
`engine overhead` = first step - hf floor: what this project adds (argument parsing, data, model, the step).
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
MARK = "--ready--"
GOAL_S = 4.0

IMPORT_ROWS = {
    "python": "pass",
    "torch": "import torch",
    "hf floor": "import torch, tempfile\n"
    "from transformers import GPT2LMHeadModel, TrainingArguments\n"
    "TrainingArguments(output_dir=tempfile.mkdtemp(), report_to='none')",
    "gpt2_training": "import gpt2_training",
}


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def time_to_line(cmd: list[str], starts_with: str) -> float:
    """Seconds from starting `cmd` to the first line of its output that starts with `starts_with`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, tail = None, []
    for line in proc.stdout:
        if seen is None and line.startswith(starts_with):
            seen = time.perf_counter() - t0
        tail = (tail + [line])[-5:]
    proc.wait()
    if proc.returncode != 0 or seen is None:
        raise RuntimeError(
            f"{cmd[:3]} failed (exit {proc.returncode}) before {starts_with!r}: {''.join(tail)}"
        )
    return seen


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
        return time_to_line(train_argv(str(Path(tmp) / "run")), "[train] step=1 ")


def time_import(code: str) -> float:
    return time_to_line([sys.executable, "-c", f"{code}\nprint({MARK!r}, flush=True)"], MARK)


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
    load_before = os.getloadavg()[0]
    results: dict[str, float] = {}
    # interleaved, so a change in the machine's load touches every row alike
    samples: dict[str, list[float]] = {name: [] for name in [*IMPORT_ROWS, "first step"]}
    for _ in range(args.repeats):
        for name, code in IMPORT_ROWS.items():
            samples[name].append(time_import(code))
        samples["first step"].append(time_to_first_step())
    results = {name: statistics.median(values) for name, values in samples.items()}
    results["engine overhead"] = results["first step"] - results["hf floor"]
    record = {
        "machine": describe(),
        "python": platform.python_version(),
        "repeats": args.repeats,
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "median_seconds": results,
        "samples_seconds": samples,
        "heavy_modules_loaded_by_engine_import": heavy_modules_after_engine_import(),
        "goal_first_step_s": GOAL_S,
        "goal_met": results["first step"] <= GOAL_S,
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
