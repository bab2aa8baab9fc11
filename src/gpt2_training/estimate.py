"""Time and cost of a training run from a MEASURED throughput (`train.py estimate`), or from one measured on
another model size, extrapolated by FLOPs per token and said to be so."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from .errors import ConfigError
from .metrics import flops_per_token
from .model import count_parameters
from .planner import resolve_config


def _model_numbers(model: int | str, block_size: int | None) -> tuple[int, float, str]:
    """(n_params, training FLOPs per token, label) for a preset name or a bare parameter count."""
    if isinstance(model, str):
        cfg = resolve_config(model)
        n = count_parameters(cfg)
        return n, flops_per_token(n, cfg.n_layer, cfg.n_embd, block_size or cfg.n_positions), model
    n = int(model)
    return n, 6.0 * n, f"{n / 1e6:.1f} M parameters"  # no shape known: 6N (attention not counted)


@dataclass
class Estimate:
    model: str
    n_params: int
    tokens: float
    tokens_per_s: float  # whole job
    num_gpus: int
    seconds: float
    hours: float
    days: float
    gpu_hours: float
    cost: float | None
    price_per_gpu_hour: float | None
    flops_per_token: float
    total_flops: float
    achieved_tflops_per_gpu: float
    extrapolated_from: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        lines = []
        if self.extrapolated_from:
            lines.append(f"EXTRAPOLATED throughput: {self.extrapolated_from}")
        lines.append(
            f"{self.model} ({self.n_params / 1e6:.1f} M params): {self.tokens:.3g} tokens at "
            f"{self.tokens_per_s:,.0f} tokens/s (all {self.num_gpus} GPU(s) together) -> "
            f"{_duration(self.seconds)} wall-clock, {self.gpu_hours:,.1f} GPU-hours"
        )
        if self.cost is not None:
            lines.append(
                f"cost: {self.gpu_hours:,.1f} GPU-h x {self.price_per_gpu_hour:g}/GPU-h = {self.cost:,.2f}"
            )
        lines.append(
            f"work: {self.total_flops:.3g} FLOPs ({self.flops_per_token:.3g} per token); that throughput is "
            f"{self.achieved_tflops_per_gpu:.1f} TFLOP/s per GPU (compare with the GPU's peak for its MFU)"
        )
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.2f} days ({seconds / 3600:.1f} h)"


def estimate(
    model: int | str,
    tokens: float,
    tokens_per_s: float,
    num_gpus: int = 1,
    price_per_gpu_hour: float | None = None,
    *,
    block_size: int | None = None,
) -> Estimate:
    """Wall-clock time, GPU-hours and cost to train `model` (preset name or parameter count) on `tokens` at a
    measured whole-job throughput of `tokens_per_s` on `num_gpus` GPUs."""
    problems = [
        f"{name} must be > 0, got {value:g}"
        for name, value in (("tokens", tokens), ("tokens_per_s", tokens_per_s))
        if value <= 0
    ]
    if num_gpus < 1:
        problems.append(f"num_gpus must be >= 1, got {num_gpus}")
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        problems.append(f"price_per_gpu_hour must be >= 0, got {price_per_gpu_hour:g}")
    if problems:
        raise ValueError("; ".join(problems))
    n, fpt, label = _model_numbers(model, block_size)
    seconds = tokens / tokens_per_s
    gpu_hours = seconds / 3600 * num_gpus
    return Estimate(
        model=label,
        n_params=n,
        tokens=tokens,
        tokens_per_s=tokens_per_s,
        num_gpus=num_gpus,
        seconds=seconds,
        hours=seconds / 3600,
        days=seconds / 86400,
        gpu_hours=gpu_hours,
        cost=gpu_hours * price_per_gpu_hour if price_per_gpu_hour is not None else None,
        price_per_gpu_hour=price_per_gpu_hour,
        flops_per_token=fpt,
        total_flops=fpt * tokens,
        achieved_tflops_per_gpu=tokens_per_s * fpt / num_gpus / 1e12,
    )


def extrapolate_tokens_per_s(
    measured_tokens_per_s: float,
    measured_model: int | str,
    target_model: int | str,
    *,
    block_size: int | None = None,
) -> tuple[float, str]:
    """EXTRAPOLATION: tokens/s of `target_model` from a measurement on `measured_model`, scaled by the ratio of
    training FLOPs per token (i.e. assuming the same MFU on the same hardware). Returns (tokens/s, explanation)."""
    _, f_from, l_from = _model_numbers(measured_model, block_size)
    _, f_to, l_to = _model_numbers(target_model, block_size)
    tps = measured_tokens_per_s * f_from / f_to
    note = (
        f"{measured_tokens_per_s:,.0f} tokens/s measured on {l_from} x ({f_from:.3g} / {f_to:.3g} FLOPs per token) "
        f"= {tps:,.0f} tokens/s for {l_to}; this assumes the same MFU, so treat it as a rough guide and measure "
        "a few steps of the real configuration before committing budget"
    )
    return tps, note


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py estimate",
        description="Training time and cost from a throughput. --tokens_per_s is the whole job's (all GPUs "
        "together: the training log's figure per process times the processes); --tokens_per_s_per_gpu ASSUMES "
        "linear scaling to --gpus. --from_preset P --from_tokens_per_s X EXTRAPOLATES from another model size by "
        "the ratio of training FLOPs per token, which assumes the same MFU: roughly true for neighbouring sizes "
        "on the same GPU, batch and block size, optimistic for small models and when the larger one needs "
        "checkpointing or sharding. Measure with bench/bench_training.py or a short run of the real job.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="Model size (a preset name).")
    what.add_argument("--n_params", type=float, help="Parameter count, when the model is no preset.")
    p.add_argument("--tokens", type=float, required=True, help="Tokens to train on, e.g. 9e9.")
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--tokens_per_s", type=float, help="Measured throughput of the whole job (all GPUs).")
    rate.add_argument(
        "--tokens_per_s_per_gpu",
        type=float,
        help="Measured throughput of one GPU; ASSUMES linear scaling to --gpus.",
    )
    rate.add_argument(
        "--from_tokens_per_s",
        type=float,
        help="Measured whole-job throughput of --from_preset: EXTRAPOLATE by FLOPs per token.",
    )
    p.add_argument("--from_preset", help="The model size --from_tokens_per_s was measured on.")
    p.add_argument("--gpus", "--num_gpus", dest="gpus", type=int, default=1)
    p.add_argument("--price_per_gpu_hour", type=float, default=None)
    p.add_argument(
        "--block_size",
        "--seq_len",
        type=int,
        default=None,
        help="Tokens per sequence (default: the preset's n_positions; --seq_len is its older spelling).",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    p = _parser()
    a = p.parse_args(argv)
    model: int | str = a.preset if a.preset else int(a.n_params)
    note = None
    if a.tokens_per_s is not None:
        tps = a.tokens_per_s
    elif a.tokens_per_s_per_gpu is not None:
        tps = a.tokens_per_s_per_gpu * a.gpus
        note = None
        print(f"assuming linear scaling: {a.tokens_per_s_per_gpu:,.0f} tokens/s per GPU x {a.gpus} GPUs")
    else:
        if not a.from_preset:
            p.error("--from_tokens_per_s needs --from_preset")
        tps, note = extrapolate_tokens_per_s(
            a.from_tokens_per_s, a.from_preset, model, block_size=a.block_size
        )
    try:
        est = estimate(model, a.tokens, tps, a.gpus, a.price_per_gpu_hour, block_size=a.block_size)
    except ValueError as exc:
        # a one-line error with exit status 2, as for every other bad setting of train.py
        raise ConfigError(f"train.py estimate: {exc}") from exc
    est.extrapolated_from = note
    print(est.text())
    return est.as_dict()
