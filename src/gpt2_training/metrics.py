"""Numbers that describe a run: FLOPs per token, model FLOPs utilisation (MFU) from a table of peak FLOP/s,
bits per byte, and the unigram byte entropy that a model must beat to have learned anything."""

from __future__ import annotations

import math
from collections import Counter

import torch

# Dense peak tensor throughput in TFLOP/s, from the vendors' data sheets (no sparsity), for the math PyTorch
# uses: bf16/fp16 inputs with fp32 accumulation, and plain fp32 (TF32 off). Ordered so longer names match first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM ("H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
]


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s for a GPU name and precision, or None when the GPU or the precision is not in the table."""
    for key, table in PEAK_TFLOPS:
        if key in device_name:
            tflops = table.get(precision)
            return tflops * 1e12 if tflops else None
    return None


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's 12 * L * d * T
    (PaLM appendix B). Recomputation for gradient checkpointing is deliberately not counted: MFU measures
    useful work."""
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


def describe_mfu(tokens_per_s: float, flops_tok: float, precision: str) -> tuple[float | None, str]:
    """(mfu, text). On a CPU or an unknown GPU the answer is 'unknown', never a made-up percentage."""
    if not torch.cuda.is_available():
        return None, "MFU n/a on CPU"
    name = torch.cuda.get_device_name()
    peak = peak_flops(name, precision)
    if peak is None:
        return None, f"MFU unknown: no {precision} peak for {name!r} in metrics.PEAK_TFLOPS"
    mfu = tokens_per_s * flops_tok / peak
    return mfu, f"MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s ({name}, {precision})"


def bits_per_byte(loss_nats_sum: float, n_bytes: int) -> float:
    """Cross-entropy in bits per byte of text: comparable across tokenizers, unlike loss per token."""
    return loss_nats_sum / (math.log(2) * max(n_bytes, 1))


def unigram_byte_entropy(texts: list[str]) -> float:
    """Entropy in bits of the byte distribution: the bits per byte of a model that knows only byte frequencies.
    A reference scale, not a bar to clear: even an untrained token model beats it, because a uniform guess over a
    BPE vocabulary spreads its bits over several bytes per token."""
    counts: Counter[int] = Counter()
    for t in texts:
        counts.update(t.encode("utf-8", "replace"))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """Bytes of text each token id stands for (byte-level BPE: one character per byte; special tokens: 0)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    return torch.tensor([0 if i in special else len(tok) for i, tok in enumerate(vocab)], dtype=torch.long)
