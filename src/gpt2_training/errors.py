"""Errors the package raises for bad input: one line that names the problem and the fix."""


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
