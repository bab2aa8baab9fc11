"""Tokenizers: GPT-2's byte-level BPE from the Hub, or one trained on your own corpus with the same recipe.

A trained tokenizer is saved as a standard Hugging Face tokenizer (`AutoTokenizer.from_pretrained(dir)`)
and cached by a hash of the corpus and the vocabulary size, so a second run reuses it. `tiktoken_encoding`
turns such a byte-level BPE into a tiktoken encoding of the same vocabulary, which encodes several times
faster per core (bench/bench_workers.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .corpus import cache_dir

if TYPE_CHECKING:  # transformers is imported when a tokenizer is built, not with the package
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
# GPT-2's pre-tokenizer regex, the one `pre_tokenizers.ByteLevel(use_regex=True)` splits with
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE (same pre-tokenizer, same end-of-text token) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is ever unknown
        show_progress=False,
    )
    from ..progress import bar

    # the bar counts documents read; the merges that follow take a fraction of that time
    shown = bar(len(texts) if hasattr(texts, "__len__") else None, "tokenizer", unit="doc", leave=False)
    tok.train_from_iterator(texts if shown is None else _counted(texts, shown), trainer=trainer)
    if shown is not None:
        shown.close()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    fast.model_max_length = 1 << 30  # packing handles length; silence the "sequence too long" warning
    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    fast.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a cache entry is complete or absent
    except OSError:  # another process finished the same tokenizer first: theirs is identical, keep it
        shutil.rmtree(tmp, ignore_errors=True)
    # loaded back, so a new and a cached tokenizer are the same object (name, settings)
    return load_tokenizer(str(out))


def save_tokenizer(
    tokenizer: PreTrainedTokenizerFast, folder: str | Path, model_max_length: int | None = None
) -> None:
    """`tokenizer.save_pretrained(folder)`, with the fields other consumers read: a class transformers 4 knows
    (transformers 5 writes its generic `TokenizersBackend`), bos/eos/unk, and EOS as the pad token on the left,
    the usual choice for GPT-2, which has no pad token (batched generation needs one; left padding keeps every
    prompt's last token next to the generated ones). `model_max_length`: the model's n_positions, when the folder
    goes with a model; a tokenizer alone keeps transformers' "no limit"."""
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    conf = json.loads(path.read_text(encoding="utf-8"))
    eos = tokenizer.eos_token
    spec = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    byte_level_bpe = (spec.get("model") or {}).get("type") == "BPE" and (spec.get("pre_tokenizer") or {}).get(
        "type"
    ) == "ByteLevel"
    # GPT2TokenizerFast reads the same tokenizer.json; any other tokenizer keeps the generic class of transformers 4
    conf["tokenizer_class"] = "GPT2TokenizerFast" if byte_level_bpe else "PreTrainedTokenizerFast"
    for name in ("bos_token", "unk_token", "pad_token"):
        conf[name] = getattr(tokenizer, name) or eos
    conf["eos_token"] = eos
    conf["padding_side"] = "left"
    # how this process loaded the tokenizer, not a property of the folder
    for name in ("is_local", "local_files_only"):
        conf.pop(name, None)
    if model_max_length is not None:
        conf["model_max_length"] = model_max_length
    path.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _counted(texts: Iterable[str], shown) -> Iterable[str]:
    for text in texts:
        shown.update(1)
        yield text


def cached_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train once per (corpus, vocabulary size); later calls load the cached tokenizer."""
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8", "replace"))
        digest.update(b"\x00")
    path = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}"
    if (path / "tokenizer.json").exists():
        return load_tokenizer(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return train_bpe_tokenizer(texts, vocab_size, path)


CUSTOM_CODE_FILES = ("config.json", "tokenizer_config.json")


def custom_code_refusal(name_or_path: str, what: str, fix: str) -> str:
    """The one-line refusal of a folder or Hub repository that asks to run its own Python code."""
    return (
        f"{what} {name_or_path!r} asks to run its own Python code (auto_map); this tool never runs custom code "
        f"and never asks whether to: {fix}"
    )


def refuse_custom_code(name_or_path: str, what: str, fix: str) -> None:
    """Raise ConfigError when a local folder's config asks for custom code (an `auto_map` entry), before
    transformers could load it or ask the user whether to run it."""
    folder = Path(name_or_path)
    for name in CUSTOM_CODE_FILES:
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            # no such file (or a Hub name): transformers, called with trust_remote_code=False, refuses the rest
            continue
        if isinstance(config, dict) and config.get("auto_map"):
            raise ConfigError(
                f"{custom_code_refusal(name_or_path, what, fix)} ({folder / name} has auto_map)"
            )


TOKENIZER_FIX = "use a standard tokenizer folder without auto_map, --tokenizer gpt2, or --tokenizer train"


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a folder or the Hub, with a clear message when it cannot be reached; one that asks
    to run custom code is refused."""
    from transformers import AutoTokenizer

    refuse_custom_code(name_or_path, "tokenizer", TOKENIZER_FIX)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise ConfigError(custom_code_refusal(name_or_path, "tokenizer", TOKENIZER_FIX)) from exc
        raise ConfigError(
            f"cannot load tokenizer {name_or_path!r} ({type(exc).__name__}): check the name and your network, "
            "or use --tokenizer train (a BPE trained on your corpus) or a local tokenizer folder"
        ) from exc
    if not tok.is_fast:
        raise ConfigError(
            f"tokenizer {name_or_path!r} has no fast (Rust) version; batch tokenization needs one"
        )
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {name_or_path!r} has no end-of-text token to separate documents")
    tok.model_max_length = 1 << 30
    return tok


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: printable bytes stand for themselves, the other 68 bytes
    for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


# reading the JSON takes ~0.1 s: a run's train and validation streams share one encoding
@functools.lru_cache(maxsize=4)
def tiktoken_encoding(tokenizer_json: str):
    """The same tokenizer as a `tiktoken.Encoding`, or None where its ids could differ from the Rust tokenizer's.

    Only GPT-2's recipe qualifies: a BPE model without dropout, byte fallback or word prefixes/suffixes, no
    normalizer, the ByteLevel pre-tokenizer with GPT-2's regex and no prefix space, every byte in the
    vocabulary, every longer token made by one merge with ids in merge order, and added tokens that are plain
    literals none of which contains another (both libraries cut those out of the text first). tiktoken then
    merges in the same order as `tokenizers`; it also takes a whole pre-tokenized word that is a token as it
    is, which a BPE trained by merging reaches through its merges as well: tests/data/test_workers.py checks the
    ids on real text, edge cases and the text of every token of the vocabulary. Text with lone surrogates (not valid
    Unicode) is the one known difference: tiktoken replaces them, the Rust tokenizer refuses the text."""
    spec = json.loads(tokenizer_json)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (
        spec.get("normalizer") is not None
        or model.get("type") != "BPE"
        or model.get("dropout")
        or model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        or pre.get("type") != "ByteLevel"
        or pre.get("add_prefix_space")
        or not pre.get("use_regex", True)
    ):
        return None
    added = spec.get("added_tokens") or []
    if any(a["lstrip"] or a["rstrip"] or a["single_word"] for a in added):
        return None
    literals = {a["content"]: a["id"] for a in added}
    if any(a != b and a in b for a in literals for b in literals):
        return None
    byte_of = _byte_of_char()
    ranks: dict[bytes, int] = {}
    for token, rank in model["vocab"].items():
        if token in literals:
            continue
        if any(c not in byte_of for c in token):
            return None
        ranks[bytes(byte_of[c] for c in token)] = rank
    if any(bytes([b]) not in ranks for b in range(256)):
        return None
    # tiktoken ranks a merge by the id of the token it makes, `tokenizers` by its place in the merge list:
    # the same order only when every longer token is made by exactly one merge and ids follow the list
    made = [model["vocab"].get("".join(m.split(" ") if isinstance(m, str) else m)) for m in model["merges"]]
    if None in made or made != sorted(set(made)) or len(made) != len(ranks) - 256:
        return None
    try:
        import tiktoken
    except ImportError:
        # an environment that did not install this project's requirements (the GPU image bench/gpu_check.sh runs
        # on has none): the Rust tokenizer gives the same ids, more slowly
        return None
    return tiktoken.Encoding(
        "hf-byte-level-bpe", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens=literals
    )
