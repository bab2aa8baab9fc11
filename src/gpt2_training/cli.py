"""Command line: `train.py [train] ...`, `train.py prepare ...`, `train.py plan ...`, `train.py estimate ...`.

`main(argv)` does the work and returns its result (tests and notebooks call it); `run(argv)` is the process
entry point that turns errors into a one-line message and an exit status.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from .config import ARG_CLASSES, Config, DataArguments
from .errors import ConfigError, GPT2TrainingError, TrainingStopped
from .options import apply_training_arguments, refuse_named

SUBCOMMANDS = ("train", "prepare", "plan", "estimate")


def _is_secret(name: str) -> bool:
    name = name.split("=")[0].lstrip("-").lower()
    return (
        name == "token"
        or name.endswith("_token")
        or any(w in name for w in ("api_key", "password", "secret"))
    )


def _refuse_secrets(items: list[str]) -> None:
    for item in items:
        name = item.split("=")[0].lstrip("-")
        if item.startswith("-") and _is_secret(name):
            raise ConfigError(
                f"--{name}: tokens are never accepted as arguments or in config files (they would end up in "
                "shell history and logs); set HF_TOKEN or WANDB_API_KEY in the environment instead"
            )


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(
                f"config file {p} is not valid YAML{at}: {getattr(exc, 'problem', exc)}"
            ) from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of setting names to values")
    _refuse_secrets([f"--{k}" for k in data])
    return data


def parser() -> HfArgumentParser:
    """All settings; the TrainingArguments fields this engine refuses or has no use for are parsed (so setting
    one gives a clear error) but not offered in `--help` (see options.py)."""
    import argparse

    from .options import hidden_in_help

    p = HfArgumentParser(ARG_CLASSES, description="Train a GPT-2 model (see `train.py --help`).")
    p.add_argument(
        "--config", default=None, help="YAML or JSON file of settings; command-line flags override it."
    )
    hidden = hidden_in_help()
    for action in p._actions:
        if action.dest in hidden:
            action.help = argparse.SUPPRESS
        if action.dest == "optim":
            # options.validate checks this project's choices, which include a name transformers' own lacks (muon)
            action.choices, action.type = None, str
    return p


def parse_config(argv: list[str] | None = None, **overrides: Any) -> Config:
    """Settings from `--config FILE`, then flags, then keyword overrides (used by notebooks and tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_secrets(argv)
    _refuse_secrets([f"--{k}" for k in overrides])
    p = parser()
    defaults: dict[str, Any] = {}
    if "--config" in argv:
        i = argv.index("--config")
        defaults = load_config_file(argv[i + 1])
        del argv[i : i + 2]
    defaults.update(overrides)
    known = {a.dest for a in p._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}: see `train.py --help` for the names")
    # Before TrainingArguments sees them: some refused fields make its __post_init__ fail with a message that
    # does not name them (ddp_backend initialises a process group).
    refuse_named([a.split("=")[0][2:] for a in argv if a.startswith("--")] + list(defaults))
    if not _cuda():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        defaults.setdefault("use_cpu", True)  # lets TrainingArguments accept --bf16 on a CPU; we validate it
    p.set_defaults(**defaults)
    try:
        model, data, run, train, *_extra, _rest = p.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if _rest:
        raise ConfigError(f"unknown argument(s) {' '.join(_rest)}: see `train.py --help`")
    cfg = Config(model=model, data=data, run=run, train=train)
    apply_training_arguments(cfg)
    return cfg


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _refuse_out_inside_source(dataset: str, out: str) -> None:
    """A local source folder is searched recursively, so shards (and the unfinished work beside them) written
    inside it would be read back as documents by the processes that reopen the source."""
    from .data.sources import local_root

    folder = local_root(dataset)
    if folder is not None and folder.is_dir() and Path(out).expanduser().resolve().is_relative_to(folder):
        raise ConfigError(
            f"--out {out} is inside the dataset folder {folder}, where the shards would be read as data: "
            f"choose an --out outside it, e.g. --out {folder.parent / (folder.name + '-shards')}"
        )


def prepare_main(argv: list[str]) -> dict:
    """`train.py prepare --dataset SRC --out DIR [--num_proc N]`: tokenize a source once into memory-mappable
    shards, with N processes (the same bytes for every N), resumable after a kill."""
    p = HfArgumentParser((DataArguments,), description="Tokenize a data source into token shards.")
    p.add_argument("--out", required=True, help="Folder to create for the shards.")
    p.add_argument("--seed", type=int, default=1337, help="Seed (only used if a tokenizer is trained).")
    p.add_argument(
        "--num_proc",
        type=int,
        default=1,
        help="Processes that tokenize in parallel (capped at the usable cores); the output is the same for any.",
    )
    data, rest = p.parse_args_into_dataclasses(args=argv)
    from .data import RunData, source_options
    from .data.shards import prepare_shards
    from .data.tokenizer import save_tokenizer

    if rest.num_proc < 1:
        raise ConfigError(f"--num_proc must be 1 or more, got {rest.num_proc}")
    _refuse_out_inside_source(data.dataset, rest.out)
    from .outdir import refuse_unsafe

    refuse_unsafe(rest.out, "--out", {"dataset": data.dataset, "tokenizer": data.tokenizer})
    out = Path(rest.out)
    # the finished folder is renamed into place at the end, which only an absent or empty folder allows
    if out.exists() and not (out / "meta.json").exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {rest.out} already exists and is not an empty folder: the shards need a folder of their own; "
            f"choose a new one, e.g. --out {out.parent / (out.name + '-shards')}"
        )
    # one opening of the source serves the tokenizer and the shards
    run_data = RunData(data, rest.seed)
    tokenizer = run_data.tokenizer
    meta = prepare_shards(
        run_data.source,
        tokenizer,
        rest.out,
        validation_per_mille=data.validation_per_mille,
        num_proc=rest.num_proc,
        source_options=source_options(data, rest.seed),
        # the tokenizer is part of the folder, so it is written before the folder appears complete
        before_publish=lambda tmp: save_tokenizer(tokenizer, tmp / "tokenizer"),
    )
    tok_dir = Path(rest.out) / "tokenizer"
    print(
        f"wrote {meta['tokens']['train']:,} train and {meta['tokens']['validation']:,} validation tokens "
        f"({meta['dtype']}) from {meta['documents']['train'] + meta['documents']['validation']:,} documents to "
        f"{rest.out}; train with --shards_dir {rest.out} --tokenizer {tok_dir}"
    )
    return meta


