"""The notebook's helpers (`gpt2_training.tutorial`): profile choice, technique measurements, data previews with
their offline fallback, and the small pieces the notebook shows (tables, config problems, GPU benchmark, Hub)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2_training import tutorial
from gpt2_training.cli import parse_config
from gpt2_training.config import validate
from gpt2_training.errors import ConfigError

TINY = dict(
    preset="tiny",
    dataset="builtin",
    tokenizer_vocab_size=1024,
    block_size=32,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    max_steps=2,
    logging_steps=1,
    warmup_steps=1,
    eval_max_sequences=4,
    sample_prompts=["The"],
    sample_max_new_tokens=2,
    precision="fp32",
)


def test_choose_profile_takes_the_name_from_the_environment_and_says_why(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(tutorial.PROFILE_ENV, "tiny")
    monkeypatch.setenv(tutorial.OUTPUT_ENV, str(tmp_path))
    profile = tutorial.choose_profile()
    out = capsys.readouterr().out
    assert profile["name"] == "tiny" and profile["output_root"] == str(tmp_path)
    assert "profile: tiny" in out and f"{tutorial.PROFILE_ENV}=tiny" in out and "hardware:" in out
    assert profile["why"] and profile["hardware"]


def test_choose_profile_falls_back_to_the_hardware(monkeypatch, capsys):
    monkeypatch.delenv(tutorial.PROFILE_ENV, raising=False)
    profile = tutorial.choose_profile()
    if torch.cuda.is_available():
        assert profile["name"] == "gpu" and "GPU" in profile["why"]
    else:
        assert profile["name"] == "laptop" and "no CUDA GPU" in profile["why"]
    assert f"profile: {profile['name']}" in capsys.readouterr().out


def test_an_unknown_profile_is_refused(monkeypatch):
    monkeypatch.setenv(tutorial.PROFILE_ENV, "huge")
    with pytest.raises(ConfigError, match="unknown tutorial profile 'huge'"):
        tutorial.choose_profile(verbose=False)


def test_choose_profile_returns_a_copy(monkeypatch):
    monkeypatch.setenv(tutorial.PROFILE_ENV, "tiny")
    tutorial.choose_profile(verbose=False)["base"]["block_size"] = 1
    assert tutorial.PROFILES["tiny"]["base"]["block_size"] == 64


@pytest.mark.parametrize("name", list(tutorial.PROFILES))
def test_every_run_of_every_profile_has_valid_settings(name, monkeypatch, tmp_path):
    """A misspelt setting or an invalid combination in a profile fails here, not half-way through the notebook."""
    monkeypatch.setenv(tutorial.OUTPUT_ENV, str(tmp_path))
    profile = tutorial.choose_profile(name, verbose=False)
    gpu = name == "gpu"
    for part in ("main_run", "techniques", "slow_run", "lr_sweep", "launch"):
        base = tutorial.settings_for(profile, part, part)
        variants = {"techniques": tutorial.TECHNIQUES, "slow_run": tutorial.SLOW_RUN_CURES}.get(
            part, {"": {}}
        )
        for change in tutorial.resolve_variants(variants, base).values():
            settings = {**base, **change}
            if change.get("precision") == "bf16" and not gpu:
                continue  # refused on CPUs without native bf16, by design (the table says so)
            validate(parse_config([], **settings), cuda_available=gpu, bf16_ok=gpu)
    assert len(profile["lr_sweep"]["learning_rates"]) == 3


def test_settings_for_layers_base_part_and_overrides(tmp_path):
    profile = {
        "base": {"block_size": 64, "n_layer": 4},
        "main": {"max_steps": 5, "n_layer": None},
        "output_root": str(tmp_path),
    }
    s = tutorial.settings_for(profile, "main", "run", max_steps=7)
    assert s["block_size"] == 64 and s["max_steps"] == 7 and "n_layer" not in s
    assert s["output_dir"] == str(tmp_path / "run") and s["resume"] == "never"


def test_resolve_variants_scales_the_micro_batch():
    out = tutorial.resolve_variants(tutorial.SLOW_RUN_CURES, {"per_device_train_batch_size": 16})
    batches = [
        (v.get("per_device_train_batch_size"), v.get("gradient_accumulation_steps")) for v in out.values()
    ]
    assert batches[0] == (2, 8) and batches[1] == (16, 1)
    assert all(mb * acc == 16 for mb, acc in batches if mb is not None)


def test_compare_techniques_returns_a_row_per_variant_with_measured_speed(env, tmp_path):
    variants = {
        "baseline": {},
        "accumulation": {"per_device_train_batch_size": 0.5, "gradient_accumulation_steps": 2},
        "fp16": {"precision": "fp16"},
    }
    table = tutorial.compare_techniques({**TINY, "output_dir": str(tmp_path / "cmp")}, variants)
    rows = {r["variant"]: r for r in table.rows}
    assert list(rows) == list(variants)
    for name in ("baseline", "accumulation"):
        assert rows[name]["tokens/s"] > 0 and rows[name]["peak memory MiB"] is not None
        assert rows[name]["speed vs first"].endswith("x")
    assert rows["baseline"]["speed vs first"] == "1.00x"
    # same effective batch, same data, same seed: accumulation computes the same losses
    assert rows["accumulation"]["final train loss"] == pytest.approx(
        rows["baseline"]["final train loss"], rel=1e-4
    )
    if torch.cuda.is_available():
        assert rows["fp16"]["tokens/s"] > 0
    else:
        assert rows["fp16"]["tokens/s"] is None and "not run here" in rows["fp16"]["note"]
        assert "fp16 needs a CUDA GPU" in rows["fp16"]["note"]
    assert (tmp_path / "cmp" / "variant-1" / "train_log.jsonl").exists()
    assert "memory:" in table.caption and "tokens/s" in repr(table)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (RSS) measurement")
def test_peak_memory_sees_an_allocation_on_cpu():
    with tutorial.PeakMemory() as meter:
        block = np.ones(64 * tutorial.MIB // 8)  # 64 MiB, touched
        block.sum()
        import time

        time.sleep(0.05)
        del block
    assert meter.peak_mib > 48 and meter.kind.startswith("CPU: peak RSS")


def test_preview_source_falls_back_offline_with_a_plain_message(env, capsys):
    preview = tutorial.preview_source("openwebtext", 1, chars=50)
    out = capsys.readouterr().out
    assert preview.fell_back and preview.used == "builtin" and len(preview.documents) == 1
    assert "openwebtext: NOT AVAILABLE HERE" in out and "HF_HUB_OFFLINE" in out
    assert "falling back to 'builtin', which needs no download" in out and "built-in corpus" in out


def test_preview_source_falls_back_for_a_missing_local_path(env, tmp_path, capsys):
    preview = tutorial.preview_source(str(tmp_path / "nowhere"), 2)
    assert preview.fell_back and "no such file or folder" in preview.fallback_reason
    assert len(preview.documents) == 2


def test_preview_source_reads_a_reachable_source(env, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(3)) + "\n")
    preview = tutorial.preview_source(str(path), 2)
    assert not preview.fell_back and preview.documents == ["document number 0", "document number 1"]
    assert "NOT AVAILABLE" not in capsys.readouterr().out


def test_config_problems_show_the_package_message():
    problems = tutorial.config_problems(preset="gpt2-small", n_embd=768, n_head=10)
    assert problems == [
        "n_embd=768 is not divisible by n_head=10: each head gets n_embd/n_head dimensions, "
        "so pick e.g. n_head=8"
    ]
    assert tutorial.config_problems(preset="gpt2-small") == []


def test_parameter_table_has_the_published_sizes():
    rows = {r["preset"]: r["parameters"] for r in tutorial.parameter_table().rows}
    assert rows == {
        "gpt2-small": "124.5 M",
        "gpt2-medium": "354.9 M",
        "gpt2-large": "774.1 M",
        "gpt2-xl": "1557.7 M",
    }


def test_memory_table_adds_up_from_the_planner():
    from gpt2_training.planner import GIB, plan_memory

    row = tutorial.memory_table(["gpt2-small"], micro_batch=4, seq_len=512).rows[0]
    plan = plan_memory("gpt2-small", micro_batch=4, seq_len=512)
    assert row["total per GPU"] == pytest.approx(plan.total / GIB)
    assert row["optimizer states"] == pytest.approx(2 * row["weights"], rel=1e-3)  # AdamW: 8 of 4 bytes


def test_round_trip_reports_exact_text(capsys):
    class Identity:  # a stand-in tokenizer whose decode loses a trailing space
        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": list(text.encode())})()

        def decode(self, ids):
            return bytes(ids).decode().rstrip()

    tutorial.round_trip(Identity(), ["same", "trailing "])
    assert capsys.readouterr().out == "exact: 'same'\nCHANGED: 'trailing '\n"


def test_gpu_benchmark_is_pending_without_a_gpu_record(tmp_path):
    """bench/run_all.py's CPU record (machine.gpu null) is not a GPU figure."""
    (tmp_path / "cpu-amd-epyc-2cpu.md").write_text("Machine: AMD EPYC, GPU: none\n| row | tokens/s |\n")
    (tmp_path / "cpu-amd-epyc-2cpu.json").write_text(
        json.dumps({"machine": {"cpu": "AMD EPYC", "gpu": None}})
    )
    assert "GPU run pending" in tutorial.gpu_benchmark(tmp_path).data
    assert "GPU run pending" in tutorial.gpu_benchmark(tmp_path / "missing").data


