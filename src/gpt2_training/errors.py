"""Errors the package raises for bad input: one line that names the problem and the fix."""

import errno
import re

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class GPT2TrainingError(Exception):
    """Base class: the CLI prints these as a one-line message and exits with status 2."""


class ConfigError(GPT2TrainingError, ValueError):
    """Invalid settings; raised before any download or model build, listing every problem at once."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(GPT2TrainingError, ValueError):
    """A data source that cannot be read, is empty or is too small."""


class CheckpointError(GPT2TrainingError):
    """A checkpoint that cannot be written, found or safely loaded."""


class TrainingStopped(GPT2TrainingError):
    """Training stopped on purpose (too many non-finite steps); the last good checkpoint is kept."""


class DataUnavailable(DataError):
    """A source that was readable stopped being readable mid-run (a file deleted or made unreadable, a server down
    beyond the retry budget). The engine writes a checkpoint at the last completed step, then stops with this
    message (exit status 2); running the same command once the source is back resumes exactly."""


def disk_full(exc: BaseException | None) -> bool:
    """True when `exc` (or an exception it was raised from) is a write failing for lack of space or a file-size
    limit. Rust writers (safetensors) only put the OS error number in their message: "... (os error 28)"."""
    while exc is not None:
        if getattr(exc, "errno", None) in _DISK_FULL:
            return True
        m = re.search(r"os error (\d+)", str(exc))
        if m and int(m.group(1)) in _DISK_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
