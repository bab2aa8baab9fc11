"""checkpoint.py: the layout, the manifest over sub-folders, several processes writing one checkpoint, and every
stateful part (model, optimizer, schedule, train state, RNG, data position) written and read back exactly.
Processes are stood in for by threads sharing a barrier, or by a `gather` that returns several processes' states:
the file protocol is the same, and real multi-process saves are in tests/test_distributed.py."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import state_tensors

from gpt2_training import checkpoint as ckpt
from gpt2_training.errors import CheckpointError, ConfigError


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


class _Stream:
    """A stand-in for one process's data stream: its position is a number and an array."""

    block_size, rank, world_size = 32, 0, 1

    def __init__(self, index: int = 0):
        self.index = index

    def state_dict(self):
        meta = {"kind": "token_stream", "block_size": 32, "world_size": 1, "index": self.index}
        return meta, {"perm": np.arange(5) + self.index}

    def load_state_dict(self, meta, arrays):
        assert np.array_equal(arrays["perm"], np.arange(5) + meta["index"])
        self.index = meta["index"]


class _Model:
    """A replicated model part (what the single-process / DDP backend gives): weights and optimizer state."""

    name = "ddp"

    def __init__(self, lm):
        self.lm = lm
        self.optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-3)

    def full_state_dict(self):
        return dict(self.lm.state_dict())

    def state_dict(self):
        return {"model": self.full_state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.lm.load_state_dict(state["model"], strict=False)
        self.lm.tie_weights()
        self.optimizer.load_state_dict(state["optimizer"])


def _tiny_lm(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50))


def _parts(seed: int, fingerprint: dict | None = None, rank: int = 0, allow_changes: bool = False) -> dict:
    lm = _tiny_lm(seed)
    model = _Model(lm)
    scheduler = torch.optim.lr_scheduler.StepLR(model.optimizer, step_size=1, gamma=0.5)
    # one step, so that the optimizer has moments to save
    lm(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    model.optimizer.step()
    fp = fingerprint or dict(FINGERPRINT, world_size=1)
    return {
        "train_state": ckpt.TrainState(fp, "ddp", {"seed": seed}, allow_changes=allow_changes),
        "model": model,
        "scheduler": scheduler,
        "scaler": None,
        "data": ckpt.DataPosition(_Stream(), rank),
        "rng": ckpt.RNGState(rank),
    }


def test_every_part_round_trips_exactly_through_the_files(tmp_path):
    saved = _parts(seed=1)
    saved["train_state"].step, saved["train_state"].tokens_seen, saved["train_state"].skipped_steps = (
        7,
        896,
        2,
    )
    saved["scheduler"].step()
    saved["data"].stream.index = 11
    random.seed(4)
    path = ckpt.save(tmp_path, 7, saved, saved["model"].lm, save_total_limit=None)
    expected = (torch.rand(3), random.random())
    assert path == tmp_path / "checkpoint-7" and ckpt.verify(path) is None
    names = set(json.loads((path / "manifest.json").read_text())["files"])
    assert names == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rank0.json",
        "rank0.npz",
        "rank0.pt",
        "trainer_state.json",
    }

    loaded = _parts(seed=2)
    before = state_tensors(loaded["model"].state_dict())
    ckpt.load(path, loaded)
    # another seed gave other weights and moments: every tensor is now the saved one, bit for bit
    want, got = state_tensors(saved["model"].state_dict()), state_tensors(loaded["model"].state_dict())
    assert len(got) == len(want) > 10 and not all(
        torch.equal(a, b) for a, b in zip(before, want, strict=True)
    )
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert loaded["model"].lm.lm_head.weight is loaded["model"].lm.transformer.wte.weight
    assert (
        loaded["train_state"].step,
        loaded["train_state"].tokens_seen,
        loaded["train_state"].skipped_steps,
    ) == (
        7,
        896,
        2,
    )
    assert loaded["scheduler"].state_dict() == saved["scheduler"].state_dict()
    assert loaded["data"].stream.index == 11
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_per_process_parts_are_keyed_by_rank_and_mapped_onto_another_count(tmp_path):
    """Two processes' RNG states saved; three processes load them: process r continues old process r % 2."""
    streams = []
    rngs = []
    for rank in range(2):
        torch.manual_seed(10 + rank)
        rngs.append(ckpt.RNGState(rank).state_dict())
        streams.append(ckpt.DataPosition(_Stream(3), rank).state_dict())
    gathered = [{"data": streams[r], "rng": rngs[r]} for r in range(2)]
    parts = _parts(seed=1, fingerprint=dict(FINGERPRINT, world_size=2))
    parts["data"] = ckpt.DataPosition(_Stream(), 0)
    path = ckpt.save(tmp_path, 3, parts, parts["model"].lm, None, gather=lambda mine: gathered)
    assert {f"rank{r}.{ext}" for r in (0, 1) for ext in ("json", "npz", "pt")} <= {
        p.name for p in path.iterdir()
    }
    states = ckpt._read_processes(path)["rng"]
    assert sorted(states) == [0, 1]
    for new_rank, old_rank in ((0, 0), (1, 1), (2, 0)):
        torch.manual_seed(10 + old_rank)
        expected = torch.rand(4)
        ckpt.RNGState(new_rank).load_state_dict(states)
        assert torch.equal(torch.rand(4), expected), (new_rank, old_rank)


