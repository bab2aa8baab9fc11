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


@pytest.mark.timeout(600)
def test_bench_time_to_loss_smoke(tmp_path):
    import bench_time_to_loss

    record = bench_time_to_loss.main(
        ["--steps", "2", "--eval_every", "1", "--eval_sequences", "8", "--out", str(tmp_path / "ttl")]
    )
    rows = {r["contender"]: r for r in record["rows"]}
    assert len(rows) == 4 and all(r["tokens_per_s"] > 0 for r in rows.values())
    # the same model, initialisation, data order and evaluation: the engine and the Trainer agree on the loss
    engine, trainer = rows["this project, AdamW"], rows["transformers.Trainer, AdamW"]
    assert engine["final_eval_loss"] == pytest.approx(trainer["final_eval_loss"], abs=2e-3)
    assert (tmp_path / "ttl.md").read_text().count("|") > 20


def test_time_to_loss_interpolates_between_evaluations():
    from bench_time_to_loss import reach

    curve = [(100, 1.0, 6.0), (200, 2.0, 5.0), (300, 3.0, 4.0)]
    assert reach(curve, 4.5) == pytest.approx((250.0, 2.5))
    assert reach(curve, 7.0) == (100.0, 1.0) and reach(curve, 3.0) is None
