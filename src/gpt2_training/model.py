"""The model: a standard `transformers.GPT2LMHeadModel`, built from a preset or loaded from pre-trained weights,
plus a fused cross-entropy that never materialises the full fp32 logits.

Checkpoints stay plain Hugging Face models, so `AutoModelForCausalLM.from_pretrained(dir)` loads them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from .config import ModelArguments, model_shape
from .errors import ConfigError


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Round up so the embedding and output matmuls hit fast kernel tile sizes (50257 -> 50304)."""
    return int(math.ceil(vocab_size / multiple) * multiple)


def gpt2_config(args: ModelArguments, vocab_size: int, bos_eos_id: int) -> GPT2Config:
    """A GPT2Config for the preset, with dropout and attention kernel from the settings."""
    shape = model_shape(args)
    return GPT2Config(
        vocab_size=padded_vocab_size(vocab_size, args.pad_vocab_to_multiple_of),
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=bos_eos_id,
        eos_token_id=bos_eos_id,
        # packed sequences are never padded: a pad id equal to EOS would make transformers warn on every batch
        # that starts or ends with an EOS that it may be padding
        pad_token_id=None,
        attn_implementation=args.attn_implementation,
        # GPT-2's tanh-GELU as torch's one C++ kernel: the same function as the Python `gelu_new` of the original
        # config (equal to ~1e-7), without its five element-wise ops and their saved activations
        activation_function="gelu_pytorch_tanh",
        loss_type="ForCausalLM",
        **shape,
    )


def count_parameters(config: GPT2Config) -> int:
    """Parameters of GPT2LMHeadModel for a config, counted analytically (tied input/output embeddings)."""
    d, L, v, p = config.n_embd, config.n_layer, config.vocab_size, config.n_positions
    inner = config.n_inner or 4 * d
    per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
    return v * d + p * d + L * per_block + 2 * d


def build_model(args: ModelArguments, vocab_size: int, eos_id: int) -> GPT2LMHeadModel:
    """From scratch (GPT-2's initialisation, seeded by the caller) or from pre-trained weights."""
    if args.init_from == "scratch":
        model = GPT2LMHeadModel(gpt2_config(args, vocab_size, eos_id))
    else:
        model = load_pretrained(args.init_from, args)
    # transformers 5 reads the loss from the model attribute, which GPT2LMHeadModel leaves unset (the config's
    # loss_type is ignored, and --loss_impl hf would warn "loss_type=None ... unrecognized")
    model.loss_type = "ForCausalLM"
    if args.init_from != "scratch" and model.config.vocab_size < vocab_size:
        # A tokenizer with more tokens than the checkpoint: grow the tables; the new rows get GPT-2's init.
        model.resize_token_embeddings(padded_vocab_size(vocab_size, args.pad_vocab_to_multiple_of))
    return model