def test_incompatible_settings_are_refused_before_any_part_changes(tmp_path):
    saved = _parts(seed=1)
    path = ckpt.save(tmp_path, 2, saved, saved["model"].lm, None)
    other = _parts(seed=2, fingerprint=dict(FINGERPRINT, world_size=1, block_size=64))
    before = [t.clone() for t in state_tensors(other["model"].state_dict())]
    with pytest.raises(ConfigError, match="block_size: checkpoint has 32, this run has 64"):
        ckpt.load(path, other)
    after = state_tensors(other["model"].state_dict())
    assert (
        all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and other["train_state"].step == 0
    )


class _OwnFiles:
    """A model state that only its library can write and read (as DeepSpeed's engine)."""

    def __init__(self):
        self.saved_to = self.loaded_from = None

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "engine.bin").write_bytes(b"engine")
        self.saved_to = folder

    def load(self, folder: Path) -> None:
        assert (folder / "engine.bin").read_bytes() == b"engine"
        self.loaded_from = folder


class _EngineModel(_Model):
    name = "deepspeed ZeRO-3"

    def __init__(self, lm):
        super().__init__(lm)
        self.files = _OwnFiles()
        self.loaded = None

    def state_dict(self):
        return self.files

    def load_state_dict(self, state):
        self.loaded = state


def test_a_self_saving_state_gets_a_folder_named_here_and_a_foreign_layout_is_refused(tmp_path):
    parts = _parts(seed=1)
    parts["model"] = _EngineModel(parts["model"].lm)
    parts["train_state"].backend = "deepspeed ZeRO-3"
    path = ckpt.save(tmp_path, 4, parts, parts["model"].lm, None)
    assert parts["model"].files.saved_to == tmp_path / ".checkpoint-4.tmp" / "deepspeed"
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert "deepspeed/engine.bin" in manifest and "optimizer.pt" not in manifest
    ckpt.load(path, parts)
    assert (
        parts["model"].files.loaded_from == path / "deepspeed"
        and parts["model"].loaded is parts["model"].files
    )
    # the same checkpoint resumed by a replicated backend: refused with the way forward, nothing loaded
    plain = _parts(seed=2)
    with pytest.raises(CheckpointError) as err:
        ckpt.load(path, plain)
    assert "was written under deepspeed ZeRO-3, this run uses ddp" in str(err.value)
    assert f"--resume never --init_from {path} --output_dir <a new folder>" in str(err.value)
    # the same layout written by another ZeRO stage: its partitions do not fit, refused the same way
    other_stage = _parts(seed=3)
    other_stage["model"] = _EngineModel(other_stage["model"].lm)
    other_stage["model"].name = other_stage["train_state"].backend = "deepspeed ZeRO-2"
    with pytest.raises(
        CheckpointError, match="written under deepspeed ZeRO-3, this run uses deepspeed ZeRO-2"
    ):
        ckpt.load(path, other_stage)
    assert other_stage["model"].loaded is None and other_stage["model"].files.loaded_from is None


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
        ckpt.check_resume_compatible(FINGERPRINT, current, allow_changes=False)
    with pytest.raises(ConfigError) as err:
        ckpt.check_resume_compatible(FINGERPRINT, dict(FINGERPRINT, world_size=4), allow_changes=False)
    assert "world_size: checkpoint has 2, this run has 4" in str(err.value)
    assert "per_device_train_batch_size x gradient_accumulation_steps = 2" in str(err.value)
    # the suggested split resumes; --allow_resume_changes accepts another global batch
    ckpt.check_resume_compatible(
        FINGERPRINT, dict(FINGERPRINT, world_size=4, per_device_train_batch_size=2), False
    )
    ckpt.check_resume_compatible(FINGERPRINT, dict(FINGERPRINT, world_size=4), allow_changes=True)


def test_a_folder_that_is_no_checkpoint_is_named_as_such(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match=r"is not a checkpoint folder \(no manifest.json\)"):
        ckpt.load(tmp_path / "notes", _parts(seed=0))
    # a checkpoint-<step> folder without its manifest is a damaged checkpoint
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(CheckpointError, match="is damaged"):
        ckpt.load(tmp_path / "checkpoint-3", _parts(seed=0))
