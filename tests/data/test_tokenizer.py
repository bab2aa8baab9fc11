"""Tests for gpt2_training.data.tokenizer's loading: a tokenizer or model folder that asks to run its own Python
code (an `auto_map` entry) is refused with that reason, without running it and without asking."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import start_train, tiny_args

from gpt2_training.errors import ConfigError

CUSTOM_CODE = """
from pathlib import Path
Path(__file__).with_name("CODE_RAN").write_text("the folder's Python code ran")
from transformers import PreTrainedTokenizerFast
class CustomTokenizerFast(PreTrainedTokenizerFast):
    pass
"""


def custom_code_tokenizer(shared_cache: Path, folder: Path) -> Path:
    """The tiny runs' tokenizer, plus a module and an `auto_map` that tell transformers to import it."""
    source = sorted((shared_cache / "tokenizers").glob("bpe-1024-*"))[0]
    shutil.copytree(source, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "CustomTokenizerFast"
    config["auto_map"] = {"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizerFast"]}
    config_path.write_text(json.dumps(config))
    (folder / "custom_tokenizer.py").write_text(CUSTOM_CODE)
    return folder


def test_a_tokenizer_asking_for_custom_code_is_refused_without_a_prompt(tmp_path, env, shared_cache):
    """train.py with stdin closed: exit 2, the reason on one line, no "[y/N]" question, the code never ran."""
    folder = custom_code_tokenizer(shared_cache, tmp_path / "tok")
    proc = start_train(tiny_args(tmp_path / "run", tokenizer=str(folder)), env, stdin=subprocess.DEVNULL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert (
        f"error: tokenizer '{folder}' asks to run its own Python code (auto_map); this tool never runs" in out
    )
    assert "[y/N]" not in out and "Do you wish" not in out
    assert not (folder / "CODE_RAN").exists()
    assert "Traceback" not in out


def test_a_model_folder_asking_for_custom_code_is_refused(tmp_path):
    """--init_from a folder whose config.json has auto_map: refused before transformers reads it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_training.config import ModelArguments
    from gpt2_training.model import load_pretrained

    folder = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=16, n_positions=8)).save_pretrained(
        folder
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_model.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError, match=r"asks to run its own Python code \(auto_map\); this tool never runs"
    ):
        load_pretrained(str(folder), ModelArguments())
