"""The tutorial notebooks under 01-Full-Fine-Tuning/: each executes end to end on the tiny profile under nbval
(lax mode: only cells marked `# NBVAL_CHECK_OUTPUT` are compared with the committed outputs); each committed
notebook is clean (no volatile metadata, errors, warnings or fallbacks; its profile and hardware stated up front);
and the training loop and packing function written in GPT-2-From-Scratch.ipynb compute what the package does."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "01-Full-Fine-Tuning").glob("*.ipynb"))
NB_IDS = [p.name for p in NOTEBOOKS]
NBVAL_TIMEOUT_S = (
    900  # the tiny profile needs ~1 minute of compute; a shared 2-core machine can be much slower
)


def _cleaner():
    spec = importlib.util.spec_from_file_location("clean_notebooks", ROOT / "tools" / "clean_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _text(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _output_text(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        for text in (out.get("text", ""), out.get("data", {}).get("text/plain", "")):
            parts.append("".join(text) if isinstance(text, list) else text)
    return "".join(parts)


def _lesson_functions(path: Path = ROOT / "01-Full-Fine-Tuning" / "GPT-2-From-Scratch.ipynb") -> dict:
    """The functions the notebook writes out (its cells tagged `lesson`), defined exactly as the notebook has
    them, with the names the earlier cells import."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    namespace = {"torch": torch, "np": np, "F": F, "math": math}
    for cell in _cells(path):
        if "lesson" in cell["metadata"].get("tags", []):
            exec(compile(_text(cell), f"{path.name}:lesson", "exec"), namespace)
    return namespace


def test_there_is_a_tutorial_notebook():
    assert "GPT-2-From-Scratch.ipynb" in NB_IDS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_committed_notebook_is_clean(path):
    """No volatile metadata (run tools/clean_notebooks.py) and no output of a cell that crashed."""
    assert _cleaner().check_notebook(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_only_the_settings_cell_looks_at_the_environment(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    settings = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(settings) == 1 and code[0] is settings[0], (
        "the first code cell, and only it, is tagged `parameters`"
    )
    assert "choose_profile(" in _text(settings[0])
    env_probe = re.compile(r"os\.environ|getenv|cuda\.is_available|GPT2_TUTORIAL_|platform\.|socket\.")
    offenders = [_text(c)[:60] for c in code[1:] if env_probe.search(_text(c))]
    assert offenders == [], f"cells other than the settings cell branch on the environment: {offenders}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_committed_outputs_state_their_profile_and_hardware(path):
    """The first cell names the profile and the hardware that the settings cell's committed output reports."""
    cells = _cells(path)
    intro = _text(cells[0])
    settings = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    out = _output_text(settings)
    profile = re.search(r"^profile: (\S+)", out, re.M)
    hardware = re.search(r"^hardware: (.+)$", out, re.M)
    assert profile and hardware, "the committed notebook has no output from its settings cell: execute it"
    assert f"`{profile.group(1)}` profile" in intro and hardware.group(1).split(",")[0] in intro
    # Only the cells that define the lesson's functions are silent; a cell that needs the network says in one
    # line that it could not reach it.
    silent = [
        _text(c)[:60]
        for c in cells
        if c["cell_type"] == "code" and not c.get("outputs") and "lesson" not in c["metadata"].get("tags", [])
    ]
    assert silent == [], f"code cells without committed output: {silent}"


# What the before-stop hook and a reader object to in committed outputs.
ALARMING = re.compile(r"NOT AVAILABLE|falling back|Warning|deprecated|recommend passing|Traceback", re.I)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_committed_outputs_hold_no_warnings_fallbacks_or_dead_links(path):
    cells = _cells(path)
    hits = [(i, m.group(0)) for i, c in enumerate(cells) if (m := ALARMING.search(_output_text(c)))]
    assert hits == [], f"committed outputs with warnings or fallbacks: {hits}"
    prose = "".join(_text(c) for c in cells if c["cell_type"] == "markdown")
    assert "../02-PEFT" not in prose and "../03-Instruction-Tuning" not in prose  # sections that do not exist


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_the_cells_show_code_not_helper_calls(path):
    code = [_text(c) for c in _cells(path) if c["cell_type"] == "code"]
    helpers = [c for c in code if "tutorial." in c]
    assert len(helpers) * 10 < len(code) * 4, (
        f"{len(helpers)} of {len(code)} code cells call tutorial helpers"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("nbval") is None, reason="nbval is not installed (dev dependencies)"
)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_notebook_executes_on_the_tiny_profile(path, env, tmp_path):
    """Every cell runs without error on the tiny profile, and the `# NBVAL_CHECK_OUTPUT` cells (parameter counts,
    tokenizer round trip, packing equality, hand-written loop == engine) print exactly what the committed notebook
    shows."""
    run_env = {**env, "GPT2_TUTORIAL_PROFILE": "tiny", "GPT2_TUTORIAL_OUTPUT_DIR": str(tmp_path / "runs")}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--nbval-lax",
        "--nbval-cell-timeout",
        "600",
        "-p",
        "no:cacheprovider",
        "-q",
        str(path),
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=NBVAL_TIMEOUT_S)
    took = time.monotonic() - start
    assert proc.returncode == 0, (
        f"nbval failed after {took:.0f}s:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    )
    print(f"{path.name}: executed on the tiny profile in {took:.0f}s")


def test_the_notebooks_pack_yields_the_pipelines_sequences(env):
    import numpy as np

    from gpt2_training import DataArguments
    from gpt2_training.data import resolve_tokenizer
    from gpt2_training.data.corpus import builtin_documents
    from gpt2_training.data.pipeline import TokenStream
    from gpt2_training.data.sources import BuiltinSource

    pack = _lesson_functions()["pack"]
    tokenizer = resolve_tokenizer(DataArguments(tokenizer="train", tokenizer_vocab_size=1024), seed=1337)
    docs = builtin_documents()[:12]
    mine = list(pack(tokenizer(docs).input_ids, tokenizer.eos_token_id, 48))
    source = BuiltinSource(docs, shuffle=False, seed=0, max_piece_chars=1_000_000)
    theirs = list(TokenStream(source, tokenizer, 48, validation_per_mille=0, loop=False))
    assert len(mine) == len(theirs) > 10
    assert all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))


