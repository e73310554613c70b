"""Python dependencies without a cluster: the requirements parser and its import map,
the installer's environment, and the environment cache on disk with real installs
(uv, the index reachable here): install once across racing processes, sealed against
jobs, LRU eviction that spares what a job holds."""

from __future__ import annotations

import multiprocessing
import os
import stat
import sys

import pytest

from sandmill.store.requirements import (RequirementsError, distribution_of, imported_modules,
                                         requirements_block, requirements_of, requirements_text)
from sandmill.worker.pydeps import tools
from sandmill.worker.pydeps.envcache import EnvCache

TARGET = tools.Target("%d.%d" % sys.version_info[:2], os.uname().machine)


# ---- the parser ------------------------------------------------------------------------

def test_the_block_comes_first_and_ends_at_the_first_other_line():
    code = ("import yaml\n# requirements:\n# six==1.17.0\n#   idna>=3,<4  # the IDNA codec\n"
            "#requests[socks] ; python_version >= '3.8'\n\n# pandas\ndef main(): pass\n")
    assert requirements_block(code) == ["six==1.17.0", "idna>=3,<4",
                                         "requests[socks] ; python_version >= '3.8'"]
    assert requirements_of(code) == requirements_block(code)  # the imports are not looked at
    assert requirements_of("# requirements:\n\nimport six\n") == []  # an empty block: nothing


@pytest.mark.parametrize("line", ["--index-url http://evil/simple", "-r /etc/shadow",
                                  "six @ file:///etc/passwd", "git+https://x/y.git", "./local",
                                  "six; import os", "/abs/path.whl"])
def test_options_paths_and_urls_are_refused_naming_the_line(line):
    with pytest.raises(RequirementsError, match=r"line 3 of the # requirements: block"):
        requirements_block(f"x = 1\n# requirements:\n# {line}\n")


def test_imports_map_to_distributions_without_the_standard_library():
    code = ("import os, sys, json\nimport yaml\nfrom bs4 import BeautifulSoup\nimport PIL.Image\n"
            "from sklearn.linear_model import X\nimport cv2\nfrom dateutil import parser\n"
            "import requests.adapters\nfrom . import sibling\nfrom __future__ import annotations\n"
            "def main():\n    import six\n    from collections import abc\n")
    assert imported_modules(code) == sorted(["os", "sys", "json", "yaml", "bs4", "PIL", "sklearn",
                                             "cv2", "dateutil", "requests", "__future__", "six",
                                             "collections"])
    assert requirements_of(code) == ["beautifulsoup4", "opencv-python", "Pillow", "python-dateutil",
                                     "PyYAML", "requests", "scikit-learn", "six"]
    assert distribution_of("asyncio") is None and distribution_of("tomllib") is None
    assert requirements_text([]) is None and requirements_text(["a", "b"]) == "a\nb\n"


def test_a_script_that_does_not_parse_needs_nothing():
    assert requirements_of("import six\ndef main(:\n") == []


# ---- the installer's environment ----------------------------------------------------------

def test_pip_settings_are_given_to_uv_and_uv_settings_win():
    env = tools.installer_env({"PIP_INDEX_URL": "https://mirror/simple", "PIP_CERT": "/ca.pem",
                               "PIP_EXTRA_INDEX_URL": "https://extra/simple"})
    assert env["UV_INDEX_URL"] == "https://mirror/simple" and env["SSL_CERT_FILE"] == "/ca.pem"
    assert env["UV_EXTRA_INDEX_URL"] == "https://extra/simple"
    env = tools.installer_env({"PIP_INDEX_URL": "https://a/simple", "UV_INDEX_URL": "https://b/simple",
                               "SSL_CERT_FILE": "/own.pem", "PIP_CERT": "/ca.pem"})
    assert env["UV_INDEX_URL"] == "https://b/simple" and env["SSL_CERT_FILE"] == "/own.pem"


def test_the_index_of_the_workers_environment_is_the_one_used(monkeypatch):
    """PIP_INDEX_URL (a private index or proxy) reaches the resolver: pointed at a port
    nothing listens on, resolving fails there, with the tool's own message."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("UV_INDEX_URL", raising=False)
    monkeypatch.delenv("UV_DEFAULT_INDEX", raising=False)
    with pytest.raises(tools.ToolError, match="uv pip compile .*failed") as e:
        tools.resolve("six\n", TARGET)
    assert "127.0.0.1" in str(e.value)


def test_pip_is_the_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("SANDMILL_PYDEPS_TOOL", "pip")
    lock, _ = tools.resolve("six==1.17.0\n", TARGET)
    assert lock.startswith("six==1.17.0 \\\n    --hash=sha256:"), lock
    tools.install(lock, TARGET, str(tmp_path / "env"))
    assert (tmp_path / "env" / "six.py").is_file()


# ---- the cache on disk ------------------------------------------------------------------

@pytest.fixture()
def cache(tmp_path) -> EnvCache:
    return EnvCache(root=tmp_path / "pydeps")


def _hold_once(root: str, lock: str, start, out) -> None:
    c = EnvCache(root=root)
    start.wait()
    held = c.hold(lock, TARGET)
    out.put((held.installed, held.path))
    held.release()


def test_racing_workers_install_a_lock_once(cache):
    lock, _, _ = cache.resolve("six==1.17.0\n", TARGET)
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_hold_once, args=(str(cache.root), lock, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(installed for installed, _ in got) == 1, got
    assert len({path for _, path in got}) == 1
    assert os.listdir(cache.root / "envs") == [cache.key(lock, TARGET)]


def test_an_environment_is_sealed_and_reused(cache):
    lock, _, reused = cache.resolve("six==1.17.0\n", TARGET)
    assert not reused and cache.resolve("six==1.17.0\n", TARGET)[2]  # the host's resolution
    held = cache.hold(lock, TARGET)
    held.release()
    assert held.installed and cache.installs == 1
    for dirpath, dirnames, filenames in os.walk(held.path):
        for name in [*dirnames, *filenames, "."]:
            st = os.lstat(os.path.join(dirpath, name))
            assert not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH), (dirpath, name, oct(st.st_mode))
    again = cache.try_hold(cache.key(lock, TARGET))
    assert again is not None and again.path == held.path
    again.release()
    assert cache.installs == 1


def test_eviction_removes_the_least_recently_used_env_no_job_holds(cache):
    locks = [cache.resolve(f"six=={v}\n", TARGET)[0] for v in ("1.15.0", "1.16.0", "1.17.0")]
    helds = []
    for i, lock in enumerate(locks):
        h = cache.hold(lock, TARGET)
        os.utime(cache.root / "meta" / f"{h.key}.flock", (1000 + i, 1000 + i))  # oldest first
        helds.append(h)
    helds[1].release()
    helds[2].release()
    cache.max_bytes = 1  # everything is over the limit
    removed = cache.evict()
    # the oldest is held by a job: kept; the others go, oldest first
    assert removed == [helds[1].key, helds[2].key]
    assert os.listdir(cache.root / "envs") == [helds[0].key]
    helds[0].release()
    assert cache.evict() == [helds[0].key]
    # an evicted env is installed again when a job needs it
    again = cache.hold(locks[0], TARGET)
    assert again.installed and os.path.isfile(os.path.join(again.path, "six.py"))
    again.release()
