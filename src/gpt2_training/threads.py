"""How many threads torch's CPU math uses and how they wait, chosen from the cores that other programs leave free:
on a busy machine a run then loses throughput in proportion to the cores taken, instead of stalling at every
parallel operation while a descheduled thread of its own is waited for (bench/bench_contention.py measures it)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# OpenMP variables by which a user chooses the wait policy (GNU libgomp, which torch's wheels use, and Intel's).
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Variables by which a user chooses the thread count; where one is set, the count is theirs.
COUNT_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_wait_policy(environ: os._Environ | dict = os.environ) -> bool:
    """Idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, KMP_BLOCKTIME=0), unless the user
    chose a wait policy; True when set. Only effective before torch is imported: the OpenMP runtime reads these
    once, when it loads."""
    if any(name in environ for name in WAIT_SETTINGS) or "torch" in sys.modules:
        return False
    # A spinning thread keeps its core for milliseconds after each operation; with other programs running, that
    # core is one they need, and the thread the spinner waits for may be the one descheduled.
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    environ["KMP_BLOCKTIME"] = "0"
    return True


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is no /proc."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user and nice]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def busy_cpus(window_s: float = 0.3) -> float | None:
    """How many CPUs other programs kept busy during `window_s` seconds (this process sleeps meanwhile), scaled
    to the CPUs this process may use; None where it cannot be read (no /proc)."""
    before, own_before = _cpu_times(), os.times()
    time.sleep(window_s)
    after, own_after = _cpu_times(), os.times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    own_jiffies = (own_after.user + own_after.system - own_before.user - own_before.system) * os.sysconf(
        "SC_CLK_TCK"
    )
    # a share of all the machine's CPUs, applied to those this process may use
    share = max(after[0] - before[0] - own_jiffies, 0) / (after[1] - before[1])
    return min(share, 1.0) * usable_cpus()


def choose_threads(
    environ: os._Environ | dict = os.environ, busy: float | None = None
) -> tuple[int | None, str]:
    """(threads to use, why); None threads when the user chose the count (OMP_NUM_THREADS / MKL_NUM_THREADS)."""
    for name in COUNT_SETTINGS:
        if environ.get(name):
            return None, f"{name}={environ[name]} (yours)"
    cpus = usable_cpus()
    busy = busy_cpus() if busy is None else busy
    if busy is None:
        return cpus, f"{cpus} usable cores (the load of other programs is unknown here)"
    free = max(1, min(cpus, round(cpus - busy)))
    return free, f"{free} of {cpus} cores; other programs kept {busy:.1f} busy"


def apply_thread_policy(environ: os._Environ | dict = os.environ) -> str:
    """Set torch's intra-op thread count from the cores free now; returns the line that says what was chosen."""
    import torch

    threads, why = choose_threads(environ)
    if threads is not None:
        torch.set_num_threads(threads)
    wait = environ.get("OMP_WAIT_POLICY", "the OpenMP runtime's default")
    return f"threads: {torch.get_num_threads()} ({why}); idle threads wait: {wait}"
