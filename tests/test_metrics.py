"""Run metrics: MFU only from a known peak (never a made-up percentage), FLOPs per token, bits per byte."""

import math

import pytest
import torch

from gpt2_training.metrics import (
    bits_per_byte,
    describe_mfu,
    flops_per_token,
    peak_flops,
    token_byte_lengths,
    unigram_byte_entropy,
)


@pytest.mark.parametrize(
    ("name", "precision", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("Tesla V100-SXM2-16GB", "fp16", 125.0),
        ("Tesla T4", "fp16", 65.0),
        ("NVIDIA A10G", "bf16", 70.0),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("NVIDIA GeForce RTX 3090", "fp32", 35.6),
    ],
)
def test_peak_flops_table(name, precision, tflops):
    assert peak_flops(name, precision) == pytest.approx(tflops * 1e12)


def test_unknown_gpu_or_unsupported_precision_gives_no_number():
    assert peak_flops("Some Future GPU", "bf16") is None
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # V100 has no bf16 tensor cores


def test_mfu_is_never_invented_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    mfu, text = describe_mfu(1e6, 1e9, "fp32")
    assert mfu is None and "n/a" in text


def test_flops_per_token_for_gpt2_small():
    # 6 N + 12 L d T (PaLM appendix B) for 124,439,808 parameters at sequence 1024
    assert flops_per_token(124_439_808, 12, 768, 1024) == 6 * 124_439_808 + 12 * 12 * 768 * 1024


def test_bits_per_byte_and_unigram_entropy():
    assert bits_per_byte(math.log(2) * 100, 100) == pytest.approx(1.0)
    assert unigram_byte_entropy(["abab"]) == pytest.approx(1.0)
    assert unigram_byte_entropy(["aaaa"]) == 0.0


def test_token_byte_lengths_count_bytes_not_characters(tmp_path):
    from gpt2_training.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["héllo wörld " * 50], 300, tmp_path / "bpe")
    lengths = token_byte_lengths(tok)
    ids = tok("héllo", add_special_tokens=False)["input_ids"]
    assert int(lengths[ids].sum()) == len("héllo".encode())
    assert int(lengths[tok.eos_token_id]) == 0
