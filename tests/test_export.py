"""The model folder a run writes (export.py): the fields that transformers 4 and 5, llama.cpp's converter, optimum
and the Hub read, batched and long-prompt generation, 16-bit export, the model card, the held-out file and a
failed final save. `make test-interop` (tools/interop.sh) checks the same folder with those consumers installed."""

from __future__ import annotations

import json
import resource
import signal
from pathlib import Path

import pytest
import torch
from conftest import run_train, tiny_args
from safetensors.torch import load_file

from gpt2_training import export
from gpt2_training.cli import main, parse_config, run
from gpt2_training.data import validation_sequences
from gpt2_training.data.tokenizer import EOS

N_POSITIONS = 256  # the tiny preset's


@pytest.fixture(scope="module")
def trained(shared_cache, tmp_path_factory) -> dict:
    """One tiny fp32 run and one saved in bf16 (from the same settings), shared by the tests of this file."""
    out = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2_TRAINING_CACHE", str(shared_cache))
        for k, v in {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }.items():
            mp.setenv(k, v)
        fp32 = main(
            tiny_args(out / "fp32", "--write_heldout", str(out / "heldout.jsonl"), license="apache-2.0")
        )
        bf16 = main(tiny_args(out / "bf16", save_dtype="bf16"))
    return {"fp32": fp32, "bf16": bf16, "heldout": out / "heldout.jsonl"}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("folder", ["final", "checkpoint-6"])
def test_the_folder_has_the_fields_consumers_read(trained, folder):
    """What OpenAI's gpt2 folder carries and consumers read: llama.cpp needs `architectures` and `n_ctx`,
    transformers 4 needs a tokenizer class it knows, a pipeline needs `model_max_length` and a pad token."""
    path = Path(trained["fp32"].output_dir) / folder
    config = _json(path / "config.json")
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["n_ctx"] == config["n_positions"] == N_POSITIONS
    assert config["dtype"] == config["torch_dtype"] == "float32"
    if folder == "final":
        tok = _json(path / "tokenizer_config.json")
        assert tok["tokenizer_class"] == "GPT2TokenizerFast"
        assert tok["model_max_length"] == N_POSITIONS
        assert tok["bos_token"] == tok["eos_token"] == tok["unk_token"] == tok["pad_token"] == EOS
        assert tok["padding_side"] == "left"
        eos_id = config["eos_token_id"]
        assert _json(path / "generation_config.json")["pad_token_id"] == eos_id