def test_the_notebooks_training_loop_gives_the_engines_losses(env, tmp_path):
    """The loop written out in the notebook (fp32 here, so the comparison is tight) and the engine, given the
    same TrainingArguments, seed and data, agree at every step to float rounding; accumulation included."""
    import numpy as np
    import torch
    from transformers import TrainingArguments

    from gpt2_training import DataArguments, ModelArguments, RunArguments, train
    from gpt2_training.data import resolve_tokenizer, train_stream
    from gpt2_training.model import build_model

    train_by_hand = _lesson_functions()["train_by_hand"]
    args = TrainingArguments(
        output_dir=str(tmp_path / "engine"),
        use_cpu=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        max_steps=6,
        logging_steps=3,
        eval_strategy="no",
        save_strategy="no",
        seed=1337,
        report_to="none",
        disable_tqdm=True,
    )
    model_args = ModelArguments(preset="tiny")
    data_args = DataArguments(
        tokenizer="train", tokenizer_vocab_size=1024, block_size=32, eval_max_sequences=4
    )
    run = RunArguments(
        precision="fp32", resume="never", overwrite_output_dir=True, sample_prompts=[], save_final_model=False
    )
    engine = train(args, model=model_args, data=data_args, run=run)
    tokenizer = resolve_tokenizer(data_args, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model(model_args, len(tokenizer), tokenizer.eos_token_id)
    hand = train_by_hand(model, train_stream(data_args, tokenizer, seed=args.seed), args, "cpu")
    assert len(hand) == len(engine.losses) == 6
    assert np.allclose(hand, engine.losses, rtol=1e-4, atol=0)
    assert hand[-1] < hand[0] - 0.1  # it trained: equal but frozen losses would also agree


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_openwebtext_cell_pins_the_packages_revision(path):
    from gpt2_training.data.sources import OPENWEBTEXT_HUB_NAME, OPENWEBTEXT_REVISION

    source = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])
    assert f'path="{OPENWEBTEXT_HUB_NAME}", revision="{OPENWEBTEXT_REVISION}"' in source


