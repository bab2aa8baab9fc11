"""The measurement helpers that benchmarks and the notebook share (`gpt2_training.hardware`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2_training import hardware


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (peak RSS) measurement")
def test_peak_memory_sees_a_64_mib_allocation_on_cpu():
    with hardware.PeakMemory() as meter:
        block = np.ones(64 * (1 << 20) // 8)  # 64 MiB, written so the pages are really resident
        block.sum()
        del block
    assert 60 < meter.mib < 200 and meter.method
    with hardware.PeakMemory() as quiet:
        pass
    assert quiet.mib < 16


def test_machine_names_cpu_cores_and_libraries():
    m = hardware.machine()
    assert {"cpu", "cpu_count", "usable_cpus", "torch", "python", "gpu"} <= set(m)
    assert m["usable_cpus"] >= 1 and m["torch"] == torch.__version__


def test_describe_is_one_line_naming_the_device():
    cpu = {"cpu": "Test CPU", "usable_cpus": 2, "ram_gib": 23.5, "torch": "2.x", "gpu": None}
    assert hardware.describe(cpu) == "CPU only: Test CPU, 2 cores, 24 GiB RAM, torch 2.x"
    gpu = {**cpu, "gpu": "NVIDIA H200", "gpu_count": 1, "gpu_memory_gib": 139.8}
    assert hardware.describe(gpu) == "1 x NVIDIA H200 (140 GiB), torch 2.x"
