"""gpt2-training: full training of GPT-2 models, from scratch or from pre-trained weights.

    from transformers import TrainingArguments
    from gpt2_training import train, ModelArguments, DataArguments, RunArguments

    result = train(TrainingArguments(output_dir="runs/x", max_steps=100, bf16=True),
                   model=ModelArguments(preset="mini"), data=DataArguments(dataset="builtin"))

Heavy modules (torch, transformers, the data sources) are imported when first used, not by this line.
"""

from __future__ import annotations

from typing import Any

from .threads import set_wait_policy

# before anything imports torch, whose OpenMP runtime reads the wait policy once (threads.py says why)
set_wait_policy()

__all__ = ["train", "ModelArguments", "DataArguments", "RunArguments", "GPT2TrainingArguments", "Config"]


def train(args: Any, model: Any = None, data: Any = None, run: Any = None) -> Any:
    """Run one training job: `args` is a `transformers.TrainingArguments` (or this project's
    `GPT2TrainingArguments`, whose defaults suit pretraining), or a complete `Config`. Settings are checked
    against the options contract (`gpt2_training.options`) before any work; returns a `TrainResult`."""
    from .config import Config
    from .options import training_config
    from .trainer import train as run_config

    cfg = args if isinstance(args, Config) else training_config(args, model=model, data=data, run=run)
    return run_config(cfg)


def __getattr__(name: str) -> Any:
    if name in ("ModelArguments", "DataArguments", "RunArguments", "GPT2TrainingArguments", "Config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(name)