def _tiny_run_settings(tmp_path: Path, **changes):
    from transformers import TrainingArguments

    from gpt2_training import DataArguments, ModelArguments, RunArguments

    settings = dict(
        output_dir=str(tmp_path / "engine"),
        use_cpu=True,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        warmup_steps=2,
        max_steps=8,
        logging_steps=4,
        eval_strategy="steps",
        eval_steps=100,
        eval_on_start=True,
        save_strategy="no",
        seed=1337,
        report_to="none",
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **changes})
    data = DataArguments(tokenizer="train", tokenizer_vocab_size=1024, block_size=32, eval_max_sequences=8)
    run = RunArguments(
        precision="fp32",
        resume="never",
        overwrite_output_dir=True,
        sample_prompts=["The", "Return the"],
        sample_max_new_tokens=12,
        plot=False,
    )
    return args, ModelArguments(preset="tiny"), data, run


def test_the_notebooks_evaluate_and_sample_reproduce_the_engine(env, tmp_path):
    """evaluate() and sample(), as the notebook writes them, give the engine's held-out loss, perplexity and bits
    per byte (untrained and trained model) and its final samples, token for token."""
    import torch
    from transformers import AutoModelForCausalLM

    from gpt2_training import train
    from gpt2_training.data import resolve_tokenizer, validation_sequences
    from gpt2_training.model import build_model

    lesson = _lesson_functions()
    args, model_args, data, run = _tiny_run_settings(tmp_path)
    engine = train(args, model=model_args, data=data, run=run)
    tokenizer = resolve_tokenizer(data, seed=args.seed)
    held_out = validation_sequences(data, tokenizer, seed=args.seed)
    torch.manual_seed(args.seed)
    untrained = build_model(model_args, len(tokenizer), tokenizer.eos_token_id)
    trained = AutoModelForCausalLM.from_pretrained(engine.final_model_dir)
    for net, figures in ((untrained, engine.initial_eval), (trained, engine.final_eval)):
        mine = lesson["evaluate"](net, held_out, tokenizer)
        assert mine["loss"] == pytest.approx(figures["eval_loss"], rel=1e-5)
        assert mine["perplexity"] == pytest.approx(figures["eval_perplexity"], rel=1e-5)
        assert mine["bits per byte"] == pytest.approx(figures["eval_bpb"], rel=1e-5)
    # the two models differ, so agreeing with both is not agreeing with a constant
    assert engine.final_eval["eval_loss"] < engine.initial_eval["eval_loss"] - 0.05
    torch.manual_seed(args.seed)
    samples = [lesson["sample"](trained, tokenizer, p, run.sample_max_new_tokens) for p in run.sample_prompts]
    assert samples == engine.samples and len(set(samples)) == 2


def test_the_unigram_baseline_is_the_token_frequency_model(env, tmp_path):
    """unigram() scores the held-out tokens by their training-split frequencies: evaluate() on a model whose logits
    are those log-frequencies gives the same figures, and its loss lies between the held-out tokens' own entropy
    (the best any frequency table can do) and a uniform guess."""
    import math

    import numpy as np
    import torch

    from gpt2_training.data import resolve_tokenizer, validation_sequences

    lesson = _lesson_functions()
    _, _, data, _ = _tiny_run_settings(tmp_path)
    tokenizer = resolve_tokenizer(data, seed=1337)
    held_out = validation_sequences(data, tokenizer, seed=1337)
    n, counts = lesson["one_pass"](data, tokenizer, 1337)
    assert counts.sum() == n * data.block_size and n > 1000
    baseline = lesson["unigram"](counts, held_out, tokenizer)

    class Frequencies(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, input_ids):
            log_p = torch.from_numpy(np.log((counts + 1) / (counts + 1).sum()))
            return type("Out", (), {"logits": log_p.expand(*input_ids.shape, len(log_p))})

    via_evaluate = lesson["evaluate"](Frequencies(), held_out, tokenizer)
    # evaluate() computes the cross-entropy of fp32 logits: agreement to fp32 rounding
    assert via_evaluate == pytest.approx(baseline, rel=1e-6)
    targets = held_out[:, 1:].ravel()
    freq = np.bincount(targets) / targets.size
    entropy = -(freq[freq > 0] * np.log(freq[freq > 0])).sum()
    assert entropy < baseline["loss"] < math.log(len(tokenizer))


