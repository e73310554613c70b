"""The wheel built from the repository, installed into a fresh virtual environment outside
the checkout: one `sandmill` namespace (no top-level server, worker, isolation), the
profiles and migrations shipped as package data, and `sandmill up` running a job."""

from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from support import REPO, SLOWDOWN, free_port


def _sh(*argv: str, cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{argv}: {r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the repository's files (tracked and new, not ignored), built from a copy
    so that the build leaves nothing in the checkout."""
    src = tmp_path_factory.mktemp("src")
    files = _sh("git", "ls-files", "-co", "--exclude-standard", cwd=REPO).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((REPO / f).read_bytes())
    out = tmp_path_factory.mktemp("dist")
    _sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src), cwd=src)
    return next(out.glob("sandmill-*.whl"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A new venv with the wheel. Its dependencies come from this interpreter's site-packages
    (no download), put on its path by a .pth line: that adds the folders without running
    their own .pth files, so the checkout's editable install stays out of it."""
    d = tmp_path_factory.mktemp("venv")
    _sh(sys.executable, "-m", "venv", str(d), cwd=d)
    site_dir = Path(_sh(str(d / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                        cwd=d).stdout.strip())
    (site_dir / "_sandmill_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _sh(str(d / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel), cwd=d)
    return d


def test_the_wheel_holds_one_namespace_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"sandmill"}, tops
    for needed in ("sandmill/profiles/default.yaml", "sandmill/profiles/native.yaml",
                   "sandmill/store/migrations/0001_init.sql", "sandmill/worker/templates/python_wrapper.py",
                   "sandmill/isolation/zygote.py", "sandmill/cli.py"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("sandmill/tests", "sandmill/bench"))]
    # every module of the mapped folders made it in (a new sub-package must be listed in
    # pyproject's packages: the editable install finds it anyway, the wheel does not)
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in tool["package-dir"].items():
        for f in (REPO / folder).rglob("*.py"):
            rel = f.relative_to(REPO / folder)
            inside = [p for p in tool["package-dir"] if p != package and p.startswith(package + ".")
                      and f.is_relative_to(REPO / tool["package-dir"][p])]
            if not inside and "templates" not in rel.parts:
                assert "/".join([*package.split("."), *rel.parts]) in names, f"{f} is not in the wheel"


def test_installed_outside_the_checkout(venv, tmp_path):
    py = str(venv / "bin" / "python")
    where = _sh(py, "-c", "import sandmill.server.app, sandmill; print(sandmill.__file__)", cwd=tmp_path).stdout
    assert str(venv) in where, where
    for name in ("server", "worker", "isolation", "store", "profiles"):
        r = subprocess.run([py, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (name, r.stderr)
    r = _sh(str(venv / "bin" / "sandmill"), "profiles", "check", cwd=tmp_path)
    for name in ("default", "native", "gpu", "highmem"):
        assert f"{name}.yaml: ok (group {name}" in r.stdout, r.stdout
    assert str(venv) in r.stdout, r.stdout


def test_sandmill_up_from_the_wheel_runs_a_job(venv, tmp_path):
    port = free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SANDMILL_ADMIN_TOKEN")}
    log = open(tmp_path / "up.log", "w+")
    p = subprocess.Popen([str(venv / "bin" / "sandmill"), "up", "--data-dir", str(data), "--port", str(port),
                          "--workers", "1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60 * SLOWDOWN
        while True:
            assert p.poll() is None and time.time() < deadline, (tmp_path / "up.log").read_text()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        token = (data / "admin_token").read_text().strip()
        body = {"language": "python3", "content": "def main(x):\n    return {'twice': 2 * x}\n", "args": {"x": 21}}
        r = httpx.post(base + "/api/w/main/jobs/run_wait_result/preview", json=body, timeout=60 * SLOWDOWN,
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == {"twice": 42}, (r.status_code, r.text)
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    out = (tmp_path / "up.log").read_text()
    assert "sandmill is up" in out
    # a quiet start: the embedded PostgreSQL's chatter is in its log file, not on the console
    assert "initdb" not in out and "pg_ctl" not in out and "Running commandline" not in out, out
    assert "pg_ctl" in (data / "pgserver.log").read_text()
