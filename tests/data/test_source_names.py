"""The source-name grammar, read once by `sources.parse_source`: what each form names, which local folder it
points into, and the modules that ask it (the source opener, the validation, the output-folder guards, the
model card, the epoch count)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2_training.cli import prepare_main
from gpt2_training.data.opening import open_source
from gpt2_training.data.sources import (
    OPENWEBTEXT_HUB_NAME,
    OPENWEBTEXT_REVISION,
    SourceName,
    local_root,
    parse_source,
)
from gpt2_training.errors import ConfigError, DataError
from gpt2_training.export import hub_dataset

# spec -> (kind, location, remote, streamed, local_path)
FORMS = {
    "builtin": ("builtin", "builtin", False, False, None),
    "openwebtext": ("hub", OPENWEBTEXT_HUB_NAME, False, True, None),
    "hf:org/corpus:sample-10BT": ("hub", "org/corpus", False, True, None),
    "corpus/part-*.jsonl": ("files", "corpus/part-*.jsonl", False, False, "corpus/part-*.jsonl"),
    "file:///data/corpus": ("files", "file:///data/corpus", False, False, "/data/corpus"),
    "hf-json:corpus/*.jsonl": ("hf-files", "corpus/*.jsonl", False, False, "corpus/*.jsonl"),
    "hf-parquet:s3://bucket/owt/": ("hf-files", "s3://bucket/owt/", True, True, None),
    "hf-json:https://host/a.jsonl": ("hf-files", "https://host/a.jsonl", True, True, None),
    # hf-text reads local files only: a URL after it is a path that does not exist, as before
    "hf-text:https://host/a.txt": ("hf-files", "https://host/a.txt", False, False, None),
    "s3://bucket/deeplake-ds": ("deeplake", "s3://bucket/deeplake-ds", True, True, None),
    "deeplake:s3://bucket/ds": ("deeplake", "s3://bucket/ds", True, True, None),
    "deeplake:file://./ds-v4": ("deeplake", "file://./ds-v4", False, False, "./ds-v4"),
    "deeplake:./ds-v4": ("deeplake", "./ds-v4", False, False, "./ds-v4"),
    "hub://activeloop/openwebtext": ("deeplake", "hub://activeloop/openwebtext", False, True, None),
    "al://org/name": ("deeplake", "al://org/name", False, True, None),
    "gs://bucket/corpus": ("unsupported", "gs://bucket/corpus", False, False, None),
}


@pytest.mark.parametrize("spec", list(FORMS))
def test_each_form_is_read_once_the_same_way(spec):
    kind, location, remote, streamed, local = FORMS[spec]
    name = parse_source(spec)
    assert (name.kind, name.location, name.remote, name.streamed, name.local_path) == (
        kind,
        location,
        remote,
        streamed,
        local,
    )


def test_hub_names_carry_their_configuration_and_pinned_revision():
    assert parse_source("hf:org/corpus:cfg") == SourceName("hub", "org/corpus", config="cfg")
    assert parse_source("openwebtext").revision == OPENWEBTEXT_REVISION
    # the model card names the same dataset the source streams
    assert hub_dataset("openwebtext") == (OPENWEBTEXT_HUB_NAME, None, OPENWEBTEXT_REVISION)
    assert hub_dataset("hf:org/corpus:cfg") == ("org/corpus", "cfg", None)
    assert hub_dataset("hf-parquet:corpus") is None and hub_dataset("builtin") is None


def test_local_root_is_the_existing_folder_a_setting_points_into(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "a.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.chdir(tmp_path)
    for spec in (str(corpus), f"file://{corpus}", "hf-json:corpus", f"deeplake:file://{corpus}", "corpus"):
        assert local_root(spec) == corpus, spec
    # a glob's root is the fixed folder it starts from
    assert local_root("corpus/**/*.jsonl") == corpus
    assert local_root("*.jsonl") == tmp_path
    assert local_root("corpus/sub/a.jsonl") == corpus / "sub" / "a.jsonl"
    for spec in (
        "builtin",
        "openwebtext",
        "hf:org/corpus",
        "s3://b/x",
        "hf-parquet:https://h/x",
        "missing",
        None,
    ):
        assert local_root(spec) is None, spec


def test_a_url_no_source_reads_is_refused_with_the_forms_that_are_read():
    with pytest.raises(DataError, match=r"'gs://bucket/corpus': no source reads this kind of URL; use s3://"):
        open_source("gs://bucket/corpus")


def test_prepare_refuses_an_out_inside_a_glob_source_folder(tmp_path, monkeypatch):
    """`prepare` asks the grammar for the source's folder, so a glob's folder is guarded like a folder."""
    monkeypatch.setenv("GPT2_TRAINING_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some text for training.\n" * 50)
    with pytest.raises(ConfigError, match=r"inside the dataset folder .* --out \S+-shards$"):
        prepare_main(["--dataset", f"hf-text:{corpus}/*.txt", "--out", str(corpus / "shards")])
    assert [p.name for p in corpus.iterdir()] == ["a.txt"]


@pytest.mark.parametrize(
    ("spec", "checked"),
    [("missing/*.jsonl", True), ("file://missing", True), ("hf:org/corpus", False), ("s3://b/x", False)],
)
def test_validation_checks_that_a_local_path_exists_and_leaves_the_rest_to_the_source(
    tmp_path, spec, checked
):
    from conftest import tiny_args

    from gpt2_training.cli import parse_config
    from gpt2_training.options import validate

    cfg = parse_config(tiny_args(tmp_path / "run", dataset=spec))
    problems = ""
    try:
        validate(cfg, cuda_available=False, bf16_ok=False)
    except ConfigError as error:
        problems = str(error)
    assert (f"dataset path {spec!r} does not exist" in problems) == checked, problems


def test_a_path_is_a_path_however_it_looks(tmp_path, monkeypatch):
    """A local name with a colon in it is still read as files (the reader, not the grammar, finds it)."""
    monkeypatch.chdir(tmp_path)
    Path("v1:notes.txt").write_text("A document of its own, long enough to train on.\n")
    assert parse_source("v1:notes.txt").kind == "files"
    assert open_source("v1:notes.txt").description.startswith("local files: 1 .txt files")
