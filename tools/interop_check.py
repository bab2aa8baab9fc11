#!/usr/bin/env python3
"""The consumers' side of `make test-interop`, run in the separate environment that tools/interop.sh builds: a
final/ folder written by train.py loads and generates in transformers 4.46, converts with llama.cpp's GGUF
converter, and exports to ONNX with its tokenizer and the same logits.

    python tools/interop_check.py MODEL_DIR LLAMA_CPP_DIR WORK_DIR
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TEXT = "A function that returns <|endoftext|> and 3 more  spaces\n"


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        sys.exit(1)


def transformers_4(model_dir: Path) -> None:
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    check(transformers.__version__.startswith("4.46."), f"transformers {transformers.__version__}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(TEXT).ids
    check(tok(TEXT).input_ids == raw, f"tokenizer loads as {type(tok).__name__} with the trained ids")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok("The", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    check(out.shape[1] == ids.input_ids.shape[1] + 8, f"model generates: {tok.decode(out[0])!r}")
    generate = pipeline("text-generation", model=str(model_dir), device="cpu")
    batch = generate(["The", "A function that returns"], batch_size=2, max_new_tokens=5, do_sample=False)
    check(len(batch) == 2, "a batched pipeline generates (EOS pads on the left)")
    long_prompt = "def f(x):\n    return x\n" * 60
    n = len(tok(long_prompt).input_ids)
    out = generate(long_prompt, max_new_tokens=8, do_sample=False, handle_long_generation="hole")
    limit = model.config.n_positions
    check(
        bool(out[0]["generated_text"]),
        f'a {n}-token prompt on a {limit}-position model: handle_long_generation="hole"',
    )


def gguf(model_dir: Path, llama: Path, work: Path) -> None:
    from gguf import GGUFReader
    from safetensors.torch import load_file

    out = work / "model.gguf"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "convert_to_gguf.py"), str(llama), str(model_dir)]
    proc = subprocess.run([*cmd, "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True)
    check(proc.returncode == 0 and out.exists(), "llama.cpp's convert_hf_to_gguf.py converts the folder")
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
    reader = GGUFReader(out)
    fields = {
        name: f.contents()
        for name, f in reader.fields.items()
        if name.startswith(("gpt2.", "tokenizer.ggml.pre"))
    }
    check(fields.get("tokenizer.ggml.pre") == "gpt-2", f"pre-tokenizer {fields.get('tokenizer.ggml.pre')!r}")
    weights = load_file(model_dir / "model.safetensors")
    n_ctx = json.loads((model_dir / "config.json").read_text())["n_ctx"]
    check(
        fields.get("gpt2.context_length") == n_ctx,
        f"context length {fields.get('gpt2.context_length')} = n_ctx",
    )
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    embedding = weights["transformer.wte.weight"].float().numpy()
    same = np.array_equal(tensors["token_embd.weight"].reshape(embedding.shape), embedding)
    check(same, f"the GGUF holds the same token embedding ({len(tensors)} tensors)")


def onnx(model_dir: Path, work: Path) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / "onnx"
    # the command SETUP.md gives
    cli = Path(sys.executable).parent / "optimum-cli"
    cmd = [
        str(cli),
        "export",
        "onnx",
        "--model",
        str(model_dir),
        "--task",
        "text-generation-with-past",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    check(
        proc.returncode == 0,
        "optimum-cli export onnx " + ("exports the folder" if proc.returncode == 0 else proc.stderr[-3000:]),
    )
    check(
        (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists(),
        "the ONNX export includes the tokenizer",
    )
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["The cat", "A function that returns a"], return_tensors="pt", padding=True)
    ort = ORTModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()(**batch).logits
        got = ort(**batch).logits
    mask = batch.attention_mask.bool()
    diff = float((ref - got).abs()[mask].max())
    check(diff < 1e-4, f"ONNX Runtime logits match transformers: max |difference| {diff:.2e} (< 1e-4)")


def main(argv: list[str]) -> None:
    model_dir, llama, work = (Path(a) for a in argv)
    transformers_4(model_dir)
    gguf(model_dir, llama, work)
    onnx(model_dir, work)


if __name__ == "__main__":
    main(sys.argv[1:])
