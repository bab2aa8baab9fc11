"""The thread policy: the count comes from the cores other programs leave free (measured on real busy
processes), a user's OMP_NUM_THREADS / wait policy is never overridden, and the wait policy is set before torch
loads in a real `python` start-up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpt2_training.threads import apply_thread_policy, busy_cpus, choose_threads, set_wait_policy, usable_cpus


def test_threads_are_the_cores_left_free():
    cpus = usable_cpus()
    assert choose_threads({}, busy=0.0)[0] == cpus
    assert choose_threads({}, busy=cpus - 1.0)[0] == 1
    # never below one, whatever the load
    assert choose_threads({}, busy=5.0 * cpus)[0] == 1


def test_a_user_s_thread_count_is_kept():
    before = torch.get_num_threads()
    assert choose_threads({"OMP_NUM_THREADS": "3"}) == (None, "OMP_NUM_THREADS=3 (yours)")
    line = apply_thread_policy({"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"})
    assert torch.get_num_threads() == before
    assert "OMP_NUM_THREADS=3 (yours)" in line and "wait: ACTIVE" in line


def test_busy_cpus_sees_a_competing_process():
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        # let it start; then it keeps one core busy for the whole window
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        busy = busy_cpus(0.5)
    finally:
        competitor.kill()
        competitor.wait()
    assert busy is not None and busy >= 0.6


def test_busy_cpus_does_not_count_this_process():
    if not os.path.exists("/proc/stat"):
        pytest.skip("needs /proc")
    # the window is a sleep: whatever else runs, this process's own earlier work is not in it
    assert busy_cpus(0.2) <= usable_cpus()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "PASSIVE 0"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),
        ({"GOMP_SPINCOUNT": "1000"}, "None None"),
    ],
)
def test_wait_policy_is_set_at_start_up_unless_the_user_chose_one(env, expected):
    clean = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    }
    code = (
        "import gpt2_training, os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('KMP_BLOCKTIME'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == expected.split()


def test_wait_policy_is_left_alone_once_torch_is_loaded():
    # torch is loaded in this process: its OpenMP runtime has read the variables already
    environ: dict[str, str] = {}
    assert set_wait_policy(environ) is False and environ == {}
