"""`open_source(spec)`: the one entry that opens any source string, handing it to the reader that reads it:
sources.py for local files, the built-in corpus, the Hub and local DeepLake; remote.py for S3 and HTTP(S)."""

from __future__ import annotations

from typing import Any

from .remote import open_remote
from .sources import DocumentSource, open_named, parse_source


def open_source(
    spec: str,
    *,
    text_field: str = "text",
    split: str = "train",
    txt_mode: str = "file",
    shuffle: bool = True,
    seed: int = 0,
    max_piece_chars: int = 1_000_000,
    network: dict[str, Any] | None = None,
) -> DocumentSource:
    """Open the data source named by `spec` (see sources.py's docstring for the accepted forms); `network` holds
    `remote.NetworkSettings` fields for sources read over a network."""
    name = parse_source(spec)
    common = {"shuffle": shuffle, "seed": seed, "max_piece_chars": max_piece_chars}
    if name.remote:
        return open_remote(name, text_field=text_field, network=network, **common)
    return open_named(spec, name, text_field=text_field, split=split, txt_mode=txt_mode, **common)
