"""One small interface over the ways a model can be spread across processes (`Backend`, see base.py): one process
or DDP, FSDP2 and DeepSpeed ZeRO 1-3, chosen by one reading of the settings (`backend_settings`)."""

from .base import Backend
from .deepspeed import FORBIDDEN_DS_SECTIONS, DeepSpeedBackend, deepspeed_config
from .fsdp2 import FSDP2Backend
from .settings import BackendSettings, backend_problems, backend_settings, make_backend

__all__ = [
    "FORBIDDEN_DS_SECTIONS",
    "Backend",
    "BackendSettings",
    "DeepSpeedBackend",
    "FSDP2Backend",
    "backend_problems",
    "backend_settings",
    "deepspeed_config",
    "make_backend",
]
