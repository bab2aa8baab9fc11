"""The options contract: what this engine does with every field of `TrainingArguments` and of its own settings.

The engine is a loop of its own, not `transformers.Trainer`, so it cannot inherit the Trainer's ~110 fields and
hope for the best. Each field is classified here, once:

* honoured: it takes effect (the `test` named proves it);
* refused: setting it to anything but its default stops the run before any work, with a one-line error that
  names the field and says what to use instead; `--help` does not offer it;
* not applicable: it has no meaning for this program (launcher bookkeeping such as `local_rank`), is accepted
  and is not offered in `--help`.

`tests/test_options.py` walks every field: a field missing from this table fails the test suite (a new
transformers release cannot add a silently ignored option), every refused field is set on the command line and
must exit 2 with its name, and every honoured field must name a test that exists.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from . import checkpoint
from .backends import backend_problems
from .config import (
    ATTN_IMPLEMENTATIONS,
    LOSS_IMPLS,
    PRECISIONS,
    PRESETS,
    SAVE_DTYPES,
    SCHEDULES,
    SUPPORTED_OPTIMIZERS,
    TXT_MODES,
    Config,
    DataArguments,
    GPT2TrainingArguments,
    ModelArguments,
    RunArguments,
    model_shape,
)
from .data.sources import parse_source
from .errors import ConfigError
from .optim import scheduler_problems

HONOURED, REFUSED, NOT_APPLICABLE = "honoured", "refused", "not applicable"


@dataclass(frozen=True)
class Option:
    status: str
    note: str
    # honoured: "tests/<file>.py::<test>" proving it; refused: a non-default command-line value for the test.
    test: str = ""
    example: str = ""


def _h(note: str, test: str) -> Option:
    return Option(HONOURED, note, test=test)


def _r(note: str, example: str = "True") -> Option:
    return Option(REFUSED, note, example=example)


def _na(note: str) -> Option:
    return Option(NOT_APPLICABLE, note)


T_OPT = "tests/test_options.py"
T_TRAINER = "tests/test_trainer.py"
T_REL = "tests/test_reliability.py"
T_OPTIM = "tests/test_optim.py"
T_REPORT = "tests/test_reporting.py"
T_HUB = "tests/test_hub.py"

# Every field of transformers.TrainingArguments (5.x), in its own order.
TRAINING_ARGUMENTS: dict[str, Option] = {
    "output_dir": _h(
        "where checkpoints, logs and the final model go", f"{T_REL}::test_bit_exact_resume_shards"
    ),
    "per_device_train_batch_size": _h(
        "sequences per process per micro-step", f"{T_TRAINER}::test_batch_shape"
    ),
    "num_train_epochs": _h(
        "passes over a corpus of known size (local files, DeepLake folders, prepared shards); max_steps > 0 "
        "takes precedence, as in the Trainer",
        f"{T_TRAINER}::test_num_train_epochs_sets_the_steps",
    ),
    "max_steps": _h(
        "optimizer steps; > 0 overrides num_train_epochs",
        f"{T_TRAINER}::test_num_train_epochs_sets_the_steps",
    ),
    "learning_rate": _h("peak learning rate", f"{T_OPTIM}::test_schedule_peaks_at_learning_rate"),
    "lr_scheduler_type": _h(
        "every transformers schedule stepped once per optimizer step (the metric-driven reduce_lr_on_plateau "
        "and greedy are refused)",
        f"{T_OPTIM}::test_cosine_with_min_lr_ends_at_a_tenth",
    ),
    "lr_scheduler_kwargs": _h(
        "passed to the schedule", f"{T_OPTIM}::test_cosine_with_min_lr_ends_at_a_tenth"
    ),
    "warmup_steps": _h(
        "linear warmup steps; a value below 1 is a ratio of the run", f"{T_OPTIM}::test_warmup_ratio"
    ),
    "optim": _h(
        "adamw_torch, adamw_torch_fused, adamw_bnb_8bit / adamw_8bit, sgd, muon (Muon on the hidden matrices, "
        "AdamW on the rest)",
        f"{T_OPTIM}::test_optim_args_reach_the_optimizer",
    ),
    "optim_args": _h(
        "'key=value,...' passed to the optimizer", f"{T_OPTIM}::test_optim_args_reach_the_optimizer"
    ),
    "weight_decay": _h("on matrices and embeddings only", f"{T_OPTIM}::test_optim_args_reach_the_optimizer"),
    "adam_beta1": _h("AdamW beta1", f"{T_OPTIM}::test_optim_args_reach_the_optimizer"),
    "adam_beta2": _h("AdamW beta2", f"{T_OPTIM}::test_optim_args_reach_the_optimizer"),
    "adam_epsilon": _h("AdamW epsilon", f"{T_OPTIM}::test_optim_args_reach_the_optimizer"),
    "optim_target_modules": _r(
        "GaLore/APOLLO-style optimizers are not offered: use --optim adamw_torch", "attn"
    ),
    "gradient_accumulation_steps": _h(
        "micro-steps per optimizer step", "tests/test_techniques.py::test_accumulation_equals_a_bigger_batch"
    ),
    "average_tokens_across_devices": _na(
        "every sequence is a full block, so each process holds the same token count"
    ),
    "max_grad_norm": _h(
        "global norm clipping; 0 = off", "tests/test_techniques.py::test_gradient_clipping_bounds_the_update"
    ),
    "label_smoothing_factor": _r("label smoothing is not implemented: leave it at 0", "0.1"),
    "bf16": _h("bf16 autocast (same as --precision bf16)", f"{T_OPT}::test_precision_flags"),
    "fp16": _h(
        "fp16 autocast with loss scaling, GPU only (same as --precision fp16)",
        f"{T_OPT}::test_precision_flags",
    ),
    "bf16_full_eval": _r("evaluation runs in the training precision: use --bf16"),
    "fp16_full_eval": _r("evaluation runs in the training precision: use --fp16"),
    "tf32": _h(
        "TF32 matmuls on Ampere+ GPUs; refused by TrainingArguments elsewhere",
        f"{T_OPT}::test_precision_flags",
    ),
    "activation_checkpointing": _h(
        "recompute activations in backward", f"{T_TRAINER}::test_gradient_checkpointing_kwargs"
    ),
    "activation_checkpointing_kwargs": _h(
        "passed to activation_checkpointing_enable", f"{T_TRAINER}::test_gradient_checkpointing_kwargs"
    ),
    "gradient_checkpointing": _h(
        "the older name of activation_checkpointing", f"{T_TRAINER}::test_gradient_checkpointing_kwargs"
    ),
    "gradient_checkpointing_kwargs": _h(
        "the older name of activation_checkpointing_kwargs",
        f"{T_TRAINER}::test_gradient_checkpointing_kwargs",
    ),
    "torch_compile": _h("torch.compile the model", f"{T_TRAINER}::test_torch_compile_mode"),
    "torch_compile_backend": _h("torch.compile backend", f"{T_TRAINER}::test_torch_compile_mode"),
    "torch_compile_mode": _h("torch.compile mode", f"{T_TRAINER}::test_torch_compile_mode"),
    "use_liger_kernel": _r(
        "Liger kernels are not wired in: the chunked loss (--loss_impl chunked) saves the logits memory"
    ),
    "liger_kernel_config": _r("Liger kernels are not wired in", '{"rope": true}'),
    "use_cache": _na("training never uses the KV cache; sampling always does"),
    "neftune_noise_alpha": _r("NEFTune is for instruction tuning, not pretraining: leave it unset", "5"),
    "torch_empty_cache_steps": _r("emptying the CUDA cache only slows steps here: leave it unset", "10"),
    "auto_find_batch_size": _r("run `train.py plan` to choose a batch size that fits"),
    "logging_strategy": _h("'steps' or 'no' ('epoch' is refused)", f"{T_TRAINER}::test_strategies_no"),
    "logging_steps": _h(
        "log every N steps (a value below 1 is a ratio of the run)", f"{T_TRAINER}::test_logging_first_step"
    ),
    "logging_first_step": _h("also log step 1", f"{T_TRAINER}::test_logging_first_step"),
    "log_on_each_node": _r("only the main process logs; each node's log would repeat it"),
    "logging_nan_inf_filter": _r(
        "non-finite losses are never filtered: the NaN guard skips the step and logs it (leave it at its default)",
        "False",
    ),
    "include_num_input_tokens_seen": _na("tokens_seen is always logged"),
    "log_level": _r("library log levels are not changed by this engine", "debug"),
    "log_level_replica": _r("library log levels are not changed by this engine", "debug"),
    "disable_tqdm": _h(
        "no progress bar (plain log lines only)",
        "tests/test_progress.py::test_progress_bar_only_on_a_terminal",
    ),
    "report_to": _h(
        "none, tensorboard, wandb, all (= tensorboard wandb)", f"{T_REPORT}::test_report_to_values"
    ),
    "run_name": _h(
        "the W&B run name and the header of the log", f"{T_REPORT}::test_run_name_and_logging_dir"
    ),
    "project": _h("the W&B project (WANDB_PROJECT also works)", f"{T_REPORT}::test_run_name_and_logging_dir"),
    "trackio_space_id": _r("trackio is not supported: use --report_to wandb or tensorboard", "x/y"),
    "trackio_bucket_id": _r("trackio is not supported: use --report_to wandb or tensorboard", "x/y"),
    "trackio_static_space_id": _r("trackio is not supported: use --report_to wandb or tensorboard", "x/y"),
    "eval_strategy": _h("'steps' or 'no' ('epoch' is refused)", f"{T_TRAINER}::test_strategies_no"),
    "eval_steps": _h("evaluate (and sample) every N steps", f"{T_TRAINER}::test_strategies_no"),
    "eval_delay": _r("evaluations start at eval_steps: use a larger --eval_steps", "10"),
    "per_device_eval_batch_size": _h(
        "sequences per evaluation batch",
        "tests/test_evaluation.py::test_eval_batch_size_does_not_change_the_loss",
    ),
    "prediction_loss_only": _na("evaluation reports loss, perplexity and bits per byte only"),
    "eval_on_start": _h("evaluate the untrained model before step 1", f"{T_TRAINER}::test_strategies_no"),
    "eval_do_concat_batches": _r("evaluation keeps no predictions", "False"),
    "eval_use_gather_object": _r("evaluation keeps no predictions"),
    "eval_accumulation_steps": _r("evaluation keeps no predictions", "2"),
    "include_for_metrics": _r(
        "there are no custom metrics: evaluation reports loss, perplexity, bits per byte", "inputs"
    ),
    "batch_eval_metrics": _r("there are no custom metrics"),
    "save_only_model": _r(
        "checkpoints always hold the full training state, so resume is exact; the final model is saved alone in final/"
    ),
    "save_strategy": _h(
        "'steps' or 'no' ('epoch' and 'best' are refused)", f"{T_TRAINER}::test_strategies_no"
    ),
    "save_steps": _h("write an atomic checkpoint every N steps", f"{T_REL}::test_bit_exact_resume_shards"),
    "save_on_each_node": _r("the checkpoint is written once, by the main process, for a shared file system"),
    "save_total_limit": _h(
        "keep this many newest checkpoints",
        f"{T_REL}::test_sigkill_during_saves_and_rotation_always_leaves_a_loadable_checkpoint",
    ),
    "enable_jit_checkpoint": _r("SIGTERM/SIGINT always save a checkpoint here; leave it unset"),
    "push_to_hub": _h(
        "upload final/ at the end; checked at start-up", f"{T_HUB}::test_push_to_hub_fails_at_start_up"
    ),
    "hub_token": _r("tokens are never arguments: set HF_TOKEN or run `hf auth login`", "hf_x"),
    "hub_private_repo": _h(
        "create the Hub repository private", f"{T_HUB}::test_push_to_hub_fails_at_start_up"
    ),
    "hub_model_id": _h(
        "the Hub repository (default: output_dir's name)", f"{T_HUB}::test_push_to_hub_fails_at_start_up"
    ),
    "hub_strategy": _h(
        "'end' only (the other strategies are refused)", f"{T_HUB}::test_push_to_hub_fails_at_start_up"
    ),
    "hub_always_push": _r("only --hub_strategy end is supported"),
    "hub_revision": _r("pushes go to the main branch", "dev"),
    "load_best_model_at_end": _r(
        "the final model is the last step's; pass a checkpoint folder to --init_from to use another"
    ),
    "metric_for_best_model": _r("there is no best-model selection", "eval_loss"),
    "greater_is_better": _r("there is no best-model selection"),
    "ignore_data_skip": _r(
        "resume seeks the data exactly instead of replaying it, so there is nothing to skip"
    ),
    "restore_callback_states_from_checkpoint": _r("there are no callbacks"),
    "full_determinism": _r("runs are already seeded and bit-exact on resume; leave it unset"),
    "seed": _h(
        "initialisation, dropout and (unless data_seed) data order", f"{T_REL}::test_bit_exact_resume_shards"
    ),
    "data_seed": _h(
        "data order and shuffling, apart from the model seed",
        f"{T_TRAINER}::test_data_seed_changes_only_the_data",
    ),
    "use_cpu": _h("train on the CPU even where a GPU exists", f"{T_OPT}::test_precision_flags"),
    "accelerator_config": _r("the engine configures Accelerate itself", '{"split_batches": true}'),
    "parallelism_config": _r("use --fsdp or --deepspeed", "{}"),
    "dataloader_drop_last": _na("packed sequences are all full blocks: there is no last partial batch"),
    "dataloader_num_workers": _h(
        "background data workers (see the data pipeline)", "tests/data/test_workers.py"
    ),
    "dataloader_pin_memory": _h(
        "pin host batches before the copy to the GPU", f"{T_TRAINER}::test_batch_shape"
    ),
    "dataloader_persistent_workers": _r("the data workers live for the whole run already"),
    "dataloader_prefetch_factor": _r("the data workers' prefetch depth is fixed", "4"),
    "dataloader_multiprocessing_context": _r("the data workers choose their start method", "spawn"),
    "dataloader_in_order": _r("the data order is always deterministic", "False"),
    "remove_unused_columns": _na("the pipeline reads only --text_field"),
    "label_names": _r("labels are the shifted inputs (causal LM)", "labels"),
    "train_sampling_strategy": _r("the order is the seeded shard shuffle and shuffle buffer", "sequential"),
    "length_column_name": _r("there is no length grouping: sequences are packed to one length", "len"),
    "ddp_find_unused_parameters": _r("every parameter of GPT-2 gets a gradient: leave it unset"),
    "ddp_bucket_cap_mb": _r("DDP's default buckets are used", "50"),
    "ddp_broadcast_buffers": _r("GPT-2 has no buffers to broadcast", "True"),
    "ddp_static_graph": _r("not wired in", "True"),
    "ddp_backend": _r("the backend follows the device (nccl on GPUs, gloo on CPUs)", "gloo"),
    "ddp_timeout": _r("the default process-group timeout is used", "60"),
    "fsdp": _h("FSDP2, one unit per GPT2Block", "tests/test_distributed.py"),
    "fsdp_config": _h("FSDP settings", "tests/test_distributed.py"),
    "deepspeed": _h("a DeepSpeed JSON config (ZeRO 1-3)", "tests/test_distributed.py"),
    "debug": _r("debug modes are not offered", "underflow_overflow"),
    "skip_memory_metrics": _na("memory is reported by `train.py plan` and the benchmarks"),
    "do_train": _na(
        "train.py's train command always trains; the field is for scripts that choose what to run"
    ),
    "do_eval": _na("the engine always evaluates at the end; eval_strategy sets evaluations during training"),
    "do_predict": _r("there is no test-set prediction: evaluation reports held-out loss"),
    "resume_from_checkpoint": _h(
        "a checkpoint folder, or True for the newest in output_dir",
        f"{T_TRAINER}::test_resume_from_checkpoint",
    ),
    "local_rank": _na("set by the launcher"),
}

# Values that TrainingArguments accepts but this engine does not implement, for honoured fields.
ALLOWED_VALUES: dict[str, tuple[str, ...]] = {
    "logging_strategy": ("steps", "no"),
    "eval_strategy": ("steps", "no"),
    "save_strategy": ("steps", "no"),
    "hub_strategy": ("end",),
}
REPORT_TO = ("none", "tensorboard", "wandb", "all")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def changed_fields(args: Any) -> list[str]:
    """Fields of a TrainingArguments that differ from a fresh instance of the same class (what the user set)."""
    reference = type(args)(output_dir=args.output_dir, use_cpu=args.use_cpu)
    changed = []
    for f in dataclasses.fields(args):
        if _value(getattr(args, f.name)) != _value(getattr(reference, f.name)):
            changed.append(f.name)
    return changed


def check_training_arguments(args: Any) -> None:
    """Raise ConfigError naming every refused field that is set, and every value an honoured field cannot take."""
    changed = changed_fields(args)
    problems = [
        f"--{name} is not known to this engine's options table: leave it at its default"
        for name in changed
        if name not in TRAINING_ARGUMENTS
    ]
    problems += refusals(changed)
    for name, allowed in ALLOWED_VALUES.items():
        value = str(_value(getattr(args, name)))
        if name == "hub_strategy" and not args.push_to_hub:
            continue
        if value not in allowed:
            problems.append(f"--{name} {value} is not supported: use one of {', '.join(allowed)}")
    for name in report_to_list(args.report_to, check=False):
        if name not in REPORT_TO:
            problems.append(f"--report_to {name} is not supported: use {', '.join(REPORT_TO)}")
    if problems:
        raise ConfigError(problems)


def refusals(names: list[str]) -> list[str]:
    """One line per refused field among `names`: its name and what to use instead."""
    return [
        f"--{n} is not supported by this engine: {TRAINING_ARGUMENTS[n].note}"
        for n in dict.fromkeys(names)
        if n in TRAINING_ARGUMENTS and TRAINING_ARGUMENTS[n].status == REFUSED
    ]


def refuse_named(names: list[str]) -> None:
    """Raise ConfigError for every refused field among `names` (flags or settings given explicitly)."""
    problems = refusals(names)
    if problems:
        raise ConfigError(problems)


def report_to_list(value: Any, check: bool = True) -> list[str]:
    """The reporters asked for, 'all' expanded; [] for none."""
    names = [value] if isinstance(value, str) else list(value or [])
    names = [n for n in names if n not in ("none", None)]
    if "all" in names:
        names = ["tensorboard", "wandb"]
    if check:
        bad = [n for n in names if n not in REPORT_TO]
        if bad:
            raise ConfigError(f"--report_to {bad[0]} is not supported: use {', '.join(REPORT_TO)}")
    return names


def hidden_in_help() -> set[str]:
    """Fields the command line accepts but does not offer."""
    return {name for name, opt in TRAINING_ARGUMENTS.items() if opt.status != HONOURED}


def project_settings() -> dict[str, Option]:
    """The project's own settings (model, data, run): all honoured; each is tested with its module."""
    return {
        f.name: Option(HONOURED, f.metadata.get("help", ""))
        for cls in (ModelArguments, DataArguments, RunArguments)
        for f in dataclasses.fields(cls)
    }


