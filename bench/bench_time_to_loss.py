"""Time and tokens to a target held-out loss, in one run, on the same data: this project's engine (AdamW and Muon),
`transformers.Trainer` and the repository's nanoGPT-style reference loop (bench/reference_gpt.py).

Every contender trains the same model size (tiny preset widened by flags, block 128, batch 16) on the same
sequences of the built-in corpus (the project's own train stream, pre-tokenized for the Trainer and the reference
loop) with the same schedule (warm-up 10%, cosine to 10%), weight decay 0.1 and clipping 1.0, and is evaluated
every `--eval_every` steps on the same held-out sequences with the same formula (mean next-token cross-entropy).
Time is training time only (evaluations excluded), one intra-op thread each (OMP_NUM_THREADS=1 unless set).
Tokens and seconds to the target are interpolated between evaluations.

    .venv/bin/python bench/bench_time_to_loss.py [--steps 150] [--target 5.0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

BATCH, BLOCK, VOCAB = 16, 128, 2048


def settings(a) -> dict:
    return dict(
        preset="tiny",
        n_positions=BLOCK,
        block_size=BLOCK,
        dataset="builtin",
        tokenizer_vocab_size=VOCAB,
        eval_max_sequences=a.eval_sequences,
        per_device_train_batch_size=BATCH,
        max_steps=a.steps,
        warmup_steps=max(a.steps // 10, 1),
        lr_scheduler_type="cosine_with_min_lr",
        weight_decay=0.1,
        max_grad_norm=1.0,
        adam_beta2=0.95,
        seed=0,
        precision="fp32",
    )


def shared_data(a) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(training sequences in the engine's order, held-out sequences, tokenizer size, end-of-text id)."""
    from gpt2_training.cli import parse_config
    from gpt2_training.data import resolve_tokenizer, train_stream, validation_sequences

    cfg = parse_config([], output_dir="unused", **settings(a))
    tok = resolve_tokenizer(cfg.data, seed=0)
    stream = train_stream(cfg.data, tok, 0)
    train = np.stack([next(stream) for _ in range(a.steps * BATCH)]).astype(np.int64)
    return train, validation_sequences(cfg.data, tok, 0).astype(np.int64), len(tok), tok.eos_token_id


@torch.no_grad()
def heldout_loss(loss_of, val: np.ndarray) -> float:
    """Mean next-token cross-entropy over the held-out sequences (every sequence has BLOCK - 1 targets)."""
    losses = [
        float(loss_of(torch.from_numpy(val[i : i + BATCH]))) * len(val[i : i + BATCH])
        for i in range(0, len(val), BATCH)
    ]
    return sum(losses) / len(val)


class Clock:
    """Training time: wall time with the evaluations taken out."""

    def __init__(self):
        self.start, self.paused = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.paused

    @contextlib.contextmanager
    def pause(self):
        t0 = time.perf_counter()
        yield
        self.paused += time.perf_counter() - t0