def test_each_profiles_longer_run_stays_under_one_epoch(env, tmp_path):
    """The epochs the notebook prints for its longer run: the gpu profile's data path without the Hub (the parquet
    shards of section 5, read by `datasets` streaming) runs offline on local shards and is capped under one epoch;
    with the Hub, its budget is 3% of OpenWebText; the tiny and laptop profiles' runs fit their corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpt2_training import train
    from gpt2_training.data import resolve_tokenizer
    from gpt2_training.data.corpus import builtin_documents
    from gpt2_training.tutorial import PROFILES

    lesson = _lesson_functions()
    documents = builtin_documents()
    # beside the run's folder, not around it: a run never writes inside its dataset folder
    shards = tmp_path / "parquet"
    shards.mkdir()
    for i in range(4):
        pq.write_table(pa.table({"text": documents[i::4]}), shards / f"train-{i:05d}-of-00004.parquet")
    args, model_args, data, run = _tiny_run_settings(tmp_path, max_steps=2)
    gpu = PROFILES["gpu"]
    parquet = dataclasses.replace(data, dataset=f"hf-parquet:{shards}", block_size=gpu["block_size"])
    tokenizer = resolve_tokenizer(data, seed=1337)
    n, _ = lesson["one_pass"](parquet, tokenizer, 1337)
    tokens_per_step = gpu["micro_batch"] * gpu["accumulation"] * gpu["block_size"]
    steps = min(gpu["main_steps"], n * gpu["block_size"] // tokens_per_step)
    assert 0 < steps < gpu["main_steps"] and steps * tokens_per_step <= n * gpu["block_size"]
    # the same data path, trained on: a few engine steps on the streamed parquet shards
    result = train(args, model=model_args, data=dataclasses.replace(parquet, block_size=32), run=run)
    assert result.step == 2 and result.data_stats["documents"] > 0
    openwebtext_tokens = 9_035_582_198
    assert gpu["main_steps"] * tokens_per_step / openwebtext_tokens == pytest.approx(0.0326, abs=1e-4)
    laptop = PROFILES["laptop"]
    assert (
        laptop["main_steps"] * laptop["micro_batch"] * laptop["accumulation"] * laptop["block_size"]
        < 1_000_000
    )


def test_the_committed_laptop_run_reaches_make_trains_quality():
    """What the committed notebook claims for its laptop run: under one epoch, held out at most 1.8 bits per byte
    (make train's quality), evaluate() and sample() equal to the engine's figures, a final sample per prompt."""
    cells = _cells(NOTEBOOKS[0])
    out = {_text(c): _output_text(c) for c in cells if c["cell_type"] == "code"}
    settings = next(v for k, v in out.items() if "choose_profile(" in k)
    if not settings.startswith("profile: laptop"):
        pytest.skip("the committed notebook was executed with another profile")
    plan = next(v for v in out.values() if v.startswith("data: "))
    epochs = float(re.search(r"= ([\d.]+) epochs", plan).group(1))
    assert 0.5 < epochs <= 1
    evaluation = next(v for v in out.values() if "(engine " in v)
    bpb = float(re.search(r"trained \(\d+ steps\).*bits per byte ([\d.]+)", evaluation).group(1))
    assert bpb <= 1.8
    assert any("evaluate() == the engine's figures, untrained and trained: True" in v for v in out.values())
    assert any("sample() draws exactly the engine's final samples: True" in v for v in out.values())
    samples = next(v for v in out.values() if "--- prompt 'Return the'" in v)
    assert samples.count("--- prompt ") == 3
