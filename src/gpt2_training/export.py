"""The model folder a run hands on: `final/` (and the Hugging Face part of every checkpoint) as transformers 4 and 5,
llama.cpp's GGUF converter, optimum's ONNX export and the Hub read it, with a model card and the held-out text."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Config, model_shape
from .data.sources import parse_source
from .data.tokenizer import save_tokenizer
from .errors import CheckpointError, ConfigError, disk_full

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the held-out figures the run measures, and the names the Hub's model-index gives them
METRICS = {"eval_loss": "loss", "eval_perplexity": "perplexity", "eval_bpb": "bits_per_byte"}


def save_hf_model(
    lm, folder: Path, state_dict: dict[str, torch.Tensor] | None = None, dtype: str = "fp32"
) -> None:
    """`lm` in Hugging Face's format (model.safetensors + config.json + generation_config.json), with the weights
    of `state_dict` when given (gathered from shards), stored in `dtype`. Written directly rather than by
    `save_pretrained`, whose unwrapping imports DeepSpeed (seconds, and a warning) whenever it is installed."""
    from safetensors.torch import save

    weights = state_dict if state_dict is not None else lm.state_dict()
    # a tied output matrix is the embedding: Hugging Face saves it once and ties it again on load
    if getattr(lm.config, "tie_word_embeddings", False):
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    target = TORCH_DTYPES[dtype]
    weights = {k: v.detach().to(target) if v.is_floating_point() else v.detach() for k, v in weights.items()}
    data = save({k: v.contiguous() for k, v in weights.items()}, metadata={"format": "pt"})
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(data)
    config = copy.deepcopy(lm.config)
    # what OpenAI's gpt2 config.json carries and consumers read: llama.cpp finds the converter by `architectures`
    # and reads the context length from `n_ctx`; `dtype` is the key of transformers >= 4.56, `torch_dtype` that of
    # older releases (both load the folder in its stored precision with dtype="auto")
    config.architectures = [type(lm).__name__]
    config.n_ctx = config.n_positions
    config.dtype = str(target).removeprefix("torch.")
    config.save_pretrained(folder)
    # transformers 5 serialises only `dtype` (setting torch_dtype warns that it is deprecated): added to the file
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"torch_dtype": config.dtype}, indent=2) + "\n")
    if getattr(lm, "generation_config", None) is not None:
        generation = copy.deepcopy(lm.generation_config)
        # batched generation pads with EOS (tokenizer_config.json says so too); stated here, `generate` does not warn
        if generation.pad_token_id is None:
            generation.pad_token_id = lm.config.eos_token_id
        generation.save_pretrained(folder)


def cast_copy(lm, state_dict: dict[str, torch.Tensor] | None, dtype: str) -> torch.nn.Module:
    """A new model of `lm`'s kind holding its weights (or `state_dict`'s) in `dtype`, on the CPU, for measuring
    the weights exactly as a 16-bit export stores them."""
    weights = state_dict if state_dict is not None else lm.state_dict()
    twin = type(lm)(copy.deepcopy(lm.config))
    missing, unexpected = twin.load_state_dict(
        {k: v.detach().cpu() for k, v in weights.items()}, strict=False
    )
    # only the tied output matrix may be absent (it is the embedding)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise CheckpointError(f"the weights do not fit the model: missing {missing}, unexpected {unexpected}")
    twin.tie_weights()
    return twin.to(TORCH_DTYPES[dtype]).eval()


@dataclass
class RunFacts:
    """What the model card says about the run that made the model."""

    step: int
    tokens_seen: int
    n_params: int
    wall_time_s: float
    hardware: str
    backend: str = "single process"
    precision: str = "fp32"
    # the saved model's shape (n_layer, n_head, n_embd, n_positions, vocab_size); the settings' when empty
    shape: dict[str, int] = field(default_factory=dict)


def hub_dataset(spec: str) -> tuple[str, str | None, str | None] | None:
    """(repository, configuration, revision) of a Hub dataset source, or None for any other corpus."""
    name = parse_source(spec)
    if name.kind != "hub" or not name.location:
        return None
    return name.location, name.config, name.revision


def _is_hub_model(name: str) -> bool:
    return name != "scratch" and not Path(name).exists()


def model_card(
    cfg: Config, facts: RunFacts, metrics: dict[str, float], metrics16: dict[str, float] | None
) -> str:
    """README.md: YAML the Hub reads (with the held-out results as model-index) and the run's facts.
    `metrics16`: the same figures measured on the 16-bit weights the folder holds, when it holds them."""
    from huggingface_hub import EvalResult, ModelCardData

    m, d, r, t = cfg.model, cfg.data, cfg.run, cfg.train
    shape = facts.shape or model_shape(m)
    hub = hub_dataset(d.dataset) if not d.shards_dir else None
    name = f"gpt2-{m.preset}-{Path(t.output_dir).name}"
    corpus = d.shards_dir or d.dataset
    held_out = (
        f"the validation shards of `{d.shards_dir}`"
        if d.shards_dir
        else f"{d.validation_per_mille / 10:g}% of the documents of `{d.dataset}` (chosen by a hash of the text)"
    )
    held_out += f", the first {d.eval_max_sequences} sequences of {d.block_size} tokens"
    # the figures of the weights as stored: the 16-bit ones when the folder holds 16-bit weights
    stored = metrics16 or metrics
    suffix = f" ({r.save_dtype} weights)" if metrics16 else ""
    results = [
        EvalResult(
            task_type="text-generation",
            task_name="Language modelling (held-out text)",
            dataset_type=hub[0] if hub else Path(corpus).name or corpus,
            dataset_name=f"{corpus} (held-out)",
            dataset_config=hub[1] if hub else None,
            dataset_revision=hub[2] if hub else None,
            dataset_split="held-out",
            metric_type=kind,
            metric_name=f"held-out {kind.replace('_', ' ')}{suffix}",
            metric_value=round(stored[key], 4),
        )
        for key, kind in METRICS.items()
    ]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gpt2", "causal-lm", "gpt2-training"],
        datasets=[hub[0]] if hub else None,
        base_model=m.init_from if _is_hub_model(m.init_from) else None,
        license=r.license,
        model_name=name,
        eval_results=results,
    )
    origin = "trained from scratch" if m.init_from == "scratch" else f"fine-tuned from `{m.init_from}`"
    columns = ["fp32 weights"] + ([f"{r.save_dtype} weights (stored)"] if metrics16 else [])
    rows = [f"| held-out {kind.replace('_', ' ')} | {metrics[key]:.4f} |" for key, kind in METRICS.items()]
    if metrics16:
        rows = [f"{row} {metrics16[key]:.4f} |" for row, key in zip(rows, METRICS, strict=True)]
    hyper = {
        **{k: shape[k] for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k in shape},
        "block_size": d.block_size,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": str(getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)),
        "warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay,
        "optim": str(getattr(t.optim, "value", t.optim)),
        "max_grad_norm": t.max_grad_norm,
        "max_steps": t.max_steps,
        "dropout": m.dropout,
        "seed": t.seed,
        "precision": facts.precision,
        "save_dtype": r.save_dtype,
    }
    body = [
        f"# {name}",
        "",
        f"GPT-2 ({m.preset}, {facts.n_params / 1e6:.1f} M parameters), {origin} with gpt2-training on "
        f"`{corpus}`: {facts.step} steps, {facts.tokens_seen:,} tokens seen.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        'generate = pipeline("text-generation", model="PATH_OR_REPO")',
        'print(generate(["The", "A function that"], batch_size=2, max_new_tokens=40))',
        f"# a prompt longer than {shape.get('n_positions', '')} tokens: keep its end",
        'print(generate(long_prompt, max_new_tokens=40, handle_long_generation="hole"))',
        "```",
        "",
        "GPT-2 has no padding token: this tokenizer pads with its end-of-text token on the left, so that batched",
        "prompts end right where generation starts. `model_max_length` is the model's context length, which",
        '`handle_long_generation="hole"` uses to cut a long prompt to the tokens that fit.',
        "",
        "## Evaluation",
        "",
        f"On {held_out}:",
        "",
        "| metric | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *rows,
        "",
        "## Training",
        "",
        f"- tokens seen: {facts.tokens_seen:,} in {facts.step} optimizer steps",
        f"- hardware: {facts.hardware}; {facts.backend}",
        f"- wall time: {facts.wall_time_s / 60:.1f} min ({facts.wall_time_s:.0f} s, set-up to final save)",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in hyper.items()],
    ]
    # YAML written by huggingface_hub itself, in the form its parser (and the Hub) reads back
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def save_final(
    out: Path,
    lm,
    tokenizer,
    cfg: Config,
    facts: RunFacts,
    final_eval: dict[str, float],
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    evaluate: Callable[[torch.nn.Module], dict[str, float] | None] | None = None,
    last_checkpoint: Path | None = None,
) -> Path:
    """Write `out/final`: model (in --save_dtype), tokenizer, training_metrics.json and README.md, into a temporary
    folder renamed into place when complete. `state_dict`: the full weights when they are sharded across processes;
    `evaluate`: measures a model's held-out figures (the 16-bit copy's); `last_checkpoint`: named when the write
    fails, so that the user knows where the run can go on from."""
    final, tmp = out / "final", out / ".final.tmp"
    dtype = cfg.run.save_dtype
    facts.shape = facts.shape or {
        k: getattr(lm.config, k) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
    }
    metrics: dict[str, Any] = {"step": facts.step, "tokens_seen": facts.tokens_seen, **final_eval}
    metrics16 = None
    if dtype != "fp32" and evaluate is not None:
        metrics16 = evaluate(cast_copy(lm, state_dict, dtype))
        metrics |= {f"{dtype}_{k}": v for k, v in (metrics16 or {}).items()}
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_hf_model(lm, tmp, state_dict, dtype)
        save_tokenizer(tokenizer, tmp, lm.config.n_positions)
        (tmp / "training_metrics.json").write_text(json.dumps(metrics, indent=1))
        (tmp / "README.md").write_text(model_card(cfg, facts, final_eval, metrics16), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    # whatever failed (a full disk, torch's or safetensors' own errors), no half-written folder stays behind
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if disk_full(exc) else f"{type(exc).__name__}: {exc}"
        free = "Free space (or point --output_dir at a bigger disk)"
        if last_checkpoint is not None:
            where = (
                f"checkpoint {last_checkpoint} holds step {last_checkpoint.name.removeprefix('checkpoint-')}. "
                f"{free} and run the same command again: it resumes from "
                "there and writes the model"
            )
        else:
            where = f"no checkpoint was written (--save_steps 0). {free} and train again"
        raise CheckpointError(f"could not write the final model {final} ({reason}); {where}") from exc
    return final


def write_heldout(path: str | Path, texts: list[str]) -> None:
    """The held-out sequences' text as JSON lines ({"text": ...}), for lm-evaluation-harness; a file that holds
    anything else is never overwritten (the same command run again finds its own file and leaves it)."""
    path = Path(path)
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    if path.exists():
        if path.read_text(encoding="utf-8", errors="replace") == data:
            return
        raise ConfigError(
            f"write_heldout {path} exists and holds other text: choose a new file name (this run does not "
            "overwrite a file it did not write)"
        )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)
