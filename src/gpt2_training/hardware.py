"""What a measurement ran on and how much memory it took: one description of the machine and one peak-memory
meter, shared by the benchmarks (`bench/`) and the tutorial notebook, so their figures are measured alike."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from pathlib import Path
from typing import Any

import torch

GIB = 1 << 30


def _proc_value(path: str, key: str) -> int | None:
    """The number after `key:` in a /proc file (kB for memory figures), or None where /proc is absent."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict[str, Any]:
    """The facts a benchmark record names: CPU, usable cores, RAM, GPU, library versions."""
    ram_kib = _proc_value("/proc/meminfo", "MemTotal")
    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    info = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(ram_kib / (1 << 20), 1) if ram_kib else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": gpu.name if gpu else None,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "gpu_memory_gib": round(gpu.total_memory / GIB, 1) if gpu else None,
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    return info


def describe(info: dict[str, Any] | None = None) -> str:
    """One line for a table caption or a plot title, e.g. 'CPU only: AMD EPYC 7B13, 2 cores, 24 GiB RAM, ...'."""
    m = info or machine()
    ram = f", {m['ram_gib']:.0f} GiB RAM" if m.get("ram_gib") else ""
    if m["gpu"]:
        return f"{m['gpu_count']} x {m['gpu']} ({m['gpu_memory_gib']:.0f} GiB), torch {m['torch']}"
    return f"CPU only: {m['cpu']}, {m['usable_cpus']} cores{ram}, torch {m['torch']}"


class PeakMemory:
    """Peak memory of a block of work: the CUDA allocator's peak on a GPU; on a CPU the rise of the process's
    peak resident set size (VmHWM, reset through /proc/self/clear_refs), or of getrusage's maxrss elsewhere.

        with PeakMemory() as mem:
            train_step()
        print(mem.bytes, mem.method)
    """

    def __init__(self, device: torch.device | str | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cuda = torch.device(device).type == "cuda"
        self.method = "torch.cuda.max_memory_allocated (absolute, reset per block)" if self.cuda else ""
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            # Writing 5 resets VmHWM to the current RSS, so the peak of this block alone is measured.
            Path("/proc/self/clear_refs").write_text("5")
            self._start = _proc_value("/proc/self/status", "VmRSS") or 0
            self.method = "peak RSS rise (VmHWM after /proc/self/clear_refs reset)"
        except OSError:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "getrusage ru_maxrss delta (only rises above the previous peak show)"
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = int(torch.cuda.max_memory_allocated())
        elif self.method.startswith("peak RSS"):
            self.bytes = max((_proc_value("/proc/self/status", "VmHWM") or 0) - self._start, 0) * 1024
        else:
            self.bytes = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._start, 0) * 1024

    @property
    def mib(self) -> float:
        return self.bytes / (1 << 20)
