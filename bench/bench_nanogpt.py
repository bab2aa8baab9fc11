"""This project's `train.py` against nanoGPT's own `train.py`, side by side on this machine: the same prepared token
shards of the built-in corpus, the same model and recipe, one intra-op thread each, runs interleaved.

nanoGPT is not part of this repository: pass a checkout of it (`git clone https://github.com/karpathy/nanoGPT`).
Its `train.py`, `model.py` and `configurator.py` are copied, unchanged, into a temporary folder beside the data
layout its `get_batch` reads (`data/builtin/train.bin`, `val.bin`, `meta.pkl`). For `--precision bf16` the copy's
one line that turns autocast off on a CPU is changed so that nanoGPT autocasts like this project does.

Model: 4 layers x 4 heads x 128, block 128, a 4,096-token BPE (a multiple of 64), biases, no dropout; batch 16,
AdamW 3e-3 betas (0.9, 0.95), weight decay 0.1, warm-up 50, cosine to 10%, clipping 1.0. Speed: the median of
20-step windows (the first window and nanoGPT's iteration 0, which holds its first evaluation, left out), tokens per
second of wall time. Memory: each process's peak resident set (ru_maxrss from wait4).

    .venv/bin/python bench/bench_nanogpt.py --nanogpt /tmp/nanogpt [--steps 200] [--pairs 2] [--bf16_pairs 0]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "01-Full-Fine-Tuning" / "train.py"
BATCH, BLOCK, VOCAB, WINDOW = 16, 128, 4096, 20
CONTESTANTS = ("project", "project-compiled", "nanogpt", "nanogpt-compiled")
# nanoGPT's train.py turns autocast off on a CPU with this line; the bf16 runs autocast instead
NANOGPT_CPU_NO_AUTOCAST = "ctx = nullcontext() if device_type == 'cpu' else "


def env() -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )


def run(cmd: list[str], cwd: Path) -> dict:
    """Run to the end; wall time, peak resident set of the process and its output."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {
        "load_at_start": round(load, 2),
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "output": out,
    }


def project(shards: Path, out: Path, steps: int, precision: str, compiled: bool = False) -> dict:
    cmd = [sys.executable, str(TRAIN), "--shards_dir", str(shards), "--tokenizer", str(shards / "tokenizer")]
    if compiled:
        cmd += ["--torch_compile", "true"]
    cmd += f"""--n_layer 4 --n_head 4 --n_embd 128 --n_positions {BLOCK} --block_size {BLOCK} --dropout 0
        --per_device_train_batch_size {BATCH} --learning_rate 3e-3 --adam_beta2 0.95 --weight_decay 0.1
        --warmup_steps 50 --lr_scheduler_type cosine_with_min_lr --max_grad_norm 1.0 --max_steps {steps}
        --logging_steps {WINDOW} --eval_steps 0 --no_eval_on_start --save_steps 0 --sample_max_new_tokens 0
        --disable_tqdm true --plot false --save_final_model false --resume never --overwrite_output_dir
        --precision {precision} --output_dir {out}""".split()
    res = run(cmd, ROOT)
    windows = [float(v) for v in re.findall(r"^\[train\] .*tokens_per_s=([\d.e+]+)", res["output"], re.M)]
    res["tokens_per_s_windows"] = windows[1:]
    res["heldout_loss"] = float(re.search(r"^held-out: loss ([\d.]+)", res["output"], re.M)[1])
    return res


def nanogpt(workdir: Path, steps: int, precision: str, compiled: bool = False) -> dict:
    cmd = [sys.executable, "train.py"]
    cmd += f"""--dataset=builtin --device=cpu --compile={compiled} --n_layer=4 --n_head=4 --n_embd=128
        --block_size={BLOCK} --batch_size={BATCH} --gradient_accumulation_steps=1 --bias=True --dropout=0.0
        --learning_rate=3e-3 --beta2=0.95 --weight_decay=0.1 --warmup_iters=50 --max_iters={steps}
        --lr_decay_iters={steps} --min_lr=3e-4 --grad_clip=1.0 --eval_interval={steps} --eval_iters=20
        --always_save_checkpoint=False --log_interval=1 --out_dir=out""".split()
    cmd.append("--dtype=" + ("bfloat16" if precision == "bf16" else "float32"))
    res = run(cmd, workdir / precision)
    dts = [float(t) / 1000 for _, t in re.findall(r"^iter (\d+): .*time ([\d.]+)ms", res["output"], re.M)][1:]
    # windows of WINDOW iterations after iteration 0, the first one left out as for the project
    sums = [sum(dts[i : i + WINDOW]) for i in range(0, len(dts) - WINDOW + 1, WINDOW)]
    res["tokens_per_s_windows"] = [WINDOW * BATCH * BLOCK / s for s in sums[1:]]
    res["heldout_loss"] = float(
        re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", res["output"], re.M)[-1]
    )
    return res