def table_markdown() -> str:
    """The table as Markdown (SETUP.md holds this exact text; a test keeps the two equal)."""
    rows = ["| field | status | what it does here / why not |", "|---|---|---|"]
    rows += [f"| `{n}` | {o.status} | {o.note} |" for n, o in TRAINING_ARGUMENTS.items()]
    return "\n".join(rows)


def apply_training_arguments(cfg: Any) -> None:
    """Check `cfg.train` against the table and map the Trainer's own switches onto the project's settings:
    `--bf16` / `--fp16` onto `--precision`, `--resume_from_checkpoint` onto `--resume`."""
    t, run = cfg.train, cfg.run
    if str(getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)) not in SCHEDULES:
        # before the field check: transformers sets metric_for_best_model for these schedules itself
        raise ConfigError(scheduler_problems(t))
    check_training_arguments(t)
    asked = [name for name in ("bf16", "fp16") if getattr(t, name)]
    if len(asked) > 1:
        raise ConfigError("--bf16 and --fp16 are both set: choose one (or use --precision)")
    if asked and run.precision not in ("auto", asked[0]):
        raise ConfigError(f"--{asked[0]} contradicts --precision {run.precision}: keep one of them")
    if asked:
        run.precision = asked[0]
    if not asked and run.precision == "auto" and not isinstance(t, GPT2TrainingArguments):
        # Hugging Face's own TrainingArguments without --bf16/--fp16 means fp32 to its users; this project's
        # GPT2TrainingArguments (the command line) means "auto": bf16 where the hardware has it
        run.precision = "fp32"
    if t.push_to_hub and not run.save_final_model:
        raise ConfigError("--push_to_hub uploads the final model: it needs --save_final_model true")
    resume = _resume_from_checkpoint(t.resume_from_checkpoint, t.output_dir)
    if resume is not None:
        if run.resume not in ("auto", resume):
            raise ConfigError(
                f"--resume_from_checkpoint {t.resume_from_checkpoint} contradicts --resume {run.resume}: keep one"
            )
        run.resume = resume


