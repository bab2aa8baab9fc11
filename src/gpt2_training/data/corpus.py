"""The built-in corpus: English technical prose that ships with every CPython, so training needs no download.

It joins the interactive-help topics of `pydoc_data.topics` with the docstrings of the standard library's
modules, classes and functions and the comment paragraphs of their source, read with `ast` and `tokenize`
(nothing is imported, so no module runs). About 4.2 M characters, 1.1 M tokens with a 8 K BPE vocabulary. The order is fixed
(topics by name, then files by path), so the same Python version always builds the same corpus; other Python
versions build a slightly different one, which is why the cache key holds the version.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize
from pathlib import Path

CORPUS_VERSION = 1  # bump when the assembly rule changes, so caches are rebuilt
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def _comment_paragraphs(source: str) -> list[str]:
    """Runs of consecutive `#` comment lines, joined into paragraphs of prose."""
    paragraphs, current, last_line = [], [], -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        if tok.start[0] != last_line + 1 and current:
            paragraphs.append(" ".join(current))
            current = []
        if text:
            current.append(text)
        last_line = tok.start[0]
    if current:
        paragraphs.append(" ".join(current))
    return [p for p in paragraphs if len(p) > 40 and not p.startswith("!")]


def _docstring_document(path: Path) -> str | None:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        comments = _comment_paragraphs(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, tokenize.TokenError):
        return None
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(module_doc)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:  # one-word docstrings teach nothing
                parts.append(f"{node.name}: {doc}")
    parts += comments
    return "\n\n".join(parts) if parts else None


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files)


def build_builtin_documents() -> list[str]:
    """Assemble the corpus from scratch (about two seconds)."""
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics)]
    for path in _stdlib_files():
        doc = _docstring_document(path)
        if doc:
            docs.append(doc)
    return docs


def cache_dir() -> Path:
    """Where derived artefacts (corpus, tokenizers) are cached; GPT2_TRAINING_CACHE overrides it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2_training"
    return Path(os.environ.get("GPT2_TRAINING_CACHE", default))


def builtin_documents() -> list[str]:
    """The built-in corpus as a list of documents, cached as JSON after the first build."""
    key = f"v{CORPUS_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    path = cache_dir() / f"builtin-corpus-{key}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))["documents"]
    docs = build_builtin_documents()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "key": key,
        "sha256": hashlib.sha256("\x00".join(docs).encode()).hexdigest(),
        "documents": docs,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a killed build never leaves a truncated cache
    return docs
