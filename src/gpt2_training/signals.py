"""SIGTERM and SIGINT become a flag that the training loop reads between two steps, so that the checkpoint written
on a signal is taken at a clean point; the run then exits with the conventional status 128 + signal number."""

from __future__ import annotations

import signal
from typing import Any

EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class SignalFlag:
    """Within its `with` block, SIGTERM/SIGINT set `signum` instead of stopping the process."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for s in EXIT_CODES:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook launchers): signals stay default
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
