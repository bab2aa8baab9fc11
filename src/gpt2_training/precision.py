"""Choosing the numeric precision: bf16 where the hardware does it natively, fp16 with loss scaling on older
GPUs, fp32 otherwise. An explicit choice is honoured or refused with the reason (see options.validate)."""

from __future__ import annotations

import torch


def cuda_bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_bf16_supported() -> bool:
    """True on CPUs with native bf16 instructions (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_supported() -> bool:
    return cuda_bf16_supported() if torch.cuda.is_available() else cpu_bf16_supported()


def resolve_precision(requested: str) -> tuple[str, str]:
    """(precision, reason) for 'auto', or the explicit choice with a note on why it is allowed."""
    if requested != "auto":
        return requested, "chosen explicitly"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if cuda_bf16_supported():
            return "bf16", f"{name} supports bf16 natively"
        return "fp16", f"{name} has no native bf16, so fp16 with dynamic loss scaling"
    if cpu_bf16_supported():
        return "bf16", "this CPU has native bf16 instructions (autocast)"
    return "fp32", "no GPU and no native bf16 on this CPU (emulated bf16 would be slower than fp32)"
