"""The notebook's presentation helpers (`gpt2_training.tutorial`): choosing the profile, the tables (the memory
table adds up, the benchmark table shows the committed record) and the plots."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

from gpt2_training import tutorial
from gpt2_training.config import PRESETS, ModelArguments, model_shape
from gpt2_training.errors import ConfigError
from gpt2_training.planner import GIB, plan_memory


def test_choose_profile_takes_the_name_from_the_environment_and_says_why(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(tutorial.PROFILE_ENV, "tiny")
    monkeypatch.setenv(tutorial.OUTPUT_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    profile = tutorial.choose_profile()
    out = capsys.readouterr().out
    assert profile["name"] == "tiny" and profile["output_root"] == str(tmp_path)
    assert f"why: named explicitly ({tutorial.PROFILE_ENV}=tiny)" in out and "hardware: " in out
    # offline means offline: the Hub is not even tried
    assert profile["hub_reachable"] is False and "Hugging Face Hub reachable: no" in out
    assert profile["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert profile["mixed_precision"] in ("bf16", "fp16", None)


def test_the_gpu_profile_streams_openwebtext_only_when_the_hub_is_reachable(monkeypatch, capsys):
    """Without the Hub the gpu profile's longer run reads the local parquet shards, and the settings cell says
    so in one line; the laptop profile always trains on the built-in corpus."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    profile = tutorial.choose_profile("gpu")
    out = capsys.readouterr().out
    assert tutorial.PROFILES["gpu"]["main_dataset"] == "openwebtext"
    assert profile["main_dataset"] == "parquet" and profile["hub_reachable"] is False
    assert "the longer run (section 10) trains on: the parquet shards of section 5 (OpenWebText needs" in out
    monkeypatch.setattr(tutorial, "reachable", lambda host, timeout_s=3.0: True)
    for name in tutorial.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    assert tutorial.choose_profile("gpu", verbose=False)["main_dataset"] == "openwebtext"
    assert tutorial.choose_profile("laptop", verbose=False)["main_dataset"] == "builtin"


def test_choose_profile_falls_back_to_the_hardware(monkeypatch, capsys):
    monkeypatch.delenv(tutorial.PROFILE_ENV, raising=False)
    profile = tutorial.choose_profile(verbose=False)
    assert profile["name"] == ("gpu" if torch.cuda.is_available() else "laptop")
    assert capsys.readouterr().out == ""


def test_an_unknown_profile_is_refused(monkeypatch):
    monkeypatch.setenv(tutorial.PROFILE_ENV, "huge")
    with pytest.raises(ConfigError, match="unknown tutorial profile 'huge': choose one of tiny, laptop, gpu"):
        tutorial.choose_profile(verbose=False)


def test_choose_profile_returns_a_copy(monkeypatch):
    tutorial.choose_profile("tiny", verbose=False)["model"]["preset"] = "gpt2-xl"
    assert tutorial.PROFILES["tiny"]["model"]["preset"] == "tiny"


@pytest.mark.parametrize("name", list(tutorial.PROFILES))
def test_every_profile_fits_its_model_and_its_batches(name):
    """A block longer than the model's positions, or a model setting that does not exist, fails here."""
    p = tutorial.PROFILES[name]
    shape = model_shape(ModelArguments(**p["model"]))
    assert p["block_size"] <= shape["n_positions"] and shape["n_embd"] % shape["n_head"] == 0
    assert p["model"]["preset"] in PRESETS
    assert p["warmup_steps"] < p["hand_steps"] <= p["main_steps"] and p["eval_steps"] <= p["main_steps"]
    assert p["trainer_steps"] <= p["hand_steps"] and p["packing_documents"] > 0
    assert p["main_dataset"] in tutorial.MAIN_DATA_TEXT


def test_reachable_is_false_for_a_closed_port():
    assert tutorial.reachable("127.0.0.1", timeout_s=0.5) is False


def test_memory_table_columns_add_up_to_the_planners_total():
    table = tutorial.memory_table(per_device_train_batch_size=4, block_size=512, precision="bf16")
    for row in table.rows:
        parts = sum(v for k, v in row.items() if k not in ("preset", "total"))
        assert parts == pytest.approx(row["total"], rel=1e-9)
        plan = plan_memory(row["preset"], per_device_train_batch_size=4, block_size=512, precision="bf16")
        assert row["total"] == pytest.approx(plan.total / GIB)
        assert row["AdamW states"] == pytest.approx(
            2 * row["gradients"], rel=1e-3
        )  # 8 bytes vs 4 per parameter
    assert "per_device_train_batch_size=4" in table.caption


