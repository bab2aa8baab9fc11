"""Muon against AdamW on the tiny preset and the built-in corpus: a small learning-rate sweep for each (seed 0, one
more rate where the best is at the grid's edge), then the best of each on three seeds; held-out loss at a fixed token budget and tokens to a target held-out loss.

The target is the highest final held-out loss of AdamW's three seeds, so every AdamW run reaches it; tokens to it
are interpolated between evaluations (bench_time_to_loss.reach). Both optimizers share everything else (warm-up, cosine schedule to 10%,
weight decay 0.1, clipping 1.0, batch, data order). One intra-op thread (OMP_NUM_THREADS=1) unless set.

    .venv/bin/python bench/bench_muon.py [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(ROOT / "bench"))
from bench_time_to_loss import reach  # noqa: E402

SWEEP = {"adamw_torch": (3e-3, 1e-2), "muon": (1e-2, 3e-2)}
SEEDS = (0, 1, 2)


def run(optim: str, lr: float, seed: int, steps: int, eval_every: int, out: Path) -> dict:
    from gpt2_training import DataArguments, GPT2TrainingArguments, ModelArguments, RunArguments, train

    args = GPT2TrainingArguments(
        output_dir=str(out / f"{optim}-{lr}-{seed}"),
        optim=optim,
        learning_rate=lr,
        seed=seed,
        max_steps=steps,
        warmup_steps=max(steps // 10, 1),
        lr_scheduler_type="cosine_with_min_lr",
        weight_decay=0.1,
        max_grad_norm=1.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        per_device_train_batch_size=16,
        logging_steps=eval_every,
        eval_steps=eval_every,
        save_steps=0,
        disable_tqdm=True,
        report_to="none",
    )
    data = DataArguments(dataset="builtin", tokenizer_vocab_size=2048, block_size=128, eval_max_sequences=256)
    runs = RunArguments(sample_max_new_tokens=0, save_final_model=False, plot=False, precision="fp32")
    start = time.perf_counter()
    res = train(args, model=ModelArguments(preset="tiny", n_positions=128, dropout=0.0), data=data, run=runs)
    tokens_per_step = res.tokens_seen // max(res.step, 1)
    curve = [(e["step"] * tokens_per_step, e["eval_loss"]) for e in res.evals]
    curve.append((res.tokens_seen, res.final_eval["eval_loss"]))
    return {
        "optim": optim,
        "learning_rate": lr,
        "seed": seed,
        "final_eval_loss": round(res.final_eval["eval_loss"], 4),
        "curve": [(t, round(loss, 4)) for t, loss in curve],
        "tokens_per_s": round(res.tokens_per_s or 0),
        "wall_s": round(time.perf_counter() - start, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def _earlier_runs(path: str | None, steps: int) -> dict:
    if path is None:
        return {}
    record = json.loads(Path(path).read_text())
    if record["steps"] != steps:
        raise SystemExit(f"--reuse {path}: its runs have {record['steps']} steps, not {steps}")
    return {(r["optim"], r["learning_rate"], r["seed"]): {**r, "reused": True} for r in record["rows"]}


def _best(rows: list[dict], optim: str) -> float:
    return min((r for r in rows if r["optim"] == optim), key=lambda r: r["final_eval_loss"])["learning_rate"]


def main() -> int:
    from gpt2_training.hardware import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval_every", type=int, default=25)
    ap.add_argument("--out", default=str(ROOT / "bench/results/muon-cpu"))
    ap.add_argument(
        "--reuse",
        default=None,
        help="an earlier record with the same --steps and --eval_every: its runs are taken as they are, not rerun "
        "(with one thread a run's losses are the same every time; its tokens/s and load stay those of its day)",
    )
    a = ap.parse_args()
    rows: list[dict] = []
    earlier = _earlier_runs(a.reuse, a.steps)
    with tempfile.TemporaryDirectory() as tmp:
        for optim, lrs in SWEEP.items():
            for lr in lrs:
                rows.append(
                    earlier.get((optim, lr, 0)) or run(optim, lr, 0, a.steps, a.eval_every, Path(tmp))
                )
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
        best = {optim: _best(rows, optim) for optim in SWEEP}
        for optim, lrs in SWEEP.items():
            # a best rate at the grid's edge: one more rate beyond it (x3 or /3), so neither side is under-tuned
            if best[optim] in (lrs[0], lrs[-1]):
                lr = best[optim] / 3 if best[optim] == lrs[0] else best[optim] * 3
                rows.append(
                    earlier.get((optim, round(lr, 6), 0))
                    or run(optim, round(lr, 6), 0, a.steps, a.eval_every, Path(tmp))
                )
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
                best[optim] = _best(rows, optim)
        # the remaining seeds, interleaved so a change in the machine's load touches both optimizers alike
        for seed in SEEDS[1:]:
            for optim, lr in best.items():
                rows.append(
                    earlier.get((optim, lr, seed)) or run(optim, lr, seed, a.steps, a.eval_every, Path(tmp))
                )
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    chosen = {o: [r for r in rows if r["optim"] == o and r["learning_rate"] == best[o]] for o in SWEEP}
    target = max(r["final_eval_loss"] for r in chosen["adamw_torch"])
    summary = {}
    for optim, runs in chosen.items():
        got = [reach([(t, 0.0, loss) for t, loss in r["curve"]], target) for r in runs]
        reached = [None if g is None else g[0] for g in got]
        summary[optim] = {
            "learning_rate": best[optim],
            "final_eval_loss_mean": round(statistics.mean(r["final_eval_loss"] for r in runs), 4),
            "final_eval_loss_per_seed": [r["final_eval_loss"] for r in runs],
            "tokens_to_target_per_seed": [None if t is None else round(t) for t in reached],
            "tokens_to_target_mean": round(statistics.mean(reached)) if None not in reached else None,
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs),
        }
    a_tok, m_tok = summary["adamw_torch"]["tokens_to_target_mean"], summary["muon"]["tokens_to_target_mean"]
    record = {
        "what": "tiny preset (2 x 64, block 128, batch 16), built-in corpus, 2048-token BPE, fp32",
        "steps": a.steps,
        "tokens_budget": a.steps * 16 * 128,
        "target_eval_loss": target,
        "muon_tokens_ratio": round(m_tok / a_tok, 3) if a_tok and m_tok else None,
        "summary": summary,
        "machine": machine(),
        "rows": rows,
    }
    Path(a.out + ".json").write_text(json.dumps(record, indent=1))
    Path(a.out + ".md").write_text(markdown(record))
    print(markdown(record))
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"## Muon against AdamW ({m['cpu']}, {m['usable_cpus']} cores, torch {m['torch']}, one thread)",
        "",
        f"`bench/bench_muon.py`: {r['what']}; {r['steps']} steps = {r['tokens_budget']:,} tokens per run. Sweep on "
        "seed 0 (extended past an edge optimum), then the best learning rate of each on seeds 0-2. The machine is shared (load average per row).",
        "",
        "| optimizer | learning rate | seed | held-out loss at the budget | tokens/s | load average (end) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        load = " / ".join(f"{x:.1f}" for x in row["load_average_at_end"])
        lines.append(
            f"| {row['optim']} | {row['learning_rate']:g} | {row['seed']} | {row['final_eval_loss']:.4f} "
            f"| {row['tokens_per_s']:,} | {load}{' (earlier record)' if row.get('reused') else ''} |"
        )
    lines += [
        "",
        f"Target held-out loss {r['target_eval_loss']:.4f} (AdamW's worst seed at the budget).",
        "",
        "| optimizer | learning rate | mean held-out loss at the budget | tokens to the target (mean of 3 seeds) |",
        "|---|---:|---:|---:|",
    ]
    for optim, s in r["summary"].items():
        tok = f"{s['tokens_to_target_mean']:,}" if s["tokens_to_target_mean"] else "not reached by every seed"
        lines.append(f"| {optim} | {s['learning_rate']:g} | {s['final_eval_loss_mean']:.4f} | {tok} |")
    if r["muon_tokens_ratio"] is not None:
        lines += ["", f"Muon needs **{r['muon_tokens_ratio']:.2f}x** AdamW's tokens to the target."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
