#!/usr/bin/env python3
"""Strip volatile metadata from Jupyter notebooks (keeps outputs).

    python tools/clean_notebooks.py NB.ipynb ...           # clean in place
    python tools/clean_notebooks.py --check NB.ipynb ...   # exit 1 if not clean or has errors

With no paths, every ``*.ipynb`` under the repository (outside .venv and checkpoints) is used.

Removed / normalised:
* cell metadata ``execution`` (per-cell timestamps written by JupyterLab), ``collapsed``,
  ``scrolled``, ``ExecuteTime`` and ``heading_collapsed``-style UI state;
* notebook metadata ``widgets`` (ipywidgets state), ``varInspector``, ``toc``, and the outputs that display a
  widget (progress bars: without the state, only their frozen first frame would remain);
* ``metadata.kernelspec`` -> ``{"display_name": "Python 3 (ipykernel)", "language": "python",
  "name": "python3"}``;
* ``metadata.language_info`` keeps only ``name`` (the Python patch version is volatile).

``--check`` additionally fails when any output has ``output_type == "error"``.

``check_notebook(path) -> list[str]`` returns the problems of one notebook (empty: clean) and is
meant to be imported by tests (``tools/`` is not a package: load this file with runpy/importlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime", "jp-MarkdownHeadingCollapsed")
VOLATILE_NB_METADATA = ("widgets", "varInspector", "toc", "toc-autonumbering", "vscode")


def clean_notebook_dict(nb: dict[str, Any]) -> dict[str, Any]:
    """Return a cleaned copy of a notebook (JSON dict)."""
    nb = json.loads(json.dumps(nb))
    meta = nb.setdefault("metadata", {})
    for key in VOLATILE_NB_METADATA:
        meta.pop(key, None)
    meta["kernelspec"] = dict(KERNELSPEC)
    lang = meta.get("language_info")
    if isinstance(lang, dict):
        meta["language_info"] = {"name": lang.get("name", "python")}
    for cell in nb.get("cells", []):
        cmeta = cell.get("metadata", {})
        for key in VOLATILE_CELL_METADATA:
            cmeta.pop(key, None)
        cell["metadata"] = cmeta
        if "outputs" in cell:
            # a widget (a progress bar) lives in the widget state stripped above; its text fallback is the bar
            # as first drawn (0%), which GitHub and nbviewer would show as a run stuck at the start
            cell["outputs"] = [out for out in cell["outputs"] if not _is_widget(out)]
        for out in cell.get("outputs", []) or []:
            if isinstance(out.get("metadata"), dict):
                out["metadata"].pop("execution", None)
    return nb


def _is_widget(out: dict[str, Any]) -> bool:
    data = out.get("data")
    return isinstance(data, dict) and "application/vnd.jupyter.widget-view+json" in data


def _dumps(nb: dict[str, Any]) -> str:
    # the same layout nbformat writes (indent=1, keys sorted, trailing newline)
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def error_outputs(nb: dict[str, Any]) -> list[str]:
    problems = []
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []) or []:
            if out.get("output_type") == "error":
                problems.append(f"cell {i}: error output {out.get('ename', '?')}: {out.get('evalue', '')}")
    return problems


def check_notebook(path: str | Path) -> list[str]:
    """Problems found in one notebook: volatile metadata left in, or error outputs."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path}: cannot read notebook: {exc}"]
    problems = [f"{path}: {p}" for p in error_outputs(nb)]
    if clean_notebook_dict(nb) != nb:
        problems.append(f"{path}: volatile metadata present (run tools/clean_notebooks.py)")
    return problems


def clean_file(path: str | Path) -> bool:
    """Clean in place; True when the file changed."""
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    cleaned = clean_notebook_dict(nb)
    if cleaned == nb:
        return False
    path.write_text(_dumps(cleaned), encoding="utf-8")
    return True


def find_notebooks() -> list[Path]:
    skip = {".venv", ".ipynb_checkpoints", ".git", "node_modules"}
    return sorted(p for p in ROOT.rglob("*.ipynb") if not skip.intersection(p.relative_to(ROOT).parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Strip volatile metadata from notebooks.")
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--check", action="store_true", help="only report; exit 1 if anything is wrong")
    args = ap.parse_args(argv)
    paths = args.paths or find_notebooks()
    if args.check:
        problems = [p for path in paths for p in check_notebook(path)]
        for p in problems:
            print(p)
        return 1 if problems else 0
    for path in paths:
        if clean_file(path):
            print(f"cleaned {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
