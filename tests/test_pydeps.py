"""Python scripts with dependencies, through real servers and workers, with real packages
from the index reachable here (small pure-Python ones: six, idna): the dependency job
resolves the lock, the worker installs it once into its cache, and jobs import it, on
every backend, without being able to change it."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from support import SLOWDOWN, wait_done

PROFILE = """
name: {name}
tags: [{tag}]
backend: {{kind: {kind}}}
subworkers: 2
"""

SIX = "import six\n\n\ndef main():\n    return six.__version__\n"


@pytest.fixture()
def pydeps_dir():
    """A cache root of this test's own, where every backend's jobs can see it (the process
    backend masks /tmp, where pytest's tmp_path is)."""
    d = Path("/var/cache/sandmill/test-pydeps") / uuid.uuid4().hex[:10]
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _cluster(make_cluster, pydeps_dir, kind="process", workers=1):
    c = make_cluster(env={"SANDMILL_PYDEPS_DIR": str(pydeps_dir)})
    tag = f"deps-{uuid.uuid4().hex[:6]}"
    for _ in range(workers):
        c.start_worker(profile_text=PROFILE.format(name=tag, tag=tag, kind=kind))
    c.wait_workers(tag, count=workers)
    return c, tag


def _create(api, ws, path, content, tag):
    r = api.post(f"/api/w/{ws}/scripts/create",
                 json={"path": path, "content": content, "language": "python3", "tag": tag})
    assert r.status_code == 201, r.text
    return r.text


def _script(api, ws, h):
    return api.get(f"/api/w/{ws}/scripts/get/h/{h}").json()


def _run(api, ws, h, timeout=60):
    jid = api.post(f"/api/w/{ws}/jobs/run/h/{h}", json={}).text
    return wait_done(api, ws, jid, timeout=timeout * SLOWDOWN)


def _dependency_job(api, ws, h):
    s = _script(api, ws, h)
    assert s["lock_job"], s
    return wait_done(api, ws, s["lock_job"], timeout=120 * SLOWDOWN)


def _envs(pydeps_dir: Path) -> list[str]:
    return sorted(p.name for p in (pydeps_dir / "envs").iterdir())


@pytest.mark.parametrize("kind", ["process", "nsjail", "docker"])
def test_a_script_importing_a_package_runs(make_cluster, pydeps_dir, ws, kind):
    """scripts/create queues a dependency job whose result and scripts/get show the lock;
    the script's jobs import the package from the env mounted read-only, and a second job
    reuses the env: nothing more is resolved or installed."""
    c, tag = _cluster(make_cluster, pydeps_dir, kind)
    with c.client() as api:
        h = _create(api, ws, "f/deps/six", SIX, tag)
        dep = _dependency_job(api, ws, h)
        assert dep["success"], dep
        assert dep["job_kind"] == "dependency"
        assert dep["result"]["requirements"] == ["six"]
        assert "six==" in dep["result"]["lock"] and "--hash=sha256:" in dep["result"]["lock"]
        assert "resolving the requirements" in dep["logs"] and "installed" in dep["logs"], dep["logs"]
        s = _script(api, ws, h)
        assert s["lock_status"] == "ready" and s["lock"] == dep["result"]["lock"]
        assert s["requirements"] == "six\n"
        first, second = _run(api, ws, h), _run(api, ws, h)
    for j in (first, second):
        assert j["success"], j
        # process and nsjail: the warm job process binds the env from under the mount root
        # (isolation/zygote.py); docker starts a container per job
        assert j["outcome"]["warm"] is (kind != "docker"), j["outcome"]
        assert j["result"].count(".") >= 1, j["result"]
        assert "installing" not in j["logs"] and "resolving" not in j["logs"], j["logs"]
    assert _envs(pydeps_dir) == [dep["result"]["environment"]]


def test_a_job_cannot_write_into_the_environment(make_cluster, pydeps_dir, ws):
    code = (
        "import os\nimport six\n\n\ndef main():\n"
        "    env = os.path.dirname(six.__file__)\n"
        "    out = {}\n"
        "    for what, f in (('append', lambda: open(six.__file__, 'a')),\n"
        "                    ('create', lambda: open(os.path.join(env, 'evil.py'), 'w')),\n"
        "                    ('mkdir', lambda: os.mkdir(os.path.join(env, 'evil'))),\n"
        "                    ('chmod', lambda: os.chmod(six.__file__, 0o777))):\n"
        "        try:\n            f()\n            out[what] = 'done'\n"
        "        except OSError as e:\n            out[what] = type(e).__name__\n"
        "    return out\n")
    c, tag = _cluster(make_cluster, pydeps_dir)
    with c.client() as api:
        h = _create(api, ws, "f/deps/write", code, tag)
        assert _dependency_job(api, ws, h)["success"]
        j = _run(api, ws, h)
    assert j["success"], j
    assert "done" not in j["result"].values(), j["result"]
    env = pydeps_dir / "envs" / _envs(pydeps_dir)[0]
    assert not (env / "evil.py").exists() and not (env / "evil").exists()


def test_a_bad_package_fails_clearly(make_cluster, pydeps_dir, ws):
    """An unknown distribution: the dependency job fails with the resolver's message, the
    script version records it, and the script's jobs fail with it."""
    bad = "sandmill-no-such-package-" + uuid.uuid4().hex[:8]
    code = f"# requirements:\n# {bad}\n\ndef main():\n    return 1\n"
    c, tag = _cluster(make_cluster, pydeps_dir)
    with c.client() as api:
        h = _create(api, ws, "f/deps/bad", code, tag)
        dep = _dependency_job(api, ws, h)
        assert not dep["success"], dep
        assert dep["result"]["error"]["name"] == "DependencyResolutionFailed"
        assert bad in dep["result"]["error"]["message"], dep["result"]
        s = _script(api, ws, h)
        assert s["lock_status"] == "failed" and bad in s["lock_error"], s
        j = _run(api, ws, h)
    assert not j["success"], j
    assert j["result"]["error"]["name"] == "DependencyResolutionFailed", j["result"]
    assert bad in j["result"]["error"]["message"]


def test_a_new_version_with_another_requirement_gets_a_new_environment(make_cluster, pydeps_dir, ws):
    c, tag = _cluster(make_cluster, pydeps_dir)
    results, envs = [], []
    with c.client() as api:
        for pin in ("1.16.0", "1.17.0"):
            h = _create(api, ws, "f/deps/pinned", f"# requirements:\n# six=={pin}\n\n" + SIX, tag)
            dep = _dependency_job(api, ws, h)
            assert dep["success"], dep
            envs.append(dep["result"]["environment"])
            results.append(_run(api, ws, h)["result"])
        # the path's live version is the newest
        live = api.get(f"/api/w/{ws}/scripts/get/p/f/deps/pinned").json()
    assert results == ["1.16.0", "1.17.0"]
    assert envs[0] != envs[1] and _envs(pydeps_dir) == sorted(envs)
    assert "six==1.17.0" in live["lock"]


def test_jobs_claimed_before_their_dependency_job_wait_for_the_lock(make_cluster, pydeps_dir, ws):
    """Jobs pushed right after scripts/create, on two workers: whichever runs first
    resolves; every job runs with the one lock recorded, and the lock is installed once."""
    c, tag = _cluster(make_cluster, pydeps_dir, workers=2)
    code = "# requirements:\n# idna\n\nimport idna\n\n\ndef main(i):\n    return idna.encode('bücher.example').decode()\n"
    with c.client() as api:
        h = _create(api, ws, "f/deps/race", code, tag)
        ids = [api.post(f"/api/w/{ws}/jobs/run/h/{h}", json={"i": i}).text for i in range(6)]
        jobs = [wait_done(api, ws, j, timeout=120 * SLOWDOWN) for j in ids]
        dep = _dependency_job(api, ws, h)
    assert all(j["success"] and j["result"] == "xn--bcher-kva.example" for j in jobs), jobs
    assert dep["success"], dep
    assert len(_envs(pydeps_dir)) == 1
    installs = sum(j["logs"].count("[sandmill] installed ") for j in [*jobs, dep])
    assert installs == 1, [j["logs"] for j in [*jobs, dep]]


def test_previews_resolve_too(make_cluster, pydeps_dir, ws):
    c, tag = _cluster(make_cluster, pydeps_dir)
    with c.client() as api:
        r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                     json={"content": "import idna\n\n\ndef main():\n    return idna.decode('xn--bcher-kva')\n",
                           "language": "python3"})
        j = wait_done(api, ws, r.text, timeout=120 * SLOWDOWN)
        bad = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                       json={"content": "# requirements:\n# --index-url http://evil/\n\ndef main():\n    return 1\n",
                             "language": "python3"})
    assert j["success"] and j["result"] == "bücher", j
    assert "resolving the requirements" in j["logs"], j["logs"]
    assert bad.status_code == 400 and "requirements" in bad.json()["error"], bad.text


@pytest.mark.timeout(180)
def test_the_benchmark_runs_quick():
    import json
    import subprocess
    import sys

    from support import REPO

    p = subprocess.run([sys.executable, "-m", "bench.pydeps", "--quick"], cwd=REPO,
                       capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(p.stdout.strip().splitlines()[-1])["rows"]
    assert set(rows) == {"no deps", "first job of a new lock", "later jobs"}
    assert rows["later jobs"]["warm"] == rows["later jobs"]["n"]  # process: warm with its env
