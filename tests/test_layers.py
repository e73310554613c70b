"""The import rule of docs/architecture.md: isolation imports nothing of sandmill; store and
profiles only isolation; server and worker the layers below and not each other; only the
CLI, the supervisor and the local cluster import both. import-linter checks it on a copy of
the packages laid out as installed (it reads the tree on disk, which package-dir maps)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from support import REPO

PACKAGE_DIRS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def installed_view(dest: Path) -> Path:
    """The sandmill packages' .py files under ``dest/sandmill/...``, as a wheel lays them out."""
    for package, folder in sorted(PACKAGE_DIRS.items()):
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for f in (REPO / folder).glob("*.py"):
            shutil.copy(f, target / f.name)
        for sub in (REPO / folder).iterdir():  # sub-packages that live inside a folder
            if sub.is_dir() and (sub / "__init__.py").exists() and f"{package}.{sub.name}" not in PACKAGE_DIRS:
                shutil.copytree(sub, target / sub.name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def lint(view: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=view,
                          env={"PYTHONPATH": str(view), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def view(tmp_path: Path) -> Path:
    return installed_view(tmp_path)


def test_the_layers_hold(view):
    r = lint(view)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout, r.stdout


@pytest.mark.parametrize("module,upward", [
    ("isolation/base.py", "from sandmill.store import db"),
    ("store/db.py", "from sandmill.worker import runtimes"),
    ("worker/runtimes.py", "from sandmill.server import routing"),
    ("server/monitor.py", "import sandmill.cli"),
])
def test_an_upward_import_breaks_the_rule(view, module, upward):
    folder, name = module.split("/")
    package = next(p for p, f in PACKAGE_DIRS.items() if f == folder)
    target = view.joinpath(*package.split("."), name)
    target.write_text(target.read_text() + f"\n{upward}  # an upward import\n")
    r = lint(view)
    assert r.returncode != 0, r.stdout
    assert "BROKEN" in r.stdout and upward.split()[1] in r.stdout, r.stdout


def test_no_module_imports_a_folder_by_its_checkout_name():
    """`import server` works in a checkout (its folder is on the path) but not once installed:
    every import of sandmill's own code goes through the sandmill namespace."""
    folders = {f for f in PACKAGE_DIRS.values() if f != "sandmill"}
    bad = []
    for folder in [*PACKAGE_DIRS.values(), "tests", "bench"]:
        for f in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                         else [])
                bad += [f"{f.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in folders]
    assert not bad, "\n".join(bad)
