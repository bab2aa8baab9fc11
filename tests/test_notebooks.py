"""The tutorial notebooks under 01-Full-Fine-Tuning/: each executes end to end on the tiny profile under nbval
(lax mode: only cells marked `# NBVAL_CHECK_OUTPUT` are compared with the committed outputs), and each committed
notebook is clean: no volatile metadata, no error outputs, its outputs' profile and hardware stated up front."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "01-Full-Fine-Tuning").glob("*.ipynb"))
NB_IDS = [p.name for p in NOTEBOOKS]
NBVAL_TIMEOUT_S = (
    900  # the tiny profile needs ~1 minute of compute; a shared 2-core machine can be much slower
)


def _cleaner():
    spec = importlib.util.spec_from_file_location("clean_notebooks", ROOT / "tools" / "clean_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _text(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _output_text(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        text = out.get("text") or out.get("data", {}).get("text/plain", "")
        parts.append("".join(text) if isinstance(text, list) else text)
    return "".join(parts)


def test_there_is_a_tutorial_notebook():
    assert "GPT-2-From-Scratch.ipynb" in NB_IDS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_committed_notebook_is_clean(path):
    """No volatile metadata (run tools/clean_notebooks.py) and no output of a cell that crashed."""
    assert _cleaner().check_notebook(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_only_the_settings_cell_looks_at_the_environment(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    settings = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(settings) == 1 and code[0] is settings[0], (
        "the first code cell, and only it, is tagged `parameters`"
    )
    assert "choose_profile(" in _text(settings[0])
    env_probe = re.compile(r"os\.environ|getenv|cuda\.is_available|GPT2_TUTORIAL_|platform\.|socket\.")
    offenders = [_text(c)[:60] for c in code[1:] if env_probe.search(_text(c))]
    assert offenders == [], f"cells other than the settings cell branch on the environment: {offenders}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_committed_outputs_state_their_profile_and_hardware(path):
    """The first cell names the profile and the hardware that the settings cell's committed output reports."""
    cells = _cells(path)
    intro = _text(cells[0])
    settings = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    out = _output_text(settings)
    profile = re.search(r"^profile: (\S+)", out, re.M)
    hardware = re.search(r"^hardware: (.+)$", out, re.M)
    assert profile and hardware, "the committed notebook has no output from its settings cell: execute it"
    assert f"`{profile.group(1)}` profile" in intro and hardware.group(1).split(",")[0] in intro
    assert all(c.get("outputs") for c in cells if c["cell_type"] == "code"), (
        "every code cell has committed output"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("nbval") is None, reason="nbval is not installed (dev dependencies)"
)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_notebook_executes_on_the_tiny_profile(path, env, tmp_path):
    """Every cell runs without error on the tiny profile, and the `# NBVAL_CHECK_OUTPUT` cells (parameter counts,
    tokenizer round trip, config validation) print exactly what the committed notebook shows."""
    run_env = {**env, "GPT2_TUTORIAL_PROFILE": "tiny", "GPT2_TUTORIAL_OUTPUT_DIR": str(tmp_path / "runs")}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--nbval-lax",
        "--nbval-cell-timeout",
        "600",
        "-p",
        "no:cacheprovider",
        "-q",
        str(path),
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=NBVAL_TIMEOUT_S)
    took = time.monotonic() - start
    assert proc.returncode == 0, (
        f"nbval failed after {took:.0f}s:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    )
    print(f"{path.name}: executed on the tiny profile in {took:.0f}s")
