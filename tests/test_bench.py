"""Smoke runs of the benchmarks with the smallest settings (CPU): every row reports tokens/s > 0 and the
result files have the expected keys. No throughput number is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

ROW_KEYS = {
    "name",
    "what",
    "tokens_per_s",
    "step_time_s",
    "n_params",
    "precision",
    "mfu",
    "mfu_text",
    "peak_memory_bytes",
    "peak_memory_method",
}


@pytest.mark.timeout(120)
def test_bench_training_smoke(tmp_path):
    import bench_training

    out = tmp_path / "training.json"
    result = bench_training.main(
        [
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--seq_len",
            "16",
            "--micro_batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--engine_steps",
            "2",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert out.with_suffix(".md").exists()
    names = [r["name"] for r in saved["rows"]]
    assert names == ["seed", "recipe", "reference", "engine", "raw", "hf_trainer"]
    for row in saved["rows"]:
        assert ROW_KEYS <= set(row), row
        assert row["tokens_per_s"] > 0
        assert row["mfu"] is None and "n/a" in row["mfu_text"]  # CPU
        assert row["peak_memory_bytes"] >= 0
    engine = saved["rows"][3]
    assert engine["overhead_ratio"] > 0 and len(engine["overhead_ratio_pairs"]) == 1
    assert saved["rows"][5]["overhead_ratio_median_step"] > 0  # transformers.Trainer vs the raw loop
    assert {"cpu", "cpu_count", "torch"} <= set(saved["machine"])
    assert result["rows"][0]["tokens_per_s"] == saved["rows"][0]["tokens_per_s"]


@pytest.mark.timeout(120)
def test_bench_data_smoke(tmp_path):
    import bench_data

    out = tmp_path / "data.json"
    bench_data.main(
        [
            "--max_chars",
            "100000",
            "--vocab_size",
            "1024",
            "--block_size",
            "64",
            "--micro_batch",
            "4",
            "--repeats",
            "1",
            "--no_gpt2",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    names = [r["name"] for r in saved["rows"]]
    assert names == ["raw_tokenizer", "pipeline", "prepare_shards", "shard_reader"]
    for row in saved["rows"]:
        assert row["tokens_per_s"] > 0 and row["tokens"] > 0
    assert saved["rows"][1]["ratio_to_raw_tokenizer"] > 0
    assert saved["tokenizers_parallelism"] in ("true", "false")
    assert {"cpu", "torch"} <= set(saved["machine"])


def test_memory_grid_lists_predictions_without_a_gpu():
    import bench_training

    rows = bench_training.memory_grid(__import__("torch").device("cpu"))
    assert len(rows) >= 6 and all(r["predicted_peak_gib"] > 0 for r in rows)