def prepare(tmp: Path, checkout: Path) -> tuple[Path, Path]:
    """The project's shards, and nanoGPT's folder holding the same tokens (fp32 and bf16 copies of its script)."""
    shards = tmp / "shards"
    subprocess.run(
        [sys.executable, str(TRAIN), "prepare", "--dataset", "builtin", "--tokenizer_vocab_size", str(VOCAB)]
        + ["--out", str(shards)],
        env=env(),
        check=True,
        capture_output=True,
    )
    work = tmp / "nanogpt"
    for precision in ("fp32", "bf16"):
        d = work / precision
        (d / "data" / "builtin").mkdir(parents=True)
        for name in ("train.py", "model.py", "configurator.py"):
            shutil.copy(checkout / name, d / name)
        shutil.copy(shards / "train_000000.bin", d / "data/builtin/train.bin")
        shutil.copy(shards / "validation_000000.bin", d / "data/builtin/val.bin")
        with open(d / "data/builtin/meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": VOCAB}, f)
    script = work / "bf16" / "train.py"
    text = script.read_text()
    if NANOGPT_CPU_NO_AUTOCAST not in text:
        sys.exit(
            f"{checkout}/train.py has no line {NANOGPT_CPU_NO_AUTOCAST!r}: use nanoGPT's master checkout"
        )
    script.write_text(text.replace(NANOGPT_CPU_NO_AUTOCAST, "ctx = "))
    return shards, work


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=2, help="fp32 pairs")
    ap.add_argument("--bf16_pairs", type=int, default=0, help="bf16 pairs (CPUs with native bf16 only)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/nanogpt-cpu")
    ap.add_argument(
        "--contestants",
        default="project,nanogpt",
        help=f"comma-separated, from {', '.join(CONTESTANTS)}; '-compiled' runs torch.compile (inductor)",
    )
    a = ap.parse_args()
    a.contestants = a.contestants.split(",")
    unknown = [c for c in a.contestants if c not in CONTESTANTS]
    if unknown:
        print(
            f"error: unknown contestant(s) {unknown}: choose from {', '.join(CONTESTANTS)}", file=sys.stderr
        )
        return 2
    if not (a.nanogpt / "train.py").is_file() or not (a.nanogpt / "model.py").is_file():
        print(f"error: {a.nanogpt} is not a nanoGPT checkout (no train.py and model.py)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "src"))
    from gpt2_training.precision import cpu_bf16_supported

    if a.bf16_pairs and not cpu_bf16_supported():
        print(
            "error: this CPU has no native bf16 (AVX512-BF16 or AMX), so the project refuses --precision bf16 "
            "(emulated bf16 is slower than fp32): run with --bf16_pairs 0",
            file=sys.stderr,
        )
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards, work = prepare(Path(tmp), a.nanogpt)
        plan = ["fp32"] * a.pairs + ["bf16"] * a.bf16_pairs
        for i, precision in enumerate(plan):
            # each pair runs every contestant once, the order turned by one place per pair
            order = a.contestants[i % len(a.contestants) :] + a.contestants[: i % len(a.contestants)]
            pair = {"pair": i + 1, "precision": precision, "order": order}
            for who in order:
                compiled = who.endswith("-compiled")
                if who.startswith("project"):
                    r = project(shards, Path(tmp) / f"run{i}", a.steps, precision, compiled)
                else:
                    r = nanogpt(work, a.steps, precision, compiled)
                r["tokens_per_s"] = round(statistics.median(r.pop("tokens_per_s_windows")))
                r.pop("output")
                pair[who] = r
                print(f"pair {i + 1} {precision} {who}: {r}", flush=True)
            base = pair.get("nanogpt")
            for who in order:
                if base is not None:
                    pair[who]["ratio"] = round(pair[who]["tokens_per_s"] / base["tokens_per_s"], 2)
            rows.append(pair)
    import torch

    from gpt2_training.hardware import cpu_name

    record = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, no GPU used, torch {torch.__version__}",
        "load_at_end": round(os.getloadavg()[0], 2),
        "steps": a.steps,
        "nanogpt_commit": subprocess.run(
            ["git", "-C", str(a.nanogpt), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "unknown (not a git checkout)",
        "rows": rows,
    }
    a.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "| pair | precision | run | load at start | tokens/s | vs nanoGPT (eager) | wall time | peak RSS "
        "| held-out loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for who in r["order"]:
            x = r[who]
            ratio = f"{x['ratio']}x" if "ratio" in x else "n/a"
            lines.append(
                f"| {r['pair']} | {r['precision']} | {who} | {x['load_at_start']} | {x['tokens_per_s']:,} | {ratio} "
                f"| {x['wall_s']} s | {x['peak_rss_mb']} MB | {x['heldout_loss']:.3f} |"
            )
    table = "\n".join(lines)
    print(table)
    a.out.with_suffix(".md").write_text(
        f"# bench/bench_nanogpt.py\n\n{record['machine']}; nanoGPT {record['nanogpt_commit']}; {a.steps} steps "
        "per run, one intra-op thread each, the runs of a pair one after another (the order turned each pair); load "
        "average (1 min) at each run's start in the table, "
        f"{record['load_at_end']} at the end. Speed: median tokens/s of 20-step windows (the first left out); "
        "wall time: the whole process, start-up and compilation included; memory: each process's peak resident "
        "set.\n\n" + table + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
