"""Packaging invariants: pyproject groups, poetry.lock hygiene, requirements/*.txt == lock."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCKFILE = ROOT / "poetry.lock"
REQ_DIR = ROOT / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def _lock() -> dict:
    return tomllib.loads(LOCKFILE.read_text(encoding="utf-8"))


def _locked_versions() -> dict[str, set[str]]:
    versions: dict[str, set[str]] = {}
    for pkg in _lock()["package"]:
        versions.setdefault(_canon(pkg["name"]), set()).add(pkg["version"])
    return versions


def _requirement_files() -> list[Path]:
    return sorted(REQ_DIR.glob("*.txt"))


def test_pyproject_metadata_and_groups():
    data = _pyproject()
    project = data["project"]
    assert project["name"] == "gpt2-training"
    assert project["requires-python"] == ">=3.10,<3.14"
    deps = {_canon(re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    for required in (
        "torch",
        "transformers",
        "datasets",
        "accelerate",
        "tokenizers",
        "safetensors",
        "numpy",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "pyyaml",
    ):
        assert required in deps, required
    groups = data["dependency-groups"]
    for group, members in {
        "full-finetuning": {"deeplake", "bitsandbytes", "wandb"},
        "dev": {
            "pytest",
            "nbval",
            "ruff",
            "jupyterlab",
            "ipykernel",
            "nbformat",
            "nbconvert",
            "pytest-timeout",
        },
        "deepspeed": {"deepspeed"},
    }.items():
        names = {_canon(re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0]) for d in groups[group]}
        assert members <= names, (group, members - names)
    assert data["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def _pip_index_hosts() -> set[str]:
    """Hosts of the package indexes pip is configured with here (read at run time)."""
    lock_py = _load_lock_py()
    hosts = {urlsplit(lock_py.pip_index_url()).hostname}
    extra = os.environ.get("PIP_EXTRA_INDEX_URL", "")
    hosts |= {urlsplit(u).hostname for u in extra.split()}
    return {h for h in hosts if h}


def _load_lock_py():
    spec = importlib.util.spec_from_file_location("_gpt2_lock_tool", ROOT / "tools" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lock_has_no_registry_host():
    text = LOCKFILE.read_text(encoding="utf-8")
    assert "[package.source]" not in text
    assert not re.search(r"^url\s*=", text, flags=re.M)
    for pkg in _lock()["package"]:
        assert "source" not in pkg, pkg["name"]
    # no index / download URLs at all (package descriptions may contain project homepages)
    urls = re.findall(r"\b(?:https?|file)://[^\s\"']+", text)
    index_like = [u for u in urls if re.search(r"/simple\b|/packages/|\.whl\b|\.tar\.gz\b|/files/", u)]
    assert not index_like, index_like
    lowered = text.lower()
    for host in _pip_index_hosts():
        assert host.lower() not in lowered, f"poetry.lock mentions the index host {host}"


def test_lock_metadata_and_torch_pin():
    lock = _lock()
    assert lock["metadata"]["lock-version"].startswith("2.")
    torch_versions = _locked_versions()["torch"]
    assert torch_versions == {"2.13.0"}
    groups = {g for pkg in lock["package"] for g in pkg.get("groups", [])}
    assert {"main", "dev", "full-finetuning", "deepspeed"} <= groups


def test_requirement_files_exist():
    names = {p.name for p in _requirement_files()}
    assert {"lock.txt", "dev.txt", "full-finetuning.txt"} <= names


@pytest.mark.parametrize("path", _requirement_files(), ids=lambda p: p.name)
def test_requirements_match_lock(path: Path):
    locked = _locked_versions()
    seen = set()
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert "--hash" not in line, f"{path.name}:{lineno}: hashes are not used"
        m = PIN.match(line)
        assert m, f"{path.name}:{lineno}: not an exact pin: {raw!r}"
        name, version = _canon(m.group(1)), m.group(2)
        assert name not in seen, f"{path.name}:{lineno}: {name} pinned twice"
        seen.add(name)
        assert name in locked, f"{path.name}:{lineno}: {name} is not in poetry.lock"
        assert version in locked[name], f"{path.name}:{lineno}: {name}=={version}, lock has {locked[name]}"
    assert seen, f"{path.name} pins nothing"


def test_lock_txt_is_cpu_only_and_has_runtime_roots():
    pins = {
        _canon(line.split("==")[0])
        for line in (REQ_DIR / "lock.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    }
    assert {"torch", "transformers", "datasets", "numpy", "pyyaml"} <= pins
    assert not {p for p in pins if p.startswith(("nvidia-", "cuda-")) or p == "triton"}


def test_requirements_are_fresh():
    """requirements/*.txt are what tools/lock.py exports from the current poetry.lock."""
    if sys.platform != "linux" or sys.version_info[:2] != (3, 11):
        pytest.skip("requirements/*.txt are exported for linux / python 3.11")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "lock.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _poetry_command() -> list[str] | None:
    if importlib.util.find_spec("poetry") is not None:
        return [sys.executable, "-m", "poetry"]
    venv_poetry = Path(sys.executable).parent / "poetry"
    if venv_poetry.exists():
        return [str(venv_poetry)]
    found = shutil.which("poetry")
    return [found] if found else None


def test_poetry_check_lock():
    cmd = _poetry_command()
    if cmd is None:
        pytest.skip("poetry is not installed in this environment (only needed to re-lock)")
    proc = subprocess.run(
        [*cmd, "check", "--lock"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "POETRY_NO_INTERACTION": "1",
            "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
        },
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is in the dev group (make install)"
)
def test_code_passes_the_linter_and_formatter():
    """`make lint`'s two checks over the Makefile's LINT_PATHS, so that `make test` (what CI runs) catches drift."""
    paths = re.search(r"^LINT_PATHS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    for check in (["check"], ["format", "--check"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *check, *paths], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, f"ruff {' '.join(check)}:\n{done.stdout}{done.stderr}"