def _resume_from_checkpoint(value: Any, output_dir: str) -> str | None:
    """None (not set), 'never' (False), or the checkpoint folder to resume from."""
    if value is None or value == "":
        return None
    text = str(value)
    if text.lower() == "false":
        return "never"
    if text.lower() == "true":
        newest = checkpoint.latest_checkpoint(output_dir)
        if newest is None:
            raise ConfigError(
                f"--resume_from_checkpoint True: {output_dir} holds no complete checkpoint; drop the option to "
                "start a new run"
            )
        return str(newest)
    if not (Path(text) / "manifest.json").exists():
        raise ConfigError(
            f"--resume_from_checkpoint {text}: not a checkpoint folder (no manifest.json); pass a "
            f"checkpoint-<step> folder, or True for the newest in --output_dir"
        )
    return text


def training_config(
    train: TrainingArguments,
    model: ModelArguments | None = None,
    data: DataArguments | None = None,
    run: RunArguments | None = None,
) -> Config:
    """A Config from a `TrainingArguments` built in Python (as the seed README builds it) and this project's
    model/data/run settings, checked against the options contract like the command line."""
    cfg = Config(
        model=model or ModelArguments(), data=data or DataArguments(), run=run or RunArguments(), train=train
    )
    apply_training_arguments(cfg)
    return cfg