def test_benchmark_table_shows_median_steps_and_their_ratio_to_the_raw_loop(tmp_path):
    rows = [
        {"name": n, "what": n, "median_step_s": ms / 1000, "n_params": 1000}
        for n, ms in (("seed", 90.0), ("engine", 21.0), ("raw", 20.0), ("hf_trainer", 22.0))
    ]
    machine = {"cpu": "Test CPU", "usable_cpus": 2, "torch": "2.x"}
    settings = {"threads": 1, "preset": "tiny", "micro_batch": 8, "seq_len": 64, "repeats": 9}
    record = {"machine": machine, "training": {"rows": rows, "settings": settings}}
    (tmp_path / "cpu-test-2cpu.json").write_text(json.dumps(record))
    table = tutorial.benchmark_table(tmp_path)
    assert [r["loop"] for r in table.rows] == ["raw", "engine", "hf_trainer"]
    assert [r["vs raw loop"] for r in table.rows] == pytest.approx([1.0, 1.05, 1.1])
    assert table.rows[1]["median step (ms)"] == pytest.approx(21.0)
    assert "Test CPU, 2 cores, 1 torch thread" in table.caption and "1,000 parameters" in table.caption


def test_the_committed_benchmark_record_gives_the_ratios_its_report_states():
    """The notebook's prose quotes the committed record's median-step ratios (1.05x and 1.09x)."""
    ratios = {r["loop"]: round(r["vs raw loop"], 2) for r in tutorial.benchmark_table().rows}
    record = json.loads(next((tutorial.REPO_ROOT / "bench" / "results").glob("cpu-*.json")).read_text())
    rows = {r["name"]: r for r in record["training"]["rows"]}
    assert ratios["engine"] == round(rows["engine"]["overhead_ratio_median_step"], 2)
    assert ratios["hf_trainer"] == round(rows["hf_trainer"]["overhead_ratio_median_step"], 2)


def test_table_renders_markdown_and_aligned_text():
    t = tutorial.Table([{"a": 1234.5, "b": None}, {"a": 0.5, "b": "x|y"}], caption="cap")
    assert t._repr_markdown_().splitlines()[2:] == [
        "| a | b |",
        "|---|---|",
        "| 1,234 | - |",
        "| 0.50 | x\\|y |",
    ]
    assert repr(t).splitlines() == ["cap", "a      b", "1,234  -", "0.50   x|y"]


def test_smooth_is_bias_corrected():
    assert tutorial.smooth([5.0, 5.0, 5.0]) == pytest.approx([5.0, 5.0, 5.0])
    rising = tutorial.smooth([0.0, 10.0], beta=0.5)
    assert rising == pytest.approx([0.0, 10 * 0.5 / 0.75])


def test_plot_run_draws_loss_schedule_and_throughput(tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=False)
    log = [
        {"event": "eval", "step": 0, "eval_loss": 7.0},
        {"event": "train", "step": 5, "lr": 1e-3, "tokens_per_s": 100.0},
        {"event": "train", "step": 10, "lr": 0.0, "tokens_per_s": 120.0},
        {"event": "eval", "step": 10, "eval_loss": 6.0},
    ]
    (tmp_path / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in log))
    result = SimpleNamespace(output_dir=str(tmp_path), losses=[7.0 - 0.1 * i for i in range(10)])
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, warmup_steps=2, max_steps=10, report_to="none"
    )
    fig = tutorial.plot_run(result, args, "tiny on test data")
    loss_ax, lr_ax, tps_ax = fig.axes
    assert fig._suptitle.get_text() == "tiny on test data"
    lrs = lr_ax.lines[0].get_ydata()
    # linear warmup to the peak at step 3, cosine decay towards 0 by max_steps
    assert list(lrs[:3]) == pytest.approx([0.0, 5e-4, 1e-3]) and lrs[-1] < lrs[2] / 5
    assert len(loss_ax.lines) == 3 and list(tps_ax.lines[0].get_ydata()) == [100.0, 120.0]
