"""How many optimizer steps a run takes: `max_steps`, or `num_train_epochs` over a corpus of known size.

The precedence is the Trainer's: `max_steps > 0` wins over `num_train_epochs`. An epoch here is the corpus's
training sequences divided by the global batch (sequences per step over all processes), rounded up; each
process's stream wraps around on its own, so an epoch is a count of sequences, not a barrier.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .data import RunData


def resolve_max_steps(cfg, data: RunData, world_size: int, epochs_set: bool) -> tuple[int, str | None]:
    """(steps, note): the run's optimizer steps and, when epochs decided them or were overridden, why; `data`
    counts the corpus's training sequences when epochs decide."""
    t = cfg.train
    if t.max_steps > 0:
        note = None
        if epochs_set:
            note = (
                f"max_steps={t.max_steps} overrides num_train_epochs={t.num_train_epochs:g} (the Trainer's "
                "precedence); drop --max_steps to train by epochs"
            )
        return t.max_steps, note
    t0 = time.perf_counter()
    sequences = data.count_train_sequences()
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    if sequences < per_step:
        raise ConfigError(
            f"the corpus has {sequences} training sequences of {cfg.data.block_size} tokens, fewer than one step "
            f"takes ({per_step}): lower --per_device_train_batch_size or --block_size, or add data"
        )
    steps = math.ceil(t.num_train_epochs * sequences / per_step)
    note = (
        f"num_train_epochs={t.num_train_epochs:g}: {sequences:,} training sequences / {per_step} per step = "
        f"{steps} steps (counted in {time.perf_counter() - t0:.1f} s)"
    )
    return steps, note