def validate(cfg: Config, *, cuda_available: bool, bf16_ok: bool) -> None:
    """Raise ConfigError listing every problem found, so one run shows them all."""
    problems: list[str] = []
    m, d, r, t = cfg.model, cfg.data, cfg.run, cfg.train
    if m.preset not in PRESETS:
        problems.append(f"unknown preset {m.preset!r}: choose one of {', '.join(PRESETS)}")
    shape = model_shape(m)
    too_small = [f"{k}={shape[k]}" for k in ("n_layer", "n_head", "n_embd", "n_positions") if shape[k] < 1]
    if too_small:
        problems.append(f"{', '.join(too_small)}: n_layer, n_head, n_embd and n_positions must each be >= 1")
    elif shape["n_embd"] % shape["n_head"]:
        problems.append(
            f"n_embd={shape['n_embd']} is not divisible by n_head={shape['n_head']}: each head gets "
            f"n_embd/n_head dimensions, so pick e.g. n_head={_divisor_near(shape['n_embd'], shape['n_head'])}"
        )
    if d.block_size > shape["n_positions"]:
        problems.append(
            f"block_size={d.block_size} exceeds n_positions={shape['n_positions']}: lower --block_size "
            f"or raise --n_positions"
        )
    if d.block_size < 2:
        problems.append("block_size must be at least 2 (one input and one target token)")
    if not 0.0 <= m.dropout < 1.0:
        problems.append(f"dropout={m.dropout} must be in [0, 1)")
    if m.attn_implementation not in ATTN_IMPLEMENTATIONS:
        problems.append(
            f"attn_implementation={m.attn_implementation!r}: use one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if m.loss_impl not in LOSS_IMPLS:
        problems.append(f"loss_impl={m.loss_impl!r}: use one of {', '.join(LOSS_IMPLS)}")
    if m.pad_vocab_to_multiple_of < 1:
        problems.append("pad_vocab_to_multiple_of must be >= 1")
    if d.txt_mode not in TXT_MODES:
        problems.append(f"txt_mode={d.txt_mode!r}: use one of {', '.join(TXT_MODES)}")
    if not 0 <= d.validation_per_mille < 1000:
        problems.append("validation_per_mille must be in [0, 1000)")
    if d.tokenizer_vocab_size < 257:
        problems.append("tokenizer_vocab_size must be at least 257 (256 bytes + end-of-text)")
    if d.shards_dir is not None and not (Path(d.shards_dir) / "meta.json").exists():
        problems.append(
            f"shards_dir {d.shards_dir!r} has no meta.json: create it with `train.py prepare --out {d.shards_dir}`"
        )
    if Path(t.output_dir).exists() and not Path(t.output_dir).is_dir():
        problems.append(f"output_dir {t.output_dir} is a file, not a folder: choose another --output_dir")
    # settings with a lower bound, and what the bound means where it is not obvious
    steps_note = "below 1: a fraction of the run; 0: never"
    seed_note = "numpy's generators take no negative seed"
    bounds = [
        (t, "gradient_accumulation_steps", 1, ""),
        (t, "per_device_train_batch_size", 1, ""),
        (t, "per_device_eval_batch_size", 1, ""),
        (d, "eval_max_sequences", 1, "to skip evaluation: --eval_strategy no"),
        (t, "seed", 0, seed_note),
        (t, "data_seed", 0, seed_note),
        (t, "weight_decay", 0, "0: none"),
        (t, "adam_epsilon", 0, ""),
        (t, "logging_steps", 0, steps_note),
        (t, "eval_steps", 0, steps_note),
        (t, "save_steps", 0, steps_note),
        (d, "shuffle_buffer", 0, "0: no shuffling"),
        (d, "network_retries", 0, "0: stop at the first failed read"),
        (d, "network_backoff", 0, ""),
        (d, "network_prefetch", 0, "0: read on demand"),
        (r, "max_bad_steps", 1, ""),
        (r, "sample_max_new_tokens", 0, "0: no samples"),
    ]
    for section, name, minimum, note in bounds:
        value = getattr(section, name)
        if value is not None and value < minimum:
            problems.append(f"{name} must be >= {minimum}" + (f" ({note})" if note else ""))
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:
            problems.append(f"{name}={getattr(t, name)} must be in [0, 1)")
    if d.network_backoff_max < d.network_backoff:
        problems.append(
            f"network_backoff_max={d.network_backoff_max} is below network_backoff={d.network_backoff}: "
            "raise --network_backoff_max"
        )
    if not d.network_timeout > 0:
        problems.append("network_timeout must be > 0 (seconds)")
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        problems.append("set --max_steps N (> 0), or --num_train_epochs E (> 0) for a corpus of known size")
    if t.learning_rate <= 0:
        problems.append("learning_rate must be > 0")
    optim = str(getattr(t.optim, "value", t.optim))
    if optim not in SUPPORTED_OPTIMIZERS:
        problems.append(
            f"optim={optim!r} is not supported here: use one of {', '.join(SUPPORTED_OPTIMIZERS)}"
        )
    if r.precision not in PRECISIONS:
        problems.append(f"precision={r.precision!r}: use one of {', '.join(PRECISIONS)}")
    elif r.precision == "fp16" and not cuda_available:
        problems.append("precision=fp16 needs a CUDA GPU (loss scaling); on a CPU use bf16 or fp32")
    elif r.precision == "bf16" and not bf16_ok:
        problems.append("precision=bf16 is not supported on this hardware: use fp16 (older GPUs) or fp32")
    if r.save_dtype not in SAVE_DTYPES:
        problems.append(f"save_dtype={r.save_dtype!r}: use one of {', '.join(SAVE_DTYPES)}")
    if r.license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", r.license):
        problems.append(
            f"license={r.license!r}: give a license identifier as the Hub lists them, e.g. apache-2.0, mit, "
            "cc-by-4.0 or other"
        )
    if r.write_heldout is not None:
        heldout = Path(r.write_heldout)
        if heldout.is_dir() or not heldout.parent.is_dir():
            problems.append(
                f"write_heldout {r.write_heldout}: give a file name in an existing folder, e.g. heldout.jsonl"
            )
    if r.resume not in ("auto", "never") and not Path(r.resume).exists():
        problems.append(f"resume={r.resume!r}: no such checkpoint; use 'auto', 'never' or an existing path")
    if r.overwrite_output_dir and r.resume != "never":
        problems.append(
            "overwrite_output_dir needs --resume never (otherwise the run would resume, not restart)"
        )
    source = parse_source(d.dataset)
    if source.kind == "files" and not _glob_matches(source.local_path):
        problems.append(f"dataset path {d.dataset!r} does not exist: check the path or glob")
    # lr_scheduler_kwargs the schedule would only refuse once training is set up
    problems += scheduler_problems(t)
    # --deepspeed / --fsdp: a JSON contradicting the settings, an unknown wrap class, two backends at once
    problems += backend_problems(t, None if r.precision == "auto" else r.precision)
    if problems:
        raise ConfigError(problems)


def _divisor_near(n: int, target: int) -> int:
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: (abs(k - target), k))


def _glob_matches(path: str) -> bool:
    import glob

    if os.path.exists(path) or not glob.has_magic(path):
        return os.path.exists(path)
    # only the folder a pattern starts from: glob's own `**` follows link loops without end (two loops hung
    # start-up); the source's search, which enters each folder once, names a pattern that matches no file
    parts = Path(path).parts
    fixed = parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]
    return Path(*fixed).is_dir() if fixed else True


if __name__ == "__main__":
    print(table_markdown())
