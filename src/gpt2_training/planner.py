"""Memory planner: how many bytes one GPU needs to train a GPT-2 configuration (`plan_memory`), and the cheapest
change that makes it fit a given GPU (`advise`, `train.py plan`)."""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace

from transformers import GPT2Config

from .config import LOSS_IMPLS, PRESETS
from .config import OPTIMIZERS as OPTIMIZER_KINDS
from .errors import ConfigError
from .model import count_parameters, padded_vocab_size

GIB = 1 << 30
MIB = 1 << 20
GPT2_VOCAB = 50257
CHUNK_SIZE = 4096  # model.GPU_CHUNK_ROWS: the chunked loss's rows per chunk on a GPU
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes 0.50 Optimizer2State default `min_8bit_size`
BNB_BLOCKSIZE = 256  # bitsandbytes 0.50 blockwise 8-bit states: one fp32 absmax per 256 elements
BNB_QMAP_BYTES = 2 * 256 * 4  # qmap1 (signed dynamic map) + qmap2 (unsigned), shared by all tensors
WORKSPACE_BYTES = 256 * MIB  # cuBLAS workspaces, cuDNN/SDPA scratch, small buffers
FRAGMENTATION = 0.05  # caching-allocator slack on the activation-sized blocks
CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context + kernels: outside max_memory_allocated, inside nvidia-smi
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# --optim's names (optim.py's table, the one list) and the short names of the kinds they keep state as
OPTIMIZERS = {
    **{kind: kind for kind in OPTIMIZER_KINDS.values()},
    **OPTIMIZER_KINDS,
    "adamw_fused": "adamw_fused",
}
# each kind's --optim name, for building it as the training run does
_OPTIM_NAME = {kind: name for name, kind in reversed(OPTIMIZER_KINDS.items())}


# -- the model's tensors ------------------------------------------------------------------------------------------
def resolve_config(config: GPT2Config | str, vocab_size: int | None = None, pad_to: int = 64) -> GPT2Config:
    """A GPT2Config from a preset name (GPT-2's 50257-token vocabulary padded to a multiple of 64) or as given."""
    if isinstance(config, GPT2Config):
        return config
    if config not in PRESETS:
        raise ValueError(f"unknown preset {config!r}: choose one of {', '.join(PRESETS)}")
    return GPT2Config(
        vocab_size=padded_vocab_size(vocab_size or GPT2_VOCAB, pad_to),
        # as model.gpt2_config builds a scratch model
        activation_function="gelu_pytorch_tanh",
        **PRESETS[config],
    )


def parameter_shapes(config: GPT2Config) -> list[tuple[str, int]]:
    """(name, numel) of every distinct parameter tensor of GPT2LMHeadModel (lm_head is tied to wte)."""
    d, v, p = config.n_embd, config.vocab_size, config.n_positions
    inner = config.n_inner or 4 * d
    out = [("wte", v * d), ("wpe", p * d)]
    for i in range(config.n_layer):
        out += [
            (f"h.{i}.ln_1.weight", d),
            (f"h.{i}.ln_1.bias", d),
            (f"h.{i}.attn.c_attn.weight", d * 3 * d),
            (f"h.{i}.attn.c_attn.bias", 3 * d),
            (f"h.{i}.attn.c_proj.weight", d * d),
            (f"h.{i}.attn.c_proj.bias", d),
            (f"h.{i}.ln_2.weight", d),
            (f"h.{i}.ln_2.bias", d),
            (f"h.{i}.mlp.c_fc.weight", d * inner),
            (f"h.{i}.mlp.c_fc.bias", inner),
            (f"h.{i}.mlp.c_proj.weight", inner * d),
            (f"h.{i}.mlp.c_proj.bias", d),
        ]
    out += [("ln_f.weight", d), ("ln_f.bias", d)]
    assert sum(n for _, n in out) == count_parameters(config)
    return out


