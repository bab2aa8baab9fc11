"""checkpoint.py: the layout, the manifest over sub-folders, several processes writing one checkpoint, and the run
state (RNG, data position, schedule) written and read back. Processes are stood in for by threads sharing a
barrier: the file protocol is the same, and a real multi-process save is in tests/test_distributed.py."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2_training import checkpoint as ckpt
from gpt2_training.errors import CheckpointError, ConfigError
from gpt2_training.trainer import check_resume_compatible


def _save_from(n: int, out: Path, write, step: int = 5) -> list:
    """`save_checkpoint` called by `n` threads as if they were processes; returns each one's result/exception."""
    barrier = threading.Barrier(n, timeout=20)
    results: list = [None] * n

    def process(rank: int) -> None:
        try:
            results[rank] = ckpt.save_checkpoint(
                out, step, lambda tmp: write(tmp, rank), 2, is_main=rank == 0, barrier=barrier.wait
            )
        except Exception as exc:
            results[rank] = exc

    threads = [threading.Thread(target=process, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a process hung at a barrier"
    return results


def test_every_process_writes_its_part_and_the_manifest_lists_all(tmp_path):
    def write(tmp: Path, rank: int) -> None:
        (tmp / "shards").mkdir(exist_ok=True)
        (tmp / "shards" / f"part{rank}.bin").write_bytes(bytes([rank]) * (100 + rank))

    results = _save_from(3, tmp_path, write)
    final = tmp_path / "checkpoint-5"
    assert results == [final] * 3
    files = json.loads((final / "manifest.json").read_text())["files"]
    assert sorted(files) == [f"shards/part{r}.bin" for r in range(3)]
    assert [files[f"shards/part{r}.bin"]["size"] for r in range(3)] == [100, 101, 102]
    assert ckpt.verify(final) is None and ckpt.latest_checkpoint(tmp_path) == final
    # damage inside a sub-folder is found like damage at the top
    (final / "shards" / "part2.bin").write_bytes(b"\x00" * 102)
    assert ckpt.verify(final) == "shards/part2.bin does not match its checksum"
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_a_failed_write_leaves_no_checkpoint_and_no_process_waiting(tmp_path):
    def write(tmp: Path, rank: int) -> None:
        if rank == 0:
            raise OSError(28, "No space left on device")
        (tmp / f"part{rank}.bin").write_bytes(b"x")

    results = _save_from(2, tmp_path, write)
    assert isinstance(results[0], CheckpointError) and "the disk is full" in str(results[0])
    assert not any(p.name.startswith(("checkpoint-", ".checkpoint-")) for p in tmp_path.iterdir())


def test_run_state_round_trip_restores_generators_and_data_position(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    states = []
    for rank in range(2):
        meta = {"kind": "shards", "index": 10 + rank}
        states.append({"data": (meta, {"perm": np.arange(5) + rank}), "rng": ckpt.rng_state()})
    expected = (torch.rand(3), random.random())
    schedule = {"scheduler": {"last_epoch": 7}, "scaler": None}
    train_state = {"step": 7, "fingerprint": {"world_size": 2}}
    ckpt.write_run_state(tmp_path, train_state, schedule, states)
    got_train, got_schedule, got_ranks = ckpt.read_run_state(tmp_path)
    assert got_train == train_state and got_schedule == schedule and len(got_ranks) == 2
    assert got_ranks[1]["data"][0] == {"kind": "shards", "index": 11}
    np.testing.assert_array_equal(got_ranks[1]["data"][1]["perm"], np.arange(5) + 1)
    ckpt.load_rng_state(got_ranks[0]["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_hugging_face_save_loads_with_tied_weights(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50))
    ckpt.save_hf_model(lm, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for name, tensor in lm.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


FINGERPRINT = {
    "block_size": 32,
    "world_size": 2,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
}


def test_another_process_count_resumes_when_the_global_batch_is_kept():
    for world, per_device, accumulation in ((1, 4, 2), (1, 8, 1), (4, 2, 1)):
        current = dict(FINGERPRINT, world_size=world)
        current.update(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation)
        check_resume_compatible(FINGERPRINT, current, allow_changes=False)
    with pytest.raises(ConfigError) as err:
        check_resume_compatible(FINGERPRINT, dict(FINGERPRINT, world_size=4), allow_changes=False)
    assert "world_size: checkpoint has 2, this run has 4" in str(err.value)
    assert "per_device_train_batch_size x gradient_accumulation_steps = 2" in str(err.value)
    # the suggested split resumes; --allow_resume_changes accepts another global batch
    check_resume_compatible(
        FINGERPRINT, dict(FINGERPRINT, world_size=4, per_device_train_batch_size=2), False
    )
    check_resume_compatible(FINGERPRINT, dict(FINGERPRINT, world_size=4), allow_changes=True)