def test_transformers_loads_the_folder_with_the_trained_ids(trained):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast

    path = Path(trained["fp32"].final_model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(tok, GPT2TokenizerFast) and tok.pad_token == EOS and tok.model_max_length == N_POSITIONS
    text = "A function that returns <|endoftext|> and 3 more  spaces\n"
    assert tok(text).input_ids == Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.n_ctx == N_POSITIONS and model.dtype == torch.float32


def test_a_pipeline_batches_and_truncates_a_long_prompt(trained):
    """Batching needs a pad token; `handle_long_generation="hole"` cuts a prompt longer than the model to
    `model_max_length - max_new_tokens` tokens from the left, which works only when `model_max_length` is the
    model's n_positions (with transformers' 'unlimited' default the 400-token prompt reaches the model whole)."""
    from transformers import pipeline

    gen = pipeline("text-generation", model=trained["fp32"].final_model_dir, device="cpu")
    outs = gen(["The", "A function that returns a list of"], batch_size=2, max_new_tokens=5, do_sample=False)
    assert len(outs) == 2 and all(o[0]["generated_text"] for o in outs)
    long_prompt = "def f(x):\n    return x\n" * 60
    assert len(gen.tokenizer(long_prompt).input_ids) > N_POSITIONS + 100
    out = gen(long_prompt, max_new_tokens=8, do_sample=False, handle_long_generation="hole")
    assert out[0]["generated_text"]


def test_a_16_bit_export_is_stored_recorded_and_measured_again(trained):
    fp32, bf16 = trained["fp32"], trained["bf16"]
    final = Path(bf16.final_model_dir)
    weights = load_file(final / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert (final / "model.safetensors").stat().st_size < 0.6 * (
        Path(fp32.final_model_dir) / "model.safetensors"
    ).stat().st_size
    assert _json(final / "config.json")["dtype"] == "bfloat16"
    # checkpoints that resume keep fp32 master weights
    ckpt_weights = load_file(Path(bf16.output_dir) / "checkpoint-6" / "model.safetensors")
    assert {t.dtype for t in ckpt_weights.values()} == {torch.float32}
    metrics = _json(final / "training_metrics.json")
    # same settings and seed: the fp32 figures are the fp32 run's; the bf16 ones are measured on the bf16 weights
    assert metrics["eval_loss"] == pytest.approx(fp32.final_eval["eval_loss"], rel=1e-6)
    assert metrics["bf16_eval_loss"] != metrics["eval_loss"]
    assert metrics["bf16_eval_loss"] == pytest.approx(metrics["eval_loss"], abs=0.05)
    card = (final / "README.md").read_text()
    assert f"{metrics['bf16_eval_loss']:.4f}" in card and f"{metrics['eval_loss']:.4f}" in card

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final, dtype="auto").dtype == torch.bfloat16


def test_the_model_card_is_read_by_the_hub_parser(trained):
    from huggingface_hub import ModelCard

    final = Path(trained["fp32"].final_model_dir)
    card = ModelCard.load(final / "README.md")
    data, metrics = card.data, _json(final / "training_metrics.json")
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert "gpt2" in data.tags and data.license == "apache-2.0"
    # the built-in corpus is no Hub dataset, and a model trained from scratch has no base model
    assert data.datasets is None and data.base_model is None
    got = {r.metric_type: r.metric_value for r in data.eval_results}
    assert got == pytest.approx(
        {
            "loss": metrics["eval_loss"],
            "perplexity": metrics["eval_perplexity"],
            "bits_per_byte": metrics["eval_bpb"],
        },
        rel=1e-3,
    )
    assert {r.dataset_split for r in data.eval_results} == {"held-out"}
    for fact in (
        "tokens seen",
        "hardware",
        "wall time",
        "learning_rate",
        "block_size",
        str(metrics["tokens_seen"]),
    ):
        assert fact in card.text.replace(",", ""), fact


def test_the_card_names_a_hub_dataset_with_its_revision_a_base_model_and_no_invented_license(tmp_path):
    from huggingface_hub import ModelCard

    cfg = parse_config(
        ["--dataset", "openwebtext", "--init_from", "gpt2", "--max_steps", "1", "--output_dir", str(tmp_path)]
    )
    facts = export.RunFacts(step=1, tokens_seen=1024, n_params=124_000_000, wall_time_s=3.0, hardware="CPU")
    text = export.model_card(cfg, facts, {"eval_loss": 3.0, "eval_perplexity": 20.1, "eval_bpb": 1.1}, None)
    data = ModelCard(text).data
    assert data.datasets == ["Skylion007/openwebtext"] and data.base_model == "gpt2"
    assert "license" not in data.to_dict()
    assert {r.dataset_revision for r in data.eval_results} == {"refs/convert/parquet"}
    assert {r.dataset_type for r in data.eval_results} == {"Skylion007/openwebtext"}


def test_write_heldout_holds_the_evaluated_sequences_as_json_lines(trained, env, tmp_path, capsys):
    from transformers import AutoTokenizer

    lines = trained["heldout"].read_text().splitlines()
    assert len(lines) == 8  # --eval_max_sequences
    tok = AutoTokenizer.from_pretrained(trained["fp32"].final_model_dir)
    texts = [json.loads(line)["text"] for line in lines]
    # the text gives back the very tokens the run measured
    cfg = parse_config(tiny_args(tmp_path / "unused"))
    seqs = validation_sequences(cfg.data, tok, cfg.train.seed)
    assert [tok(t).input_ids for t in texts] == seqs.tolist()
    # a file the run did not write is never overwritten
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text("keep me\n")
    assert run(tiny_args(tmp_path / "run", "--write_heldout", str(foreign), max_steps=1)) == 2
    assert "mine.jsonl" in capsys.readouterr().err and foreign.read_text() == "keep me\n"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--save_dtype", "int8"], "save_dtype"),
        (["--license", "MIT License"], "license"),
        (["--write_heldout", "/nonexistent-dir/x.jsonl"], "write_heldout"),
    ],
)
def test_bad_export_options_are_one_line_errors(tmp_path, env, capsys, flags, message):
    assert run(tiny_args(tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()


def test_prepare_writes_the_same_tokenizer_fields(tmp_path, env):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} says hello."}) + "\n" for i in range(50)))
    main(
        [
            "prepare",
            "--dataset",
            str(corpus),
            "--tokenizer",
            "train",
            "--tokenizer_vocab_size",
            "300",
            "--out",
            str(tmp_path / "shards"),
        ]
    )
    tok = _json(tmp_path / "shards" / "tokenizer" / "tokenizer_config.json")
    assert tok["tokenizer_class"] == "GPT2TokenizerFast" and tok["pad_token"] == EOS
    assert tok["padding_side"] == "left" and tok["bos_token"] == tok["unk_token"] == EOS


def test_a_full_disk_during_the_final_save_leaves_no_partial_folder_and_names_the_last_checkpoint(
    tmp_path, env
):
    """A real write failure (RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG, as on a full disk) while the final model is
    written: one error line that names the newest checkpoint, exit status 2, no temporary folder left."""
    out = tmp_path / "run"
    assert run_train(tiny_args(out, max_steps=2, save_steps=2), env).returncode == 0
    weights = (out / "final" / "model.safetensors").stat().st_size

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (weights // 2, resource.RLIM_INFINITY))

    # resumes at step 2, trains to 4 without a checkpoint, then fails to write final/ (bigger than the limit)
    proc = run_train(tiny_args(out, max_steps=4, save_steps=0), env, preexec_fn=small_disk)
    assert proc.returncode == 2, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stdout
    assert "could not write the final model" in errors[0] and "the disk is full" in errors[0]
    assert str(out / "checkpoint-2") in errors[0]
    assert not [p for p in (out).iterdir() if p.name.startswith(".final")]