def train_main(argv: list[str] | None = None, **overrides: Any):
    cfg = parse_config(argv, **overrides)
    # after parsing: `--help` and bad options answer without importing the model code
    from .trainer import train

    result = train(cfg)
    if result.final_eval and cfg.train.process_index == 0:
        print(summary(result))
    return result


def summary(result) -> str:
    """The end-of-run report: where the model is, how well it predicts held-out text, what it writes."""
    fe, ie = result.final_eval, result.initial_eval
    lines = [f"\nmodel saved to {result.final_model_dir}" if result.final_model_dir else ""]
    lines.append(
        f"held-out: loss {fe['eval_loss']:.3f} nats/token, perplexity {fe['eval_perplexity']:.1f}, "
        f"{fe['eval_bpb']:.3f} bits per byte"
    )
    if ie and result.unigram_bpb is not None:
        lines.append(
            f"  for comparison: untrained model {ie['eval_bpb']:.3f} bits/byte; byte frequencies alone (unigram "
            f"entropy) {result.unigram_bpb:.3f} bits/byte"
        )
    if result.tokens_per_s:
        lines.append(
            f"trained {result.step} steps, {result.tokens_seen:,} tokens, {result.tokens_per_s:,.0f} tokens/s"
        )
    for s in result.samples:
        lines.append(f"--- sample ---\n{s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, **overrides: Any):
    """Dispatch to a subcommand (default: train) and return its result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "train"
    if command == "prepare":
        return prepare_main(argv)
    if command == "plan":
        from .planner import main as plan_main

        return plan_main(argv)
    if command == "estimate":
        from .estimate import main as estimate_main

        return estimate_main(argv)
    return train_main(argv, **overrides)


def run(argv: list[str] | None = None) -> int:
    """Process entry point: exit status 0 on success, 2 for bad input, 3 when training stopped itself,
    128 + signal number after a SIGTERM/SIGINT checkpoint."""
    try:
        result = main(argv)
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except GPT2TrainingError as exc:
        problems = getattr(exc, "problems", [str(exc)])
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    leave_process_group()
    return int(getattr(result, "exit_code", 0) or 0)


def leave_process_group() -> None:
    """Destroy the process group once the run has ended on every process (a finished run, or a signal's
    checkpoint, both of which end with all processes together), and with it gloo's threads. Left to interpreter
    shutdown, those threads can be torn down while still joinable, and C++ aborts the process ("terminate called
    without an active exception") after a run that otherwise succeeded: the launcher then reports a failure. The
    finished engine's reference cycles still hold the wrapped model, whose gradient reducer holds the group, so
    `destroy_process_group` alone only unregisters it: collecting them first lets it join the threads here. Not
    after an error: a process that failed alone must not wait for the others to leave a group they are still
    using."""
    dist = sys.modules.get("torch.distributed")  # never imported by plan / estimate: nothing to do
    if dist is not None and dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