def test_gpu_benchmark_shows_the_committed_gpu_record(tmp_path):
    (tmp_path / "gpu-nvidia-h100.json").write_text(json.dumps({"machine": {"gpu": "NVIDIA H100 80GB HBM3"}}))
    (tmp_path / "gpu-nvidia-h100.md").write_text("measured on NVIDIA H100 80GB HBM3: 123,456 tokens/s\n")
    shown = tutorial.gpu_benchmark(tmp_path).data
    assert "123,456 tokens/s" in shown and "pending" not in shown and shown.count("123,456") == 1
    (tmp_path / "gpu-nvidia-h100.md").unlink()
    assert "NVIDIA H100 80GB HBM3" in tutorial.gpu_benchmark(tmp_path).data  # the JSON alone


def test_push_to_hub_is_skipped_offline_or_without_a_token(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tutorial.push_to_hub(tmp_path, "x") is None
    assert "HF_HUB_OFFLINE" in capsys.readouterr().out
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert tutorial.push_to_hub(tmp_path, "x") is None
    assert "no HF_TOKEN" in capsys.readouterr().out


def test_table_renders_markdown_and_text():
    t = tutorial.Table([{"a": 1234.5, "b": None}, {"a": 0.5, "b": "x|y"}], caption="cap")
    assert t._repr_markdown_().splitlines()[2:] == [
        "| a | b |",
        "|---|---|",
        "| 1,234 | - |",
        "| 0.5 | x\\|y |",
    ]
    assert repr(t).splitlines() == ["cap", "a      b", "1,234  -", "0.5    x|y"]
