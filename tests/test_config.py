"""Settings: presets match GPT-2's published sizes, every problem is reported at once, the CLI parses files."""

import pytest
from transformers import GPT2LMHeadModel

from gpt2_training.cli import parse_config
from gpt2_training.config import PRESETS, ModelArguments
from gpt2_training.errors import ConfigError
from gpt2_training.model import count_parameters, gpt2_config
from gpt2_training.options import validate

# Parameter counts of OpenAI's released checkpoints as loaded by transformers (vocabulary 50257, tied head).
PUBLISHED = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_sizes_match_published_gpt2(preset):
    cfg = gpt2_config(ModelArguments(preset=preset, pad_vocab_to_multiple_of=1), 50257, 50256)
    assert count_parameters(cfg) == PUBLISHED[preset]


def test_analytic_count_equals_instantiated_model():
    cfg = gpt2_config(ModelArguments(preset="tiny"), 1000, 999)
    model = GPT2LMHeadModel(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert cfg.vocab_size == 1024  # padded to a multiple of 64


def test_every_preset_builds_a_valid_config():
    for name in PRESETS:
        cfg = parse_config(["--preset", name, "--block_size", "64"])
        validate(cfg, cuda_available=False, bf16_ok=False)


def test_all_problems_reported_at_once():
    cfg = parse_config(
        [
            "--preset",
            "nope",
            "--n_embd",
            "100",
            "--n_head",
            "3",
            "--block_size",
            "4096",
            "--gradient_accumulation_steps",
            "0",
            "--precision",
            "fp16",
        ]
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg, cuda_available=False, bf16_ok=False)
    text = str(err.value)
    for fragment in (
        "unknown preset",
        "not divisible by n_head",
        "exceeds n_positions",
        "gradient_accumulation_steps",
        "fp16 needs a CUDA GPU",
    ):
        assert fragment in text, fragment
    assert len(err.value.problems) == 5


def test_divisibility_error_suggests_a_valid_head_count():
    cfg = parse_config(["--n_embd", "96", "--n_head", "5"])
    with pytest.raises(ConfigError, match="pick e.g. n_head=4"):
        validate(cfg, cuda_available=False, bf16_ok=False)


def test_to_dict_has_no_token_fields():
    d = parse_config([]).to_dict()
    assert "hub_token" not in d and d["per_device_train_batch_size"] == 16


def test_training_arguments_precision_switches_are_honoured_or_refused():
    assert parse_config(["--fp16", "true"]).run.precision == "fp16"
    with pytest.raises(ConfigError, match="contradicts"):
        parse_config(["--bf16", "true", "--precision", "fp32"])
    cfg = parse_config(["--bf16", "true"])
    assert cfg.run.precision == "bf16"
    with pytest.raises(ConfigError, match="bf16 is not supported on this hardware"):
        validate(cfg, cuda_available=False, bf16_ok=False)


@pytest.mark.parametrize(
    "words, expect",
    [
        ("full_shard auto_wrap", {"reshard_after_forward": True}),
        ("shard_grad_op", {"reshard_after_forward": False}),
        ("full_shard offload", {"reshard_after_forward": True, "cpu_offload": True}),
    ],
)
def test_fsdp_words_become_fsdp2_settings_without_a_deprecation_warning(words, expect, caplog):
    """`--fsdp "full_shard auto_wrap"` (TrainingArguments' names, as the docs write them) maps to FSDP2's
    fsdp_config as transformers maps it, but without transformers' "passing fsdp as a string" warning."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        cfg = parse_config(["--preset", "tiny", "--fsdp", words])
    finally:
        hf_logging.disable_propagation()
    assert cfg.train.fsdp is True
    assert {k: cfg.train.fsdp_config[k] for k in expect} == expect
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_an_unknown_fsdp_word_is_still_refused_by_transformers():
    with pytest.raises(ValueError, match="Unknown `fsdp` option"):
        parse_config(["--preset", "tiny", "--fsdp", "full_shard sideways"])


@pytest.mark.timeout(30)
def test_a_glob_over_link_loops_is_checked_without_hanging(tmp_path):
    """Two link loops (`ln -s . dir/loop`, `ln -s .. dir/sub/up`) made glob's `**` search grow without end, so
    start-up hung in this check before the source's loop-safe search ever ran; a missing folder is still named."""
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "a.txt").write_text("text")
    (tmp_path / "dir" / "loop").symlink_to(".")
    (tmp_path / "dir" / "sub" / "up").symlink_to("..")
    for pattern in ("**/*.txt", "**/*.parquet"):
        validate(
            parse_config(["--dataset", str(tmp_path / "dir" / pattern)]), cuda_available=False, bf16_ok=False
        )
    with pytest.raises(ConfigError, match="does not exist"):
        validate(
            parse_config(["--dataset", str(tmp_path / "nowhere" / "*.txt")]),
            cuda_available=False,
            bf16_ok=False,
        )