def run_engine(a, optim: str, lr: float) -> list[tuple[int, float, float]]:
    """(tokens, seconds, held-out loss) after every evaluation; the engine evaluates its own held-out split, which
    is the same sequences (`validation_sequences` with the same settings)."""
    from gpt2_training.cli import parse_config
    from gpt2_training.trainer import train

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        cfg = parse_config(
            [],
            **settings(a),
            output_dir=tmp,
            optim=optim,
            learning_rate=lr,
            logging_steps=a.eval_every,
            eval_steps=a.eval_every,
            save_steps=0,
            sample_max_new_tokens=0,
            plot=False,
            save_final_model=False,
            disable_tqdm=True,
            report_to="none",
        )
        res = train(cfg)
        log = [json.loads(x) for x in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
    seconds, curve = 0.0, []
    windows = {r["step"]: r["tokens_per_s"] for r in log if r["event"] == "train"}
    previous = 0
    for step in sorted(windows):
        seconds += (step - previous) * BATCH * BLOCK / windows[step]
        previous = step
        loss = next(
            e["eval_loss"] for e in [*res.evals, {"step": res.step, **res.final_eval}] if e["step"] == step
        )
        curve.append((step * BATCH * BLOCK, seconds, loss))
    return curve


def run_reference(a, train_data, val, vocab, lr) -> list[tuple[int, float, float]]:
    """The nanoGPT-style loop: ReferenceGPT, AdamW (fused), the same schedule, clipping, data and evaluation."""
    from reference_gpt import ReferenceGPT
    from transformers import get_scheduler

    torch.manual_seed(0)
    model = ReferenceGPT(2, 2, 64, BLOCK, vocab)
    opt = model.optimizer(lr=lr, weight_decay=0.1, fused=True)
    sched = get_scheduler(
        "cosine_with_min_lr",
        opt,
        max(a.steps // 10, 1),
        a.steps,
        scheduler_specific_kwargs={"min_lr_rate": 0.1},
    )
    data = torch.from_numpy(train_data).view(a.steps, BATCH, BLOCK)
    curve, clock = [], Clock()
    for step in range(1, a.steps + 1):
        loss = model(data[step - 1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % a.eval_every == 0 or step == a.steps:
            seconds = clock.now()
            with clock.pause():
                model.eval()
                curve.append((step * BATCH * BLOCK, seconds, heldout_loss(model, val)))
                model.train()
    return curve


def run_trainer(a, train_data, val, vocab, eos, lr) -> list[tuple[int, float, float]]:
    """`transformers.Trainer` as its users run it: GPT2LMHeadModel with labels, the same schedule and data."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gpt2_training.config import ModelArguments
    from gpt2_training.model import build_model

    torch.manual_seed(0)
    lm = build_model(ModelArguments(preset="tiny", n_positions=BLOCK), vocab, eos)
    lm.config.use_cache = False
    curve: list = []
    clock: list[Clock] = []

    class Evaluate(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.append(Clock())

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % a.eval_every == 0 or state.global_step == a.steps:
                seconds = clock[0].now()
                with clock[0].pause():
                    lm.eval()
                    loss = heldout_loss(lambda x: lm(input_ids=x, labels=x).loss, val)
                    lm.train()
                curve.append((state.global_step * BATCH * BLOCK, seconds, loss))

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=BATCH,
            max_steps=a.steps,
            learning_rate=lr,
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            warmup_steps=max(a.steps // 10, 1),
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1},
            logging_steps=10**9,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        rows = [{"input_ids": torch.from_numpy(r), "labels": torch.from_numpy(r)} for r in train_data]
        # the data in the engine's order, as the other contenders read it
        trainer = Trainer(model=lm, args=args, train_dataset=rows, callbacks=[Evaluate()])
        trainer._get_train_sampler = lambda *args, **kw: torch.utils.data.SequentialSampler(rows)
        trainer.train()
    return curve


def reach(curve: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    """(tokens, seconds) at which the held-out loss first reaches `target`, interpolated between evaluations."""
    previous = None
    for tokens, seconds, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens), seconds
            t0, s0, l0 = previous
            f = (l0 - target) / (l0 - loss)
            return t0 + f * (tokens - t0), s0 + f * (seconds - s0)
        previous = (tokens, seconds, loss)
    return None


def main(argv: list[str] | None = None) -> dict:
    from gpt2_training.hardware import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval_every", type=int, default=15)
    ap.add_argument("--eval_sequences", type=int, default=128)
    ap.add_argument(
        "--target", type=float, default=None, help="default: the worst final loss of all contenders"
    )
    ap.add_argument("--adamw_lr", type=float, default=1e-2)
    ap.add_argument("--muon_lr", type=float, default=3e-2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/time-to-loss-cpu"))
    a = ap.parse_args(argv)
    train_data, val, vocab, eos = shared_data(a)
    load = {}
    curves = {}
    contenders = {
        "this project, AdamW": lambda: run_engine(a, "adamw_torch", a.adamw_lr),
        "this project, Muon": lambda: run_engine(a, "muon", a.muon_lr),
        "transformers.Trainer, AdamW": lambda: run_trainer(a, train_data, val, vocab, eos, a.adamw_lr),
        "nanoGPT-style reference loop, AdamW": lambda: run_reference(a, train_data, val, vocab, a.adamw_lr),
    }
    for name, fn in contenders.items():
        load[name] = [round(x, 2) for x in os.getloadavg()]
        curves[name] = fn()
        print(name, json.dumps(curves[name][-1]), flush=True)
    target = a.target if a.target is not None else max(c[-1][2] for c in curves.values())
    rows = []
    for name, curve in curves.items():
        got = reach(curve, target)
        rows.append(
            {
                "contender": name,
                "tokens_to_target": None if got is None else round(got[0]),
                "seconds_to_target": None if got is None else round(got[1], 1),
                "final_eval_loss": round(curve[-1][2], 4),
                "tokens_per_s": round(curve[-1][0] / curve[-1][1]),
                "load_average_at_start": load[name],
                "curve": [(t, round(s, 2), round(x, 4)) for t, s, x in curve],
            }
        )
    record = {
        "what": f"tiny preset (2 x 64), block {BLOCK}, batch {BATCH}, {VOCAB}-token BPE on the built-in corpus, fp32",
        "steps": a.steps,
        "target_eval_loss": round(target, 4),
        "learning_rates": {"adamw": a.adamw_lr, "muon": a.muon_lr},
        "machine": machine(),
        "rows": rows,
    }
    Path(a.out + ".json").write_text(json.dumps(record, indent=1))
    Path(a.out + ".md").write_text(markdown(record))
    print(markdown(record))
    return record


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"## Time to a held-out loss of {r['target_eval_loss']:.3f} ({m['cpu']}, {m['usable_cpus']} cores, one "
        f"thread each, torch {m['torch']})",
        "",
        f"`bench/bench_time_to_loss.py`: {r['what']}, {r['steps']} steps; learning rates AdamW "
        f"{r['learning_rates']['adamw']:g}, Muon {r['learning_rates']['muon']:g} (from bench/bench_muon.py's sweep). "
        "The machine is shared with other users' jobs (load average at each row's start).",
        "",
        "| contender | tokens to target | training seconds to target | held-out loss at the end | tokens/s | load |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        tok = f"{row['tokens_to_target']:,}" if row["tokens_to_target"] is not None else "not reached"
        sec = f"{row['seconds_to_target']}" if row["seconds_to_target"] is not None else "-"
        load = " / ".join(f"{x:.1f}" for x in row["load_average_at_start"])
        lines.append(
            f"| {row['contender']} | {tok} | {sec} | {row['final_eval_loss']:.4f} | {row['tokens_per_s']:,} | {load} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
