"""progress.py: bars only where a person watches (a terminal or a notebook), never in a log file."""

from __future__ import annotations

import sys

from conftest import tiny_args

from gpt2_training.cli import parse_config
from gpt2_training.progress import in_notebook
from gpt2_training.progress import training_bar as progress_bar


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    args = parse_config(tiny_args(tmp_path)).train
    assert progress_bar(args, 0, enabled=True) is None, "pytest's captured stderr is not a terminal"

    class Terminal:
        def isatty(self):
            return True

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress_bar(args, 2, enabled=True)
    assert bar is not None and (bar.n, bar.total) == (2, 6)
    bar.close()
    args.disable_tqdm = True
    assert progress_bar(args, 0, enabled=True) is None
    assert progress_bar(parse_config(tiny_args(tmp_path)).train, 0, enabled=False) is None


def test_pytest_s_own_ipython_import_is_not_a_notebook():
    # nbval imports IPython; a bar must still not be drawn into pytest's captured output
    assert in_notebook() is False