def optimizer_state_bytes(config: GPT2Config, optim: str = "adamw_torch") -> int:
    """Bytes of the optimizer's state tensors once it has stepped (unsharded)."""
    kind = OPTIMIZERS[optim]
    shapes = parameter_shapes(config)
    if kind in ("adamw", "adamw_fused"):
        return sum(2 * 4 * n + 4 for _, n in shapes)  # exp_avg, exp_avg_sq (fp32) + a float32 `step` tensor
    if kind == "sgd":
        return 0  # no momentum unless --optim_args asks for it
    if kind == "muon":
        # one fp32 momentum buffer per hidden matrix (c_attn as three); AdamW's two moments for the rest
        hidden = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
        return sum(4 * n if name.endswith(hidden) else 2 * 4 * n + 4 for name, n in shapes)
    total, any_8bit = 0, False
    for _, n in shapes:
        if n >= BNB_MIN_8BIT_SIZE:
            # state1/state2 uint8 + absmax1/absmax2 fp32 (one per block)
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCKSIZE)
            any_8bit = True
        else:
            total += 2 * 4 * n  # small tensors keep 32-bit states (bnb's min_8bit_size)
    return total + (BNB_QMAP_BYTES if any_8bit else 0)  # `step` is a Python int in bnb


# -- activations ----------------------------------------------------------------------------------------------------
def layer_activation_bytes_per_token(
    config: GPT2Config,
    block_size: int,
    dtype_bytes: int,
    *,
    attn_implementation: str = "sdpa",
    dropout: float = 0.0,
) -> float:
    """Bytes autograd saves per token in one eager GPT2Block (fp32 weights, autocast to `dtype_bytes`).

    Walking GPT2Block.forward (s = compute-dtype bytes, d = n_embd, H = heads; the residual stream stays fp32
    because bf16 + fp32 promotes to fp32):
      ln_1: input 4d + mean/rstd 8           c_attn: its (cast) input s*d
      SDPA: q, k, v (views of c_attn's output) 3*s*d, output s*d (also c_proj's input), logsumexp 4*H
      ln_2: input 4d + 8                     c_fc: its (cast) input s*d
      gelu_pytorch_tanh (one C++ kernel, this project's scratch models): its input x 4*s*d; the Python gelu_new
        (0.5*x*(1+tanh(c*(x+0.044715*x^3))), pre-trained GPT-2 configs) saves x (by pow) 4*s*d, the tanh output
        4*s*d, 0.5*x 4*s*d and 1+tanh 4*s*d (by the final multiply)
      mlp.c_proj: its input (the gelu output) 4*s*d
    = 8d + 16 + 4H + 14*s*d with the C++ GELU (26*s*d with gelu_new). Dropout > 0 adds two 1-byte residual masks per layer (2d); eager attention saves
    the fp32 softmax output and its s-byte cast (plus a 1-byte dropout mask) per head and key: H*T*(4+s[+1]).
    """
    d, heads = config.n_embd, config.n_head
    per = 8 * d + 16 + (26 if config.activation_function == "gelu_new" else 14) * dtype_bytes * d
    if attn_implementation == "eager":
        per += heads * block_size * (4 + dtype_bytes + (1 if dropout > 0 else 0))
    else:
        per += 4 * heads
    if dropout > 0:
        per += 2 * d
    return per


def activation_bytes(
    config: GPT2Config,
    per_device_train_batch_size: int,
    block_size: int,
    dtype_bytes: int,
    gradient_checkpointing: bool = False,
    attn_implementation: str = "sdpa",
    dropout: float = 0.0,
) -> int:
    """Saved activations of the whole transformer (embeddings, blocks, ln_f), excluding the loss head."""
    tokens = per_device_train_batch_size * block_size
    layer = layer_activation_bytes_per_token(
        config, block_size, dtype_bytes, attn_implementation=attn_implementation, dropout=dropout
    )
    if gradient_checkpointing:
        # Non-reentrant checkpointing keeps each block's fp32 input; backward recomputes one block at a time.
        blocks = config.n_layer * 4 * config.n_embd + layer
    else:
        blocks = config.n_layer * layer
    outside = 8 + 8 + 4 * config.n_embd + 8  # token ids (int64) for wte, ln_f input + mean/rstd
    if dropout > 0:
        outside += config.n_embd  # embedding dropout mask
    return int(tokens * (blocks + outside))


