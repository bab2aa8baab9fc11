"""Every shipped config file parses and agrees with the settings it is used with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gpt2_training.backends import FORBIDDEN_DS_SECTIONS, deepspeed_config
from gpt2_training.cli import parse_config
from gpt2_training.options import validate

CONFIGS = Path(__file__).resolve().parents[1] / "01-Full-Fine-Tuning" / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("accelerate_"))
ACCELERATE = sorted(CONFIGS.glob("accelerate_*.yaml"))
DEEPSPEED = sorted(CONFIGS.glob("ds_*.json"))
# Keys Accelerate can only fill from `model.config.hidden_size`; the prepared model is CausalLMWithLoss (no
# .config), so they must be numbers in the shipped JSONs.
HIDDEN_SIZE_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def test_every_kind_of_config_is_shipped():
    names = {p.name for p in CONFIGS.iterdir()}
    assert {"gpt2-small-owt.yaml", "gpt2-medium-owt.yaml", "domain-corpus.yaml", "tiny.yaml"} <= names
    assert {"ds_zero1.json", "ds_zero2.json", "ds_zero3.json"} <= names
    assert {
        "accelerate_ddp.yaml",
        "accelerate_fsdp.yaml",
        "accelerate_deepspeed.yaml",
        "accelerate_cpu_2proc.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_validates(path, tmp_path, monkeypatch):
    cfg = parse_config(["--config", str(path)])
    monkeypatch.chdir(tmp_path)  # relative dataset folders (domain-corpus: data/domain) resolve from here
    if cfg.data.dataset not in ("builtin", "openwebtext") and ":" not in cfg.data.dataset:
        (tmp_path / cfg.data.dataset).mkdir(parents=True)
        (tmp_path / cfg.data.dataset / "a.txt").write_text("some text")
    validate(cfg, cuda_available=True, bf16_ok=True)  # the recipes are written for GPUs


@pytest.mark.parametrize("name", ["gpt2-small-owt.yaml", "gpt2-medium-owt.yaml"])
def test_owt_recipes_step_half_a_million_tokens_on_8_gpus(name):
    t = parse_config(["--config", str(CONFIGS / name)])
    tokens = t.train.per_device_train_batch_size * t.train.gradient_accumulation_steps * t.data.block_size * 8
    assert tokens == 524_288 and t.data.block_size == 1024
    assert t.run.precision == "bf16" and t.model.init_from == "scratch"


def test_domain_recipe_starts_from_gpt2():
    cfg = parse_config(["--config", str(CONFIGS / "domain-corpus.yaml")])
    assert cfg.model.init_from == "gpt2" and cfg.data.tokenizer == "gpt2" and cfg.model.preset == "gpt2-small"


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_json_is_consistent_with_training_arguments(path, monkeypatch):
    raw = json.loads(path.read_text())
    stage = int(path.stem.removeprefix("ds_zero"))
    assert raw["zero_optimization"]["stage"] == stage
    for section in FORBIDDEN_DS_SECTIONS:  # the project's AdamW + schedule, identical to single-GPU runs
        assert section not in raw
    for key in (
        "train_micro_batch_size_per_gpu",
        "train_batch_size",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert raw[key] == "auto", key
    assert raw["bf16"]["enabled"] == "auto" and raw["fp16"]["enabled"] == "auto"
    for key in HIDDEN_SIZE_KEYS:
        assert raw["zero_optimization"].get(key, 0) != "auto", key
    if stage == 3:  # get_state_dict / the saved model need the full weights gathered on rank 0
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # Used with each recipe: the filled config carries the recipe's numbers, and Accelerate's plugin accepts it
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    for recipe in ("gpt2-small-owt.yaml", "gpt2-medium-owt.yaml"):
        cfg = parse_config(["--config", str(CONFIGS / recipe)])
        t = cfg.train
        t.deepspeed = str(path)  # set after parsing: TrainingArguments' own check needs deepspeed installed
        filled = deepspeed_config(t)
        assert filled["train_micro_batch_size_per_gpu"] == t.per_device_train_batch_size
        assert filled["gradient_accumulation_steps"] == t.gradient_accumulation_steps
        assert filled["gradient_clipping"] == t.max_grad_norm
        plugin = DeepSpeedPlugin(hf_ds_config=filled)
        plugin.set_mixed_precision(cfg.run.precision)  # bf16 recipe -> bf16.enabled true, fp16 false
        assert plugin.deepspeed_config["bf16"]["enabled"] is (cfg.run.precision == "bf16")
        assert plugin.deepspeed_config["fp16"]["enabled"] is False
        assert plugin.zero_stage == stage


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    raw = yaml.safe_load(path.read_text())
    cfg = load_config_from_file(str(path))  # refuses keys accelerate does not know
    assert cfg.num_processes == raw["num_processes"] >= 2
    expected = {
        "accelerate_ddp.yaml": DistributedType.MULTI_GPU,
        "accelerate_cpu_2proc.yaml": DistributedType.MULTI_GPU,
        "accelerate_fsdp.yaml": DistributedType.FSDP,
        "accelerate_deepspeed.yaml": DistributedType.DEEPSPEED,
    }
    assert cfg.distributed_type == expected[path.name]
    # the training config's --precision decides; next to a DeepSpeed JSON Accelerate refuses any mixed_precision
    assert cfg.mixed_precision == (None if cfg.distributed_type == DistributedType.DEEPSPEED else "no")
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        ds_file = Path(__file__).resolve().parents[1] / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file.exists()
    if cfg.distributed_type == DistributedType.FSDP:
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "GPT2Block"
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
