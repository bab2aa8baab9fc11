"""The forms a backend's model state takes besides a plain dict, shared by the backends (which produce them) and
checkpoint.py (which alone decides their files): `Sharded` and `OwnFiles`."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


class Sharded(dict):
    """A model state of which every process holds a part (FSDP's DTensors): all processes write it together with
    torch.distributed.checkpoint, and any number of processes can read it back."""


@runtime_checkable
class OwnFiles(Protocol):
    """The model state of a library that persists only through its own files (DeepSpeed's engine): checkpoint.py
    names the folder, and the library writes or reads it."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...
