#!/usr/bin/env python3
"""Run llama.cpp's `convert_hf_to_gguf.py` on a model folder whose tokenizer is a newly trained GPT-2 vocabulary.

The converter knows a BPE pre-tokenizer only by the hash of the ids its tokenizer gives one test string, so a
vocabulary trained here (same splitting rules as GPT-2, other merges) is "not recognized". When tokenizer.json
splits text exactly as GPT-2 does (the ByteLevel pre-tokenizer with GPT-2's regex, no prefix space), this script
declares it 'gpt-2' for the converter and refuses otherwise; GPT-2's own tokenizer is recognised without it.

    python tools/convert_to_gguf.py LLAMA_CPP_DIR MODEL_DIR [converter options, e.g. --outfile m.gguf --outtype f32]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def splits_like_gpt2(tokenizer_json: Path) -> bool:
    pre = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    llama, model = Path(argv[0]), Path(argv[1])
    if not (llama / "convert_hf_to_gguf.py").exists():
        print(f"error: {llama} has no convert_hf_to_gguf.py: pass llama.cpp's source folder", file=sys.stderr)
        return 2
    if not splits_like_gpt2(model / "tokenizer.json"):
        print(
            f"error: {model / 'tokenizer.json'} does not split text as GPT-2 does: run llama.cpp's converter "
            "directly (it must know this pre-tokenizer)",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(llama))
    sys.argv = [str(llama / "convert_hf_to_gguf.py"), str(model), *argv[2:]]
    import convert_hf_to_gguf as converter

    # the class that defines the hash lookup (TextModel, in `conversion.base` in 2026 releases, in the script before)
    classes = [converter.ModelBase]
    while "get_vocab_base_pre" not in vars(classes[0]):
        classes = classes[1:] + classes[0].__subclasses__()
    owner = classes[0]
    recognise = owner.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    owner.get_vocab_base_pre = get_vocab_base_pre
    converter.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
