"""Build tests/fixtures/deeplake_v3: a small version-3 DeepLake dataset for the read-only `deeplake.query` path.

deeplake 3.x and 4.x cannot share one environment, so this runs once in a throwaway one:

    python3.11 -m venv /tmp/dl3venv && /tmp/dl3venv/bin/pip install 'deeplake<4'
    /tmp/dl3venv/bin/python tools/build_deeplake_v3_fixture.py

The documents follow `fixture_document(i)` (tests/data/test_sources.py rebuilds the same list to compare); row 7
is an empty string, which DeepLake stores as a missing value.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

ROWS = 2100  # three 1024-row chunks, the last one partial, so resume positions cross chunk boundaries
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "deeplake_v3"


def fixture_document(i: int) -> str:
    return (
        ""
        if i == 7
        else f"Fixture document {i}: " + " ".join(f"w{(i * 13 + j) % 97}" for j in range(i % 9 + 1))
    )


def main() -> None:
    import deeplake

    if not deeplake.__version__.startswith("3."):
        raise SystemExit(f"needs deeplake 3.x, this is {deeplake.__version__}")
    shutil.rmtree(OUT, ignore_errors=True)
    ds = deeplake.empty(str(OUT), overwrite=True)
    with ds:
        ds.create_tensor("text", htype="text")
        ds.create_tensor("id", htype="generic", dtype="int64")
        ds.text.extend([fixture_document(i) for i in range(ROWS)])
        ds.id.extend(np.arange(ROWS, dtype=np.int64))
        ds.commit("fixture")
    print(f"wrote {len(ds)} rows with deeplake {deeplake.__version__} to {OUT}")


if __name__ == "__main__":
    main()
