"""The built-in corpus (`data/corpus.py`): prose read from the standard library without running it, in a fixed
order, built once and then read from its cache."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from pydoc_data.topics import topics

from gpt2_training.data import corpus


def test_comment_runs_become_paragraphs_and_short_ones_and_shebangs_are_dropped():
    source = (
        "#!/usr/bin/env python3 and some more words to pass the length limit here\n"
        "import os\n"
        "# The first paragraph starts here and\n"
        "# goes on over a second line of the same run.\n"
        "x = 1\n"
        "# short\n"
        "\n"
        "y = 2  # a trailing comment is a comment too, long enough to be kept as prose\n"
    )
    assert corpus._comment_paragraphs(source) == [
        "The first paragraph starts here and goes on over a second line of the same run.",
        "a trailing comment is a comment too, long enough to be kept as prose",
    ]


def test_a_file_gives_its_docstrings_and_comments_without_running_it(tmp_path: Path):
    module = tmp_path / "mod.py"
    module.write_text(
        '"""The module docstring."""\n'
        "raise SystemExit('importing this file would stop the process')\n"
        "class Thing:\n"
        '    """A class docstring that is long enough to teach something."""\n'
        "    def f(self):\n"
        '        """Too short."""\n'
        "# A comment paragraph that is long enough to be kept as prose.\n"
    )
    assert corpus._docstring_document(module) == (
        "The module docstring.\n\n"
        "Thing: A class docstring that is long enough to teach something.\n\n"
        "A comment paragraph that is long enough to be kept as prose."
    )
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    assert corpus._docstring_document(broken) is None
    (tmp_path / "empty.py").write_text("x = 1\n")
    assert corpus._docstring_document(tmp_path / "empty.py") is None


def test_the_standard_library_files_leave_out_tests_and_installed_packages():
    files = corpus._stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert not any(set(path.parts) & corpus._SKIP_DIRS for path in files)


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("GPT2_TRAINING_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.cache_dir() == tmp_path / "xdg" / "gpt2_training"
    monkeypatch.setenv("GPT2_TRAINING_CACHE", str(tmp_path / "mine"))
    assert corpus.cache_dir() == tmp_path / "mine"


def test_the_corpus_is_built_in_a_fixed_order_once_then_read_from_its_cache(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("GPT2_TRAINING_CACHE", str(tmp_path))
    documents = corpus.builtin_documents()
    # the interactive-help topics by name come first, then the files' prose
    assert documents[: len(topics)] == [topics[name].strip() for name in sorted(topics)]
    assert len(documents) > len(topics) + 500 and sum(map(len, documents)) > 2_000_000
    version = ".".join(map(str, sys.version_info[:3]))
    (cached,) = tmp_path.glob("builtin-corpus-*.json")
    assert cached.name == f"builtin-corpus-v{corpus.CORPUS_VERSION}-py{version}.json"
    payload = json.loads(cached.read_text(encoding="utf-8"))
    assert payload["documents"] == documents
    assert payload["sha256"] == hashlib.sha256("\x00".join(documents).encode()).hexdigest()
    assert not list(tmp_path.glob("*.tmp"))
    # a later call reads the cache instead of building
    payload["documents"] = ["from the cache"]
    cached.write_text(json.dumps(payload), encoding="utf-8")
    assert corpus.builtin_documents() == ["from the cache"]