def loss_head_bytes(
    config: GPT2Config,
    per_device_train_batch_size: int,
    block_size: int,
    dtype_bytes: int,
    loss_impl: str,
    chunk_size: int = CHUNK_SIZE,
) -> int:
    """Peak bytes of the loss computation on top of the activations (see model._ChunkedLinearCrossEntropy)."""
    d, v = config.n_embd, config.vocab_size
    if loss_impl == "hf":
        n = per_device_train_batch_size * block_size
        forward = (dtype_bytes + (4 if dtype_bytes != 4 else 0) + 4) * n * v  # logits, fp32 copy, log-softmax
        backward = 12 * n * v  # saved log-softmax + nll's dense gradient + log-softmax's input gradient
        return int(max(forward, backward))
    n = per_device_train_batch_size * (block_size - 1)
    copy = (
        dtype_bytes if dtype_bytes != 4 else 0
    )  # `.to(compute_dtype)` is free when the dtype already matches
    saved = 4 * n * d + 4 * v * d  # grad_h (fp32) and grad_w (fp32) saved for backward
    fixed = 4 * n * d + copy * (
        2 * n * d + v * d
    )  # hidden[:, :-1] copy; h, grad_h and w in the compute dtype
    c = min(chunk_size, n)
    # One fp32 [chunk, vocab] buffer reused by every chunk, worked on in place, and the weight's transposed copy;
    # in 16 bits also the chunk's 16-bit logits and its 16-bit gradient.
    chunk = 4 * c * v + 2 * copy * c * v
    w_t = (copy or 4) * v * d
    return int(saved + fixed + w_t + chunk + (copy + 4) * v * d * bool(copy))  # g.T @ h_c's fp32 copy