def enable_activation_checkpointing(lm: GPT2LMHeadModel, kwargs: dict | None = None) -> None:
    """Recompute each block's activations in backward (non-reentrant by default: works with DDP and with inputs
    that need no grad). Recent transformers (5.24 here) renamed `gradient_checkpointing_enable` and deprecated the
    old name; older 5.x releases (5.17, the GPU image bench/gpu_check.sh runs on) have only the old one."""
    kwargs = kwargs or {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_for_training(
    args: ModelArguments, tokenizer: Any, block_size: int, train_args: Any
) -> GPT2LMHeadModel:
    """`build_model` for the tokenizer, checked against it and the sequence length, with activation checkpointing
    when `train_args` (TrainingArguments) ask for it and no generation cache."""
    vocab = len(tokenizer)
    lm = build_model(args, vocab, tokenizer.eos_token_id)
    if lm.config.vocab_size < vocab:
        raise ConfigError(f"tokenizer has {vocab} tokens but the model only {lm.config.vocab_size}")
    if lm.config.n_positions < block_size:
        raise ConfigError(
            f"block_size={block_size} exceeds the loaded model's n_positions={lm.config.n_positions}"
        )
    # activation_checkpointing(_kwargs): TrainingArguments fields added after transformers 5.17
    if getattr(train_args, "activation_checkpointing", False) or train_args.gradient_checkpointing:
        kwargs = getattr(train_args, "activation_checkpointing_kwargs", None)
        enable_activation_checkpointing(lm, kwargs or train_args.gradient_checkpointing_kwargs)
    lm.config.use_cache = False
    return lm


def load_pretrained(name_or_path: str, args: ModelArguments) -> GPT2LMHeadModel:
    """Load weights from a local folder or the Hub, with a clear message when offline."""
    from .data.tokenizer import refuse_custom_code

    local = Path(name_or_path)
    refuse_custom_code(
        name_or_path, "--init_from", "use a GPT-2 folder without auto_map, such as `final/` of a run"
    )
    try:
        return GPT2LMHeadModel.from_pretrained(
            name_or_path,
            trust_remote_code=False,
            attn_implementation=args.attn_implementation,
            resid_pdrop=args.dropout,
            embd_pdrop=args.dropout,
            attn_pdrop=args.dropout,
        )
    except OSError as exc:
        where = "local folder" if local.exists() else "Hugging Face Hub name"
        raise ConfigError(
            f"cannot load pre-trained weights from {where} {name_or_path!r} ({type(exc).__name__}): "
            "check the name and your network, or download it once with internet access "
            "(hf download gpt2 --local-dir models/gpt2) and pass the local folder to --init_from"
        ) from exc


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, computed chunk by chunk.

    The gradients for `hidden` and `weight` are computed during the forward pass, one chunk at a time,
    so neither the [tokens, vocab] logits nor their fp32 copy are ever held for the backward pass. This is the
    trick behind Liger-Kernel's fused linear cross-entropy, written here in plain PyTorch.

    One [chunk, vocab] buffer serves every chunk and is worked on in place: the logits, then exp(logits - row
    max), whose row sums give the log-sum-exp, then softmax / n, less 1/n at the targets, which is the loss's
    gradient with respect to the logits. That is one exponential per logit and no buffer allocated per chunk
    (`F.cross_entropy` takes two exponentials). Its effect on a CPU's step: bench/results/nanogpt-cpu.md.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype: torch.dtype):
        n = hidden.shape[0]
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax in fp32 at least (fp64 stays fp64)
        need_grad = hidden.requires_grad or weight.requires_grad
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        buffer = torch.empty((min(chunk_size, n), weight.shape[0]), dtype=acc, device=hidden.device)
        # [D, V], contiguous: a layout MKL multiplies faster than the transposed view on a CPU
        w_t = w.t().contiguous()
        fp32_product = compute_dtype == acc  # else a 16-bit product, with the softmax in fp32
        for start in range(0, n, chunk_size):
            h_c = h[start : start + chunk_size]
            t_c = targets[start : start + chunk_size]
            rows = len(t_c)
            z = buffer[:rows]
            if fp32_product:
                torch.mm(h_c, w_t, out=z)
            else:
                z.copy_(h_c @ w_t)
            target_logit = z.gather(1, t_c[:, None])
            row_max = z.amax(1, keepdim=True)
            z.sub_(row_max).exp_()
            row_sum = z.sum(1, keepdim=True)
            total += (row_max + row_sum.log() - target_logit).sum()
            if need_grad:
                z.mul_(row_sum.reciprocal_().mul_(1.0 / n))  # softmax / n
                z[torch.arange(rows, device=z.device), t_c] -= 1.0 / n
                if fp32_product:
                    torch.mm(z, w, out=grad_h[start : start + rows])
                    grad_w.addmm_(z.t(), h_c)
                else:
                    g = z.to(compute_dtype)
                    torch.mm(g, w, out=grad_h[start : start + rows])
                    grad_w += (g.t() @ h_c).to(acc)
        if need_grad:
            ctx.save_for_backward(grad_h.to(hidden.dtype), grad_w.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


# A chunk's rows on a GPU (large matmuls keep it busy) and its logits on a CPU, where a chunk of 2**21 logits
# (8 MB in fp32; 512 rows of a 4,096-token vocabulary) was the fastest of 2**19 to 2**22 and keeps the run's peak
# memory down.
GPU_CHUNK_ROWS = 4096
CPU_CHUNK_LOGITS = 2**21


def loss_chunk_rows(device: torch.device, vocab_size: int) -> int:
    """Rows of the output layer computed at once by the chunked loss on this device."""
    if device.type == "cpu":
        return max(1, CPU_CHUNK_LOGITS // vocab_size)
    return GPU_CHUNK_ROWS


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Mean next-token loss from final hidden states [N, D], the output matrix [V, D] and targets [N];
    `chunk_size` rows at a time (default: `loss_chunk_rows` for the device)."""
    chunk_size = chunk_size or loss_chunk_rows(hidden.device, weight.shape[0])
    dtype = (
        torch.get_autocast_dtype(hidden.device.type)
        if torch.is_autocast_enabled(hidden.device.type)
        else None
    )
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, dtype or hidden.dtype)


class CausalLMWithLoss(torch.nn.Module):
    """Wraps a GPT2LMHeadModel so that forward returns the next-token loss on packed sequences.

    The loss must live inside forward: DDP, FSDP and DeepSpeed only synchronise gradients of computations that
    run through the wrapped module's forward. `self.lm` stays a plain Hugging Face model for saving.
    """

    def __init__(self, lm: GPT2LMHeadModel, loss_impl: str = "chunked"):
        super().__init__()
        self.lm = lm
        self.loss_impl = loss_impl

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.loss_impl == "hf":
            return self.lm(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        hidden = self.lm.transformer(input_ids=input_ids, use_cache=False).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return chunked_cross_entropy(h, self.lm.lm_head.weight, input_ids[:, 1:].reshape(-1))


def reference_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The plain computation the chunked loss must match (used by tests and benchmarks)."""
    return F.cross_entropy((hidden @ weight.t()).float(), targets)
