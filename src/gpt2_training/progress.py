"""Progress bars where a person watches: tqdm on a terminal, its widget in a notebook, nothing in a log file.

A bar written to a file or a pipe (CI, `nohup`, Slurm) is a stream of carriage returns, so without a terminal
or a Jupyter kernel the caller's plain log lines are the only progress shown.
"""

from __future__ import annotations

import sys
from typing import Any


def in_notebook() -> bool:
    """True inside a Jupyter kernel (not merely with ipykernel imported, as pytest's nbval plugin does)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def wanted(enabled: bool = True) -> bool:
    return enabled and (in_notebook() or sys.stderr.isatty())


def bar(total: int | None, desc: str, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar (the widget in a notebook), or None where no one would see it."""
    if not wanted(enabled):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, **kwargs)


def training_bar(args: Any, initial: int, enabled: bool) -> Any:
    """The training bar (step / max_steps, ETA, loss, tokens/s); `args` is the run's TrainingArguments."""
    return bar(
        args.max_steps, "train", enabled=enabled and not args.disable_tqdm, initial=initial, unit="step"
    )