# -- the plan -------------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Predicted bytes on ONE GPU; `peak` is what torch.cuda.max_memory_allocated should show (roughly),
    `total` adds the CUDA context and is what must fit on the card."""

    model: str
    n_params: int
    per_device_train_batch_size: int
    block_size: int
    precision: str
    gradient_checkpointing: bool
    optim: str
    zero_stage: int
    fsdp: bool
    num_gpus: int
    loss_impl: str
    gradient_accumulation_steps: int
    weights: int
    gradients: int
    optimizer_states: int
    master_weights: int
    autocast_weight_copies: int
    activations: int
    loss_head: int
    optimizer_temp: int
    workspace: int
    cuda_context: int
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.master_weights

    @property
    def forward_backward_peak(self) -> int:
        return self.static + self.autocast_weight_copies + self.activations + self.loss_head + self.workspace

    @property
    def optimizer_step_peak(self) -> int:
        return self.static + self.optimizer_temp + WORKSPACE_BYTES

    @property
    def peak(self) -> int:
        return max(self.forward_backward_peak, self.optimizer_step_peak)

    @property
    def total(self) -> int:
        return self.peak + self.cuda_context

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(peak=self.peak, total=self.total, total_gib=self.total / GIB)
        return out

    def table(self) -> str:
        # the parts in the order they add up, then the totals; each labelled by its name unless named here
        labels = {
            "loss_head": "loss head (logits)",
            "workspace": "workspace + fragmentation",
            "optimizer_temp": "optimizer-step temporaries",
            "peak": "peak allocated (max_memory_allocated)",
            "cuda_context": "CUDA context",
            "total": "total per GPU",
        }
        names = ("weights", "gradients", "optimizer_states", "master_weights", "autocast_weight_copies")
        names += ("activations", "loss_head", "workspace", "optimizer_temp", "peak", "cuda_context", "total")
        rows = [(labels.get(n, n.replace("_", " ")), getattr(self, n)) for n in names]
        sharding = f"ZeRO-{self.zero_stage}" if self.zero_stage else ("FSDP" if self.fsdp else "no sharding")
        head = (
            f"{self.model} ({self.n_params / 1e6:.1f} M params), micro-batch {self.per_device_train_batch_size} x "
            f"seq {self.block_size} x accumulation {self.gradient_accumulation_steps}, {self.precision}, "
            f"{OPTIMIZERS[self.optim]}, "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, loss {self.loss_impl}, "
            f"{sharding} on {self.num_gpus} GPU(s)"
        )
        lines = [head, "", "| component | GiB |", "|---|---:|"]
        lines += [f"| {name} | {b / GIB:.2f} |" for name, b in rows]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def _optimizer_kind(optim: str) -> str:
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim {optim!r}: use one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[optim]


def plan_memory(
    config: GPT2Config | str = "gpt2-small",
    per_device_train_batch_size: int = 16,
    block_size: int | None = None,
    precision: str = "bf16",
    gradient_checkpointing: bool = False,
    optim: str = "adamw_torch",
    zero_stage: int = 0,
    fsdp: bool = False,
    num_gpus: int = 1,
    loss_impl: str = "chunked",
    *,
    gradient_accumulation_steps: int = 1,
    attn_implementation: str = "sdpa",
    dropout: float = 0.0,
    chunk_size: int = CHUNK_SIZE,
) -> MemoryPlan:
    """Predict per-GPU memory for one training configuration. The settings have the names and meaning of the
    training settings; zero_stage, fsdp and num_gpus say how the state is sharded.

    What is modelled, and how (every number is derived from the code this project runs, not from a rule of
    thumb):

    * weights, gradients, optimizer states: exact. This project keeps fp32 parameters and uses autocast, so
      the fp32 weights *are* the master copy (no separate master weights); torch AdamW holds exp_avg +
      exp_avg_sq (2 x 4 bytes/param) and a 4-byte `step` tensor per parameter tensor; bitsandbytes 0.50
      AdamW8bit holds, for a tensor of >= `min_8bit_size` (4096) elements, two uint8 states (2 bytes/param)
      plus two fp32 absmax values per block of 256 elements, and for smaller tensors two fp32 states; its two
      256-entry fp32 quantisation maps are shared by all tensors. Tests compare these numbers with the bytes
      of real tensors, byte for byte.
    * autocast weight copies: under bf16/fp16 autocast each Conv1D weight is cast once per forward and the
      copy is saved for backward, so 2 bytes per block parameter live from the forward until that layer's
      backward.
    * activations: the tensors autograd saves in Hugging Face's eager GPT2Block with SDPA attention (see
      `layer_activation_bytes_per_token`). torch.compile usually saves less (it recomputes cheap pointwise
      ops), so for a compiled model this is an upper bound.
    * loss head: the chunked loss keeps its fp32 dL/dhidden and dL/dW_out for the backward pass and builds a
      few [chunk, vocab] fp32 buffers at a time; 'hf' builds the full [tokens, vocab] logits in the compute
      dtype, an fp32 copy, the fp32 log-softmax and, in backward, two more fp32 [tokens, vocab] gradients.
    * workspace: a fixed allowance for cuBLAS/cuDNN workspaces plus 5% allocator fragmentation, and the CUDA
      context (~0.5 GiB, outside `torch.cuda.max_memory_allocated`) which `fits` counts.

    The peak is the larger of two phases: forward/backward (weights, gradients, states, activations, loss
    head) and the optimizer step (weights, gradients, states and the foreach AdamW's temporary). Sharding
    (num_gpus > 1): ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 also weights (DeepSpeed's
    own mixed-precision layout: 2-byte weights and gradients, fp32 master + states in the optimizer, as in the
    ZeRO paper); FSDP shards fp32 weights, gradients and states and gathers about two layers at a time.
    """
    name = config if isinstance(config, str) else f"custom (L={config.n_layer}, d={config.n_embd})"
    cfg = resolve_config(config)
    block_size = block_size or cfg.n_positions
    if precision not in DTYPE_BYTES:
        raise ValueError(f"precision {precision!r}: use bf16, fp16 or fp32")
    counts = {
        "per_device_train_batch_size": per_device_train_batch_size,
        "block_size": block_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
    }
    for what, value in counts.items():
        if value < 1:
            raise ValueError(f"{what} must be >= 1, got {value}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if not 0 <= zero_stage <= 3:
        raise ValueError("zero_stage must be 0, 1, 2 or 3")
    if zero_stage and fsdp:
        raise ValueError("choose ZeRO (DeepSpeed) or FSDP, not both")
    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {', '.join(LOSS_IMPLS)}")
    opt = _optimizer_kind(optim)
    s = DTYPE_BYTES[precision]
    n_gpus = int(num_gpus)
    shapes = parameter_shapes(cfg)
    P = sum(n for _, n in shapes)
    block_params = sum(n for k, n in shapes if k.startswith("h."))
    states = optimizer_state_bytes(cfg, opt)
    notes: list[str] = []
    master = 0
    copies = 2 * block_params if s == 2 else 0
    weights, grads = 4 * P, 4 * P
    # foreach AdamW: a parameter-sized sqrt(exp_avg_sq) temporary (Muon's AdamW part: less; counted in full)
    temp = 4 * P if opt in ("adamw", "muon") else 0
    if zero_stage and s == 2:
        # DeepSpeed's mixed precision: the model itself is cast to 16 bits; the optimizer owns an fp32 master.
        weights, grads, master, copies = 2 * P, 2 * P, 4 * P, 0
        notes.append(
            "DeepSpeed bf16/fp16: 2-byte weights and gradients, fp32 master weights in the optimizer"
        )
    shard = {
        "weights": n_gpus if (zero_stage == 3 or fsdp) else 1,
        "grads": n_gpus if (zero_stage >= 2 or fsdp) else 1,
        "states": n_gpus if (zero_stage >= 1 or fsdp) else 1,
    }
    weights, grads = math.ceil(weights / shard["weights"]), math.ceil(grads / shard["grads"])
    states, master = math.ceil(states / shard["states"]), math.ceil(master / shard["states"])
    temp = math.ceil(temp / shard["states"])
    if (zero_stage == 3 or fsdp) and n_gpus > 1:
        per_layer = block_params // cfg.n_layer
        gathered = (
            2 * per_layer * (s + s)
        )  # ~2 layers gathered (prefetch) in the compute dtype, + their grads
        gathered += 4 * cfg.vocab_size * cfg.n_embd // (1 if fsdp else 2)  # the embedding unit when it runs
        weights += gathered
        notes.append("ZeRO-3/FSDP: includes ~2 gathered layers and the embedding while they compute")
        if fsdp:
            copies = 0
    if s == 2 and not (zero_stage and s == 2) and not ((zero_stage == 3 or fsdp) and n_gpus > 1):
        notes.append(
            f"fp32 weights are the master copy (autocast); bf16 casts of the block weights "
            f"({copies / GIB:.2f} GiB) live from the forward to each layer's backward"
        )
    acts = activation_bytes(
        cfg, per_device_train_batch_size, block_size, s, gradient_checkpointing, attn_implementation, dropout
    )
    head = loss_head_bytes(cfg, per_device_train_batch_size, block_size, s, loss_impl, chunk_size)
    workspace = WORKSPACE_BYTES + int(FRAGMENTATION * (acts + head))
    if attn_implementation == "sdpa":
        notes.append("activations: eager HF GPT2Block with SDPA; torch.compile saves less (upper bound)")
    return MemoryPlan(
        model=name,
        n_params=P,
        per_device_train_batch_size=per_device_train_batch_size,
        block_size=block_size,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        optim=optim,
        zero_stage=zero_stage,
        fsdp=fsdp,
        num_gpus=n_gpus,
        loss_impl=loss_impl,
        gradient_accumulation_steps=gradient_accumulation_steps,
        weights=weights,
        gradients=grads,
        optimizer_states=states,
        master_weights=master,
        autocast_weight_copies=copies,
        activations=acts,
        loss_head=head,
        optimizer_temp=temp,
        workspace=workspace,
        cuda_context=CUDA_CONTEXT_BYTES,
        notes=notes,
    )


def fits(plan: MemoryPlan, gpu_gib: float) -> bool:
    """True when the plan's total (peak allocations + CUDA context) fits a GPU of `gpu_gib` GiB."""
    return plan.total <= gpu_gib * GIB


# -- advice ---------------------------------------------------------------------------------------------------------
@dataclass
class Advice:
    fits_as_is: bool
    plan: MemoryPlan
    gpu_memory_gib: float
    change: str | None = None  # None: nothing needed, or nothing found
    settings: dict = field(default_factory=dict)  # the recommended keyword arguments of plan_memory
    recommended: MemoryPlan | None = None
    tried: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.fits_as_is or self.recommended is not None

    def text(self) -> str:
        need = self.plan.total / GIB
        if self.fits_as_is:
            return (
                f"fits: {need:.1f} GiB of {self.gpu_memory_gib:g} GiB "
                f"({self.gpu_memory_gib - need:.1f} GiB to spare)"
            )
        if self.recommended is None:
            return (
                f"does NOT fit: needs {need:.1f} GiB of {self.gpu_memory_gib:g} GiB, and none of the changes "
                f"tried fits ({'; '.join(self.tried)}); use a GPU with more memory or a smaller model"
            )
        return (
            f"does NOT fit: needs {need:.1f} GiB of {self.gpu_memory_gib:g} GiB.\n"
            f"cheapest change that fits: {self.change} -> {self.recommended.total / GIB:.1f} GiB"
        )


def _plan_settings(*args, **settings) -> dict:
    """`plan_memory`'s arguments as given (positional or by name), with its defaults filled in."""
    bound = inspect.signature(plan_memory).bind(*args, **settings)
    bound.apply_defaults()
    return dict(bound.arguments)


def _divisors_desc(n: int) -> list[int]:
    return [k for k in range(n - 1, 0, -1) if n % k == 0]


def advise(config: GPT2Config | str = "gpt2-small", *, gpu_memory_gib: float, **settings) -> Advice:
    """Does it fit a GPU of `gpu_memory_gib`? If not, the cheapest change (in throughput) that makes it fit.
    `settings` are `plan_memory`'s keyword arguments, with its defaults.

    Changes are tried in order of cost, each keeping the effective batch (per_device_train_batch_size x
    gradient_accumulation_steps):
      1. a smaller micro-batch with more gradient accumulation (largest micro-batch that fits);
      2. gradient checkpointing (~30% more compute), with the largest micro-batch that then fits;
      3. the 8-bit AdamW (bitsandbytes), again with the largest micro-batch that fits;
      4. with num_gpus > 1: ZeRO-1, ZeRO-2, ZeRO-3/FSDP (more communication), same search.
    """
    base = _plan_settings(config, **settings)
    batch, accumulation = base["per_device_train_batch_size"], base["gradient_accumulation_steps"]
    num_gpus = base["num_gpus"]
    plan = plan_memory(**base)
    advice = Advice(fits_as_is=fits(plan, gpu_memory_gib), plan=plan, gpu_memory_gib=gpu_memory_gib)
    if advice.fits_as_is:
        return advice

    effective = batch * accumulation

    def with_micro_batches(candidate: dict, label: str) -> tuple[dict, MemoryPlan, str] | None:
        first = candidate["per_device_train_batch_size"]
        for mb in [first, *_divisors_desc(first)]:
            s = dict(candidate, per_device_train_batch_size=mb, gradient_accumulation_steps=effective // mb)
            p = plan_memory(**s)
            if fits(p, gpu_memory_gib):
                parts = [label] if label else []
                if mb != batch:
                    parts.append(
                        f"--per_device_train_batch_size {mb} --gradient_accumulation_steps "
                        f"{effective // mb} (same effective batch of {effective})"
                    )
                return s, p, " + ".join(parts)
            advice.tried.append(f"{label or 'as is'} at micro-batch {mb}: {p.total / GIB:.1f} GiB")
        return None

    stages: list[tuple[dict, str]] = [(base, "")]
    if not base["gradient_checkpointing"]:
        stages.append((dict(base, gradient_checkpointing=True), "--gradient_checkpointing"))
    if OPTIMIZERS.get(base["optim"]) != "adamw_8bit":
        last = stages[-1][0]
        label = " + ".join(x for x in (stages[-1][1], "--optim adamw_bnb_8bit") if x)
        stages.append((dict(last, optim="adamw_bnb_8bit"), label))
    if num_gpus > 1:
        last, label = stages[-1]
        for z in range(max(base["zero_stage"], 0) + 1, 4):
            stages.append(
                (
                    dict(last, zero_stage=z, fsdp=False),
                    " + ".join(x for x in (label, f"DeepSpeed ZeRO-{z} across {num_gpus} GPUs") if x),
                )
            )
        if not base["fsdp"]:
            stages.append(
                (
                    dict(last, zero_stage=0, fsdp=True),
                    " + ".join(x for x in (label, f"FSDP (full shard) across {num_gpus} GPUs") if x),
                )
            )
    for settings, label in stages:
        found = with_micro_batches(settings, label)
        if found:
            advice.settings, advice.recommended, advice.change = found
            return advice
    return advice


# -- measurement (GPU) ----------------------------------------------------------------------------------------------
def measure_peak_memory(*plan_args, steps: int = 3, compile: bool = False, **plan_settings) -> dict:
    """Train `steps` steps on random tokens on the current CUDA device; torch.cuda.max_memory_allocated.

    Takes `plan_memory`'s arguments, so the two compare one configuration; the optimizer is built as the
    training run builds it (`optim.build_optimizer`). GPU only (RuntimeError on a CPU), one GPU, no sharding."""
    import torch
    from transformers import GPT2LMHeadModel

    from .model import CausalLMWithLoss, enable_activation_checkpointing
    from .optim import build_optimizer

    if not torch.cuda.is_available():
        raise RuntimeError("measure_peak_memory needs a CUDA GPU (torch.cuda.max_memory_allocated)")
    plan = _plan_settings(*plan_args, **plan_settings)
    if plan["zero_stage"] or plan["fsdp"] or plan["num_gpus"] != 1:
        raise ValueError(
            "measure_peak_memory measures one GPU without sharding: leave zero_stage, fsdp and num_gpus "
            "at their defaults"
        )
    cfg = resolve_config(plan["config"])
    dropout = plan["dropout"]
    cfg = GPT2Config(
        **{**cfg.to_dict(), "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    )
    cfg._attn_implementation = plan["attn_implementation"]
    block_size = plan["block_size"] or cfg.n_positions
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lm = GPT2LMHeadModel(cfg).cuda()
    if plan["gradient_checkpointing"]:
        enable_activation_checkpointing(lm)
    lm.config.use_cache = False
    model = CausalLMWithLoss(lm, plan["loss_impl"])
    # the training run's optimizer for this --optim (the values do not change its memory)
    settings = dict(learning_rate=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8)
    optim_name = _OPTIM_NAME.get(plan["optim"], plan["optim"])
    optimizer = build_optimizer(model, SimpleNamespace(optim=optim_name, optim_args=None, **settings))
    step_model = torch.compile(model) if compile else model
    precision = plan["precision"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    x = torch.randint(0, cfg.vocab_size, (plan["per_device_train_batch_size"], block_size), device="cuda")
    for _ in range(steps):
        for _ in range(plan["gradient_accumulation_steps"]):
            with torch.autocast("cuda", dtype=dtype, enabled=precision != "fp32"):
                loss = step_model(x)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, step_model, lm, optimizer, x, loss
    torch.cuda.empty_cache()
    return {"peak_allocated": peak, "peak_allocated_gib": peak / GIB}


# -- command line ---------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py plan",
        description="Predict per-GPU memory and advise how to fit. The settings are the training settings' "
        "(--micro_batch, --seq_len and --grad_accum are older spellings of the first three).",
    )
    p.add_argument("--preset", default="gpt2-small", choices=list(PRESETS))
    p.add_argument("--per_device_train_batch_size", "--micro_batch", type=int, default=16)
    p.add_argument(
        "--block_size",
        "--seq_len",
        type=int,
        default=None,
        help="Tokens per sequence (default: the preset's n_positions).",
    )
    p.add_argument("--gradient_accumulation_steps", "--grad_accum", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=list(DTYPE_BYTES))
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--optim", default="adamw_torch", choices=list(OPTIMIZER_KINDS))
    p.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--num_gpus", type=int, default=1)
    p.add_argument("--loss_impl", default="chunked", choices=list(LOSS_IMPLS))
    p.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument(
        "--vocab_size", type=int, default=None, help="Tokenizer size (default GPT-2's 50257, padded)."
    )
    p.add_argument(
        "--gpu_memory_gib", type=float, default=None, help="Memory of one GPU; omit for the table only."
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    a = vars(_parser().parse_args(argv))
    preset, vocab_size, gpu_memory_gib = a.pop("preset"), a.pop("vocab_size"), a.pop("gpu_memory_gib")
    config = resolve_config(preset, vocab_size) if vocab_size else preset
    kw = dict(config=config, **a)
    try:
        plan = plan_memory(**kw)
        if gpu_memory_gib is not None and gpu_memory_gib <= 0:
            raise ValueError(f"gpu_memory_gib must be > 0, got {gpu_memory_gib}")
    except ValueError as exc:
        # a one-line error with exit status 2, as for every other bad setting of train.py
        raise ConfigError(f"train.py plan: {exc}") from exc
    if isinstance(config, GPT2Config):
        plan = replace(plan, model=preset)
    print(plan.table())
    result = {"plan": plan.as_dict()}
    if gpu_memory_gib is not None:
        adv = advise(**kw, gpu_memory_gib=gpu_memory_gib)
        print("\n" + adv.text())
        result["advice"] = {
            "fits_as_is": adv.fits_as_is,
            "found": adv.found,
            "change": adv.change,
            "settings": {k: v for k, v in adv.settings.items() if k != "config"},
            "recommended": adv.recommended.as_dict() if adv.recommended else None,
            "text": adv.text(),
        }
    return result
